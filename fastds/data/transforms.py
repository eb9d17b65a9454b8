"""Model-ready transforms (METHOD.md §1): log10 + min-max, coarse->fine alignment, covariates."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .regions import season_of

__all__ = ["FLOOR", "to_log", "from_log", "MinMax", "fit_minmax", "align_index", "cell_of",
           "ALIGN_METHODS",
           "covariate_maps", "event_maps", "COVARIATES", "COVARIATE_SETS", "EVENT_COVARIATES", "SOURCE_COVARIATES",
           "source_maps", "year_scale", "split_days", "SPLITS",
           "Anchor", "fit_anchor", "season_fit_days"]

FLOOR = 1e-6
YEAR0, YEAR1 = 2000, 2024
COVARIATES = ("elevation", "lat", "lon", "season", "day", "year")  # the paper's set
SPLITS = {"train": 0, "val": 1, "test": 2}


def to_log(v):
    """``log10(max(v, 1e-6))``; NaN stays NaN. Any array shape."""
    return np.log10(np.maximum(v, FLOOR))


def from_log(z):
    return np.power(10.0, z)


@dataclass(frozen=True)
class MinMax:
    """Per-season min-max of log10 values: ``z = (log10(max(v,1e-6)) - lo[s]) / (hi[s] - lo[s])``.

    ``lo``/``hi`` are dicts season (1..4) -> float, fitted on training days only.
    """
    lo: dict = field(default_factory=dict)
    hi: dict = field(default_factory=dict)

    def _span(self, season):
        lo, hi = self.lo[int(season)], self.hi[int(season)]
        return lo, (hi - lo) if hi > lo else 1.0

    def forward(self, v, season):
        lo, span = self._span(season)
        return ((to_log(v) - lo) / span).astype(np.float32)

    def forward_log(self, z, season):
        """From log10 values (a μ or a prediction in log space) to the normalised scale."""
        lo, span = self._span(season)
        return ((np.asarray(z) - lo) / span).astype(np.float32)

    def inverse_log(self, z, season):
        """Back to log10 space (where skill is scored)."""
        lo, span = self._span(season)
        return np.asarray(z, np.float64) * span + lo

    def inverse(self, z, season):
        """Back to physical units (values below 1e-6 come back as 1e-6)."""
        return from_log(self.inverse_log(z, season))

    def to_dict(self):
        return {"lo": {str(k): float(v) for k, v in self.lo.items()},
                "hi": {str(k): float(v) for k, v in self.hi.items()}}

    @classmethod
    def from_dict(cls, d):
        return cls({int(k): float(v) for k, v in d["lo"].items()},
                   {int(k): float(v) for k, v in d["hi"].items()})


def season_fit_days(times, train_mask) -> dict:
    """Indices of the days each season's statistics are fitted on: season -> int64 (n,).

    The season's training days; a season without one falls back to all its days (it still
    needs a scale), and a season without any day is left out.
    """
    seasons = season_of(pd.DatetimeIndex(times).month)
    out = {}
    for s in (1, 2, 3, 4):
        sel = (seasons == s) & np.asarray(train_mask)
        if not sel.any():
            sel = seasons == s
        if sel.any():
            out[s] = np.flatnonzero(sel)
    return out


def fit_minmax(values, times, train_mask) -> MinMax:
    """Fit per-season min/max of ``log10`` over training days.

    values : (time, ...) physical units; times : DatetimeIndex (time,);
    train_mask : bool (time,).
    """
    lo, hi = {}, {}
    for s, idx in season_fit_days(times, train_mask).items():
        logs = to_log(np.asarray(values[idx]))
        lo[s], hi[s] = float(np.nanmin(logs)), float(np.nanmax(logs))
    return MinMax(lo, hi)


ALIGN_METHODS = ("nearest", "bilinear", "conservative")


def _cell_edges(src):
    """Edges (n+1,) of the cells around ascending centres ``src``: midpoints inside, and half
    a spacing beyond the first and last centre."""
    if src.size == 1:
        return np.array([-np.inf, np.inf])
    mid = 0.5 * (src[1:] + src[:-1])
    return np.concatenate([[src[0] - (mid[0] - src[0])], mid, [src[-1] + (src[-1] - mid[-1])]])


def cell_of(src, dst) -> np.ndarray:
    """The coarse cell holding each fine coordinate, int64 (m,).

    A MERRA-2 cell is the half-open box ``[c - d/2, c + d/2)`` around its centre ``c``, so a
    fine pixel whose centre sits exactly on an edge belongs to the cell *above* it (G5NR's
    0.0625° pixels fall on MERRA-2's edges in latitude every 8 rows). Coordinates within
    1e-6 of a spacing of an edge count as on it (grids built by ``arange`` accumulate error).
    Pixels outside the coarse axis are clipped to the first or last cell.
    """
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    edges = _cell_edges(src)
    tol = 1e-6 * (float(np.min(np.diff(src))) if src.size > 1 else 1.0)
    idx = np.searchsorted(edges[1:-1], dst + tol, side="right")
    return np.clip(idx, 0, src.size - 1).astype(np.int64)


def align_index(src, dst, *, method="nearest"):
    """Map a coarse axis onto a fine one.

    src : (n,) coarse coordinate, ascending; dst : (m,) fine coordinate, ascending.
    ``nearest`` returns int64 (m,) indices into src: the cell each fine pixel lies in (see
    :func:`cell_of`; the reference code's nearest neighbour, with edge pixels sent to the
    cell whose half-open box holds them). ``bilinear`` and ``conservative`` return
    (i0 (m,), weight (m,)) so ``v = (1-w)*a[i0] + w*a[i0+1]``; ``conservative`` weights each
    cell by its share of the fine pixel's box (a pixel centred on an edge gets half of each:
    the area-weighted remap of a box-averaged field).
    """
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    if method == "nearest":
        return cell_of(src, dst)
    if method not in ("bilinear", "conservative"):
        raise ValueError(f"align method must be one of {', '.join(ALIGN_METHODS)}, got {method!r}")
    if src.size == 1:
        return np.zeros(dst.size, np.int64), np.zeros(dst.size)
    if method == "bilinear":
        i0 = np.clip(np.searchsorted(src, dst) - 1, 0, src.size - 2)
        w = np.clip((dst - src[i0]) / (src[i0 + 1] - src[i0]), 0.0, 1.0)
        return i0.astype(np.int64), w
    half = 0.5 * (float(np.median(np.diff(dst))) if dst.size > 1 else float(np.min(np.diff(src))))
    edges = _cell_edges(src)
    lo_cell = cell_of(src, dst - half)
    i0 = np.clip(lo_cell, 0, src.size - 2)
    # share of [dst - half, dst + half] above the upper edge of cell i0
    upper = edges[i0 + 1]
    w = np.clip((dst + half - upper) / (2 * half), 0.0, 1.0)
    return i0.astype(np.int64), w


def window_index(index, sl: slice):
    """Restrict an :func:`align_index` result to a window ``sl`` of the fine axis."""
    return (index[0][sl], index[1][sl]) if isinstance(index, tuple) else index[sl]


def upsample(coarse, iy, ix):
    """Coarse (…, h, w) onto the fine grid with :func:`align_index` results for each axis."""
    if isinstance(iy, tuple):
        (y0, wy), (x0, wx) = iy, ix
        a = coarse[..., y0, :] * (1 - wy)[:, None] + coarse[..., y0 + 1 if coarse.shape[-2] > 1 else y0, :] * wy[:, None]
        b0 = a[..., x0]
        b1 = a[..., x0 + 1 if coarse.shape[-1] > 1 else x0]
        return (b0 * (1 - wx) + b1 * wx).astype(np.float32)
    return coarse[..., iy, :][..., ix]


def year_scale(times):
    """``(year - 2000) / (2024 - 2000)`` per day, float32 (time,)."""
    return ((pd.DatetimeIndex(times).year.values - YEAR0) / (YEAR1 - YEAR0)).astype(np.float32)


COVARIATE_SETS = {
    # the paper's: day index and year grow without bound beyond the fine record
    "paper": ("elevation", "lat", "lon", "season", "day", "year"),
    # bounded: the day as a point on the annual circle, the year clamped to the years the
    # fine record covers, so a rollout years out sees inputs from the training range
    "bounded": ("elevation", "lat", "lon", "season", "doy_sin", "doy_cos", "year"),
    # bounded plus what predicts where the fine field is uncertain (issue: event-aware spread):
    # the log10 coarse field's gradient magnitude (plume edges) and its change since the day
    # before (arriving or leaving events), both per coarse cell, interpolated like the field
    "events": ("elevation", "lat", "lon", "season", "doy_sin", "doy_cos", "year",
               "coarse_grad", "coarse_change"),
    # bounded plus static source maps from the fine record's training days (the anchor's):
    # where fixed structure lifts the fine field, and where it varies most (sources and the
    # paths their plumes take), so the spread can follow them
    "sources": ("elevation", "lat", "lon", "season", "doy_sin", "doy_cos", "year",
                "residual_clim", "residual_spread"),
}
EVENT_COVARIATES = ("coarse_grad", "coarse_change")
SOURCE_COVARIATES = ("residual_clim", "residual_spread")


def event_maps(log_today, log_before):
    """The "events" covariates on the coarse grid, (2, h_c, w_c) float32: the gradient
    magnitude of log10 coarse (log10 units per cell, central differences) and its change
    from the day before (0 without one). NaN cells count as the floor's log."""
    today = np.nan_to_num(np.asarray(log_today, np.float64), nan=np.log10(FLOOR))
    grads = np.gradient(today) if min(today.shape) > 1 else [np.zeros_like(today)] * 2
    change = (today - np.nan_to_num(np.asarray(log_before, np.float64), nan=np.log10(FLOOR))
              if log_before is not None else np.zeros_like(today))
    return np.stack([np.hypot(*grads), change]).astype(np.float32)


