"""Stage B: the frozen transfer encoder (METHOD.md §3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import TemporalUNet, UNetEncoder, _pad_to

__all__ = ["TransferEncoder"]


class TransferEncoder(nn.Module):
    """Stage A's encoder, frozen, applied to a fine lag stack.

    forward(lags (B, t_lag, h, w)) -> features (B, C, h, w): the mid-block output (C = the
    last Stage-A width, 256 in the paper) bilinearly upsampled to the patch size. Frozen for
    real: parameters have ``requires_grad=False``, the module stays in eval mode whatever
    ``train()`` says, and forward runs under ``torch.no_grad``, so optimizers built from
    trainable parameters never see it (no update, no weight decay: Eq. 3).
    """

    def __init__(self, encoder: UNetEncoder):
        super().__init__()
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    @classmethod
    def from_unet(cls, unet: TemporalUNet) -> "TransferEncoder":
        return cls(unet.encoder)

    @property
    def out_channels(self) -> int:
        return self.encoder.out_channels

    def train(self, mode: bool = True):
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, lags):
        x, (H, W) = _pad_to(lags, self.encoder.multiple)
        mid, _ = self.encoder(x)
        return F.interpolate(mid, size=(H, W), mode="bilinear", align_corners=False)
