"""Building blocks shared by every network: residual conv blocks with an optional time
embedding, self-attention at low resolution, resampling, sinusoidal time embedding."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .norm import KERNEL_BACKENDS, group_norm_silu

__all__ = ["timestep_embedding", "ResBlock", "Attention", "NormSiLUConv", "set_kernel_backend", "KERNEL_BACKENDS", "Down", "Up", "norm"]


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch) if ch % min(8, ch) == 0 else 1, ch)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual; ``emb`` (B, emb_dim) is added as a bias.

    ``backend`` picks the GroupNorm+SiLU implementation (see
    :func:`fastds.models.norm.group_norm_silu`): "auto" fuses it in Triton for CUDA inference.
    """

    def __init__(self, cin: int, cout: int, emb_dim: int = 0, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.n1, self.c1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout) if emb_dim else None
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb=None):
        h = self.c1(group_norm_silu(x, self.n1, backend=self.backend))
        if self.emb is not None and emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.c2(self.drop(group_norm_silu(h, self.n2, backend=self.backend)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over all pixels of a (B, C, H, W) map (low resolution only).

    ``backend`` picks the attention core (see :func:`fastds.models.attention.attention`):
    "auto" runs the fused Triton kernel for CUDA inference and torch's attention otherwise.
    """

    def __init__(self, ch: int, heads: int = 4, backend: str = "auto"):
        super().__init__()
        self.heads = heads if ch % heads == 0 else 1
        self.backend = backend
        self.n = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.n(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        # (B, 3, heads, HW, d) in one copy: torch's fused CPU attention needs the head dim
        # contiguous, and on transposed views falls back to the materialised softmax (3-5x
        # slower on the 8x8 maps here; bench_nn_kernels.py)
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)
        h = attention(q, k, v, backend=self.backend)
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class NormSiLUConv(nn.Sequential):
    """GroupNorm, SiLU, conv (a network's output head) with the first two fused like in
    :class:`ResBlock`; a Sequential, so its parameters keep the names out.0 and out.2."""

    def __init__(self, norm_layer: nn.GroupNorm, conv: nn.Module, backend: str = "auto"):
        super().__init__(norm_layer, nn.SiLU(), conv)
        self.backend = backend

    def forward(self, x):
        return self[2](group_norm_silu(x, self[0], backend=self.backend))


def set_kernel_backend(module: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` ("auto", "ref", "torch", "triton") on every :class:`Attention` and
    :class:`ResBlock` inside ``module``, i.e. for attention and GroupNorm+SiLU; returns it."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"set_kernel_backend: unknown backend {backend!r}; expected one of "
                         f"{', '.join(KERNEL_BACKENDS)}")
    for m in module.modules():
        if isinstance(m, (Attention, ResBlock, NormSiLUConv)):
            m.backend = backend
    return module


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        H, W = x.shape[-2:]
        if tuple(size) == (2 * H, 2 * W):
            # nearest x2 as one broadcast copy: torch's CPU nearest-upsample kernel is about
            # 5x slower on NCHW maps, and this was 13% of a denoiser call on CPU
            x = x[:, :, :, None, :, None].expand(-1, -1, -1, 2, -1, 2).reshape(*x.shape[:2], 2 * H, 2 * W)
        else:  # odd sizes (a 13-pixel map downsampled to 7) need nearest resampling proper
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
