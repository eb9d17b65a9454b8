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
from .transforms import (COVARIATE_SETS, FLOOR, SPLITS, Anchor, align_index, covariate_maps,
                         event_maps, fit_anchor, from_log, source_maps, to_log, upsample,
                         window_index)

__all__ = ["LagSequences", "FinePatches", "SpeciesPatches", "FineDays", "SPACES"]

SPACES = ("absolute", "residual")


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


def _store_block(store: Store) -> int:
    """The split's block length recorded by ``prepare`` (1: the reference's day-level split)."""
    import json
    try:
        return int(json.loads(store.ds.attrs.get("manifest", "{}")).get("split", {}).get("block", 1))
    except (TypeError, ValueError):
        return 1


class _FineBase:
    """Fine-grid arrays shared by patch and whole-day datasets.

    ``space`` is what the model sees as its target: ``"absolute"`` (the paper: min-max of
    log10) or ``"residual"`` (the standardised residual around the anchor μ, see
    :class:`~fastds.data.transforms.Anchor`; fitted here on the season's training days unless
    ``anchor`` is given, e.g. the one saved with a model). ``covariates`` picks the covariate
    encoding (``"paper"`` or ``"bounded"``). ``align`` None uses the store's alignment.
    """

    def __init__(self, store: Store, *, season: int, t_lag=40, align=None, space="absolute",
                 covariates="paper", anchor: Anchor | None = None, shrink=False):
        if space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
        if covariates not in COVARIATE_SETS:
            raise ValueError(f"covariates must be one of {', '.join(COVARIATE_SETS)}, got {covariates!r}")
        if covariates == "sources" and space != "residual":
            raise ValueError("covariates='sources' needs the residual target (train.target="
                             "'residual'): the source maps are the anchor's")
        self.store = store
        self.season = int(season)
        self.t_lag = int(t_lag)
        self.space = space
        self.covariate_encoding = covariates
        self.times = store.times
        fine = store.fine.values
        self.y = np.nan_to_num(store.norm_y.forward(fine, season), nan=0.0)
        tc = store.times_c
        self.cidx = tc.get_indexer(self.times)
        coarse = store.coarse.values
        self.x = np.nan_to_num(store.norm_x.forward(coarse, season), nan=0.0)
        method = align if align not in (None, "", "store") else store.align
        self.align = method
        self.iy = align_index(store.ds["lat_c"].values, store.ds["lat"].values, method=method)
        self.ix = align_index(store.ds["lon_c"].values, store.ds["lon"].values, method=method)
        self.lat = store.ds["lat"].values
        self.lon = store.ds["lon"].values
        self.elev = store.elevation.values.astype(np.float32)
        self.elev_scale = float(max(np.abs(self.elev).max(), 1.0))
        self.day0 = tc[0]
        self.day_scale = float(max(len(tc), 1))
        self.year_range = (int(self.times[0].year), int(self.times[-1].year))
        self.shape = self.y.shape[1:]
        self.logx = to_log(coarse).astype(np.float32)
        self.anchor = anchor
        if space == "residual":
            self.logy = to_log(fine).astype(np.float32)
            if anchor is None:
                up = self.coarse_log_at(self.cidx)
                self.anchor = fit_anchor(self.logy, up, self.times,
                                         store.ds["split"].values == SPLITS["train"],
                                         align=method, shrink=shrink)
            if self.season not in self.anchor.clim:
                raise ValueError(f"the anchor has no statistics for season {self.season}")

    def index_of(self, day) -> int:
        """The fine-record index of ``day`` (an error names a day outside the record)."""
        i = self.times.get_indexer([pd.Timestamp(day)])[0]
        if i < 0:
            raise KeyError(f"{pd.Timestamp(day):%Y-%m-%d} is not in the fine record")
        return int(i)

    def logy_at(self, d):
        """log10 of fine day ``d``'s truth (H, W); NaN where the record has none."""
        return self.logy[d] if self.space == "residual" else to_log(self.store.fine.values[d]).astype(np.float32)

    def coarse_on_fine(self, d, win=(slice(None), slice(None))):
        """Day ``d``'s (fine index) coarse field on the fine grid (window ``win``), (1, h, w)."""
        return self.coarse_at(self.cidx[d], win)

    def coarse_at(self, c, win=(slice(None), slice(None))):
        """Coarse day ``c`` (coarse index, any day of the coarse record) on the fine grid, (1, h, w)."""
        return upsample(self.x[c][None], window_index(self.iy, win[0]), window_index(self.ix, win[1]))

    def coarse_log_at(self, c, win=(slice(None), slice(None))):
        """log10 coarse of coarse day(s) ``c`` (int or (n,) array) on the fine grid: (h, w) or (n, h, w)."""
        return upsample(np.nan_to_num(self.logx[c], nan=np.log10(FLOOR)),
                        window_index(self.iy, win[0]), window_index(self.ix, win[1]))

    def mu_at(self, c, win=(slice(None), slice(None))):
        """log10 μ (h, w) of coarse day ``c`` (residual space only)."""
        return self.anchor.mu(self.coarse_log_at(c, win), self.season, win)

    def stand_in_log(self, c, win=(slice(None), slice(None))):
        """log10 of the model-free stand-in for a fine day nobody predicted, from coarse
        day(s) ``c``: μ (residual space) or the interpolated coarse field (absolute space);
        (h, w) or (n, h, w). Pushforward training and cold-started rollout segments use it."""
        if self.space == "residual":
            return self.anchor.mu(self.coarse_log_at(c, win), self.season, win)
        return self.coarse_log_at(c, win)

    def target_at(self, d, win=(slice(None), slice(None))):
        """The model-space target of fine day ``d`` on ``win``: float32 (h, w)."""
        if self.space == "absolute":
            return self.y[d][win]
        r = self.anchor.forward(self.logy[d][win], self.mu_at(self.cidx[d], win), self.season)
        return np.nan_to_num(r, nan=0.0)

    def to_physical(self, z, c):
        """Model-space fields (..., H, W) of coarse day ``c`` -> physical units, float32."""
        if self.space == "absolute":
            # the reference code replaces negative (normalised) outputs
            return self.store.norm_y.inverse(np.maximum(z, 0.0), self.season).astype(np.float32)
        return from_log(self.anchor.inverse(z, self.mu_at(c), self.season)).astype(np.float32)

    def covariates(self, d, win=(slice(None), slice(None))):
        """Covariate maps (C, h, w) of fine day ``d`` on window ``win`` (see covariate_maps)."""
        return self.covariates_at(self.times[d], win)

    def covariates_at(self, t, win=(slice(None), slice(None))):
        """Covariate maps (C, h, w) for any date ``t`` of the coarse record (also beyond the
        fine record)."""
        t = pd.Timestamp(t)
        events = sources = None
        if self.covariate_encoding == "events":
            c = self.store.times_c.get_loc(t)
            coarse = event_maps(self.logx[c], self.logx[c - 1] if c > 0 else None)
            events = upsample(coarse, window_index(self.iy, win[0]), window_index(self.ix, win[1]))
        elif self.covariate_encoding == "sources":
            sources = source_maps(self.anchor, self.season, win)
        return covariate_maps(self.elev[win], self.lat[win[0]], self.lon[win[1]],
                              lat_range=(self.lat[0], self.lat[-1]),
                              lon_range=(self.lon[0], self.lon[-1]), elev_scale=self.elev_scale,
                              time=t, day_index=(t - self.day0).days, day_scale=self.day_scale,
                              encoding=self.covariate_encoding, year_range=self.year_range,
                              events=events, sources=sources)

    def target_days(self, split, *, purge=None):
        """Fine-day indices of this season in ``split`` with a full lag window.

        ``purge`` (default: on when the store's split is in blocks of more than one day)
        drops train/val targets whose lag window holds a test day, so no test-day truth ever
        reaches a model that is scored on it.
        """
        code = _split_code(split)
        n = len(self.times)
        ok = (season_of(self.times.month) == self.season) & (np.arange(n) >= self.t_lag)
        sp = self.store.ds["split"].values
        if code is not None:
            ok &= sp == code
        if purge is None:
            purge = _store_block(self.store) > 1
        if purge and code != SPLITS["test"]:
            ok &= self.test_free_window()
        return np.flatnonzero(ok)

    def test_free_window(self):
        """(n_days,) bool: no test day among each day's ``t_lag`` lag days."""
        test = np.concatenate([[0], np.cumsum(self.store.ds["split"].values == SPLITS["test"])])
        idx = np.arange(len(self.times))
        return test[idx] - test[np.maximum(idx - self.t_lag, 0)] == 0


