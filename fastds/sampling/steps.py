"""One sampler update: per-step coefficients, torch references, and the fused dispatcher.

Every sampler here is, per element, ``x0 = clip(a_x·x_t + a_m·m)`` followed by
``x_next = c0·x0 + c1·x_t + cp·x0_prev + σ·z`` (see ``csrc/step.h``). The ``*_plan``
functions compute those six coefficients per step in float64; the ``*_step_ref`` functions
write each update the way its paper does (no coefficient tables), and tests check that the
fused paths (``fused_step`` with backend ``cpu``, ``triton``, ``cuda``, ``torch``) agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import _backend

__all__ = ["StepPlan", "ddpm_plan", "ddim_plan", "dpmpp_plan", "fused_step", "fused_step_ref",
           "ddpm_step_ref", "ddim_step_ref", "dpmpp_step_ref", "leading_timesteps", "STEP_BACKENDS"]

STEP_BACKENDS = ("auto", "ref", "torch", "cpu", "triton", "cuda")


@dataclass(frozen=True)
class StepPlan:
    """A sampler's whole schedule: ``timesteps`` (n,) int64 (the t the network sees),
    ``coef`` (n, 6) float64 rows ``(a_x, a_m, c0, c1, cp, sigma)``, ``noisy`` (n,) bool."""
    timesteps: np.ndarray
    coef: np.ndarray
    noisy: np.ndarray
    name: str

    def __len__(self):
        return len(self.timesteps)

    def mirrored(self) -> "StepPlan":
        """The same plan with every noise draw negated (σ -> −σ): run from −x_T with the
        same generator it gives the antithetic twin of a trajectory. Each twin is an exact
        sample (−z ~ N(0, I)); the pair is negatively correlated, so a pair's mean is a
        lower-variance estimate of the conditional mean (antithetic variates)."""
        coef = self.coef.copy()
        coef[:, 5] = -coef[:, 5]
        return StepPlan(self.timesteps, coef, self.noisy, self.name + "~")


def leading_timesteps(T: int, steps: int | None):
    """"Leading" spacing: t = k·(T//n) for k = n-1..0; previous t is t - T//n (−1 -> ᾱ = 1)."""
    n = T if steps is None else int(steps)
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in 1..T={T}, got {n}")
    ratio = T // n
    ts = (np.arange(n) * ratio)[::-1].astype(np.int64)
    return ts, ts - ratio


def _x0_coef(prediction, ab):
    if prediction == "sample":
        return 0.0, 1.0
    if prediction == "epsilon":
        return 1 / math.sqrt(ab), -math.sqrt(1 - ab) / math.sqrt(ab)
    if prediction == "v":
        return math.sqrt(ab), -math.sqrt(1 - ab)
    raise ValueError(f"prediction must be 'sample', 'epsilon' or 'v', got {prediction!r}")


def _abar(alpha_bar, t):
    return 1.0 if t < 0 else float(alpha_bar[t])


def ddpm_plan(alpha_bar, steps=None, prediction="sample") -> StepPlan:
    """DDPM ancestral sampling, ``fixed_small`` variance (the common DDPMScheduler)."""
    ts, prev = leading_timesteps(len(alpha_bar), steps)
    rows, noisy = [], []
    for t, tp in zip(ts, prev):
        ab, ab_prev = _abar(alpha_bar, t), _abar(alpha_bar, tp)
        alpha_t = ab / ab_prev
        beta_t = 1 - alpha_t
        a_x, a_m = _x0_coef(prediction, ab)
        c0 = math.sqrt(ab_prev) * beta_t / (1 - ab)
        c1 = math.sqrt(alpha_t) * (1 - ab_prev) / (1 - ab)
        var = max((1 - ab_prev) / (1 - ab) * beta_t, 1e-20)
        rows.append((a_x, a_m, c0, c1, 0.0, math.sqrt(var) if t > 0 else 0.0))
        noisy.append(bool(t > 0))
    return StepPlan(ts, np.array(rows), np.array(noisy), "ddpm")


def ddim_plan(alpha_bar, steps=50, prediction="sample", eta=0.0) -> StepPlan:
    """DDIM with η (0: deterministic). ε̂ is re-derived from the (possibly clipped) x̂0."""
    ts, prev = leading_timesteps(len(alpha_bar), steps)
    rows, noisy = [], []
    for t, tp in zip(ts, prev):
        ab, ab_prev = _abar(alpha_bar, t), _abar(alpha_bar, tp)
        a_x, a_m = _x0_coef(prediction, ab)
        var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        sigma = eta * math.sqrt(max(var, 0.0))
        d = math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))
        c1 = d / math.sqrt(1 - ab)
        c0 = math.sqrt(ab_prev) - c1 * math.sqrt(ab)
        rows.append((a_x, a_m, c0, c1, 0.0, sigma))
        noisy.append(bool(sigma > 0))
    return StepPlan(ts, np.array(rows), np.array(noisy), "ddim")


