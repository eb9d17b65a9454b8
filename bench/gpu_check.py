"""The device checks that need a GPU, in one script (``bash bench/gpu_check.sh``).

1. A two-day bf16 comparison of the graphed sampler against the eager loop, for both fusion
   modes, with a deterministic sampler (DDIM, eta = 0: the graphs' in-kernel noise would
   otherwise differ from the eager draws by design). Day 2 replays graphs captured on day 1,
   which is where a graph that recorded autocast's freed weight cache would go wrong. Then
   ``del model``: the graph cache must be empty.
2. Kernels against their same-work peers on the device: the CUDA stitch vs torch
   gather + ``index_add_``; the Triton fused step vs diffusers' ``DDPMScheduler.step``, each
   drawing its own noise; CUDA-event timing, median of 50.
3. A profiler summary of one graphed and one eager day: host syncs (cudaStreamSynchronize,
   cudaDeviceSynchronize, blocking cudaMemcpy) per sampler step, and the device's idle share.

Prints one JSON line per result, and writes them to ``$OUT/gpu_check.json`` when OUT is set.
On a machine without CUDA it says so and exits 0 having run nothing, so it is safe anywhere.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time

import numpy as np
import torch

RESULTS = []


def emit(**row):
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def _model(cfg):
    from fastds.models.conditional import build_model
    torch.manual_seed(0)
    return build_model("ddpm", widths=cfg.train.widths, target="residual", t_lag=cfg.data.t_lag,
                       transfer_widths=cfg.pretrain.widths).eval().cuda()


def _inputs(t_lag, H, W, seed):
    from fastds.sampling.pipeline import DayInputs
    rng = np.random.default_rng(seed)
    return DayInputs(rng.random((1, H, W), dtype=np.float32), rng.random((6, H, W), dtype=np.float32),
                     rng.random((1, t_lag, H, W), dtype=np.float32))


def graphs_vs_eager(H=357, W=432):
    from fastds.config import load_config
    from fastds.sampling import day as pipeline  # the graph cache lives with the day
    from fastds.sampling.pipeline import downscale_day
    cfg = load_config("tiny")
    for fusion in ("step", "final"):
        base = dataclasses.replace(cfg.sample, members=2, precision="bf16", fusion=fusion, eta=0.0,
                                   sampler="ddim")
        model = _model(cfg)
        pipeline._GRAPHS.clear()
        worst = 0.0
        for day in (0, 1):
            inp = _inputs(cfg.data.t_lag, H, W, day)
            kw = dict(kind="ddpm", T=cfg.diffusion.T, prediction=cfg.diffusion.prediction, members=2,
                      seed=3, day_key=day, device="cuda")
            t0 = time.perf_counter()
            g = downscale_day(model, inp, cfg=dataclasses.replace(base, cuda_graphs=True), **kw)
            torch.cuda.synchronize()
            tg = time.perf_counter() - t0
            t0 = time.perf_counter()
            e = downscale_day(model, inp, cfg=dataclasses.replace(base, cuda_graphs=False), **kw)
            torch.cuda.synchronize()
            te = time.perf_counter() - t0
            diff = float(np.abs(g - e).max())
            worst = max(worst, diff)
            emit(check="graphed_vs_eager_bf16", fusion=fusion, day=day + 1, max_abs_diff=diff,
                 graphed_s=round(tg, 3), eager_s=round(te, 3), cached=len(pipeline._GRAPHS))
        del model
        gc.collect()
        emit(check="graph_cache_after_del_model", fusion=fusion, entries=len(pipeline._GRAPHS._items),
             ok=len(pipeline._GRAPHS._items) == 0)
        emit(check="graphed_equals_eager_within_1e-3", fusion=fusion, ok=worst <= 1e-3, worst=worst)


def _time_cuda(fn, n=50):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return float(np.median(times)), float(np.min(times))


def kernels_vs_peers():
    sys.path.insert(0, os.path.dirname(__file__))
    import fastds
    from bench_stitch import TorchIndexAdd, bytes_moved
    for H, W in ((357, 432), (1428, 1728)):
        starts = fastds.plan_patches((H, W), 16, 4, 2)
        p = torch.rand(len(starts), 16, 16, device="cuda")
        plan = fastds.StitchPlan(starts, (H, W), tile=16, halo=4)
        peer = TorchIndexAdd(starts, 16, 4, H, W)
        peer.src, peer.dst, peer.w, peer.zden = (t.cuda() for t in (peer.src, peer.dst, peer.w, peer.zden))
        ours = plan.stitch(p)
        err = float((ours - peer(p)).abs().max())
        t_ours, _ = _time_cuda(lambda: plan.stitch(p))
        t_peer, _ = _time_cuda(lambda: peer(p))
        nbytes = bytes_moved(starts, 16, 4, H, W)
        emit(check="stitch_cuda_vs_torch_index_add", grid=f"{H}x{W}", ours_ms=t_ours * 1e3,
             peer_ms=t_peer * 1e3, ratio=t_peer / t_ours, gb_s=nbytes / t_ours / 1e9, max_diff=err)
    from fastds.sampling.samplers import make_plan
    plan = make_plan("ddpm", T=1000, steps=200, prediction="epsilon")
    for shape in ((4096, 1, 16, 16), (32, 4, 1440, 1440)):
        _step_case(shape, plan)
        torch.cuda.empty_cache()


def _step_case(shape, plan):
    """The Triton fused step (noise in the kernel, or torch.randn then the step) against
    diffusers' DDPMScheduler.step, each drawing its own noise, on one state shape."""
    import diffusers
    from fastds.sampling.steps import fused_step
    m, x = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    z, out = torch.empty_like(x), torch.empty_like(x)
    gen = torch.Generator(device="cuda").manual_seed(0)
    table = torch.tensor(plan.coef, dtype=torch.float32, device="cuda")
    step = torch.tensor([100], device="cuda")
    seed = torch.tensor([12345], device="cuda")

    def ours_rng():
        return fused_step(m, x, table, step=step, seed=seed, out=out, backend="triton")

    def ours_randn():
        noise = torch.randn(shape, generator=gen, out=z, device="cuda")
        return fused_step(m, x, table, step=step, noise=noise, out=out, backend="triton")

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="epsilon", clip_sample=False)
    sched.set_timesteps(200)
    t = sched.timesteps[100]

    def peer():
        return sched.step(m, t, x, generator=gen).prev_sample

    a, _ = _time_cuda(ours_rng)
    b, _ = _time_cuda(ours_randn)
    c, _ = _time_cuda(peer)
    emit(check="fused_step_vs_diffusers", shape=list(shape), ours_in_kernel_rng_ms=a * 1e3,
         ours_torch_randn_ms=b * 1e3, diffusers_ms=c * 1e3, ratio_in_kernel=c / a, ratio_randn=c / b,
         gb_s=3 * x.numel() * 4 / a / 1e9)


