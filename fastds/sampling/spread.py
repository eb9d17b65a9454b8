"""Widening a residual ensemble: one inflation α, or one gain per spatial scale.

A single α multiplies every scale of the DDPM's residual alike, while a few-step sampler's
deficit depends on scale (a 5-step DDIM keeps most of the large-scale variance and little
of the finest). :func:`band_split` cuts a field into Gaussian difference bands that sum back
to it exactly (finest first: r − G₀.₅r, G₀.₅r − G₁r, ..., G₄r − G₈r, G₈r, with σ in fine
pixels), and :func:`widen` scales each band by
its gain. The gains are fitted per band on validation days so that the ensemble's spread
matches its mean's error at each scale (``training.stages.calibrate_spread``).

The Gaussian bands cannot isolate the grid scale: their finest one spans 0.2 cycles/px to
the grid's corner, and within it a few-step sample is too rough at 3–5 px wavelengths and
too smooth at 2–2.5 px, so the band's one gain leaves the finest wavenumbers short (0.72
of the truth's power on validation days). :func:`grid_texture` is that scale alone (a
radial high-pass), and ``widen(..., texture=κ)`` scales it after the band gains.

Neither depends on where the spread is needed: a field's error grows with its coarse state
(plume days, high coarse AOD) faster than a uniformly widened spread does.
:func:`state_gain` is a spread gain per pixel, piecewise linear in the day's coarse field on
the fine grid between a few quantile nodes (fitted per coarse bin on validation days), and
``widen(..., state=field)`` applies it last.
"""
from __future__ import annotations

import numpy as np

__all__ = ["BAND_SIGMAS", "INFLATIONS", "RAW", "STATE_BINS", "TEXTURE_BAND", "band_split", "filter_bands",
           "grid_texture", "sampler_record", "scan_factors", "state_bin", "state_gain", "state_nodes", "widen",
           "widen_parts"]

# the finest band (r − G₀.₅ r) holds wavelengths of about 2–3 px, where a few-step sampler
# loses the most power; 8 px is the coarse cell of the paper's grids
BAND_SIGMAS = (0.5, 1.0, 2.0, 4.0, 8.0)
# the factors a widening is scanned over (α, a band factor, a rollout or a null's factor)
INFLATIONS = np.round(np.arange(0.6, 2.001, 0.05), 2)
RAW = int(np.argmin(np.abs(INFLATIONS - 1.0)))  # the index of factor 1 (no widening)
# the grid-scale texture band (cycles per pixel): a ramp from 0 at 0.35 to 1 at 0.45, full
# beyond; the protocol's finest spectrum band is 0.41-0.5, the one before it is left alone
TEXTURE_BAND = (0.35, 0.45)
# coarse-state bins of the state gain: quintiles, as the protocol's spread/error reliability
STATE_BINS = 5


def sampler_record(cfg) -> dict:
    """The settings of a ``SampleConfig`` that shape the residual a widening is fitted to
    (saved with a calibration; sampling with other ones warns)."""
    return {"fusion": cfg.fusion, "sampler": cfg.sampler, "steps": cfg.steps,
            "spacing": cfg.spacing, "projection": bool(cfg.consistency)}


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


def grid_texture(r, band=TEXTURE_BAND) -> np.ndarray:
    """The grid-scale part of fields (..., H, W), float64: a radial high-pass whose gain
    ramps from 0 at ``band[0]`` to 1 at ``band[1]`` cycles per pixel (1 beyond, the corners
    included). Filtered by FFT on the field mirrored to (2H, 2W), so no wrap-around edge
    appears; r − grid_texture(r) keeps every coarser scale."""
    from scipy import fft
    r = np.asarray(r, np.float64)
    H, W = r.shape[-2:]
    even = np.concatenate([r, r[..., ::-1, :]], axis=-2)
    even = np.concatenate([even, even[..., ::-1]], axis=-1)
    k = np.hypot(np.fft.fftfreq(2 * H)[:, None], np.fft.rfftfreq(2 * W)[None, :])
    ramp = np.clip((k - band[0]) / (band[1] - band[0]), 0.0, 1.0)
    return fft.irfft2(fft.rfft2(even, axes=(-2, -1)) * ramp, s=(2 * H, 2 * W), axes=(-2, -1))[..., :H, :W]


