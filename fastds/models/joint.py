"""Several species as channels of one field: the joint residual model.

CorrDiff over the species' own U-Nets: each species keeps its trained U-Net (frozen) as its
mean and as its conditioning (its coarse field, the covariates, its Stage-A transfer
features of its own lag window); one denoiser sees every species' conditioning at once and
generates the K species' scaled residuals as the K channels of one field, so what the
species share (transport, the weather of the day) is learned, not imposed afterwards by
correlated latents.
"""
from __future__ import annotations

import torch
from torch import nn

from .conditional import ConditionalModel, FixedBatch, cond_channels
from .unet import Denoiser

__all__ = ["JointModel", "build_joint"]


class JointModel(nn.Module):
    """K frozen species U-Nets (``means``, each a :class:`ConditionalModel`) + one trainable
    :class:`~fastds.models.unet.Denoiser` of K channels (``net``).

    ``cond(coarse (B,K,h,w), covariates (B,n_cov,h,w), lags (B,K·t_lag,h,w), drop)`` ->
    (B, Σ_k C_k, h, w): each species' own conditioning tensor, side by side (species k's lag
    window is ``lags[:, k·t_lag:(k+1)·t_lag]``). ``regression_mean_of(cond)`` -> the means
    (B, K, h, w) from that tensor (each U-Net reads its own slice: the transfer features are
    computed once for the mean and the residual). ``forward(x_t (B,K,h,w), t, cond)`` ->
    (B, K, h, w). Buffers ``regression_scale`` and ``regression_inflation`` are (K,): the
    residual of species k is ``regression_scale[k]`` times the generated channel k.
    """

    kind = "ddpm"

    def __init__(self, means, net: Denoiser, names, n_covariates: int):
        super().__init__()
        if len(means) != len(names) or len(means) < 2:
            raise ValueError(f"JointModel: needs one U-Net per species and at least two species, "
                             f"got {len(means)} U-Nets for {list(names)}")
        for m in means:
            if not isinstance(m, ConditionalModel) or m.kind != "unet":
                raise ValueError("JointModel: every species mean must be a trained U-Net ConditionalModel")
            for p in m.parameters():
                p.requires_grad_(False)
        self.means = nn.ModuleList(means).eval()
        self.net = net
        self.names = list(names)
        # each species' conditioning width: coarse, covariates, transfer features, lag channels
        self.cond_split = [cond_channels(n_covariates, m.transfer, m.lag_channels) for m in means]
        K = len(names)
        self.register_buffer("regression_scale", torch.ones(K))
        self.register_buffer("regression_inflation", torch.ones(K))
        # per-species band gains (K, bands) set by the spread calibration; empty: none
        self.register_buffer("regression_bands", torch.zeros(0))
        self.anchors = [m.anchor for m in means]  # each species' residual anchor μ
        self.calibration = None

    @property
    def channels(self) -> int:
        return len(self.names)

    @property
    def regression(self):
        """The species' means (what makes the sampler treat this as a CorrDiff model)."""
        return self.means

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        bands = state_dict.get(prefix + "regression_bands")
        if bands is not None and bands.shape != self.regression_bands.shape:
            self.regression_bands = torch.empty_like(bands, device=self.regression_bands.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def cond(self, coarse, covariates, lags, drop=None):
        K = self.channels
        if coarse.shape[1] != K or lags.shape[1] % K:
            raise ValueError(f"JointModel.cond: coarse needs {K} channels and lags a multiple of {K}, "
                             f"got {tuple(coarse.shape)} and {tuple(lags.shape)}")
        t = lags.shape[1] // K
        return torch.cat([m.cond(coarse[:, k:k + 1], covariates, lags[:, k * t:(k + 1) * t], drop)
                          for k, m in enumerate(self.means)], 1)

    @torch.no_grad()
    def regression_mean_of(self, cond):
        """The species' means (B, K, h, w) from this model's conditioning tensor."""
        parts = torch.split(cond, self.cond_split, 1)
        return torch.cat([m(None, None, c) for m, c in zip(self.means, parts)], 1)

    @torch.no_grad()
    def regression_mean(self, coarse, covariates, lags, drop=None):
        return self.regression_mean_of(self.cond(coarse, covariates, lags, drop))

    def shares_conditioning(self) -> bool:
        return True  # the denoiser's conditioning is the means' own, by construction

    def compile_for_sampling(self, backend="inductor") -> "JointModel":
        """The denoiser through ``torch.compile`` for inference, behind
        :class:`~fastds.models.conditional.FixedBatch` (as
        :meth:`ConditionalModel.compile_for_sampling`); returns self."""
        if not isinstance(self.net, FixedBatch):
            self.net = FixedBatch(self.net, backend=backend)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.means.eval()
        return self

    def forward(self, x_t, t, cond):
        return self.net(x_t, t, cond)


def build_joint(means, names, *, widths, attention=True, n_covariates) -> JointModel:
    """A joint model over the trained species U-Nets ``means`` (one per name in ``names``):
    the denoiser's input is every species' conditioning (each U-Net's: coarse, covariates,
    transfer features, lag channels) plus the K noisy channels."""
    cond = sum(cond_channels(n_covariates, m.transfer, m.lag_channels) for m in means)
    net = Denoiser(cond, tuple(widths), attention, output="linear", channels=len(names))
    return JointModel(means, net, names, n_covariates)