def dpmpp_plan(alpha_bar, steps=20, prediction="sample") -> StepPlan:
    """DPM-Solver++(2M), data prediction, first order at the first and last step, ending at
    σ = 0 (x_0 = x̂0 of the last step)."""
    ts, prev = leading_timesteps(len(alpha_bar), steps)

    def lam(ab):
        return 0.5 * math.log(ab) - 0.5 * math.log(1 - ab)

    rows = []
    for i, (t, tp) in enumerate(zip(ts, prev)):
        ab = _abar(alpha_bar, t)
        a_x, a_m = _x0_coef(prediction, ab)
        if tp < 0:  # to σ = 0: the solution is the data prediction itself
            rows.append((a_x, a_m, 1.0, 0.0, 0.0, 0.0))
            continue
        ab_next = _abar(alpha_bar, tp)
        s_cur, s_next, a_next = math.sqrt(1 - ab), math.sqrt(1 - ab_next), math.sqrt(ab_next)
        h = lam(ab_next) - lam(ab)
        phi = -math.expm1(-h)  # 1 - e^{-h}
        if i == 0:
            rows.append((a_x, a_m, a_next * phi, s_next / s_cur, 0.0, 0.0))
            continue
        h0 = lam(ab) - lam(_abar(alpha_bar, ts[i - 1]))
        r = h0 / h
        rows.append((a_x, a_m, a_next * phi * (1 + 0.5 / r), s_next / s_cur, -a_next * phi * 0.5 / r, 0.0))
    return StepPlan(ts, np.array(rows), np.zeros(len(ts), bool), "dpmpp")


# ----------------------------------------------------------------------------- references
def _x0_ref(m, x, ab, prediction, clip):
    if prediction == "sample":
        x0 = m
    elif prediction == "epsilon":
        x0 = (x - (1 - ab) ** 0.5 * m) / ab ** 0.5
    else:
        x0 = ab ** 0.5 * x - (1 - ab) ** 0.5 * m
    return x0.clamp(-clip, clip) if clip else x0


def ddpm_step_ref(m, x, t, t_prev, alpha_bar, *, prediction="sample", clip=None, noise=None):
    """DDPM posterior step written as in Ho et al. (2020), Eq. 7, ``fixed_small`` variance."""
    ab, ab_prev = _abar(alpha_bar, t), _abar(alpha_bar, t_prev)
    alpha_t, beta_t = ab / ab_prev, 1 - ab / ab_prev
    x0 = _x0_ref(m, x, ab, prediction, clip)
    mean = (ab_prev ** 0.5 * beta_t / (1 - ab)) * x0 + (alpha_t ** 0.5 * (1 - ab_prev) / (1 - ab)) * x
    if t > 0:
        var = max((1 - ab_prev) / (1 - ab) * beta_t, 1e-20)
        mean = mean + var ** 0.5 * noise
    return mean


def ddim_step_ref(m, x, t, t_prev, alpha_bar, *, prediction="sample", clip=None, eta=0.0, noise=None):
    """DDIM (Song et al. 2021, Eq. 12): x_prev = √ᾱ' x̂0 + √(1-ᾱ'-σ²) ε̂ + σ z."""
    ab, ab_prev = _abar(alpha_bar, t), _abar(alpha_bar, t_prev)
    x0 = _x0_ref(m, x, ab, prediction, clip)
    eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5
    sigma = eta * max((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev), 0.0) ** 0.5
    out = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
    return out + sigma * noise if sigma > 0 else out


