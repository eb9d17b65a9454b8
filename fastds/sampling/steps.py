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
           "philox_normal4_ref", "step_noise_ref",
           "ddpm_step_ref", "ddim_step_ref", "dpmpp_step_ref", "leading_timesteps",
           "trailing_timesteps", "linspace_timesteps", "karras_timesteps", "logsnr_timesteps",
           "karras_linear_timesteps", "timesteps", "SPACINGS",
           "STEP_BACKENDS"]

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


def _step_count(T: int, steps: int | None) -> int:
    """A plan's step count: ``steps`` (all T when None), refused outside 1..T."""
    n = T if steps is None else int(steps)
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in 1..T={T}, got {n}")
    return n


def leading_timesteps(T: int, steps: int | None):
    """"Leading" spacing: t = k·(T//n) for k = n-1..0; previous t is t - T//n (−1 -> ᾱ = 1)."""
    n = _step_count(T, steps)
    ratio = T // n
    ts = (np.arange(n) * ratio)[::-1].astype(np.int64)
    return ts, ts - ratio


def trailing_timesteps(T: int, steps: int | None):
    """"Trailing" spacing (diffusers' ``timestep_spacing="trailing"``): t = round(T − k·T/n) − 1
    for k = 0..n-1, so the first step starts at t = T − 1 (ᾱ ≈ 0, pure noise) however few
    the steps; with leading spacing 5 steps start at t = 800 (ᾱ ≈ 0.09) and the sample keeps
    less of the noise's variance. The previous t is the next one in the list (−1 at the end)."""
    n = _step_count(T, steps)
    ts = (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[:n]
    return ts, np.append(ts[1:], -1).astype(np.int64)


def linspace_timesteps(T: int, steps: int | None):
    """"Linspace" spacing (diffusers' ``timestep_spacing="linspace"``): t = round(k·(T−1)/(n−1))
    for k = n-1..0, so the first step starts at t = T − 1 (pure noise, as with trailing
    spacing) and the last at t = 0 (as with leading spacing: the finest scales get a step at
    low noise). The previous t is the next one in the list (−1 at the end); one step is t = T − 1."""
    n = _step_count(T, steps)
    ts = np.round(np.linspace(T - 1, 0, n)).astype(np.int64)
    return ts, np.append(ts[1:], -1).astype(np.int64)


# where a noise-level spacing starts: EDM's σ_max. The cosine schedule's last steps jump to
# σ ≈ 2·10⁴ (t = 999, β capped at 0.999), and spacing from there would spend a few-step
# budget on pure noise (diffusers clips λ for the same reason: lambda_min_clipped)
SIGMA_MAX = 80.0


def _sigma_spaced(alpha_bar, steps, spacing, warp, sigma_max=SIGMA_MAX):
    """n integer timesteps from σ_max (``SIGMA_MAX``, or t = T − 1 if that is lower) down to
    t = 0, placed by noise level σ (σ² = (1 − ᾱ)/ᾱ, so log σ = −λ): ``warp`` maps a ramp
    0..1 (n points) to the σ's, then each σ goes to the nearest t of the schedule (diffusers
    keeps fractional t there; integer t keeps every backend's coefficient tables exact). The
    previous t of the last is −1 (σ = 0)."""
    ab = np.asarray(alpha_bar, np.float64)
    T = len(ab)
    n = _step_count(T, steps)
    log_sigma = 0.5 * (np.log1p(-ab) - np.log(ab))  # increasing in t
    s_max = min(float(np.exp(log_sigma[-1])), sigma_max)  # one step: the ramp's 0, σ_max
    target = np.log(warp(s_max, np.exp(log_sigma[0]), np.linspace(0.0, 1.0, n)))
    ts = np.round(np.interp(target, log_sigma, np.arange(T))).astype(np.int64)
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"spacing {spacing!r} puts two of its {n} steps on one timestep of T={T}; "
                         f"use fewer steps or another spacing")
    return ts, np.append(ts[1:], -1).astype(np.int64)


