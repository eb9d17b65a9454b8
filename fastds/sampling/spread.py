"""Widening a residual ensemble: one inflation α, or one gain per spatial scale.

A single α multiplies every scale of the DDPM's residual alike, while a few-step sampler's
deficit depends on scale (a 5-step DDIM keeps most of the large-scale variance and little
of the finest). :func:`band_split` cuts a field into Gaussian difference bands that sum back
to it exactly (finest first: r − G₀.₅r, G₀.₅r − G₁r, ..., G₄r − G₈r, G₈r, with σ in fine
pixels), and :func:`widen` scales each band by
its gain. The gains are fitted per band on validation days so that the ensemble's spread
matches its mean's error at each scale (``training.stages.calibrate_spread``).

A Gaussian band is wide in wavenumber: the finest, r − G₀.₅r, spans about 0.2 cycles per
pixel to the grid's corner, so a gain that matches its spread to its error can leave the
member's power near Nyquist well below the truth's while the band as a whole matches.
:func:`spectral_split` cuts the field instead by wavenumber |k| (piecewise-linear hats on
SPECTRAL_NODES that sum to 1, applied to the field's mirror extension, so no periodicity is
assumed), and :func:`filter_spectral` is its gain curve; ``split="spectral"`` selects them in
:func:`widen` (``sample.calibrate_to = "spectrum"``).
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["BAND_SIGMAS", "SPECTRAL_NODES", "SPLITS", "band_split", "filter_bands", "spectral_split",
           "filter_spectral", "widen", "widen_parts"]

# the finest band (r − G₀.₅ r) holds wavelengths of about 2–3 px, where a few-step sampler
# loses the most power; 8 px is the coarse cell of the paper's grids
BAND_SIGMAS = (0.5, 1.0, 2.0, 4.0, 8.0)


def band_split(r, sigmas=BAND_SIGMAS) -> np.ndarray:
    """Fields (..., H, W) -> bands (len(sigmas) + 1, ..., H, W), float64, finest first; their
    sum is ``r`` (to float rounding). Gaussian blurs over the last two axes, reflected at
    the edges (no periodicity assumed)."""
    from scipy.ndimage import gaussian_filter
    r = np.asarray(r, np.float64)
    levels = [r] + [gaussian_filter(r, s, mode="reflect", axes=(-2, -1)) for s in sigmas]
    return np.stack([levels[k] - levels[k + 1] for k in range(len(sigmas))] + [levels[-1]])


def filter_bands(r, gains, sigmas=BAND_SIGMAS) -> np.ndarray:
    """Σ_k gains[k] · band_k(r): (..., H, W) in ``r``'s dtype."""
    gains = np.asarray(gains, np.float64)
    if gains.shape != (len(sigmas) + 1,):
        raise ValueError(f"widen: gains must have {len(sigmas) + 1} entries (one per band), got {gains.shape}")
    return np.tensordot(gains, band_split(r, sigmas), axes=1).astype(np.asarray(r).dtype)


# radial wavenumbers (cycles per fine pixel) of the spectral bands' hats: the coarse cell of
# the paper's grids is 8 px (1/8), Nyquist 1/2 and the grid's corner 1/√2; the step of 1/16
# resolves the scales finer than the cell, where a few-step sampler's texture errs
SPECTRAL_NODES = (0.0, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 2 ** -0.5)


@functools.lru_cache(maxsize=16)
def _hats(shape, nodes) -> np.ndarray:
    """The spectral bands' responses on the rfft2 grid of a (H, W) field's mirror extension
    (2H, 2W): (len(nodes), 2H, W + 1), summing to 1 at every wavenumber."""
    h, w = shape
    k = np.hypot(np.fft.fftfreq(2 * h)[:, None], np.fft.rfftfreq(2 * w)[None, :])
    eye = np.eye(len(nodes))
    return np.stack([np.interp(k, nodes, eye[b]) for b in range(len(nodes))])


