"""The U-Nets: Stage A's TemporalUNet (with the ``encoder`` Stage B reuses) and Stage C's
conditional Denoiser. Shapes: inputs (B, C, H, W) with any H, W (padded internally to a
multiple of 2**(levels-1) and cropped back)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Attention, Down, NormSiLUConv, ResBlock, Up, timestep_embedding

__all__ = ["UNetEncoder", "UNetDecoder", "TemporalUNet", "Denoiser"]


def _pad_to(x, mult):
    H, W = x.shape[-2:]
    ph, pw = (-H) % mult, (-W) % mult
    return (F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x), (H, W)


class UNetEncoder(nn.Module):
    """Input conv, one ResBlock per level with downsampling between levels, and a mid block
    (ResBlock, attention if asked, ResBlock). ``forward(x, emb)`` -> (mid, skips)."""

    def __init__(self, cin: int, widths=(64, 128, 256), attention=True, emb_dim=0):
        super().__init__()
        self.widths = tuple(widths)
        self.inp = nn.Conv2d(cin, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = widths[0]
        for i, w in enumerate(widths):
            self.blocks.append(ResBlock(prev, w, emb_dim))
            prev = w
            if i < len(widths) - 1:
                self.downs.append(Down(w))
        self.mid1 = ResBlock(prev, prev, emb_dim)
        self.attn = Attention(prev) if attention else nn.Identity()
        self.mid2 = ResBlock(prev, prev, emb_dim)
        self.out_channels = prev

    @property
    def multiple(self):
        return 2 ** (len(self.widths) - 1)

    def forward(self, x, emb=None):
        h = self.inp(x)
        skips = []
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        return h, skips


class UNetDecoder(nn.Module):
    def __init__(self, cout: int, widths=(64, 128, 256), emb_dim=0):
        super().__init__()
        rev = list(reversed(widths))
        self.blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        prev = rev[0]
        for i, w in enumerate(rev):
            if i > 0:
                self.ups.append(Up(prev))
            self.blocks.append(ResBlock(prev + w, w, emb_dim))
            prev = w
        self.out = NormSiLUConv(nn.GroupNorm(1, prev), nn.Conv2d(prev, cout, 3, padding=1))

    def forward(self, h, skips, emb=None):
        for i, block in enumerate(self.blocks):
            skip = skips[-1 - i]
            if i > 0:
                h = self.ups[i - 1](h, skip.shape[-2:])
            h = block(torch.cat([h, skip], 1), emb)
        return self.out(h)


class TemporalUNet(nn.Module):
    """Stage A: ``t_lag`` coarse days as channels -> the next day.

    forward(lags (B, t_lag, H, W)) -> (B, 1, H, W). ``self.encoder`` is exactly what the
    transfer encoder reuses (input conv, down blocks, mid block).
    """

    def __init__(self, t_lag=40, widths=(64, 128, 256), attention=True):
        super().__init__()
        self.t_lag = t_lag
        self.encoder = UNetEncoder(t_lag, widths, attention)
        self.decoder = UNetDecoder(1, widths)

    def forward(self, lags):
        x, (H, W) = _pad_to(lags, self.encoder.multiple)
        h, skips = self.encoder(x)
        return self.decoder(h, skips)[..., :H, :W]


class Denoiser(nn.Module):
    """Stage C network: ``model(x_t, t, cond)``.

    x_t (B, channels, h, w) noisy target (or None for the deterministic baseline);
    t (B,) long timesteps (ignored when ``timesteps=False``);
    cond (B, cond_channels, h, w): next-day coarse, covariates, transfer features.
    Returns (B, channels, h, w) (``channels`` > 1: several species as one field, see
    :class:`~fastds.models.joint.JointModel`); ``output="sigmoid"`` bounds it to (0, 1) like the reference code's
    x0 prediction, ``"linear"`` for epsilon/v prediction and baselines in other spaces.
    """

    def __init__(self, cond_channels, widths=(64, 128, 256), attention=True, timesteps=True,
                 noisy_input=True, output="sigmoid", channels=1):
        super().__init__()
        self.timesteps = timesteps
        self.noisy_input = noisy_input
        self.emb_dim = 4 * widths[0] if timesteps else 0
        if timesteps:
            self.temb = nn.Sequential(nn.Linear(widths[0], self.emb_dim), nn.SiLU(),
                                      nn.Linear(self.emb_dim, self.emb_dim))
        cin = cond_channels + (int(channels) if noisy_input else 0)
        self.encoder = UNetEncoder(cin, widths, attention, self.emb_dim)
        self.decoder = UNetDecoder(int(channels), widths, self.emb_dim)
        if output not in ("sigmoid", "linear"):
            raise ValueError(f"output must be 'sigmoid' or 'linear', got {output!r}")
        self.output = output

    def forward(self, x_t, t, cond):
        parts = [x_t, cond] if self.noisy_input else [cond]
        x, (H, W) = _pad_to(torch.cat(parts, 1), self.encoder.multiple)
        emb = None
        if self.timesteps:
            emb = self.temb(timestep_embedding(t, self.encoder.widths[0]))
        h, skips = self.encoder(x, emb)
        out = self.decoder(h, skips, emb)[..., :H, :W]
        return torch.sigmoid(out) if self.output == "sigmoid" else out
