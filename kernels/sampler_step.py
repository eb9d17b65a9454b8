"""Triton fused sampler step (fastds.kernels.sampler_step).

One program handles BLOCK elements: it reads m, x_t (and x0_prev, noise when present) once,
writes x_next (and x̂0 when asked) once: memory traffic is (2 + has_prev + has_noise) reads
and (1 + write_x0) writes of numel elements, the minimum for this update. The per-step
coefficients (a_x, a_m, c0, c1, cp, σ) are read from a device table indexed by a device-side
step counter, so a CUDA graph captured once replays every step correctly (scalars passed as
kernel arguments would be frozen at capture). Noise comes from Philox with one 64-bit seed per
trajectory (a device tensor) and a 64-bit counter ``step·n + i``: every (step, element) gets
its own stream position, with no per-step 31-bit seeds that could collide over a long rollout. The math is the formula of
``csrc/step.h``; the torch reference is ``fastds.sampling.steps.fused_step_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_step_kernel", "fused_step_triton", "BLOCK"]

BLOCK = 1024


@triton.jit
def fused_step_kernel(m_ptr, x_ptr, z_ptr, xp_ptr, x0_ptr, out_ptr, coef_ptr, step_ptr, seed_ptr,
                      n, clip,
                      HAS_NOISE: tl.constexpr, RNG: tl.constexpr, HAS_PREV: tl.constexpr,
                      WRITE_X0: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(step_ptr)
    base = coef_ptr + s * 6
    a_x = tl.load(base + 0)
    a_m = tl.load(base + 1)
    c0 = tl.load(base + 2)
    c1 = tl.load(base + 3)
    cp = tl.load(base + 4)
    sigma = tl.load(base + 5)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x0 = a_x * x + a_m * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    out = c0 * x0 + c1 * x
    if HAS_PREV:
        out += cp * tl.load(xp_ptr + offs, mask=mask, other=0.0)
    if HAS_NOISE:
        out += sigma * tl.load(z_ptr + offs, mask=mask, other=0.0)
    if RNG:
        seed = tl.load(seed_ptr)
        counter = s.to(tl.int64) * n + offs.to(tl.int64)
        out += sigma * tl.randn(seed, counter).to(out.dtype)
    tl.store(out_ptr + offs, out, mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + offs, x0, mask=mask)


def fused_step_triton(m, x, coef, *, noise=None, x0_prev=None, clip=None, out=None, x0_out=None,
                      step=None, seed=None):
    """Launch :func:`fused_step_kernel`. ``coef``: 6 numbers or a (n, 6) tensor on x's device;
    ``step``: a long device tensor (1,) indexing it; ``seed``: a (1,) int64 device tensor, the
    trajectory's seed, to draw noise in the kernel (then ``noise`` must be None). All tensors
    contiguous, same shape."""
    if noise is not None and seed is not None:
        raise ValueError("fused_step_triton: give noise or seed, not both")
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError(f"fused_step_triton: seed must be one int64, got {seed.dtype} {tuple(seed.shape)}")
    if not isinstance(coef, torch.Tensor) or coef.ndim == 1:
        coef = torch.as_tensor(coef, dtype=torch.float64).reshape(1, 6)
    coef = coef.to(device=x.device, dtype=x.dtype)
    if step is None:
        step = torch.zeros(1, dtype=torch.int64, device=x.device)
    out = torch.empty_like(x) if out is None else out
    n = x.numel()
    dummy = x  # never read: the constexpr flags compile the loads away
    grid = (triton.cdiv(n, BLOCK),)
    fused_step_kernel[grid](
        m.contiguous(), x.contiguous(), noise if noise is not None else dummy,
        x0_prev if x0_prev is not None else dummy, x0_out if x0_out is not None else dummy,
        out, coef, step, seed if seed is not None else step, n, float(clip or 0.0),
        HAS_NOISE=noise is not None, RNG=seed is not None, HAS_PREV=x0_prev is not None,
        WRITE_X0=x0_out is not None, CLIP=bool(clip), BLOCK=BLOCK)
    return out