def source_maps(anchor, season, win=(slice(None), slice(None))):
    """The "sources" covariates of ``season`` on window ``win`` of the fine grid, float32
    (2, h, w): the anchor's mean fine-scale residual less its regional mean, in units of the
    residual sd, and log of each pixel's residual sd over the season's (smoothed, see
    :func:`fit_anchor`). Both come from the training days only, like the anchor itself."""
    s = int(season)
    if s not in anchor.spread:
        raise ValueError(f"covariates='sources': the anchor has no residual spread map for season "
                         f"{s} (a model saved before the source maps existed); retrain it")
    clim = anchor.clim[s]
    return np.stack([(clim[win] - float(clim.mean())) / anchor.sd[s],
                     np.log(anchor.spread[s][win])]).astype(np.float32)


def covariate_maps(elevation, lat, lon, *, lat_range, lon_range, elev_scale, time, day_index,
                   day_scale, encoding="paper", year_range=None, events=None, sources=None):
    """Covariate channels on (a window of) the fine grid for one day.

    elevation : (h, w) metres; lat (h,), lon (w,) degrees; lat_range/lon_range: the region's
    (min, max), so a patch gets the same values as the whole image; elev_scale: metres mapped
    to 1; time : a Timestamp; day_index : days since dataset start; day_scale : its normaliser.
    encoding : ``"paper"`` -> float32 (6, h, w): elevation/elev_scale, lat and lon scaled to
    [0, 1] over the region, season/4, day_index/day_scale, ``(year - 2000)/24``.
    ``"bounded"`` -> float32 (7, h, w): elevation, lat, lon, season as above, then
    sin and cos of 2π·day-of-year/365.25, and the normalised year clamped to ``year_range``
    (first, last year of the fine record). ``"events"`` -> float32 (9, h, w): ``"bounded"``
    then ``events`` (2, h, w), the day's :func:`event_maps` already on the window (required).
    ``"sources"`` -> float32 (9, h, w): ``"bounded"`` then ``sources`` (2, h, w), the season's
    :func:`source_maps` on the window (required).
    The channel names are ``COVARIATE_SETS[encoding]``.
    """
    if encoding not in COVARIATE_SETS:
        raise ValueError(f"covariates must be one of {', '.join(COVARIATE_SETS)}, got {encoding!r}")
    extra = {"events": events, "sources": sources}
    if encoding in extra:
        maps = extra[encoding]
        if maps is None or np.shape(maps) != (2,) + np.shape(elevation):
            raise ValueError(f"covariates={encoding!r} needs the day's {encoding} maps (2, h, w), got "
                             f"{None if maps is None else np.shape(maps)}")
        base = covariate_maps(elevation, lat, lon, lat_range=lat_range, lon_range=lon_range,
                              elev_scale=elev_scale, time=time, day_index=day_index,
                              day_scale=day_scale, encoding="bounded", year_range=year_range)
        return np.concatenate([base, np.asarray(maps, np.float32)])
    h, w = elevation.shape
    lat_s = (np.asarray(lat) - lat_range[0]) / max(lat_range[1] - lat_range[0], 1e-9)
    lon_s = (np.asarray(lon) - lon_range[0]) / max(lon_range[1] - lon_range[0], 1e-9)
    t = pd.Timestamp(time)
    out = np.empty((len(COVARIATE_SETS[encoding]), h, w), np.float32)
    out[0] = elevation / elev_scale
    out[1] = lat_s[:, None]
    out[2] = lon_s[None, :]
    out[3] = season_of(t.month) / 4.0
    if encoding == "paper":
        out[4] = day_index / day_scale
        out[5] = (t.year - YEAR0) / (YEAR1 - YEAR0)
    else:
        phase = 2 * np.pi * (t.day_of_year - 1) / 365.25
        out[4] = np.sin(phase)
        out[5] = np.cos(phase)
        year = t.year if year_range is None else min(max(t.year, year_range[0]), year_range[1])
        out[6] = (year - YEAR0) / (YEAR1 - YEAR0)
    return out


