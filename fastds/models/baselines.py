"""Baselines with the same inputs as the DDPM (METHOD.md §4): a deterministic U-Net (L1) and a
conditional VAE (KL + reconstruction). Plain interpolation lives in fastds.sampling."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ResBlock
from .unet import Denoiser, _pad_to

__all__ = ["DeterministicUNet", "VAE"]


class DeterministicUNet(Denoiser):
    """``model(None, t, cond)`` -> (B, 1, h, w); no noisy input, no time embedding."""

    def __init__(self, cond_channels, widths=(64, 128, 256), attention=True, output="sigmoid"):
        super().__init__(cond_channels, widths, attention, timesteps=False, noisy_input=False,
                         output=output)


class VAE(nn.Module):
    """Conditional VAE. Training: ``forward(target, cond)`` -> (recon, mu, logvar); the latent
    is a (latent, h/4, w/4) map encoded from target and cond. Sampling: ``generate(cond, z)``
    with z ~ N(0, I) of shape ``latent_shape(cond)``."""

    def __init__(self, cond_channels, widths=(64, 128, 256), latent=4, attention=True,
                 output="sigmoid"):
        super().__init__()
        w = widths[0]
        self.latent = latent
        self.enc = nn.Sequential(
            nn.Conv2d(cond_channels + 1, w, 3, padding=1), ResBlock(w, w),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), ResBlock(2 * w, 2 * w),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), ResBlock(2 * w, 2 * w),
            nn.Conv2d(2 * w, 2 * latent, 1))
        self.dec = Denoiser(cond_channels + latent, widths, attention, timesteps=False,
                            noisy_input=False, output=output)

    def latent_shape(self, cond):
        B, _, H, W = cond.shape
        return (B, self.latent, -(-H // 4), -(-W // 4))

    def generate(self, cond, z):
        zz = F.interpolate(z, size=cond.shape[-2:], mode="nearest")
        return self.dec(None, None, torch.cat([cond, zz], 1))

    def forward(self, target, cond):
        x, (H, W) = _pad_to(torch.cat([target, cond], 1), 4)
        mu, logvar = self.enc(x).chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.generate(cond, z[..., : -(-H // 4), : -(-W // 4)]), mu, logvar
