"""Triton fused sampler step (fastds.kernels.sampler_step).

One program handles BLOCK elements: it reads m, x_t (and x0_prev, noise when present) once,
writes x_next (and x̂0 when asked) once: memory traffic is (2 + has_prev + has_noise) reads
and (1 + write_x0) writes of numel elements, the minimum for this update. The per-step
coefficients (a_x, a_m, c0, c1, cp, σ) are read from a device table indexed by a device-side
step counter, so a CUDA graph captured once replays every step correctly (scalars passed as
kernel arguments would be frozen at capture). Noise comes from Philox with one 64-bit seed per
trajectory (a device tensor) and a 64-bit counter derived from (step, element): every (step, element) gets
its own stream position, with no per-step 31-bit seeds that could collide over a long rollout.
The stream is Triton's ``tl.randn4x``: element i of step s takes normal i mod 4 of counter
(s·n₄ + i)/4 (n₄: n rounded up to a multiple of 4), the stream the C++ step draws on the CPU
(``csrc/step.h``), so both give one seed the same noise. The math is the formula of
``csrc/step.h``; the torch reference is ``fastds.sampling.steps.fused_step_ref``.

Offsets are 64-bit: a global 2881×5760 field × 4 channels × 32 members passes 2³¹ elements.
Values are loaded in their own dtype (fp16, bf16, fp32, fp64) and computed in the dtype of
the coefficient table: float32, or float64 for float64 tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_step_kernel", "fused_step_triton", "coef_table", "BLOCK"]

BLOCK = 1024


@triton.jit
def fused_step_kernel(m_ptr, x_ptr, z_ptr, xp_ptr, x0_ptr, out_ptr, coef_ptr, step_ptr, seed_ptr,
                      n, clip,
                      HAS_NOISE: tl.constexpr, RNG: tl.constexpr, HAS_PREV: tl.constexpr,
                      WRITE_X0: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
                      TABLE: tl.constexpr = True):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(step_ptr)
    base = coef_ptr + s * 6 if TABLE else coef_ptr  # one row: the step only counts the noise
    a_x = tl.load(base + 0)
    a_m = tl.load(base + 1)
    c0 = tl.load(base + 2)
    c1 = tl.load(base + 3)
    cp = tl.load(base + 4)
    sigma = tl.load(base + 5)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(a_x.dtype)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(a_x.dtype)
    x0 = a_x * x + a_m * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    out = c0 * x0 + c1 * x
    if HAS_PREV:
        out += cp * tl.load(xp_ptr + offs, mask=mask, other=0.0).to(a_x.dtype)
    if HAS_NOISE:
        out += sigma * tl.load(z_ptr + offs, mask=mask, other=0.0).to(a_x.dtype)
    if RNG:
        # element i of step s: normal i % 4 of Philox counter (s·n4 + i) / 4 (csrc/step.h)
        seed = tl.load(seed_ptr)
        n4 = (n.to(tl.int64) + 3) // 4 * 4
        cnt = (s.to(tl.int64) * n4 + pid * BLOCK) // 4 + tl.arange(0, BLOCK // 4)
        z1, z2, z3, z4 = tl.randn4x(seed, cnt)
        z = tl.interleave(tl.interleave(z1, z3), tl.interleave(z2, z4))
        out += sigma * z.to(out.dtype)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def coef_table(coef, x):
    """The (n, 6) coefficient table on x's device in the kernel's compute dtype. Pass this
    (built once per plan, e.g. by ``run_plan``) with a ``step`` counter: a numpy row per call
    would be a host-to-device copy and a stream sync every step."""
    want = _compute_dtype(x.dtype)
    if isinstance(coef, torch.Tensor) and coef.ndim == 2:
        if coef.device == x.device and coef.dtype == want and coef.is_contiguous():
            return coef
        return coef.to(device=x.device, dtype=want).contiguous()
    table = torch.as_tensor(np_float64(coef), dtype=want).reshape(1, 6)
    return table.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else table


def np_float64(coef):
    import numpy as np
    return np.asarray(coef.detach().cpu() if isinstance(coef, torch.Tensor) else coef, dtype=np.float64)


def fused_step_triton(m, x, coef, *, noise=None, x0_prev=None, clip=None, out=None, x0_out=None,
                      step=None, seed=None):
    """Launch :func:`fused_step_kernel`. ``coef``: 6 numbers or a (n, 6) table (see
    :func:`coef_table`); ``step``: a long device tensor (1,) indexing it; ``seed``: a (1,)
    int64 device tensor, the trajectory's seed, to draw noise in the kernel (then ``noise``
    must be None). Tensors: one shape, dtype (fp16/bf16/fp32/fp64) and device, any layout
    (inputs are made contiguous; a strided ``out``/``x0_out`` gets its result copied in)."""
    import contextlib
    if noise is not None and seed is not None:
        raise ValueError("fused_step_triton: give noise or seed, not both")
    if seed is not None and not isinstance(seed, torch.Tensor):
        seed = torch.tensor([(int(seed) + 2 ** 63) % 2 ** 64 - 2 ** 63], dtype=torch.int64, device=x.device)
    if step is not None and not isinstance(step, torch.Tensor):
        step = torch.tensor([int(step)], dtype=torch.int64, device=x.device)
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device):
        raise ValueError(f"fused_step_triton: seed must be one int64 on {x.device}, got {seed.dtype} "
                         f"{tuple(seed.shape)} on {seed.device}")
    for name, a in (("m", m), ("noise", noise), ("x0_prev", x0_prev), ("out", out), ("x0_out", x0_out)):
        if a is not None and (a.shape != x.shape or a.dtype != x.dtype or a.device != x.device):
            raise ValueError(f"fused_step_triton: {name} is {a.dtype} {tuple(a.shape)} on {a.device}; "
                             f"expected x's {x.dtype} {tuple(x.shape)} on {x.device}")
    table = isinstance(coef, torch.Tensor) and coef.ndim == 2
    coef = coef_table(coef, x)
    if step is None:
        step = torch.zeros(1, dtype=torch.int64, device=x.device)
    elif step.device != x.device or step.dtype != torch.int64:
        raise ValueError(f"fused_step_triton: step must be an int64 tensor on {x.device}, got "
                         f"{step.dtype} on {step.device}")
    m, x, noise, x0_prev = (None if t is None else t.contiguous() for t in (m, x, noise, x0_prev))
    dst = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None or not out.is_contiguous() else out
    x0_dst = x0_out if x0_out is None or x0_out.is_contiguous() else torch.empty_like(x)
    n = x.numel()
    dummy = x  # never read: the constexpr flags compile the loads away
    grid = (triton.cdiv(n, BLOCK),)
    # launch on the tensors' device, whatever device is current
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        fused_step_kernel[grid](
            m, x, noise if noise is not None else dummy,
            x0_prev if x0_prev is not None else dummy, x0_dst if x0_dst is not None else dummy,
            dst, coef, step, seed if seed is not None else step, n, float(clip or 0.0),
            HAS_NOISE=noise is not None, RNG=seed is not None, HAS_PREV=x0_prev is not None,
            WRITE_X0=x0_dst is not None, CLIP=bool(clip), BLOCK=BLOCK, TABLE=table)
    if x0_out is not None and x0_dst is not x0_out:
        x0_out.copy_(x0_dst)
    if out is not None and dst is not out:
        return out.copy_(dst)
    return dst