def profile_day(H=357, W=432):
    from torch.profiler import ProfilerActivity, profile
    from fastds.config import load_config
    from fastds.sampling.pipeline import downscale_day
    cfg = load_config("tiny")
    model = _model(cfg)
    inp = _inputs(cfg.data.t_lag, H, W, 0)
    for graphs in (True, False):
        sc = dataclasses.replace(cfg.sample, members=2, precision="bf16", cuda_graphs=graphs)
        kw = dict(kind="ddpm", T=cfg.diffusion.T, prediction=cfg.diffusion.prediction, members=2,
                  seed=0, day_key=0, device="cuda", cfg=sc)
        downscale_day(model, inp, **kw)  # warm-up (captures graphs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            downscale_day(model, inp, **kw)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                         "cudaMemcpy", "cudaEventSynchronize"))
        busy = sum(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
                   for e in events if e.device_type == torch.autograd.DeviceType.CUDA) * 1e-6
        steps = sc.steps * sc.members
        emit(check="profile_day", graphs=graphs, wall_s=round(wall, 3), host_syncs=syncs,
             syncs_per_step=syncs / steps, device_busy_s=round(busy, 3),
             device_idle_share=round(max(0.0, 1 - busy / wall), 3))


def main():
    if not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False: nothing to check on this machine")
        return 0
    emit(check="device", name=torch.cuda.get_device_name(0), torch=torch.__version__)
    for part in (graphs_vs_eager, kernels_vs_peers, profile_day):
        try:
            part()
        except Exception as err:  # report and go on: each part's figures stand alone
            emit(check=part.__name__, error=f"{type(err).__name__}: {err}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_check.json"), "w") as fh:
            json.dump(RESULTS, fh, indent=1)
    return 0 if not any("error" in r or r.get("ok") is False for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
