"""Samplers: pure functions of (model, conditioning, latents, generator, steps).

All three samplers run one loop, :func:`run_plan`, over a :class:`~fastds.sampling.steps.StepPlan`
(the sampler's per-step coefficients). Per step: call the network, draw noise if the step is
noisy (``torch.randn(x.shape, generator=..., dtype=x.dtype, device=x.device)``, after the
model call, in step order), apply the fused update. ``model(x_t, t, cond)`` receives ``t`` as
a long tensor of shape (B,).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..diffusion.schedule import squaredcos_cap_v2
from .steps import StepPlan, ddim_plan, ddpm_plan, dpmpp_plan, fused_step

__all__ = ["sample_ddpm", "sample_ddim", "sample_dpmpp", "run_plan", "alpha_bar_for", "make_plan"]


@functools.lru_cache(maxsize=8)
def alpha_bar_for(T: int) -> np.ndarray:
    """ᾱ of the squared-cosine schedule with T steps, float64 (T,)."""
    return np.cumprod(1.0 - squaredcos_cap_v2(int(T)))


def make_plan(sampler: str, *, T: int, steps=None, prediction="sample", eta=0.0,
              spacing="leading") -> StepPlan:
    if steps is not None and int(steps) < 1:  # 0 must not stand for a default count
        raise ValueError(f"{sampler} plan: steps must be >= 1 (None: the sampler's default), got {steps}")
    ab = alpha_bar_for(T)
    if sampler == "ddpm":
        return ddpm_plan(ab, steps, prediction, spacing)
    if sampler == "ddim":
        return ddim_plan(ab, steps or 50, prediction, eta, spacing)
    if sampler == "dpmpp":
        return dpmpp_plan(ab, steps or 20, prediction, spacing)
    raise ValueError(f"sampler must be 'ddpm', 'ddim' or 'dpmpp', got {sampler!r}")


@torch.no_grad()
def run_plan(model, x_T, plan: StepPlan, *, cond=None, generator=None, clip=None, backend="auto"):
    """The one sampling loop. x_T (B, C, h, w) -> x_0 (B, C, h, w)."""
    x = x_T
    x0_prev = None
    multistep = bool(np.any(plan.coef[:, 4] != 0))
    coef, counter = _step_tables(plan, x, backend)
    for i in range(len(plan)):
        t = torch.full((x.shape[0],), int(plan.timesteps[i]), dtype=torch.long, device=x.device)
        m = model(x, t, cond)                                   # network output at (x_t, t)
        z = (torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
             if plan.noisy[i] else None)                        # fresh noise, only where used
        x0 = torch.empty(x.shape, dtype=x.dtype, device=x.device) if multistep else None
        x = fused_step(m.to(x.dtype), x, plan.coef[i] if coef is None else coef,  # x_{t-1}
                       step=None if counter is None else counter[i:i + 1], noise=z,
                       x0_prev=x0_prev if plan.coef[i][4] else None, clip=clip, x0_out=x0,
                       backend=backend)
        x0_prev = x0                                            # x̂0 kept for 2nd-order steps
    return x


def _step_tables(plan: StepPlan, x, backend):
    """For the Triton step on a GPU: the plan's coefficients and a step counter on the device,
    uploaded once per trajectory (a numpy row per step would be a host-to-device copy and a
    sync every step). (None, None) for the host-side backends."""
    from . import steps
    if x.device.type != "cuda" or (backend if backend != "auto" else steps._auto(x)) != "triton":
        return None, None
    from ..kernels.sampler_step import coef_table
    table = coef_table(torch.from_numpy(plan.coef), x)
    return table, torch.arange(len(plan), dtype=torch.long, device=x.device)


def sample_ddpm(model, x_T, *, T, steps=None, prediction="sample", clip=None, cond=None,
                generator=None, backend="auto"):
    """DDPM ancestral sampling with the semantics of the common ``DDPMScheduler``
    (squaredcos_cap_v2, fixed_small variance, optional x̂0 clipping to ±clip, no noise at the
    last step, "leading" spacing when ``steps < T``). x_T (B, C, h, w) -> (B, C, h, w)."""
    return run_plan(model, x_T, make_plan("ddpm", T=T, steps=steps, prediction=prediction),
                    cond=cond, generator=generator, clip=clip, backend=backend)


def sample_ddim(model, x_T, *, T, steps=50, prediction="sample", eta=0.0, clip=None, cond=None,
                generator=None, backend="auto"):
    """DDIM with η (0: deterministic), leading spacing. x_T (B, C, h, w) -> (B, C, h, w)."""
    return run_plan(model, x_T, make_plan("ddim", T=T, steps=steps, prediction=prediction, eta=eta),
                    cond=cond, generator=generator, clip=clip, backend=backend)


def sample_dpmpp(model, x_T, *, T, steps=20, prediction="sample", clip=None, cond=None,
                 generator=None, backend="auto"):
    """DPM-Solver++(2M), deterministic. x_T (B, C, h, w) -> (B, C, h, w)."""
    return run_plan(model, x_T, make_plan("dpmpp", T=T, steps=steps, prediction=prediction),
                    cond=cond, generator=generator, clip=clip, backend=backend)
