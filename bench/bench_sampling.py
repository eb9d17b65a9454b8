"""Sampler hot paths.

1. One DDPM step on 16x16x4096 (a batch of paper patches) and 512x512, the same work for
   every provider: draw the step's noise from its own generator, then update. fastds' fused
   CPU path (``torch.randn`` into a buffer, then C++/OpenMP in one pass) vs the unfused torch
   reference and torch's own vectorised form (each drawing its noise the same way) vs
   diffusers' ``DDPMScheduler.step`` (the peer, which draws its noise inside ``step``), at the
   same thread count. ``cpu_rng`` draws the noise inside the C++ kernel instead (Philox, the
   stream of the Triton kernel's ``randn4x``; a new step, so new noise, every call): no noise
   buffer, three tensors moved. Ratios are printed against diffusers. ``memcpy`` is a torch
   copy, on the same threads, of the bytes the host-noise path moves (noise written, then m,
   x and the noise read and x_{t-1} written: five tensors).
2. The transfer-feature cache: conditioning computed once per patch vs recomputed at every
   diffusion step (the reference code's recipe), same model and patches.
"""
import pytest
import torch

from fastds.config import load_config
from fastds.models.conditional import build_model
from fastds.sampling.samplers import make_plan, run_plan
from fastds.sampling.steps import fused_step, fused_step_ref

SHAPES = {"16x16x4096": (4096, 1, 16, 16), "512x512": (1, 1, 512, 512)}


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["memcpy", "ref", "cpu", "cpu_rng", "torch_fused", "diffusers"])
def test_sampler_step(benchmark, record, shape_name, provider):
    shape = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    m, x = (torch.randn(shape, generator=g) for _ in range(2))
    plan = make_plan("ddpm", T=1000, steps=200, prediction="epsilon")
    i = 100
    coef = plan.coef[i]
    nbytes = 5 * x.numel() * 4
    benchmark.group = f"DDPM step {shape_name} (epsilon prediction, each draws its own noise)"
    out, z = torch.empty_like(x), torch.empty_like(x)
    gen = torch.Generator().manual_seed(1)

    def noise():
        return torch.randn(shape, generator=gen, out=z)

    if provider == "memcpy":
        src = torch.empty(int(2.5 * x.numel()))
        dst = torch.empty_like(src)
        benchmark(lambda: dst.copy_(src))  # 2.5 tensors read + 2.5 written, torch's threads
        record(benchmark, benchmark.group, provider, nbytes=nbytes)
        return
    if provider == "ref":
        fn = lambda: fused_step_ref(m, x, coef, noise=noise())  # noqa: E731
    elif provider == "cpu":
        noise()  # the check reads z: draw into it first (empty_like holds whatever was there)
        want, _ = fused_step_ref(m, x, coef, noise=z)
        torch.testing.assert_close(fused_step(m, x, coef, noise=z, backend="cpu"), want)
        fn = lambda: fused_step(m, x, coef, noise=noise(), out=out, backend="cpu")  # noqa: E731
    elif provider == "cpu_rng":
        # the noise drawn inside the kernel (Philox, Triton's randn4x stream), in parallel
        from fastds.sampling.steps import step_noise_ref
        mean, _ = fused_step_ref(m, x, coef)
        want = mean + float(coef[5]) * torch.from_numpy(step_noise_ref(11, 100, x.numel())).reshape(shape)
        torch.testing.assert_close(fused_step(m, x, coef, seed=11, step=100, backend="cpu"), want,
                                   atol=1e-5, rtol=1e-5)
        steps = iter(range(10 ** 9))
        fn = lambda: fused_step(m, x, coef, seed=11, step=next(steps), out=out, backend="cpu")  # noqa: E731
    elif provider == "torch_fused":
        fn = lambda: fused_step(m, x, coef, noise=noise(), out=out, backend="torch")  # noqa: E731
    else:
        diffusers = pytest.importorskip("diffusers")
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="epsilon", clip_sample=False)
        sched.set_timesteps(200)
        t = sched.timesteps[i]
        # the same update: diffusers' mean equals fastds' (its noise is its own)
        zero = diffusers.DDPMScheduler.from_config(sched.config)
        zero.set_timesteps(200)
        want, _ = fused_step_ref(m, x, coef)
        got = zero.step(m, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        assert torch.allclose((got - want).std(), torch.tensor(float(coef[5])), rtol=0.05)
        fn = lambda: sched.step(m, t, x, generator=gen).prev_sample  # noqa: E731
    benchmark(fn)
    record(benchmark, benchmark.group, provider, nbytes=nbytes, peer=provider == "diffusers")


def _model(t_lag=8):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    return build_model("ddpm", widths=cfg.train.widths, t_lag=t_lag, transfer_widths=cfg.pretrain.widths).eval()


@pytest.mark.parametrize("provider", ["ref", "cached"])
def test_transfer_feature_cache(benchmark, record, provider):
    """20 DDIM steps on 256 patches of 16x16, tiny model; 'ref' recomputes the encoder per step."""
    model = _model()
    g = torch.Generator().manual_seed(0)
    B = 256
    coarse, cov, lags = torch.rand(B, 1, 16, 16, generator=g), torch.rand(B, 6, 16, 16, generator=g), torch.rand(B, 8, 16, 16, generator=g)
    x_T = torch.randn(B, 1, 16, 16, generator=g)
    plan = make_plan("ddim", T=1000, steps=20)
    benchmark.group = "transfer features: cached vs recomputed every step (256 patches x 20 steps)"
    if provider == "cached":
        def fn():
            return run_plan(model, x_T, plan, cond=model.cond(coarse, cov, lags))
    else:
        def fn():
            return run_plan(lambda x, t, c: model(x, t, model.cond(coarse, cov, lags)), x_T, plan)
    torch.testing.assert_close(run_plan(model, x_T, plan, cond=model.cond(coarse, cov, lags)),
                               run_plan(lambda x, t, c: model(x, t, model.cond(coarse, cov, lags)), x_T, plan))
    benchmark.pedantic(fn, rounds=3, iterations=1)
    record(benchmark, benchmark.group, provider, items=B * 20, unit="patch-steps")
