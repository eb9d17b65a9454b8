"""Self-attention core with one dispatcher: softmax(q kᵀ · scale) v.

Backends
- ``ref``: the formula written out (scores materialised), the named reference.
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` (differentiable).
- ``triton``: the fused forward kernel of ``fastds.kernels.attention`` (CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``); forward only, so never under autograd.

``backend="auto"`` takes ``triton`` for CUDA inference when triton is installed, else ``torch``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend

__all__ = ["attention", "attention_ref", "ATTENTION_BACKENDS"]

ATTENTION_BACKENDS = ("auto", "ref", "torch", "triton")


def attention_ref(q, k, v, *, scale=None):
    """softmax(q kᵀ · scale) v with the scores materialised, computed in float32 at least.

    q, k, v : (..., N, D); ``scale`` defaults to D**-0.5. Returns (..., N, D) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.to(work)).to(q.dtype)


def _auto(q, k, v):
    if (q.dtype in (torch.float32, torch.float16) and q.shape[-1] <= 256
            and _backend.triton_inference(q, k, v)):
        return "triton"
    return "torch"


def attention(q, k, v, *, scale=None, backend="auto"):
    """Attention over the last two dims of q, k, v: (..., N, D) each, same shape and dtype.

    Returns (..., N, D). ``scale`` defaults to D**-0.5. Leading dims (batch, heads) are
    flattened for the kernel and restored. See the module docstring for the backends.
    """
    _backend.require(backend, op="attention", choices=ATTENTION_BACKENDS)
    if q.ndim < 2 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention: q, k, v must share one (..., N, D) shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"attention: q, k, v must share one floating dtype; got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if backend == "auto":
        backend = _auto(q, k, v)
    if backend == "ref":
        return attention_ref(q, k, v, scale=scale)
    if backend == "torch":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if _backend.needs_grad(q, k, v):
        raise _backend.BackendUnavailable(
            "attention: backend 'triton' is forward only and an input requires grad; use "
            "backend='torch' for training or run under torch.no_grad()")
    if q.dtype not in (torch.float32, torch.float16) or q.shape[-1] > 256:
        raise _backend.BackendUnavailable(
            f"attention: backend 'triton' takes float32/float16 with head dim <= 256; got "
            f"{q.dtype}, head dim {q.shape[-1]}")
    from ..kernels.attention import attention_triton
    lead, (n, d) = q.shape[:-2], q.shape[-2:]
    out = attention_triton(q.reshape(-1, n, d), k.reshape(-1, n, d), v.reshape(-1, n, d), scale=scale)
    return out.reshape(*lead, n, d)
