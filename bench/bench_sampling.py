"""Sampler hot paths.

1. One sampler step on 16x16x4096 (a batch of paper patches) and 512x512: fastds' fused CPU
   path (C++/OpenMP, one pass) vs the unfused torch reference vs diffusers'
   ``DDPMScheduler.step`` (the common peer) vs a memory copy of the same bytes. Every provider
   gets the same noise tensor where it takes one (diffusers draws its own, which is part of
   what a user pays for it). Bytes that must move: model output, x_t, noise read, x_{t-1}
   written.
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
@pytest.mark.parametrize("provider", ["memcpy", "ref", "cpu", "torch_fused", "diffusers"])
def test_sampler_step(benchmark, record, shape_name, provider):
    shape = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    m, x, z = (torch.randn(shape, generator=g) for _ in range(3))
    plan = make_plan("ddpm", T=1000, steps=200, prediction="epsilon")
    i = 100
    coef = plan.coef[i]
    nbytes = 4 * x.numel() * 4
    benchmark.group = f"DDPM step {shape_name} (epsilon prediction, with noise)"
    out = torch.empty_like(x)
    if provider == "memcpy":
        # the same 4 tensors' worth of traffic: read m and x, write two outputs
        a, b = torch.empty_like(x), torch.empty_like(x)
        benchmark(lambda: (a.copy_(m), b.copy_(x)))
        record(benchmark, benchmark.group, provider, nbytes=nbytes)
        return
    if provider == "ref":
        fn = lambda: fused_step_ref(m, x, coef, noise=z)  # noqa: E731
    elif provider == "cpu":
        want, _ = fused_step_ref(m, x, coef, noise=z)
        torch.testing.assert_close(fused_step(m, x, coef, noise=z, backend="cpu"), want)
        fn = lambda: fused_step(m, x, coef, noise=z, out=out, backend="cpu")  # noqa: E731
    elif provider == "torch_fused":
        fn = lambda: fused_step(m, x, coef, noise=z, out=out, backend="torch")  # noqa: E731
    else:
        diffusers = pytest.importorskip("diffusers")
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="epsilon", clip_sample=False)
        sched.set_timesteps(200)
        t = sched.timesteps[i]
        gen = torch.Generator().manual_seed(1)
        fn = lambda: sched.step(m, t, x, generator=gen).prev_sample  # noqa: E731
    benchmark(fn)
    record(benchmark, benchmark.group, provider, nbytes=nbytes)


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
