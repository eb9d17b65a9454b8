"""GroupNorm followed by SiLU, the prologue of every residual-block convolution, with one
dispatcher.

Backends
- ``ref``: the formula written out (per-group mean and biased variance, affine, x·σ(x)).
- ``torch``: ``F.silu(F.group_norm(...))`` (differentiable).
- ``triton``: the fused kernel of ``fastds.kernels.groupnorm`` (CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``); forward only.

``backend="auto"`` takes ``triton`` for CUDA inference when triton is installed and the
launch has enough programs to fill the GPU (:func:`auto_norm_backend`), else ``torch``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from .attention import ATTENTION_BACKENDS

__all__ = ["group_norm_silu", "group_norm_silu_ref", "auto_norm_backend", "KERNEL_BACKENDS"]

# the attention core takes the same names: one switch (blocks.set_kernel_backend) sets both
KERNEL_BACKENDS = ATTENTION_BACKENDS


def group_norm_silu_ref(x, groups, weight, bias, eps=1e-5):
    """silu(GroupNorm(x)) written out. x (B, C, *spatial); weight, bias (C,). Same shape out."""
    B, C = x.shape[:2]
    work = torch.promote_types(x.dtype, torch.float32)
    g = x.to(work).reshape(B, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.ndim - 2)
    y = y * weight.to(work).reshape(shape) + bias.to(work).reshape(shape)
    return (y * torch.sigmoid(y)).to(x.dtype)


# The Triton kernel runs one program per (sample, group). A launch of fewer programs than a
# few per SM (an H100 has 132) leaves most of the GPU idle while each program walks a large
# group serially: full-image Stage-A validation is batch 1-8 with 32 groups of ~10^5 values.
MIN_PROGRAMS = 256
MAX_GROUP = 1 << 16


def auto_norm_backend(batch: int, groups: int, group_size: int, *, triton_ok: bool) -> str:
    """What ``backend="auto"`` picks: ``"triton"`` when it may run (``triton_ok``: CUDA
    inference with triton) and the grid of batch x groups programs is wide enough with
    groups small enough to stream, else ``"torch"``."""
    if not triton_ok:
        return "torch"
    if batch * groups < MIN_PROGRAMS or group_size > MAX_GROUP:
        return "torch"
    return "triton"


def group_norm_silu(x, norm: torch.nn.GroupNorm, *, backend="auto"):
    """``silu(norm(x))`` for x (B, C, *spatial) and an affine ``nn.GroupNorm`` over C channels.

    Returns a tensor shaped like x. See the module docstring for the backends.
    """
    _backend.require(backend, op="group_norm_silu", choices=KERNEL_BACKENDS)
    if x.ndim < 2 or x.shape[1] != norm.num_channels:
        raise ValueError(f"group_norm_silu: x has shape {tuple(x.shape)}, expected (B, "
                         f"{norm.num_channels}, ...) for this GroupNorm")
    if not norm.affine:
        raise ValueError("group_norm_silu: the GroupNorm must be affine (weight and bias)")
    if backend == "auto":
        ok = x.dtype in (torch.float32, torch.float16) and _backend.triton_inference(x, norm.weight)
        backend = auto_norm_backend(x.shape[0], norm.num_groups,
                                    x[0].numel() // norm.num_groups, triton_ok=ok)
    if backend == "ref":
        return group_norm_silu_ref(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    if backend == "torch":
        return F.silu(norm(x))
    if _backend.needs_grad(x, norm.weight, norm.bias):
        raise _backend.BackendUnavailable(
            "group_norm_silu: backend 'triton' is forward only and an input requires grad; use "
            "backend='torch' for training or run under torch.no_grad()")
    if x.dtype not in (torch.float32, torch.float16):
        raise _backend.BackendUnavailable(f"group_norm_silu: backend 'triton' takes float32/float16, "
                                          f"got {x.dtype}")
    from ..kernels.groupnorm import group_norm_silu_triton
    return group_norm_silu_triton(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