def _spectral(r, response):
    """Filter fields (..., H, W) by ``response`` (..., 2H, W + 1) on their mirror extension
    (even about both edges, so the filter sees no jump at the field's border): float64."""
    import scipy.fft as sf
    r = np.asarray(r, np.float64)
    h, w = r.shape[-2:]
    ext = np.concatenate([r, r[..., ::-1, :]], axis=-2)
    ext = np.concatenate([ext, ext[..., :, ::-1]], axis=-1)
    return sf.irfft2(sf.rfft2(ext) * response, s=(2 * h, 2 * w))[..., :h, :w]


def spectral_split(r, nodes=SPECTRAL_NODES) -> np.ndarray:
    """Fields (..., H, W) -> bands (len(nodes), ..., H, W), float64, coarsest first (band b
    peaks at |k| = nodes[b] cycles per pixel); their sum is ``r`` (to float rounding)."""
    r = np.asarray(r, np.float64)
    hats = _hats(r.shape[-2:], tuple(nodes))
    return np.stack([_spectral(r, hb) for hb in hats])


def filter_spectral(r, gains, nodes=SPECTRAL_NODES) -> np.ndarray:
    """Σ_b gains[b] · spectral band b of ``r`` in one filtering (the gain is piecewise linear
    in |k| between the nodes): (..., H, W) in ``r``'s dtype."""
    gains = np.asarray(gains, np.float64)
    if gains.shape != (len(nodes),):
        raise ValueError(f"widen: spectral gains must have {len(nodes)} entries (one per node), got {gains.shape}")
    r = np.asarray(r)
    response = np.tensordot(gains, _hats(r.shape[-2:], tuple(nodes)), axes=1)
    return _spectral(r, response).astype(r.dtype)


# a band split by name: (split, filter by per-band gains)
SPLITS = {"gauss": (band_split, filter_bands), "spectral": (spectral_split, filter_spectral)}


def _filter(split):
    if split not in SPLITS:
        raise ValueError(f"widen: split must be one of {', '.join(SPLITS)}, got {split!r}")
    return SPLITS[split][1]


def widen(r, alpha=1.0, *, gains=None, member0=0, antithetic=False, split="gauss"):
    """Widen an ensemble's residuals (members, H, W) by α, or by a gain per band (``gains``,
    α folded in: see :func:`filter_bands`, or :func:`filter_spectral` with ``split =
    "spectral"``).

    Antithetic pairs (members 2j, 2j+1, both in ``r``) are split into their mean
    e = (r₊ + r₋)/2 and half-difference o = (r₊ − r₋)/2 and become e ± A(o): the widening A
    acts on the spread and leaves the pair mean (the generator's own mean correction) alone;
    each member's variance over draws becomes Var(e) + Var(A(o)) (e is even and o odd in the
    latents, so they are uncorrelated). Independent members, and a pair member whose
    partner is not in ``r`` (a lone member 0), get A(r). The identity (α = 1, no gains)
    returns ``r`` itself.
    """
    if gains is None and alpha == 1.0:
        return r
    if gains is None:
        op = lambda x: alpha * x  # noqa: E731
    else:
        filt = _filter(split)
        op = lambda x: filt(x, gains)  # noqa: E731
    out = op(r)
    if antithetic:
        for k in range(len(r) - 1):
            if (int(member0) + k) % 2 == 0:
                e, o = 0.5 * (r[k] + r[k + 1]), op(0.5 * (r[k] - r[k + 1]))
                out[k], out[k + 1] = e + o, e - o
    return out


def widen_parts(r, gains=None, *, member0=0, antithetic=False, split="gauss"):
    """(base, spread), each like ``r``, with widen(r, a·gains) = base + a·spread (to float
    rounding; ``gains`` None: one inflation a): how a calibration scans the factor a without
    filtering again for each value."""
    filt = _filter(split)
    op = (lambda x: x) if gains is None else (lambda x: filt(x, gains))  # noqa: E731
    base, spread = np.zeros_like(r), op(r)
    if antithetic:
        for k in range(len(r) - 1):
            if (int(member0) + k) % 2 == 0:
                e, o = 0.5 * (r[k] + r[k + 1]), op(0.5 * (r[k] - r[k + 1]))
                base[k], base[k + 1], spread[k], spread[k + 1] = e, e, o, -o
    return base, spread