def split_days(times, *, val=0.2, test=0.1, seed=0, block=1) -> np.ndarray:
    """Seeded per-season split of days into train (0), val (1), test (2).

    times : DatetimeIndex (time,). Within each season, whole blocks of ``block`` consecutive
    days are assigned (``block=1``: the reference code's day-level split). Returns int8 (time,).
    A day's split says where its *target* may be used; test targets never train. A season
    with at least two blocks always gets at least one validation block (and one training
    block), whatever the rounding of ``val`` would give.
    """
    times = pd.DatetimeIndex(times)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"split fractions val={val}, test={test} must be >= 0 and sum below 1")
    rng = np.random.default_rng(seed)
    out = np.zeros(len(times), np.int8)
    seasons = season_of(times.month)
    blocks = (np.arange(len(times)) // max(int(block), 1))
    for s in (1, 2, 3, 4):
        ids = np.unique(blocks[seasons == s])
        if ids.size == 0:
            continue
        perm = rng.permutation(ids)
        n_test = int(round(test * ids.size))
        n_val = int(round(val * ids.size))
        # every season with two blocks or more gets validation days by construction (model
        # selection, the residual scale and the spread calibration need them), and keeps at
        # least one training block; the test share gives way first
        if val > 0 and ids.size >= 2:
            n_val = max(n_val, 1)
            n_test = max(0, min(n_test, ids.size - 1 - n_val))
        label = np.zeros(ids.size, np.int8)
        label[:n_test] = 2
        label[n_test:n_test + n_val] = 1
        lookup = dict(zip(perm.tolist(), label.tolist()))
        sel = np.flatnonzero(seasons == s)
        out[sel] = [lookup[b] for b in blocks[sel]]
    return out


@dataclass(frozen=True)
class Anchor:
    """The deterministic mean μ on the fine grid and the residual scale, per season.

    In log10 space, for season ``s``::

        μ      = interpolated log10 coarse + clim[s]          (the "clim" baseline)
        r      = (log10 fine - μ - mean[s]) / sd[s]           (what the generative model learns)
        log10 fine = μ + mean[s] + sd[s] · r                  (exact inverse)

    ``clim`` : dict season -> float32 (H, W), the mean over the fine record's training days
    of ``log10 fine - interpolated log10 coarse`` (the mean fine-scale residual, a BCSD-style
    spatial disaggregation); ``mean``/``sd`` : dict season -> float, the residual's own
    training statistics; ``align`` : the interpolation that made them; ``spread`` : dict
    season -> float32 (H, W), each pixel's residual sd over ``sd[s]``, smoothed (the
    "sources" covariates; empty in models saved before them); ``reliability`` : dict season ->
    float, the share of the plain mean residual map's spatial variance that is signal rather
    than sampling noise (see :func:`fit_anchor`; what ``data.covariates = "auto"`` reads).
    """
    clim: dict = field(default_factory=dict)
    mean: dict = field(default_factory=dict)
    sd: dict = field(default_factory=dict)
    align: str = "bilinear"
    spread: dict = field(default_factory=dict)
    reliability: dict = field(default_factory=dict)

    def mu(self, coarse_log_fine, season, win=(slice(None), slice(None))):
        """log10 μ from the coarse field already on the fine grid (log10, (..., h, w)),
        for the window ``win`` of the full grid."""
        return (np.asarray(coarse_log_fine, np.float32) + self.clim[int(season)][win]).astype(np.float32)

    def forward(self, log_fine, mu, season):
        """Standardised residual r of a log10 fine field around ``mu`` (same shapes)."""
        s = int(season)
        return ((np.asarray(log_fine, np.float32) - mu - self.mean[s]) / self.sd[s]).astype(np.float32)

    def inverse(self, r, mu, season):
        """log10 field from a standardised residual (float64, the shape of ``r``)."""
        s = int(season)
        return np.asarray(mu, np.float64) + self.mean[s] + self.sd[s] * np.asarray(r, np.float64)

    def to_dict(self):
        return {"clim": {str(k): np.asarray(v, np.float32) for k, v in self.clim.items()},
                "mean": {str(k): float(v) for k, v in self.mean.items()},
                "sd": {str(k): float(v) for k, v in self.sd.items()}, "align": self.align,
                "spread": {str(k): np.asarray(v, np.float32) for k, v in self.spread.items()},
                "reliability": {str(k): float(v) for k, v in self.reliability.items()}}

    @classmethod
    def from_dict(cls, d):
        return cls({int(k): np.asarray(v, np.float32) for k, v in d["clim"].items()},
                   {int(k): float(v) for k, v in d["mean"].items()},
                   {int(k): float(v) for k, v in d["sd"].items()}, d.get("align", "bilinear"),
                   {int(k): np.asarray(v, np.float32) for k, v in d.get("spread", {}).items()},
                   {int(k): float(v) for k, v in d.get("reliability", {}).items()})


def _map_noise(res, c):
    """(regional mean, signal variance, per-pixel noise variance (H, W)) of the pixel-mean map
    ``c`` of residual days ``res`` (time, H, W), as :func:`fit_anchor` describes."""
    a = np.nan_to_num(res - c, nan=0.0)
    var = a.var(0)
    # ρ from consecutive rows: the training days of a season are mostly consecutive
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.clip(np.where(var > 0, (a[1:] * a[:-1]).mean(0) / var, 0.0), 0.0, 0.99)
    n_eff = len(a) * (1 - rho) / (1 + rho)
    noise = var / np.maximum(n_eff, 1.0)
    bias = float(c.mean())
    return bias, max(float(((c - bias) ** 2).mean() - noise.mean()), 0.0), noise


def _shrink(c, bias, signal, noise):
    """The reliability-weighted pixel means of :func:`fit_anchor` (see there), from
    :func:`_map_noise`'s terms of the plain map ``c``."""
    w = signal / (signal + noise) if signal > 0 else np.zeros_like(noise)
    return bias + w * (c - bias)


def _reliability(signal, noise) -> float:
    """signal / (signal + mean noise) of a pixel-mean map, from :func:`_map_noise`'s terms: 0
    where the map is all sampling noise, near 1 where fixed structure (terrain, sources)
    dominates it; 0.5 where signal and noise are equal."""
    return signal / (signal + float(noise.mean())) if signal > 0 else 0.0


SPREAD_SMOOTH = 2.0  # fine pixels: the Gaussian sd smoothing the anchor's log spread map


def fit_anchor(log_fine, coarse_log_fine, times, train_mask, *, align="bilinear",
               shrink=False) -> Anchor:
    """Fit :class:`Anchor` per season over training days.

    log_fine : (time, H, W) log10 fine field (NaN ignored); coarse_log_fine : (time, H, W)
    the same days' log10 coarse field interpolated to the fine grid; times : (time,);
    train_mask : bool (time,). A season without training days falls back to all its days;
    one without any day is left out.

    ``shrink=False`` keeps each pixel's plain mean residual (the classical ``clim``
    baseline). ``shrink=True`` pulls each pixel's mean towards the region's by its
    reliability: a two-year record holds few independent days (the residual persists for
    days), so part of a pixel's mean is noise from a few weather events. With ``n`` days and
    lag-1 autocorrelation ρ a pixel's mean has noise variance ``var/n_eff``,
    ``n_eff = n(1-ρ)/(1+ρ)``; the weight is ``signal/(signal + noise)`` with the signal
    variance the spread of the pixel means less the mean noise variance (James-Stein style).
    Where the fine-scale structure is fixed (terrain, sources) the weight is near 1.
    ``reliability[s]`` is that weight for the whole plain map, signal / (signal + mean noise)
    (0 with fewer than 3 days).

    ``spread[s]`` is each pixel's sd of ``res - clim`` over ``sd[s]``, its log smoothed by a
    Gaussian of ``SPREAD_SMOOTH`` pixels: a pixel's own sd over one season of a short record
    is mostly the few events that crossed it, which the smoothing spreads to their neighbours.
    """
    from scipy.ndimage import gaussian_filter
    clim, mean, sd, spread, reliability = {}, {}, {}, {}, {}
    for s, idx in season_fit_days(times, train_mask).items():
        res = np.asarray(log_fine[idx], np.float64) - np.asarray(coarse_log_fine[idx], np.float64)
        c = np.nan_to_num(np.nanmean(res, axis=0), nan=0.0)
        reliability[s] = 0.0
        if len(idx) > 2:  # one pass over the days gives both the reliability and the shrinkage
            bias, signal, noise = _map_noise(res, c)
            reliability[s] = _reliability(signal, noise)
            if shrink:
                c = _shrink(c, bias, signal, noise)
        clim[s] = c.astype(np.float32)
        r = res - clim[s]
        mean[s] = float(np.nanmean(r))
        sd[s] = float(max(np.nanstd(r), 1e-6))
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: ratio 1 below
            ratio = np.log(np.maximum(np.nanstd(r, axis=0), 1e-6) / sd[s])
        ratio = gaussian_filter(np.nan_to_num(ratio, nan=0.0), SPREAD_SMOOTH, mode="nearest")
        spread[s] = np.exp(ratio).astype(np.float32)
    return Anchor(clim, mean, sd, align, spread, reliability)
