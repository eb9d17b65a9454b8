"""Triton fused GroupNorm + SiLU (fastds.kernels.groupnorm): the prologue of every
convolution in the U-Nets' residual blocks, ``silu(group_norm(x) · w + b)``.

One program owns one (sample, group). In NCHW layout a group's channels are one contiguous
run of (C/G)·H·W numbers, so the program streams it twice: once for the statistics, once to
write the output. That is two reads and one write, where torch's eager GroupNorm followed by
SiLU reads three times and writes twice. The statistics are shifted sums in float32 (shift:
the group's first value), which keeps E[x²] − E[x]² from cancelling when the mean is large
next to the spread. Forward only, like the attention kernel. The reference is
``fastds.models.blocks.group_norm_silu_ref``; the dispatcher ``group_norm_silu``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import device_of

__all__ = ["group_norm_silu_kernel", "group_norm_silu_triton", "BLOCK"]

BLOCK = 1024


@triton.jit
def group_norm_silu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, group_size, hw, cg, groups, eps,
                           SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # = sample * groups + group
    base = pid * group_size
    c0 = (pid % groups) * cg
    shift = tl.load(x_ptr + base).to(tl.float32)
    s1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    for start in range(0, group_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < group_size
        v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - shift, 0.0)
        s1 += v
        s2 += v * v
    mean_s = tl.sum(s1, 0) / group_size
    var = tl.maximum(tl.sum(s2, 0) / group_size - mean_s * mean_s, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    mean = mean_s + shift
    for start in range(0, group_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < group_size
        c = c0 + offs // hw
        v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, (v - mean) * rstd * w + b, 0.0)  # masked lanes: no overflow in exp
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_silu_triton(x, groups, weight, bias, eps=1e-5, *, silu=True, out=None):
    """Launch :func:`group_norm_silu_kernel`: x (B, C, *spatial) float32/float16, C divisible
    by ``groups``; weight, bias (C,). Returns ``out`` shaped like x."""
    if x.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"group_norm_silu_triton: dtype {x.dtype} is not supported (float32, float16)")
    if x.ndim < 2 or x.shape[1] % groups:
        raise ValueError(f"group_norm_silu_triton: x {tuple(x.shape)} must be (B, C, ...) with C "
                         f"divisible by groups={groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (x.shape[1],) or t.device != x.device:
            raise ValueError(f"group_norm_silu_triton: {name} is {tuple(t.shape)} on {t.device}; "
                             f"expected ({x.shape[1]},) on {x.device}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"group_norm_silu_triton: out is {out.dtype} {tuple(out.shape)} on "
                         f"{out.device}; expected x's {x.dtype} {tuple(x.shape)} on {x.device}")
    x = x.contiguous()  # NCHW: a group's channels are one contiguous run
    B, C = x.shape[:2]
    hw = x[0, 0].numel()
    cg = C // groups
    dst = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None or not out.is_contiguous() else out
    with device_of(x):
        group_norm_silu_kernel[(B * groups,)](x, weight.contiguous(), bias.contiguous(), dst, cg * hw,
                                              hw, cg, groups, float(eps), SILU=silu, BLOCK=BLOCK)
    return dst if out is None or dst is out else out.copy_(dst)