def karras_timesteps(alpha_bar, steps: int | None, rho: float = 7.0, sigma_max: float = SIGMA_MAX):
    """EDM (Karras et al. 2022) spacing, ρ = 7: σ^(1/ρ) uniform from ``sigma_max`` to σ_min
    (t = 0) (diffusers' ``use_karras_sigmas``). On the cosine schedule at 5 steps: t = 991,
    965, 802, 164, 0, so the finest scales get one step."""
    def warp(s_max, s_min, ramp):
        return (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _sigma_spaced(alpha_bar, steps, "karras", warp, sigma_max)


def logsnr_timesteps(alpha_bar, steps: int | None, sigma_max: float = SIGMA_MAX):
    """Uniform in log-SNR (Lu et al. 2022, DPM-Solver's own spacing; diffusers'
    ``use_lu_lambdas``): log σ uniform from ``sigma_max`` to σ_min (t = 0)."""
    def warp(s_max, s_min, ramp):
        return np.exp(np.log(s_max) + ramp * (np.log(s_min) - np.log(s_max)))
    return _sigma_spaced(alpha_bar, steps, "logsnr", warp, sigma_max)


def karras_linear_timesteps(alpha_bar, steps: int | None, rho: float = 7.0, sigma_max: float = SIGMA_MAX):
    """EDM's ρ = 7 steps (``karras_timesteps``) while t ≥ T/2, then even steps in t from the
    last of those down to t = 0. On the cosine schedule at 5 steps: t = 991, 965, 802, 401,
    0. Karras steps keep the residual's variance through their evaluations at high noise but
    crowd there (991, 965, 802, 164, 0), leaving the finest scales one step; the steps below
    T/2 are spread out again (measured in docs/measurements.md, round 29)."""
    ts, _ = karras_timesteps(alpha_bar, steps, rho, sigma_max)
    T = len(alpha_bar)
    high = ts[ts >= T // 2] if ts[0] >= T // 2 else ts[:1]
    low = np.round(np.linspace(high[-1], 0, len(ts) - len(high) + 1)[1:]).astype(np.int64)
    ts = np.concatenate([high, low])
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"spacing 'karras-linear' puts two of its {len(ts)} steps on one timestep of T={T}; "
                         f"use fewer steps or another spacing")
    return ts, np.append(ts[1:], -1).astype(np.int64)


SPACINGS = {"leading": leading_timesteps, "trailing": trailing_timesteps, "linspace": linspace_timesteps,
            "karras": karras_timesteps, "logsnr": logsnr_timesteps, "karras-linear": karras_linear_timesteps}
_BY_NOISE = ("karras", "logsnr", "karras-linear")  # placed by the schedule's σ: they need ᾱ, not only T


def timesteps(T: int, steps: int | None, spacing: str = "leading", alpha_bar=None):
    """(timesteps, previous timesteps) of a plan with ``spacing`` "leading", "trailing",
    "linspace", "karras", "logsnr" or "karras-linear" (the last three need the schedule
    ``alpha_bar`` (T,))."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if spacing in _BY_NOISE:
        if alpha_bar is None or len(alpha_bar) != T:
            raise ValueError(f"spacing {spacing!r} needs the schedule's alpha_bar (T={T},)")
        return SPACINGS[spacing](alpha_bar, steps)
    return SPACINGS[spacing](T, steps)


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


def ddpm_plan(alpha_bar, steps=None, prediction="sample", spacing="leading") -> StepPlan:
    """DDPM ancestral sampling, ``fixed_small`` variance (the common DDPMScheduler)."""
    ts, prev = timesteps(len(alpha_bar), steps, spacing, alpha_bar)
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


def ddim_plan(alpha_bar, steps=50, prediction="sample", eta=0.0, spacing="leading") -> StepPlan:
    """DDIM with η (0: deterministic). ε̂ is re-derived from the (possibly clipped) x̂0."""
    ts, prev = timesteps(len(alpha_bar), steps, spacing, alpha_bar)
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


def dpmpp_plan(alpha_bar, steps=20, prediction="sample", spacing="leading") -> StepPlan:
    """DPM-Solver++(2M), data prediction, first order at the first and last step, ending at
    σ = 0 (x_0 = x̂0 of the last step)."""
    ts, prev = timesteps(len(alpha_bar), steps, spacing, alpha_bar)

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


_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))


def philox_normal4_ref(seed: int, counters) -> np.ndarray:
    """Four standard normals per counter, (N,) -> (N, 4) float32: Philox4x32-10 keyed by the
    64-bit ``seed`` with counter (low, high, 0, 0), each word pair turned into two uniforms and
    two Box-Muller normals. It is Triton's ``tl.randn4x(seed, counter)``, written out in numpy
    (float64 log/cos: the kernels' float32 polynomials agree to about 1e-6)."""
    c = np.asarray(counters, dtype=np.uint64)
    seed = int(seed) & (2 ** 64 - 1)
    c0, c1 = (c & np.uint64(0xFFFFFFFF)).astype(np.uint32), (c >> np.uint64(32)).astype(np.uint32)
    c2 = c3 = np.zeros_like(c0)
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    with np.errstate(over="ignore"):
        for _ in range(10):
            pa, pb = _PHILOX_M[0] * c0.astype(np.uint64), _PHILOX_M[1] * c2.astype(np.uint64)
            c0, c2, c1, c3 = ((pb >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0,
                              (pa >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1,
                              pb.astype(np.uint32), pa.astype(np.uint32))
            k0, k1 = k0 + _PHILOX_W[0], k1 + _PHILOX_W[1]

    def uniform(w):
        i = w.view(np.int32)
        return (np.where(i < 0, ~i, i).astype(np.float32) * np.float32(4.6566127342e-10)).astype(np.float64)

    out = []
    for a, b in ((c0, c1), (c2, c3)):
        r = np.sqrt(-2.0 * np.log(np.maximum(uniform(a), 1e-7)))
        th = 2 * np.pi * uniform(b)
        out += [r * np.cos(th), r * np.sin(th)]
    return np.stack(out, axis=-1).astype(np.float32)


def step_noise_ref(seed: int, step: int, n: int) -> np.ndarray:
    """The noise every backend's in-kernel draw gives element i of step ``step`` of a state of
    n elements: normal i mod 4 of counter (step·n₄ + i) // 4, n₄ = n rounded up to 4. (n,)."""
    n4 = (n + 3) // 4 * 4
    base = step * n4 // 4
    return philox_normal4_ref(seed, base + np.arange(n4 // 4, dtype=np.int64)).reshape(-1)[:n]


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
# The dtypes each backend computes natively. "ref" and "torch" are torch expressions and take
# any floating dtype; the C++ and CUDA kernels exist for float32/float64 only, and the Triton
# kernel loads any float and computes in float32 (float64 for float64).
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NATIVE = {"ref": _FLOATS, "torch": _FLOATS, "cpu": (torch.float32, torch.float64),
           "cuda": (torch.float32, torch.float64), "triton": _FLOATS}


def _auto(x):
    if x.device.type == "cuda":
        if _backend.why_unavailable("triton") is None:
            return "triton"
        if x.dtype in _NATIVE["cuda"] and _backend.why_unavailable("cuda") is None:
            return "cuda"
        return "torch"
    if x.dtype in _NATIVE["cpu"] and _backend.why_unavailable("cpu") is None:
        return "cpu"
    return "torch"


def _check_operands(backend, m, x, noise, x0_prev, out, x0_out):
    """Every tensor of one step shares x's shape, dtype and device, and the backend computes
    that dtype; otherwise a TypeError/ValueError names the argument. (A kernel handed a
    mismatched output would write into a converted copy and lose the result.)"""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"fused_step: x must be a floating torch tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    for name, a in (("m", m), ("noise", noise), ("x0_prev", x0_prev), ("out", out), ("x0_out", x0_out)):
        if a is None:
            continue
        if a.shape != x.shape:
            raise ValueError(f"fused_step: {name} has shape {tuple(a.shape)}, expected {tuple(x.shape)} like x")
        if a.dtype != x.dtype:
            raise TypeError(f"fused_step: {name} is {a.dtype} but x is {x.dtype}; cast it (every "
                            "operand of one step shares x's dtype)")
        if a.device != x.device:
            raise ValueError(f"fused_step: {name} is on {a.device} but x is on {x.device}")
    if x.dtype not in _NATIVE[backend]:
        raise TypeError(f"fused_step: backend {backend!r} computes "
                        f"{'/'.join(str(d).replace('torch.', '') for d in _NATIVE[backend])}, "
                        f"and x is {str(x.dtype).replace('torch.', '')}; use backend 'torch' or 'auto'")
    if backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"fused_step: backend 'cpu' takes CPU tensors, x is on {x.device}")
    if backend == "cuda" and x.device.type != "cuda":
        raise ValueError(f"fused_step: backend 'cuda' takes CUDA tensors, x is on {x.device}")


def _host_int(v, name):
    """An int from a Python int or a one-element tensor on the host (a device tensor would be a
    sync; only the Triton backend reads device scalars)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.device.type != "cpu":
            raise ValueError(f"fused_step: {name} must be an int or a one-element CPU tensor here "
                             f"(got {tuple(v.shape)} on {v.device}); device scalars need backend 'triton'")
        return int(v.item())
    return int(v)


def _signed64(v):
    return (int(v) + 2 ** 63) % 2 ** 64 - 2 ** 63


def _dense(t):
    """A C-contiguous tensor the kernel may write: ``t`` itself when it is one, else a fresh
    buffer whose result :func:`_settle` copies back into ``t``."""
    if t is None or t.is_contiguous():
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _settle(target, written):
    if target is not None and written is not target:
        target.copy_(written)
    return target


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

    m, x, noise, x0_prev, out, x0_out : torch tensors of one shape (any), one floating dtype
    and one device (any layout: strided inputs are read through a contiguous copy, and a
    strided ``out``/``x0_out`` receives its result through one). Backends ``ref`` and
    ``torch`` take float16/bfloat16/float32/float64, ``triton`` too (computing in float32, or
    float64 for float64), ``cpu`` and ``cuda`` float32/float64; anything else raises naming the
    argument. ``coef``: 6 numbers, or a tensor (n, 6) indexed by ``step`` (CUDA graphs: a
    device tensor, see kernels). ``seed`` (an int, or a (1,) int64 tensor: on the device for
    ``triton``) draws the noise inside the kernel instead of reading ``noise``: element i of
    step ``step`` gets normal i mod 4 of Philox counter (step·n₄ + i)/4 (Triton's randn4x
    stream; :func:`step_noise_ref`), the same on ``triton``, ``cpu``, ``torch`` and ``ref``;
    ``cuda`` cannot and raises rather than drop the noise.
    Writes x_next to ``out`` (allocated C-contiguous if None) and x̂0 to ``x0_out`` if given.
    Returns ``out``.
    """
    _backend.require(backend, op="fused_step", choices=STEP_BACKENDS)
    if backend == "auto":
        backend = _auto(x)
    _check_operands(backend, m, x, noise, x0_prev, out, x0_out)
    if backend == "triton":
        from ..kernels.sampler_step import fused_step_triton
        return fused_step_triton(m, x, coef, noise=noise, x0_prev=x0_prev, clip=clip, out=out,
                                 x0_out=x0_out, step=step, seed=seed)
    if seed is not None and noise is not None:
        raise ValueError("fused_step: give noise= or seed=, not both")
    if seed is not None and backend == "cuda":
        raise ValueError("fused_step: seed= draws the noise in the kernel, which backends 'triton' "
                         "and 'cpu' do (and 'ref'/'torch' through step_noise_ref); backend 'cuda' "
                         "cannot: pass noise= instead")
    if isinstance(coef, torch.Tensor) and coef.ndim == 2:
        if step is not None and isinstance(step, torch.Tensor) and step.device.type != "cpu":
            # reading a device counter on the host syncs the stream and breaks graph capture
            raise ValueError(f"fused_step: a device-side step counter needs backend 'triton' "
                             f"(backend {backend!r} would read it on the host)")
        coef = coef[int(step)] if step is not None else coef[0]
    if seed is not None:
        seed_i, step_i = _host_int(seed, "seed"), 0 if step is None else _host_int(step, "step")
        if backend in ("ref", "torch"):  # the stream's reference, then the update with it
            noise = torch.from_numpy(step_noise_ref(seed_i, step_i, x.numel())).reshape(x.shape).to(
                device=x.device, dtype=x.dtype)
    if backend == "ref":
        res, x0 = fused_step_ref(m, x, coef, noise=noise, x0_prev=x0_prev, clip=clip)
        if x0_out is not None:
            x0_out.copy_(x0)
        return out.copy_(res) if out is not None else res.contiguous()
    if backend == "torch":
        res = _torch_fused(m, x, coef, noise, x0_prev, clip, x0_out)
        return out.copy_(res) if out is not None else res.contiguous()
    coef_np = np.asarray(torch.as_tensor(coef).detach().cpu(), dtype=np.float64)
    if coef_np.size != 6:
        raise ValueError(f"fused_step: coef must hold 6 numbers, got {coef_np.size}")
    dst = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else _dense(out)
    x0_dst = _dense(x0_out)
    inputs = [None if t is None else t.detach().contiguous() for t in (m, x, noise, x0_prev)]
    if backend == "cuda":
        ctab = torch.as_tensor(coef_np, dtype=x.dtype).pin_memory().to(x.device, non_blocking=True)
        ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
        _backend.cuda_ext().fused_step(
            32 if x.dtype == torch.float32 else 64, *(ptr(t) for t in inputs), ptr(x0_dst),
            dst.data_ptr(), x.numel(), ctab.data_ptr(), int(bool(clip)), float(clip or 0.0),
            torch.cuda.current_stream(x.device).cuda_stream)
    else:
        arr = lambda t: None if t is None else t.numpy()  # noqa: E731
        ext = _backend.cpu_ext()
        single = x.dtype == torch.float32
        coef_c = coef_np.astype(np.float32 if single else np.float64)
        if seed is not None:  # noise drawn in the kernel: step_noise_ref's stream
            fn = ext.fused_step_rng_f32 if single else ext.fused_step_rng_f64
            fn(arr(inputs[0]), arr(inputs[1]), arr(inputs[3]), arr(x0_dst), dst.numpy(), coef_c,
               int(bool(clip)), float(clip or 0.0), _signed64(seed_i), step_i)
        else:
            fn = ext.fused_step_f32 if single else ext.fused_step_f64
            fn(*(arr(t) for t in inputs), arr(x0_dst), dst.numpy(), coef_c, int(bool(clip)),
               float(clip or 0.0))
    _settle(x0_out, x0_dst)
    return dst if out is None else _settle(out, dst)
