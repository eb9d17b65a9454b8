"""Null ensembles: the U-Net plus noise that knows nothing about the day.

A generative model earns its cost only if it beats these on proper scores. Each is the
trained U-Net's day (its own lag history per member in a strict rollout, projected like every
learned model), with its validation bias removed, plus a residual field drawn in log10:

- ``unet+iid``: i.i.d. Gaussian noise of the validation error's sd;
- ``unet+grf``: a Gaussian random field with the radially averaged power spectrum of the
  validation residuals (same variance, realistic texture, no knowledge of the day);
- ``unet+resample``: a validation residual field of the same season, randomly shifted
  within its mirror extension and randomly flipped (the real residuals' marginals and
  texture).

The statistics come from the store's validation days of the season with true lags
(lenient), fitted once per run, season and projection setting and cached in the run folder
(``nulls/``). With ``sample.null_spread = "rollouts"`` the noise is then scaled by one factor
per season, picked by the fair CRPS of the null's own strict rollouts over the season's
validation blocks (:func:`fastds.sampling.pipeline.null_factor`, cached beside them): a
rollout's errors compound, and true lags do not show it. Draws are a pure function of (seed,
member, day): no state between days.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import atomic_path

__all__ = ["NULLS", "NULL_SPREADS", "NULL_FIT_MEMBERS", "NULL_STATS_VERSION", "NullStats", "fit_null_stats", "draw_null", "radial_spectrum", "grf_field"]

NULLS = ("unet+iid", "unet+grf", "unet+resample")
# sample.null_spread: the validation days' error statistics as they are, or times one factor
# per season fitted on strict validation rollouts (pipeline.null_factor)
NULL_SPREADS = ("validation", "rollouts")
NULL_FIT_MEMBERS = 8  # the ensemble a null's rollout factor is fitted with (the fair CRPS does
                      # not depend on the member count, so one fit serves every request)
# in the cached statistics' file names: a change to what fit_null_stats computes bumps it, so
# a run's cache from older code is fitted again instead of read (2: the mirror-extended spectrum)
NULL_STATS_VERSION = 2


@dataclass
class NullStats:
    """bias: mean validation residual (log10 truth − log10 U-Net); sd: its sd after the bias;
    k, power: radially averaged power spectrum of the debiased residuals (k in cycles per
    pixel); bank (n, H, W): the debiased residual fields."""
    bias: float
    sd: float
    k: np.ndarray
    power: np.ndarray
    bank: np.ndarray

    def save(self, path: Path):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, bias=self.bias, sd=self.sd, k=self.k, power=self.power, bank=self.bank)

    @classmethod
    def load(cls, path: Path) -> "NullStats":
        with np.load(path) as z:
            return cls(float(z["bias"]), float(z["sd"]), z["k"], z["power"], z["bank"])


def _mirrored(f):
    """(..., H, W) -> its mirror extension (..., 2H, 2W): periodic, with no jump at its edges."""
    f = np.concatenate([f, f[..., ::-1, :]], -2)
    return np.concatenate([f, f[..., ::-1]], -1)


def radial_spectrum(fields, nbins=24):
    """Mean radially averaged power of fields (n, H, W) (each mean-removed): (k centres in
    cycles per pixel, power) on ``nbins`` bins up to Nyquist. Each field is transformed with
    its mirror extension (2H, 2W): a residual field does not wrap around, and a plain FFT
    reads the jump between its edges as fine-scale power (a GRF drawn from such an estimate
    had 2.4x the residuals' power near Nyquist); the extension is periodic without a jump,
    and unlike a taper it keeps the largest scales' power."""
    f = np.asarray(fields, float)
    f = _mirrored(f - f.mean(axis=(-2, -1), keepdims=True))
    p = (np.abs(np.fft.fft2(f)) ** 2).mean(axis=0) / 4  # per pixel of the field, not the extension
    ky, kx = np.fft.fftfreq(f.shape[-2])[:, None], np.fft.fftfreq(f.shape[-1])[None, :]
    k = np.sqrt(ky ** 2 + kx ** 2).ravel()
    edges = np.linspace(0, np.sqrt(0.5), nbins + 1)
    which = np.clip(np.digitize(k, edges) - 1, 0, nbins - 1)
    power = np.bincount(which, weights=p.ravel(), minlength=nbins) / np.maximum(
        np.bincount(which, minlength=nbins), 1)
    return 0.5 * (edges[1:] + edges[:-1]), power


def grf_field(shape, k, power, sd, rng):
    """A stationary Gaussian random field (H, W) whose radially averaged spectrum follows
    (k, power), scaled to standard deviation ``sd``: white noise filtered in Fourier space."""
    H, W = shape
    ky, kx = np.fft.fftfreq(H)[:, None], np.fft.fftfreq(W)[None, :]
    amp = np.sqrt(np.maximum(np.interp(np.sqrt(ky ** 2 + kx ** 2), k, power), 0.0))
    amp[0, 0] = 0.0
    f = np.fft.ifft2(np.fft.fft2(rng.standard_normal((H, W))) * amp).real
    s = f.std()
    return f * (sd / s) if s > 0 else f


def fit_null_stats(residuals) -> NullStats:
    """Null statistics from validation residual fields (n, H, W), log10 truth − log10 U-Net."""
    r = np.asarray(residuals, float)
    if r.ndim != 3 or len(r) == 0:
        raise ValueError(f"fit_null_stats: need (n >= 1, H, W) residual fields, got {r.shape}")
    bias = float(np.nanmean(r))
    d = np.nan_to_num(r - bias)
    k, power = radial_spectrum(d)
    return NullStats(bias, float(d.std()), k, power, d.astype(np.float32))


def draw_null(kind, stats: NullStats, shape, rng):
    """One residual field (H, W) of null ``kind`` (log10, debiased: add it after removing
    ``stats.bias`` from the U-Net's log10 field)."""
    if kind == "unet+iid":
        return stats.sd * rng.standard_normal(shape)
    if kind == "unet+grf":
        return grf_field(shape, stats.k, stats.power, stats.sd, rng)
    if kind == "unet+resample":
        f = stats.bank[rng.integers(len(stats.bank))]
        if f.shape != tuple(shape):
            raise ValueError(f"draw_null: bank fields are {f.shape}, the day is {tuple(shape)}")
        # shifted within the field's mirror extension (2H, 2W), which is periodic and has
        # no jump: a plain roll would put the seam of its wrapped edges inside the day
        H, W = f.shape
        f = np.roll(_mirrored(f), (int(rng.integers(2 * H)), int(rng.integers(2 * W))), axis=(0, 1))[:H, :W]
        if rng.random() < 0.5:
            f = f[::-1]
        if rng.random() < 0.5:
            f = f[:, ::-1]
        return np.ascontiguousarray(f)
    raise ValueError(f"draw_null: kind must be one of {', '.join(NULLS)}, got {kind!r}")


def null_rng(seed, member, day_key, kind):
    """The generator of one member's draw on one day: a pure function of its arguments."""
    return np.random.default_rng([int(seed), int(member), int(day_key), NULLS.index(kind), 7])