def dpmpp_step_ref(m, x, t, t_prev, alpha_bar, *, prediction="sample", clip=None, x0_prev=None,
                   t_before=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2). Returns (x_next, x̂0)."""
    ab = _abar(alpha_bar, t)
    x0 = _x0_ref(m, x, ab, prediction, clip)
    if t_prev < 0:
        return x0, x0
    ab_next = _abar(alpha_bar, t_prev)
    lam = lambda a: math.log(a ** 0.5 / (1 - a) ** 0.5)  # noqa: E731
    h = lam(ab_next) - lam(ab)
    a_next, s_next, s_cur = ab_next ** 0.5, (1 - ab_next) ** 0.5, (1 - ab) ** 0.5
    D = x0
    if x0_prev is not None:
        r = (lam(ab) - lam(_abar(alpha_bar, t_before))) / h
        D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return (s_next / s_cur) * x - a_next * (math.exp(-h) - 1) * D, x0


def fused_step_ref(m, x, coef, *, noise=None, x0_prev=None, clip=None):
    """The linear update of ``csrc/step.h`` in plain torch (several passes). Returns (x_next, x̂0)."""
    a_x, a_m, c0, c1, cp, sigma = (float(c) for c in coef)
    x0 = a_x * x + a_m * m
    if clip:
        x0 = x0.clamp(-clip, clip)
    out = c0 * x0 + c1 * x
    if x0_prev is not None:
        out = out + cp * x0_prev
    if noise is not None:
        out = out + sigma * noise
    return out, x0


# ----------------------------------------------------------------------------- dispatcher
def _auto(x):
    if x.device.type == "cuda":
        if _backend.why_unavailable("triton") is None:
            return "triton"
        return "cuda" if _backend.why_unavailable("cuda") is None else "torch"
    if x.dtype in (torch.float32, torch.float64) and _backend.why_unavailable("cpu") is None:
        return "cpu"
    return "torch"


def _torch_fused(m, x, coef, noise, x0_prev, clip, x0_out):
    a_x, a_m, c0, c1, cp, sigma = (float(c) for c in coef)
    x0 = torch.add(a_m * m, x, alpha=a_x) if a_x else a_m * m
    if clip:
        x0.clamp_(-clip, clip)
    out = torch.add(c0 * x0, x, alpha=c1)
    if x0_prev is not None and cp:
        out.add_(x0_prev, alpha=cp)
    if noise is not None and sigma:
        out.add_(noise, alpha=sigma)
    if x0_out is not None:
        x0_out.copy_(x0)
    return out


def fused_step(m, x, coef, *, noise=None, x0_prev=None, clip=None, out=None, x0_out=None,
               backend="auto", step=None, seed=None):
    """One sampler update in one pass over memory.

    m, x, noise, x0_prev : same shape (any), float32/float64; ``coef``: 6 numbers, or a device
    tensor (n, 6) indexed by the device tensor ``step`` (CUDA graphs: see kernels). ``seed``
    (1,) int64 on the device draws the noise inside the Triton kernel (Philox, counter
    ``step·numel + i``) instead of reading ``noise``: only the ``triton`` backend can, and any
    other raises rather than silently dropping the noise. Writes x_next to ``out`` (allocated
    if None) and x̂0 to ``x0_out`` if given. Returns ``out``.
    """
    _backend.require(backend, op="fused_step", choices=STEP_BACKENDS)
    if backend == "auto":
        backend = _auto(x)
    if m.shape != x.shape:
        raise ValueError(f"fused_step: model output {tuple(m.shape)} and x_t {tuple(x.shape)} differ")
    for name, a in (("noise", noise), ("x0_prev", x0_prev), ("out", out), ("x0_out", x0_out)):
        if a is not None and a.shape != x.shape:
            raise ValueError(f"fused_step: {name} has shape {tuple(a.shape)}, expected {tuple(x.shape)}")
    if backend == "triton":
        from ..kernels.sampler_step import fused_step_triton
        return fused_step_triton(m, x, coef, noise=noise, x0_prev=x0_prev, clip=clip, out=out,
                                 x0_out=x0_out, step=step, seed=seed)
    if seed is not None:
        raise ValueError(f"fused_step: seed= draws noise inside the Triton kernel; backend "
                         f"{backend!r} cannot, so pass the noise tensor as noise= instead")
    if isinstance(coef, torch.Tensor) and coef.ndim == 2:
        if step is not None and isinstance(step, torch.Tensor) and step.device.type != "cpu":
            # reading a device counter on the host syncs the stream and breaks graph capture
            raise ValueError(f"fused_step: a device-side step counter needs backend 'triton' "
                             f"(backend {backend!r} would read it on the host)")
        coef = coef[int(step)] if step is not None else coef[0]
    if backend == "ref":
        res, x0 = fused_step_ref(m, x, coef, noise=noise, x0_prev=x0_prev, clip=clip)
        if x0_out is not None:
            x0_out.copy_(x0)
        return out.copy_(res) if out is not None else res
    if backend == "torch":
        res = _torch_fused(m, x, coef, noise, x0_prev, clip, x0_out)
        return out.copy_(res) if out is not None else res
    coef_np = np.asarray(torch.as_tensor(coef).detach().cpu(), dtype=np.float64)
    if out is None:
        out = torch.empty_like(x)
    if backend == "cuda":
        tensors = [t.contiguous() if t is not None else None for t in (m, x, noise, x0_prev)]
        ctab = torch.as_tensor(coef_np, dtype=x.dtype, device=x.device)
        ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
        _backend.cuda_ext().fused_step(
            32 if x.dtype == torch.float32 else 64, ptr(tensors[0]), ptr(tensors[1]),
            ptr(tensors[2]), ptr(tensors[3]), ptr(x0_out), out.data_ptr(), x.numel(),
            ctab.data_ptr(), int(bool(clip)), float(clip or 0.0),
            torch.cuda.current_stream(x.device).cuda_stream)
        return out
    if x.device.type != "cpu":
        raise ValueError("fused_step: backend 'cpu' takes CPU tensors")
    arr = lambda t: None if t is None else t.detach().contiguous().numpy()  # noqa: E731
    ext = _backend.cpu_ext()
    fn = ext.fused_step_f32 if x.dtype == torch.float32 else ext.fused_step_f64
    fn(arr(m), arr(x), arr(noise), arr(x0_prev), None if x0_out is None else x0_out.numpy(),
       out.numpy(), coef_np.astype(np.float32 if x.dtype == torch.float32 else np.float64),
       int(bool(clip)), float(clip or 0.0))
    return out
