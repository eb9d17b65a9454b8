"""The Stage C model as a whole: a trainable network plus the frozen transfer encoder, and
the one place that turns a batch of patches into the conditioning tensor."""
from __future__ import annotations

import torch
from torch import nn

from .baselines import VAE, DeterministicUNet
from .transfer import TransferEncoder
from .unet import Denoiser, TemporalUNet

__all__ = ["ConditionalModel", "build_model", "MODEL_KINDS", "N_COVARIATES"]

MODEL_KINDS = ("ddpm", "unet", "vae")
N_COVARIATES = 6


class ConditionalModel(nn.Module):
    """``net`` (trainable) + ``transfer`` (frozen TransferEncoder or None).

    ``cond(coarse (B,1,h,w), covariates (B,6,h,w), lags (B,t_lag,h,w))`` -> (B, C, h, w):
    the channels are [coarse, covariates, transfer features]. ``forward(x_t, t, cond)`` is the
    network call the samplers make.
    """

    def __init__(self, kind: str, net: nn.Module, transfer: TransferEncoder | None):
        super().__init__()
        self.kind = kind
        self.net = net
        self.transfer = transfer

    def cond(self, coarse, covariates, lags=None):
        parts = [coarse, covariates]
        if self.transfer is not None:
            parts.append(self.transfer(lags))
        return torch.cat(parts, 1)

    def forward(self, x_t, t, cond):
        return self.net(x_t, t, cond)


def build_model(kind: str, *, widths, attention=True, t_lag=40, transfer_widths=None,
                transfer_attention=True, prediction="sample", vae_latent=4) -> ConditionalModel:
    """A fresh model. ``transfer_widths`` None: the transfer-free ablation; else a
    TemporalUNet encoder of those widths is built (load Stage A weights into it)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    transfer = None
    if transfer_widths:
        transfer = TransferEncoder.from_unet(TemporalUNet(t_lag, tuple(transfer_widths), transfer_attention))
    cond_ch = 1 + N_COVARIATES + (transfer.out_channels if transfer else 0)
    if kind == "ddpm":
        net = Denoiser(cond_ch, tuple(widths), attention,
                       output="sigmoid" if prediction == "sample" else "linear")
    elif kind == "unet":
        net = DeterministicUNet(cond_ch, tuple(widths), attention)
    else:
        net = VAE(cond_ch, tuple(widths), vae_latent, attention)
    return ConditionalModel(kind, net, transfer)