def state_nodes(values, bins=STATE_BINS) -> np.ndarray:
    """The nodes of a state gain from coarse-state ``values`` (any shape, finite): the
    medians of ``bins`` equal-count bins of the sorted values, (n,), n <= ``bins``, strictly
    increasing (bins that ties give one median are merged)."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    return np.unique([np.median(chunk) for chunk in np.array_split(v, bins) if len(chunk)])


def state_bin(coarse, nodes) -> np.ndarray:
    """The index of the node nearest each value of ``coarse`` (any shape): the bin a state
    gain is fitted over."""
    nodes = np.asarray(nodes, np.float64)
    return np.digitize(np.asarray(coarse, np.float64), 0.5 * (nodes[1:] + nodes[:-1]))


def state_gain(coarse, nodes, gains) -> np.ndarray:
    """The spread gain at each pixel, (..., H, W) float64, from the day's coarse field on the
    fine grid ``coarse`` (..., H, W), in the units ``nodes`` (n,) were taken in: linear
    between the nodes' ``gains`` (n,), flat beyond the end nodes."""
    return np.interp(np.asarray(coarse, np.float64), np.asarray(nodes, np.float64),
                     np.asarray(gains, np.float64))


def widen(r, alpha=1.0, *, gains=None, texture=1.0, state=None, member0=0, antithetic=False):
    """Widen an ensemble's residuals (members, H, W) by α, or by a gain per band (``gains``,
    α folded in: see :func:`filter_bands`), then scale its grid-scale part
    (:func:`grid_texture`) by ``texture``, then multiply it by a gain per pixel ``state``
    (H, W) (:func:`state_gain`; None: none).

    Antithetic pairs (members 2j, 2j+1, both in ``r``) are split into their mean
    e = (r₊ + r₋)/2 and half-difference o = (r₊ − r₋)/2 and become e ± A(o): the widening A
    acts on the spread and leaves the pair mean (the generator's own mean correction) alone;
    each member's variance over draws becomes Var(e) + Var(A(o)) (e is even and o odd in the
    latents, so they are uncorrelated). Independent members, and a pair member whose
    partner is not in ``r`` (a lone member 0), get A(r). The identity (α = 1, no gains,
    texture 1, no state) returns ``r`` itself.
    """
    if gains is None and alpha == 1.0 and texture == 1.0 and state is None:
        return r

    def op(x):
        y = alpha * x if gains is None else filter_bands(x, gains)
        if texture != 1.0:
            y = y + (texture - 1.0) * grid_texture(y)
        if state is not None:
            y = y * state
        return np.asarray(y).astype(np.asarray(x).dtype, copy=False)
    out = op(r)
    if antithetic:
        for k in range(len(r) - 1):
            if (int(member0) + k) % 2 == 0:
                e, o = 0.5 * (r[k] + r[k + 1]), op(0.5 * (r[k] - r[k + 1]))
                out[k], out[k + 1] = e + o, e - o
    return out


def widen_parts(r, gains=None, *, member0=0, antithetic=False):
    """(base, spread), each like ``r``, with widen(r, a·gains) = base + a·spread (to float
    rounding; ``gains`` None: one inflation a): how a calibration scans the factor a without
    filtering again for each value."""
    op = (lambda x: x) if gains is None else (lambda x: filter_bands(x, gains))  # noqa: E731
    base, spread = np.zeros_like(r), op(r)
    if antithetic:
        for k in range(len(r) - 1):
            if (int(member0) + k) % 2 == 0:
                e, o = 0.5 * (r[k] + r[k + 1]), op(0.5 * (r[k] - r[k + 1]))
                base[k], base[k + 1], spread[k], spread[k + 1] = e, e, o, -o
    return base, spread


def scan_factors(days, to_log, *, pairs=False, factors=INFLATIONS):
    """Fair CRPS and spread/skill (log10, as sampled) of ``mean + base + f·spread`` for every
    factor f in ``factors``: two lists, one value per factor, each pooled over the days.

    ``days``: (coarse index c, mean, (base, spread), truth) per day, the fields (members, H,
    W) in the space ``to_log(c, z) -> log10 (members, H, W)`` maps to what ``sample`` writes
    (the anchor undone, the coarse-cell projection applied); truth (H, W) in log10, NaN where
    unknown. ``pairs``: the members are antithetic pairs (spread from the pairs' differences).
    One sampling pass serves every factor: members drawn once, rescaled here."""
    from ..metrics.ensemble import calibrated_variance
    from ..metrics.proper import fair_crps
    scores, ratios = [], []
    for a in factors:
        crps, err2, var = [], [], []
        for c, m, (base, spread), t in days:
            log = to_log(c, m + base + a * spread)
            crps.append(float(np.nanmean(fair_crps(log, t))))
            err2.append(np.nanmean((log.mean(0) - t) ** 2))
            var.append(calibrated_variance(log, pairs=pairs))
        scores.append(float(np.mean(crps)))
        ratios.append(float(np.sqrt(np.mean(var) / np.mean(err2))))
    return scores, ratios