class FinePatches(_FineBase, torch.utils.data.Dataset):
    """Stage C samples: fine patches of target days.

    Item -> dict of float32 tensors:
      ``target`` (1, t, t)    y[d] in model space (min-max, or the standardised residual)
      ``coarse`` (1, t, t)    x[d] aligned to the fine grid (nearest, bilinear or conservative)
      ``covariates`` (C, t, t) see COVARIATE_SETS (6 for "paper", 7 for "bounded", 9 for "events"
                          or "sources")
      ``lags`` (T_lag, t, t)  y[d - T_lag .. d - 1], the fine history the transfer encoder sees
    plus ``day`` and ``start`` (y0, x0) as int64 tensors. ``t = tile``; patch starts come from
    :func:`fastds.plan_patches` with ``stride``; ``random_offsets`` shifts each item's start by
    a seeded random offset in ``[0, stride)`` per axis (clipped to the image), drawn anew each
    epoch (:meth:`set_epoch`), so every phase of the patch against the coarse cells is seen.
    ``lag_noise`` > 0 adds seeded Gaussian noise of that sd (min-max units) to the lags, so a
    model does not learn to trust a lag window more than its own predictions deserve in a
    rollout (exposure robustness); the targets are untouched.

    ``pushforward`` p > 0: with probability p an item's last L lag days (L uniform in
    1..t_lag, as at lead L of a strict rollout) are replaced by predictions instead of the
    truth: ``alt`` (n_days, H, W) in lag units with ``alt_ok`` (n_days,) marking the days it
    holds (e.g. the U-Net's one-step predictions, see :meth:`set_alternative`); other days,
    or all with ``alt`` None, take the anchor surrogate μ (interpolated coarse + residual
    map; interpolated coarse for the absolute target), which needs no model. ``cond_dropout``
    q > 0: with probability q an item's ``drop`` flag is set and the model sees no lag
    information (a coarse-only fallback, see ConditionalModel.cond). Items carry ``drop``
    (bool) always. Both draws are seeded per (seed, epoch, item).
    """

    def __init__(self, store: Store, *, season: int, split="train", tile=16, stride=8,
                 t_lag=40, align=None, days=None, space="absolute", covariates="paper",
                 anchor=None, random_offsets=False, seed=0, purge=None, lag_noise=0.0,
                 shrink=False, pushforward=0.0, cond_dropout=0.0):
        super().__init__(store, season=season, t_lag=t_lag, align=align, space=space,
                         covariates=covariates, anchor=anchor, shrink=shrink)
        self.tile = int(tile)
        self.stride = int(stride)
        self.starts = plan_patches(self.shape, self.tile, 0, stride)
        self.days = np.asarray(days) if days is not None else self.target_days(split, purge=purge)
        self.random_offsets = bool(random_offsets)
        self.lag_noise = float(lag_noise)
        for name, v in (("pushforward", pushforward), ("cond_dropout", cond_dropout)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
        self.pushforward = float(pushforward)
        self.cond_dropout = float(cond_dropout)
        self.alt = None
        self.alt_ok = np.zeros(len(self.times), bool)
        self._surrogate = None
        self.seed = int(seed)
        self.epoch = 0

    def set_alternative(self, alt, ok):
        """Predictions to build pushforward lag windows from: ``alt`` (n_days, H, W) float32
        in lag units (the store's min-max of log10), ``ok`` (n_days,) bool, the days it holds.
        Days that are not ok fall back to the anchor surrogate."""
        alt = np.asarray(alt, np.float32)
        ok = np.asarray(ok, bool)
        if alt.shape != (len(self.times),) + tuple(self.shape) or ok.shape != (len(self.times),):
            raise ValueError(f"set_alternative: expected alt {(len(self.times),) + tuple(self.shape)} "
                             f"and ok ({len(self.times)},), got {alt.shape} and {ok.shape}")
        bad = ok & ~self.alt_allowed()
        if bad.any():
            raise ValueError(f"set_alternative: the prediction of {self.times[np.flatnonzero(bad)[0]]:%Y-%m-%d} "
                             "may not be used: its lag window holds a test day (or is incomplete)")
        self.alt, self.alt_ok = alt, ok

    def prediction_error_sd(self):
        """The sd, in lag units, of one-day prediction errors over this set's target days:
        the pushforward source's (``alt`` on the days it holds, else the anchor surrogate μ)
        minus the truth. What ``train.lag_noise_scale`` multiplies to size the lag noise, so
        the noise matches what a rollout's own predictions will put in the window."""
        days = np.unique(np.asarray(self.days, int))
        if len(days) == 0:
            raise ValueError("prediction_error_sd: the set has no target days")
        full = (slice(None), slice(None))
        s1, sq, n = 0.0, 0.0, 0
        for e in days:
            pred = self.alt[e] if self.alt is not None and self.alt_ok[e] else self.surrogate_at(e, full)
            d = (pred - self.y[e]).astype(np.float64)
            d = d[np.isfinite(d)]
            s1, sq, n = s1 + d.sum(), sq + (d * d).sum(), n + d.size
        return float(np.sqrt(max(sq / n - (s1 / n) ** 2, 0.0)))

    def alt_allowed(self):
        """(n_days,) bool: days whose one-step prediction may stand in a training lag window:
        a full lag window in the record and no test day in it (so no test truth reaches
        training through a prediction)."""
        return (np.arange(len(self.times)) >= self.t_lag) & self.test_free_window()

    def surrogate_at(self, e, win):
        """The model-free stand-in for fine day ``e``'s lag field on ``win``, in lag units:
        μ (residual target) or the interpolated coarse (absolute target). Computed for every
        fine day on first use (one more array the size of the fine record), so items stay
        views."""
        if self._surrogate is None:
            z = np.empty((len(self.times),) + tuple(self.shape), np.float32)
            for a in range(0, len(self.times), 64):  # bounded temporaries
                z[a:a + 64] = self.stand_in_log(self.cidx[a:a + 64])
            self._surrogate = self.store.norm_y.forward_log(z, self.season)
        return self._surrogate[e][win]

    def lag_sources(self, i):
        """(L, drop) of item ``i``: how many trailing lag days are pushforward predictions
        (0: all true) and whether its lag conditioning is dropped."""
        if self.pushforward <= 0 and self.cond_dropout <= 0:
            return 0, False
        g = np.random.default_rng((self.seed, self.epoch, i, 2))
        u, v, L = g.random(), g.random(), int(g.integers(1, self.t_lag + 1))
        return (L if u < self.pushforward else 0), bool(v < self.cond_dropout)

    def source_days(self, i):
        """The fine days whose truth item ``i`` reads (target and true lags), and the days
        whose alternative predictions it reads: (truth_days, alt_days) int arrays."""
        d = int(self.days[i // len(self.starts)])
        L, _ = self.lag_sources(i)
        lag = np.arange(d - self.t_lag, d)
        pushed = lag[len(lag) - L:] if L else lag[:0]
        true = np.concatenate([[d], lag[:len(lag) - L]])
        return true, pushed[self.alt_ok[pushed]] if self.alt is not None else pushed[:0]

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.days) * len(self.starts)

    def _start(self, i):
        y0, x0 = (int(v) for v in self.starts[i % len(self.starts)])
        if self.random_offsets:
            g = np.random.default_rng((self.seed, self.epoch, i))
            dy, dx = g.integers(0, self.stride, 2)
            y0 = min(y0 + int(dy), self.shape[0] - self.tile)
            x0 = min(x0 + int(dx), self.shape[1] - self.tile)
        return y0, x0

    def __getitem__(self, i):
        d = int(self.days[i // len(self.starts)])
        y0, x0 = self._start(i)
        t = self.tile
        win = (slice(y0, y0 + t), slice(x0, x0 + t))
        lags = np.array(self.y[d - self.t_lag:d][(slice(None),) + win])
        L, drop = self.lag_sources(i)
        for e in range(d - L, d):
            j = e - (d - self.t_lag)
            lags[j] = self.alt[e][win] if self.alt is not None and self.alt_ok[e] else self.surrogate_at(e, win)
        if self.lag_noise > 0:
            g = np.random.default_rng((self.seed, self.epoch, i, 1))
            lags = (lags + self.lag_noise * g.standard_normal(lags.shape)).astype(np.float32)
        return {
            "target": torch.from_numpy(np.ascontiguousarray(self.target_at(d, win))[None].copy()),
            "coarse": torch.from_numpy(np.ascontiguousarray(self.coarse_on_fine(d, win))),
            "covariates": torch.from_numpy(self.covariates(d, win)),
            "lags": torch.from_numpy(lags),
            "day": torch.tensor(d), "start": torch.tensor([y0, x0]), "drop": torch.tensor(drop),
        }


class SpeciesPatches(torch.utils.data.Dataset):
    """Several species' FinePatches of one store as one dataset: item i stacks item i of each
    (the same day, patch start, pushforward length and dropout flag: their draws are seeded by
    (seed, epoch, i), so sets built alike agree), the species in ``sets``' order.

    Item -> ``target`` (K, t, t), ``coarse`` (K, t, t), ``covariates`` (C, t, t) (the
    species share them), ``lags`` (K·T_lag, t, t) (species k's window at k·T_lag), ``day``,
    ``start`` and ``drop`` as FinePatches gives them.
    """

    def __init__(self, sets):
        sets = list(sets)
        first = sets[0]
        for fp in sets[1:]:
            if (len(fp) != len(first) or not np.array_equal(fp.days, first.days)
                    or not np.array_equal(fp.starts, first.starts) or fp.seed != first.seed):
                raise ValueError(f"SpeciesPatches: the sets of {first.store.variable} and "
                                 f"{fp.store.variable} differ in days, patches or seed; build them alike")
        self.sets = sets

    def __len__(self):
        return len(self.sets[0])

    def set_epoch(self, epoch: int):
        for fp in self.sets:
            fp.set_epoch(epoch)

    def __getitem__(self, i):
        items = [fp[i] for fp in self.sets]
        out = {k: torch.cat([it[k] for it in items]) for k in ("target", "coarse", "lags")}
        out.update({k: items[0][k] for k in ("covariates", "day", "start", "drop")})
        return out


class FineDays(_FineBase):
    """Whole-day access for inference and evaluation (no patching); see FinePatches."""
