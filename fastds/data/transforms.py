"""Model-ready transforms (METHOD.md §1): log10 + min-max, coarse->fine alignment, covariates."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .regions import season_of

__all__ = ["FLOOR", "to_log", "from_log", "MinMax", "fit_minmax", "align_index",
           "covariate_maps", "COVARIATES", "year_scale", "split_days", "SPLITS"]

FLOOR = 1e-6
YEAR0, YEAR1 = 2000, 2024
COVARIATES = ("elevation", "lat", "lon", "season", "day", "year")
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


def fit_minmax(values, times, train_mask) -> MinMax:
    """Fit per-season min/max of ``log10`` over training days.

    values : (time, ...) physical units; times : DatetimeIndex (time,);
    train_mask : bool (time,).
    """
    seasons = season_of(pd.DatetimeIndex(times).month)
    lo, hi = {}, {}
    for s in (1, 2, 3, 4):
        sel = (seasons == s) & np.asarray(train_mask)
        if not sel.any():
            sel = seasons == s  # a season with no training day still needs a scale
        if not sel.any():
            continue
        logs = to_log(np.asarray(values[np.flatnonzero(sel)]))
        lo[s], hi[s] = float(np.nanmin(logs)), float(np.nanmax(logs))
    return MinMax(lo, hi)


def align_index(src, dst, *, method="nearest"):
    """Map a coarse axis onto a fine one.

    src : (n,) coarse coordinate, ascending; dst : (m,) fine coordinate, ascending.
    ``nearest`` returns int64 (m,) indices into src (the reference code's choice);
    ``bilinear`` returns (i0 (m,), weight (m,)) so ``v = (1-w)*a[i0] + w*a[i0+1]``.
    """
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    if method == "nearest":
        idx = np.clip(np.searchsorted(src, dst), 1, max(src.size - 1, 1))
        left = src[idx - 1] if src.size > 1 else src[[0] * dst.size]
        right = src[np.minimum(idx, src.size - 1)]
        choose_left = np.abs(dst - left) <= np.abs(right - dst)
        out = np.where(choose_left, idx - 1, idx)
        return np.clip(out, 0, src.size - 1).astype(np.int64)
    if method == "bilinear":
        if src.size == 1:
            return np.zeros(dst.size, np.int64), np.zeros(dst.size)
        i0 = np.clip(np.searchsorted(src, dst) - 1, 0, src.size - 2)
        w = np.clip((dst - src[i0]) / (src[i0 + 1] - src[i0]), 0.0, 1.0)
        return i0.astype(np.int64), w
    raise ValueError(f"align method must be 'nearest' or 'bilinear', got {method!r}")


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


def covariate_maps(elevation, lat, lon, *, lat_range, lon_range, elev_scale, time, day_index,
                   day_scale):
    """Covariate channels on (a window of) the fine grid for one day.

    elevation : (h, w) metres; lat (h,), lon (w,) degrees; lat_range/lon_range: the region's
    (min, max), so a patch gets the same values as the whole image; elev_scale: metres mapped
    to 1; time : a Timestamp; day_index : days since dataset start; day_scale : its normaliser.
    Returns float32 (6, h, w) in the order of ``COVARIATES``: elevation/elev_scale, lat and
    lon scaled to [0, 1] over the region, season/4, day_index/day_scale, normalised year.
    """
    h, w = elevation.shape
    lat_s = (np.asarray(lat) - lat_range[0]) / max(lat_range[1] - lat_range[0], 1e-9)
    lon_s = (np.asarray(lon) - lon_range[0]) / max(lon_range[1] - lon_range[0], 1e-9)
    t = pd.Timestamp(time)
    out = np.empty((6, h, w), np.float32)
    out[0] = elevation / elev_scale
    out[1] = lat_s[:, None]
    out[2] = lon_s[None, :]
    out[3] = season_of(t.month) / 4.0
    out[4] = day_index / day_scale
    out[5] = (t.year - YEAR0) / (YEAR1 - YEAR0)
    return out


def split_days(times, *, val=0.2, test=0.1, seed=0, block=1) -> np.ndarray:
    """Seeded per-season split of days into train (0), val (1), test (2).

    times : DatetimeIndex (time,). Within each season, whole blocks of ``block`` consecutive
    days are assigned (``block=1``: the reference code's day-level split). Returns int8 (time,).
    A day's split says where its *target* may be used; test targets never train.
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
        label = np.zeros(ids.size, np.int8)
        label[:n_test] = 2
        label[n_test:n_test + n_val] = 1
        lookup = dict(zip(perm.tolist(), label.tolist()))
        sel = np.flatnonzero(seasons == s)
        out[sel] = [lookup[b] for b in blocks[sel]]
    return out
