"""Torch datasets: coarse lag sequences (Stage A) and fine patches (Stage C).

Both are built per season (models are trained per season x area) and per split, from a
store opened with :func:`fastds.data.store.open_store`. Arrays are normalised with the
season's min-max once, held in memory as float32 (Area 1's full 2000-2024 coarse record is
~70 MB; its two-year fine record ~450 MB for all seasons, ~1/4 of that per season's days
plus lag windows), and items are views: memory does not grow with the epoch.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..stitch import plan_patches
from .regions import season_of
from .store import Store
from .transforms import SPLITS, align_index, covariate_maps, upsample, window_index

__all__ = ["LagSequences", "FinePatches", "FineDays"]


def _split_code(split):
    if split not in SPLITS and split != "all":
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or 'all', got {split!r}")
    return SPLITS.get(split)


class LagSequences(torch.utils.data.Dataset):
    """Stage A samples: ``T_lag`` consecutive coarse days -> the next coarse day.

    Item ``i`` -> ``(lags, target)``: float32 tensors ``(T_lag, h, w)`` and ``(1, h, w)``,
    normalised with season ``season``'s coarse min-max; NaN becomes 0. Targets are the days of
    ``season`` in ``split`` whose full lag window lies in the record.
    """

    def __init__(self, store: Store, *, season: int, split="train", t_lag=40):
        self.t_lag = int(t_lag)
        self.season = int(season)
        times = store.times_c
        raw = store.coarse.values
        self.x = np.nan_to_num(store.norm_x.forward(raw, season), nan=0.0)
        code = _split_code(split)
        sp = store.ds["split_c"].values
        ok = (season_of(times.month) == season) & (np.arange(len(times)) >= self.t_lag)
        if code is not None:
            ok &= sp == code
        self.days = np.flatnonzero(ok)
        self.times = times

    def __len__(self):
        return len(self.days)

    def __getitem__(self, i):
        d = self.days[i]
        return (torch.from_numpy(self.x[d - self.t_lag:d]),
                torch.from_numpy(self.x[d:d + 1]))


class _FineBase:
    """Fine-grid arrays shared by patch and whole-day datasets."""

    def __init__(self, store: Store, *, season: int, t_lag=40, align=None):
        self.store = store
        self.season = int(season)
        self.t_lag = int(t_lag)
        self.times = store.times
        self.y = np.nan_to_num(store.norm_y.forward(store.fine.values, season), nan=0.0)
        tc = store.times_c
        self.cidx = tc.get_indexer(self.times)
        self.x = np.nan_to_num(store.norm_x.forward(store.coarse.values, season), nan=0.0)
        method = align or store.align
        self.iy = align_index(store.ds["lat_c"].values, store.ds["lat"].values, method=method)
        self.ix = align_index(store.ds["lon_c"].values, store.ds["lon"].values, method=method)
        self.lat = store.ds["lat"].values
        self.lon = store.ds["lon"].values
        self.elev = store.elevation.values.astype(np.float32)
        self.elev_scale = float(max(np.abs(self.elev).max(), 1.0))
        self.day0 = tc[0]
        self.day_scale = float(max(len(tc), 1))
        self.shape = self.y.shape[1:]

    def coarse_on_fine(self, d, win=(slice(None), slice(None))):
        """Day ``d``'s (fine index) coarse field on the fine grid (window ``win``), (1, h, w)."""
        return self.coarse_at(self.cidx[d], win)

    def coarse_at(self, c, win=(slice(None), slice(None))):
        """Coarse day ``c`` (coarse index, any day of the coarse record) on the fine grid, (1, h, w)."""
        return upsample(self.x[c][None], window_index(self.iy, win[0]), window_index(self.ix, win[1]))

    def covariates(self, d, win=(slice(None), slice(None))):
        """Covariate maps (6, h, w) of fine day ``d`` on window ``win`` (see covariate_maps)."""
        return self.covariates_at(self.times[d], win)

    def covariates_at(self, t, win=(slice(None), slice(None))):
        """Covariate maps (6, h, w) for any date ``t`` (also beyond the fine record)."""
        t = pd.Timestamp(t)
        return covariate_maps(self.elev[win], self.lat[win[0]], self.lon[win[1]],
                              lat_range=(self.lat[0], self.lat[-1]),
                              lon_range=(self.lon[0], self.lon[-1]), elev_scale=self.elev_scale,
                              time=t, day_index=(t - self.day0).days, day_scale=self.day_scale)

    def target_days(self, split):
        code = _split_code(split)
        ok = (season_of(self.times.month) == self.season) & (np.arange(len(self.times)) >= self.t_lag)
        if code is not None:
            ok &= self.store.ds["split"].values == code
        return np.flatnonzero(ok)


class FinePatches(_FineBase, torch.utils.data.Dataset):
    """Stage C samples: fine patches of target days.

    Item -> dict of float32 tensors:
      ``target`` (1, t, t)    y[d], normalised fine field
      ``coarse`` (1, t, t)    x[d] aligned to the fine grid (nearest or bilinear)
      ``covariates`` (6, t, t) elevation, lat, lon, season, day, year (see COVARIATES)
      ``lags`` (T_lag, t, t)  y[d - T_lag .. d - 1], the fine history the transfer encoder sees
    plus ``day`` and ``start`` (y0, x0) as int64 tensors. ``t = tile``; patch starts come from
    :func:`fastds.plan_patches` with ``stride``.
    """

    def __init__(self, store: Store, *, season: int, split="train", tile=16, stride=8,
                 t_lag=40, align=None, days=None):
        super().__init__(store, season=season, t_lag=t_lag, align=align)
        self.tile = int(tile)
        self.starts = plan_patches(self.shape, self.tile, 0, stride)
        self.days = np.asarray(days) if days is not None else self.target_days(split)

    def __len__(self):
        return len(self.days) * len(self.starts)

    def __getitem__(self, i):
        d = int(self.days[i // len(self.starts)])
        y0, x0 = (int(v) for v in self.starts[i % len(self.starts)])
        t = self.tile
        win = (slice(y0, y0 + t), slice(x0, x0 + t))
        return {
            "target": torch.from_numpy(self.y[d][win][None].copy()),
            "coarse": torch.from_numpy(np.ascontiguousarray(self.coarse_on_fine(d, win))),
            "covariates": torch.from_numpy(self.covariates(d, win)),
            "lags": torch.from_numpy(np.ascontiguousarray(self.y[d - self.t_lag:d][(slice(None),) + win])),
            "day": torch.tensor(d), "start": torch.tensor([y0, x0]),
        }


class FineDays(_FineBase):
    """Whole-day access for inference and evaluation (no patching); see FinePatches."""

    def __init__(self, store: Store, *, season: int, t_lag=40, align=None):
        super().__init__(store, season=season, t_lag=t_lag, align=align)

    def index_of(self, day) -> int:
        i = self.times.get_indexer([pd.Timestamp(day)])[0]
        if i < 0:
            raise KeyError(f"{pd.Timestamp(day):%Y-%m-%d} is not in the fine record")
        return int(i)
