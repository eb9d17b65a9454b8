"""Network kernels as sampling runs them (forward, no grad).

1. Self-attention core at the U-Net's lowest level.

Providers: ``ref`` (the written-out softmax, scores materialised), ``torch``
(``scaled_dot_product_attention``, the peer) and ``triton`` (fastds' fused kernel; CUDA only,
because under the interpreter its timing says nothing). Shapes are (batch*heads, tokens,
head dim): a batch of 256 tile-64 patches of the paper's model (16x16 tokens at the lowest
level, 4 heads of 64) and 16 tile-128 patches (32x32 tokens). Bytes that must move: q, k, v
read and the output written once; items are the 4·N²·D flops per head.

2. GroupNorm + SiLU before every residual-block convolution: ``ref`` (written out),
``torch`` (F.group_norm then F.silu, the peer), ``triton`` (fused, CUDA only) and a memory
copy of the same bytes (x read once, y written once).
"""
import pytest
import torch

from fastds.models.attention import attention, attention_ref
from fastds.models.norm import group_norm_silu

SHAPES = {"256 patches tile 64": (1024, 256, 64), "16 patches tile 128": (64, 1024, 64)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


def _skip_interpreted(provider):
    if provider == "triton" and DEVICE != "cuda":
        pytest.skip("the Triton kernel is timed on a CUDA device only (interpreted timings mean nothing)")


def _timed(benchmark, fn):
    """Time ``fn`` without autograd, waiting for the GPU to finish each call."""

    def synced():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.no_grad():
        benchmark(synced)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["ref", "torch", "triton"])
def test_attention(benchmark, record, shape_name, provider):
    bh, n, d = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(bh, n, d, generator=g).to(DEVICE, DTYPE) for _ in range(3))
    benchmark.group = f"attention {shape_name}: (BH, N, D) = {(bh, n, d)} {str(DTYPE)[6:]} on {DEVICE}"
    _skip_interpreted(provider)

    def fn():
        return attention(q, k, v, backend=provider)

    tol = 1e-2 if DTYPE == torch.float16 else 1e-4
    torch.testing.assert_close(fn(), attention_ref(q, k, v), rtol=tol, atol=tol)
    _timed(benchmark, fn)
    record(benchmark, benchmark.group, provider, nbytes=4 * q.numel() * q.element_size(),
           items=4 * bh * n * n * d, unit="flop")


@pytest.mark.parametrize("provider", ["views", "contiguous"])
def test_attention_layout(benchmark, record, provider):
    """The tiny preset's lowest level as :class:`~fastds.models.blocks.Attention` feeds torch's
    attention: q, k, v cut from one qkv convolution's output (64 patches, 48 channels, 4
    heads, 8x8 tokens). ``views``: transposed views of it (the form before round 17; on CPU
    torch then takes its materialised-softmax path); ``contiguous``: one copy to (B, 3,
    heads, HW, d) first, as the block does now (the copy is timed)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(64, 3, 4, 12, 64, generator=g).to(DEVICE, DTYPE)
    benchmark.group = f"attention as the tiny network calls it: 64 x 4 heads, 8x8 tokens, d 12, {str(DTYPE)[6:]} on {DEVICE}"
    if provider == "views":
        fn = lambda: attention(*(t.transpose(-1, -2) for t in qkv.unbind(1)), backend="torch")  # noqa: E731
    else:
        fn = lambda: attention(*qkv.transpose(-1, -2).contiguous().unbind(1), backend="torch")  # noqa: E731
    tol = 1e-2 if DTYPE == torch.float16 else 1e-4
    torch.testing.assert_close(fn(), attention_ref(*(t.transpose(-1, -2) for t in qkv.unbind(1))),
                               rtol=tol, atol=tol)
    _timed(benchmark, fn)
    record(benchmark, benchmark.group, provider, nbytes=4 * qkv[:, 0].numel() * qkv.element_size(),
           peer=provider == "views")


NORM_SHAPES = {"256 patches 64ch 16x16": (256, 64, 16, 16), "64 patches 128ch 32x32": (64, 128, 32, 32)}


@pytest.mark.parametrize("shape_name", list(NORM_SHAPES))
@pytest.mark.parametrize("provider", ["memcpy", "ref", "torch", "triton"])
def test_group_norm_silu(benchmark, record, shape_name, provider):
    shape = NORM_SHAPES[shape_name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    norm = torch.nn.GroupNorm(8, shape[1]).to(DEVICE)
    benchmark.group = f"GroupNorm+SiLU {shape_name} {str(DTYPE)[6:]} on {DEVICE}"
    _skip_interpreted(provider)
    if provider == "memcpy":
        y = torch.empty_like(x)
        fn = lambda: y.copy_(x)  # noqa: E731
    else:
        fn = lambda: group_norm_silu(x, norm, backend=provider)  # noqa: E731
        with torch.no_grad():
            want = torch.nn.functional.silu(norm(x.float())).to(DTYPE)
            tol = 1e-2 if DTYPE == torch.float16 else 1e-4
            torch.testing.assert_close(fn(), want, rtol=tol, atol=tol)
    _timed(benchmark, fn)
    record(benchmark, benchmark.group, provider, nbytes=2 * x.numel() * x.element_size())
