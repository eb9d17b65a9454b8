"""The Stage C model as a whole: a trainable network plus the frozen transfer encoder, and
the one place that turns a batch of patches into the conditioning tensor."""
from __future__ import annotations

import torch
from torch import nn

from .baselines import VAE, DeterministicUNet
from .transfer import TransferEncoder
from .unet import Denoiser, TemporalUNet

__all__ = ["ConditionalModel", "FixedBatch", "build_model", "cond_channels", "MODEL_KINDS", "N_COVARIATES"]

MODEL_KINDS = ("ddpm", "unet", "vae")
N_COVARIATES = 6  # the paper's covariate set; the bounded set has 7


class ConditionalModel(nn.Module):
    """``net`` (trainable) + ``transfer`` (frozen TransferEncoder or None).

    ``cond(coarse (B,1,h,w), covariates (B,n_cov,h,w), lags (B,t_lag,h,w))`` -> (B, C, h, w):
    the channels are [coarse, covariates, transfer features, the last ``lag_channels`` lag days].
    ``forward(x_t, t, cond)`` is the network call the samplers make.
    """

    def __init__(self, kind: str, net: nn.Module, transfer: TransferEncoder | None,
                 lag_channels: int = 0):
        super().__init__()
        self.lag_channels = int(lag_channels)
        self.kind = kind
        self.net = net
        self.transfer = transfer
        # the leading covariate channels this model reads, or None: all it is given (a U-Net
        # mean on a narrower set than its DDPM's, train.mean_covariates)
        self.covariate_channels = None
        self.anchor = None  # the residual anchor a trained model carries (load_trained sets it)
        self.regression = None  # CorrDiff-style mean: a frozen regression model (set_regression)

    def compile_for_sampling(self, backend="inductor") -> "ConditionalModel":
        """Put the network (and a regression mean's) through ``torch.compile`` for inference,
        behind :class:`FixedBatch` (one compiled shape per network); returns self. Weights are
        shared, so outputs match the eager network to float rounding; the state dict's keys
        change, so do not save a compiled model. ``backend``: torch.compile's."""
        if not isinstance(self.net, FixedBatch):  # not compiled yet
            self.net = FixedBatch(self.net, backend=backend)
        if self.regression is not None:
            self.regression.compile_for_sampling(backend=backend)
        return self

    def cond(self, coarse, covariates, lags=None, drop=None):
        """``drop`` (B,) bool or None: items whose lag information (transfer features and lag
        channels) is zeroed, the coarse-only fallback that conditioning dropout trains."""
        if self.covariate_channels is not None:
            covariates = covariates[:, :self.covariate_channels]
        parts = [coarse, covariates]
        lag_parts = []
        if self.transfer is not None:
            lag_parts.append(self.transfer(lags))
        if self.lag_channels:
            # the last k fine days at full resolution: the transfer encoder's 4x4-downsampled
            # mid block cannot carry yesterday's sub-cell structure
            lag_parts.append(lags[:, -self.lag_channels:])
        if drop is not None and lag_parts:
            keep = (~drop.to(torch.bool)).to(coarse.dtype).view(-1, 1, 1, 1)
            lag_parts = [p * keep for p in lag_parts]
        return torch.cat(parts + lag_parts, 1)

    def set_regression(self, regression: "ConditionalModel", scale: float = 1.0,
                       inflation: float = 1.0):
        """Make this (diffusion) model generate the residual of a deterministic regression
        model (CorrDiff): the field is ``regression_mean + scale · sample`` (times
        ``inflation`` when sampling with ``sample.calibrate``: the ratio of the regression's
        strict-rollout error on validation days to ``scale``). The regression is frozen (no
        gradient, no optimizer slot, eval mode) and saved with this model."""
        for p in regression.parameters():
            p.requires_grad_(False)
        self.regression = regression.eval()
        self.register_buffer("regression_scale", torch.tensor(float(scale)))
        self.register_buffer("regression_inflation", torch.tensor(float(inflation)))
        # per-band spread gains (fastds.sampling.spread), set by the spread calibration;
        # empty: none (one α for every scale)
        self.register_buffer("regression_bands", torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checkpoints saved before spread calibration (no inflation) or before its per-band
        # gains (none) still load; the gains' length is whatever the calibration saved
        if getattr(self, "regression", None) is not None:
            state_dict.setdefault(prefix + "regression_inflation", torch.tensor(1.0))
            bands = state_dict.setdefault(prefix + "regression_bands", torch.zeros(0))
            if bands.shape != self.regression_bands.shape:
                self.regression_bands = torch.empty_like(bands, device=self.regression_bands.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @torch.no_grad()
    def regression_mean(self, coarse, covariates, lags, drop=None):
        """The regression model's prediction (B, 1, h, w), or None without one."""
        if self.regression is None:
            return None
        self.regression.eval()
        return self.regression(None, None, self.regression.cond(coarse, covariates, lags, drop))

    def shares_conditioning(self) -> bool:
        """True when this model's conditioning tensor is also its regression's: both carry
        frozen transfer encoders with equal weights (Stage A's, loaded into each) and the same
        lag channels, so ``cond(...)`` computed once serves the regression mean too
        (:meth:`regression_mean_of`) and the transfer features of a lag window are computed
        once, not twice. Compared each call: cheap next to one network call."""
        reg = self.regression
        if reg is None or self.transfer is None or reg.transfer is None \
                or reg.lag_channels != self.lag_channels or reg.covariate_channels is not None:
            return False
        a, b = self.transfer.state_dict(), reg.transfer.state_dict()
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)

    @torch.no_grad()
    def regression_mean_of(self, cond):
        """The regression mean (B, 1, h, w) from this model's own conditioning tensor ``cond``
        (B, C, h, w); valid only where :meth:`shares_conditioning` is True."""
        self.regression.eval()
        return self.regression(None, None, cond)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.regression is not None:
            self.regression.eval()
        return self

    def forward(self, x_t, t, cond):
        return self.net(x_t, t, cond)


class FixedBatch(nn.Module):
    """``torch.compile(net, dynamic=False)`` called with one batch size: a call of fewer
    rows than the largest seen so far is padded to it (the last row repeated) and its output
    cut back. Without it every partial batch (a day's last patches, each domain's own) is a
    new static shape to compile, and past dynamo's recompile limit (8 per code object, shared
    by every compiled network of the class) calls fall back to eager without an error. Rows
    are independent in these networks (per-sample GroupNorm, no batch statistics), so the
    padding changes no row's value. Arguments: the network's own; every tensor whose first
    dim is the batch's is padded, None and others pass through."""

    def __init__(self, net: nn.Module, backend="inductor"):
        super().__init__()
        self.inner = net
        self.compiled = torch.compile(net, dynamic=False, backend=backend)
        self.rows, self.broadcast = 0, []

    @property
    def _orig_mod(self):  # as torch.compile's wrapper names the network it compiled
        return self.inner

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the network's own methods and attributes (VAE.generate, ...)
            return getattr(super().__getattr__("inner"), name)

    def fix(self, rows: int) -> None:
        """Pad every smaller call to ``rows`` from now on (the sampler's batch size: a caller
        that lowers its batch then gets that shape, not the padded old one)."""
        self.rows = int(rows)

    def forward(self, *args):
        n = next(a.shape[0] for a in args if torch.is_tensor(a) and a.dim())
        # which arguments are broadcast along the batch (a step's t, stride 0): padded ones
        # stay so, as dynamo guards strides (a 1-row batch cannot tell by itself, so the
        # last full batch's say)
        if n >= self.rows or len(self.broadcast) != len(args):
            self.broadcast = [torch.is_tensor(a) and a.dim() > 0 and a.stride(0) == 0 for a in args]
        if n >= self.rows:
            self.rows = n
            return self.compiled(*args)
        pad = self.rows - n

        def padded(a, broadcast):
            if not (torch.is_tensor(a) and a.dim() and a.shape[0] == n):
                return a
            if broadcast:
                return a[:1].expand(self.rows, *a.shape[1:])
            return torch.cat([a, a[-1:].expand(pad, *a.shape[1:])])
        return self.compiled(*(padded(a, b) for a, b in zip(args, self.broadcast)))[:n]


def cond_channels(n_covariates, transfer, lag_channels) -> int:
    """The width of :meth:`ConditionalModel.cond`'s tensor: coarse, covariates, transfer
    features (``transfer`` None: none), the last ``lag_channels`` lag days."""
    return 1 + int(n_covariates) + (transfer.out_channels if transfer is not None else 0) + int(lag_channels)


def build_model(kind: str, *, widths, attention=True, t_lag=40, transfer_widths=None,
                transfer_attention=True, prediction="sample", vae_latent=4,
                n_covariates=N_COVARIATES, target="absolute", lag_channels=0) -> ConditionalModel:
    """A fresh model. ``transfer_widths`` None: the transfer-free ablation; else a
    TemporalUNet encoder of those widths is built (load Stage A weights into it).
    ``target="absolute"`` (the paper: values in [0, 1]) bounds x0 outputs with a sigmoid;
    ``"residual"`` (a standardised residual, unbounded) keeps every output linear.
    ``lag_channels`` k > 0 also feeds the last k fine lag days as direct channels."""
    if not 0 <= int(lag_channels) <= int(t_lag):
        raise ValueError(f"lag_channels must be in 0..t_lag={t_lag}, got {lag_channels}")
    if target not in ("absolute", "residual"):
        raise ValueError(f"target must be 'absolute' or 'residual', got {target!r}")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    transfer = None
    if transfer_widths:
        transfer = TransferEncoder.from_unet(TemporalUNet(t_lag, tuple(transfer_widths), transfer_attention))
    cond_ch = cond_channels(n_covariates, transfer, lag_channels)
    bounded = target == "absolute"
    if kind == "ddpm":
        net = Denoiser(cond_ch, tuple(widths), attention,
                       output="sigmoid" if bounded and prediction == "sample" else "linear")
    elif kind == "unet":
        net = DeterministicUNet(cond_ch, tuple(widths), attention,
                                output="sigmoid" if bounded else "linear")
    else:
        net = VAE(cond_ch, tuple(widths), vae_latent, attention,
                  output="sigmoid" if bounded else "linear")
    return ConditionalModel(kind, net, transfer, lag_channels)
