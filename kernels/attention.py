"""Triton fused self-attention forward (fastds.kernels.attention).

softmax(q kᵀ · scale) v for (BH, N, D) tensors without ever materialising the (N, N) score
matrix: one program owns BLOCK_M query rows of one head, streams the keys and values in
BLOCK_N tiles and keeps a running max and sum (the online softmax of FlashAttention), so
memory traffic is one read of q, k, v per query block and one write of the output. Scores
and accumulators are float32 whatever the input dtype. fp32 inputs use IEEE fp32 dots, the
precision torch's own attention gives on CPU and with TF32 off, so the kernel is a drop-in
for it; fp16 inputs use fp16 tensor-core dots.

Forward only: sampling is where attention's cost lies (it runs at every diffusion step of
every patch), while training keeps torch's differentiable attention. The reference is
``fastds.models.attention.attention_ref``; the dispatcher is ``fastds.models.attention.attention``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["attention_fwd_kernel", "attention_triton", "block_sizes"]


@triton.jit
def attention_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, n, d, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         IEEE: tl.constexpr):
    # heads on grid axis 0: axis 1 stops at 65,535 programs, and batch x heads can pass that
    head = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    base = head * n * d  # contiguous (BH, N, D)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < d
    q = tl.load(q_ptr + base + rows[:, None] * d + cols_d[None, :],
                mask=(rows < n)[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        kv_mask = (keys < n)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + base + keys[:, None] * d + cols_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where((keys < n)[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + base + keys[:, None] * d + cols_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + base + rows[:, None] * d + cols_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rows < n)[:, None] & d_ok[None, :])


def block_sizes(d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for head dim ``d``. tl.dot needs every block dim >= 16;
    tiles shrink as rows widen so that q, k, v and the scores stay under 99 KiB of shared
    memory, the most an sm_86/sm_89 block may have (sm_90 allows 227 KiB)."""
    block_d = max(16, triton.next_power_of_2(d))
    if block_d > 256:
        raise ValueError(f"attention_triton: head dim {d} > 256 is not supported")
    row_bytes = block_d * (4 if dtype == torch.float32 else 2)
    if row_bytes <= 128:
        return 64, 64, block_d
    if row_bytes <= 256:
        return 64, 32, block_d
    if row_bytes <= 512:
        return 32, 32, block_d
    return 16, 16, block_d


def attention_triton(q, k, v, *, scale=None, out=None):
    """Launch :func:`attention_fwd_kernel` on (BH, N, D) float32/float16 tensors (same shape,
    device and dtype). ``scale`` defaults to D**-0.5. Returns ``out`` (BH, N, D)."""
    if q.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"attention_triton: dtype {q.dtype} is not supported (float32, float16)")
    if q.ndim != 3:
        raise ValueError(f"attention_triton: q must be (BH, N, D), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v), ("out", out)):
        if t is not None and (t.shape != q.shape or t.dtype != q.dtype or t.device != q.device):
            raise ValueError(f"attention_triton: {name} is {t.dtype} {tuple(t.shape)} on {t.device}; "
                             f"expected q's {q.dtype} {tuple(q.shape)} on {q.device}")
    q, k, v = (t.contiguous() for t in (q, k, v))
    bh, n, d = q.shape
    dst = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None or not out.is_contiguous() else out
    bm, bn, bd = block_sizes(d, q.dtype)
    grid = (bh, triton.cdiv(n, bm))
    with device_of(q):
        attention_fwd_kernel[grid](q, k, v, dst, n, d, float(d ** -0.5 if scale is None else scale),
                                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=q.dtype == torch.float32)
    return dst if out is None or dst is out else out.copy_(dst)


def device_of(t):
    """Launch on ``t``'s GPU whatever device is current (a no-op for CPU tensors, which the
    interpreter runs)."""
    import contextlib
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
