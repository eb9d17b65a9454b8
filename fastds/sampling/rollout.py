"""The rollout loop: days forward in time, each day's lag window from what came before.

One object (:class:`Rollout`) for every model and for both the in-process and the
distributed paths (a distributed unit is a rollout over its own days and members). In
``strict`` mode every predicted day enters the lag window of the next; in ``lenient`` mode
true fine days are used where the record has them; ``cold_start`` lets lag days nobody
predicted take the model-free stand-in (the anchor μ). Each finished day is written
atomically to ``OUT.parts/`` with the request's signature; a re-run skips the days found
there (resume; a part that cannot be read is redone), and the NetCDF is assembled
atomically at the end, a day at a time, so a long rollout's memory does not grow with it;
a Zarr ``out`` is filled day by day instead, readable while the run goes on
(:mod:`fastds.sampling.output`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .._io import atomic_path
from ..data.regions import season_of
from ..data.store import Store
from .day import DayInputs
from .downscalers import DayContext
from .output import DayStore, is_zarr, open_output, write_output

__all__ = ["Rollout", "History", "dataset", "parts_of"]

DAY0 = pd.Timestamp("2000-01-01")  # draws are keyed by days since this date


class History:
    """Predicted days of a rollout, by day: those kept in memory, and those on disk as part
    files (a resumed run's, or ones dropped from memory), loaded back when a lag window asks.
    A part file that cannot be read (a run killed while the disk was full, a truncated copy)
    is not a day: it is removed and the day is sampled again."""

    def __init__(self, parts: Path | None):
        self.parts = parts
        self.mem: dict[pd.Timestamp, np.ndarray] = {}
        self.on_disk = set()
        if parts is not None and parts.exists():
            for f in parts.glob("*.npy"):
                try:
                    np.load(f, mmap_mode="r")
                except (ValueError, OSError, EOFError):
                    f.unlink()
                    continue
                self.on_disk.add(pd.Timestamp(f.stem))

    def __contains__(self, day):
        return day in self.mem or day in self.on_disk

    def __getitem__(self, day):
        if day not in self.mem:
            self.mem[day] = np.load(self.parts / f"{day:%Y%m%d}.npy")
        return self.mem[day]

    def keep(self, day, values, since=None):
        """Hold ``values`` for ``day``; with ``since``, forget (from memory only) days before it."""
        self.mem[day] = values
        if since is not None:
            self.on_disk.add(day)
            for d in [d for d in self.mem if d < since]:
                del self.mem[d]


def _write_part(parts: Path, day, values, signature):
    parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(parts / f"{day:%Y%m%d}.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, values)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename makes it a finished day
    sig = parts / "signature.json"
    if not sig.exists():
        with atomic_path(sig) as tmp:
            tmp.write_text(json.dumps(signature))


def dataset(values, days, store: Store, members, attrs, member0=0, species=None) -> xr.Dataset:
    """values (time, member, lat, lon), numpy or dask -> the CF Dataset; with ``species`` (the
    stores of a joint model's species, channel order), values (time, member, K, lat, lon) ->
    one data variable per species, each with its own attributes."""
    if species:
        parts = [dataset(values[:, :, k], days, st, members, attrs, member0) for k, st in enumerate(species)]
        ds = xr.merge(parts, combine_attrs="override")
        ds.attrs["species"] = ",".join(st.variable for st in species)
        return ds
    da = xr.DataArray(values, dims=("time", "member", "lat", "lon"),
                      coords={"time": pd.DatetimeIndex(days), "member": member0 + np.arange(members),
                              "lat": store.ds["lat"].values, "lon": store.ds["lon"].values})
    if members == 1 and member0 == 0:
        da = da.isel(member=0, drop=True)
    da.attrs = store.attrs  # the species' units, long name and CF standard name (a copy)
    da.attrs["long_name"] += ", downscaled by fastds"
    if attrs.get("antithetic") and "member" in da.dims:
        da.attrs["antithetic"] = 1  # members in ± pairs: evaluate scores them as such
    ds = da.to_dataset(name=store.variable)
    ds["lat"].attrs = {"units": "degrees_north", "standard_name": "latitude"}
    ds["lon"].attrs = {"units": "degrees_east", "standard_name": "longitude"}
    ds.attrs = {"Conventions": "CF-1.8", "title": "fastds generative downscaling", **attrs}
    return ds


def parts_of(out) -> Path:
    """The folder where a rollout writing ``out`` keeps its finished days (``OUT.parts/``);
    it is removed once ``out`` is complete."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


class Rollout:
    """Days ``days`` of one downscaler, forward in time (see the module docstring).

    ``finish(values, coarse, season)`` is applied to each day's physical fields (the
    coarse-cell projection, or None); ``attrs`` become the output's attributes and, with
    ``out``, the signature its parts are checked against. ``species``: the stores of a joint
    model's species (channel order; ``store`` is the first): its days are (members, K, H, W)
    and its season state's ``fd`` one FineDays per species."""

    def __init__(self, *, store: Store, days, cfg, member0=0, cold_start=False, out=None,
                 attrs=None, finish=None, coarse_days=None, progress=False, desc="sample", species=None):
        self.store, self.days, self.cfg = store, pd.DatetimeIndex(days), cfg
        self.members, self.member0, self.cold_start = cfg.members, int(member0), cold_start
        self.out = Path(out) if out is not None else None
        self.parts = parts_of(self.out) if self.out is not None else None
        self.attrs, self.finish, self.coarse_days = dict(attrs or {}), finish, coarse_days
        self.progress, self.desc = progress, desc
        self.fine_set = set(store.times)
        self.species = list(species) if species else None

    def run(self, downscaler) -> xr.Dataset:
        """Sample every day with ``downscaler``; the Dataset (lazily read from ``out`` when given)."""
        from tqdm.auto import tqdm
        self._check_signature()
        history = History(self.parts)
        sink = self._day_store()
        results, t_lag = [], 0
        bar = tqdm(total=len(self.days), desc=self.desc, disable=not self.progress, unit="day")
        for day in self.days:
            if day in history:
                results.append(None if self.parts is not None else history[day])
                if sink is not None and day not in sink.done:  # killed between part and store
                    sink.put(day, history[day])
            else:
                s = int(season_of(day.month))
                state = downscaler.season(s)
                c = self.store.times_c.get_loc(day)
                ctx = DayContext(day, state, c, (day - DAY0).days, self.members, self.member0,
                                 coarse_days=self.coarse_days)
                if downscaler.needs_lags:
                    t_lag = max(t_lag, state.t_lag)
                    ctx.inputs = self._inputs(day, state, history)
                values = downscaler.day(ctx)
                if self.finish is not None:
                    values = self.finish(values, ctx.coarse, s)
                if self.parts is not None:
                    _write_part(self.parts, day, values, self.attrs)
                    if sink is not None:
                        sink.put(day, values)
                    history.keep(day, values, since=day - pd.Timedelta(days=t_lag))
                    results.append(None)
                else:
                    history.keep(day, values)
                    results.append(values)
            bar.update(1)
        bar.close()
        return self._assemble(results, sink)

    def _day_store(self):
        """A Zarr output (``out`` ending in ``.zarr``) filled day by day, else None."""
        if not is_zarr(self.out):
            return None
        import dask.array as dsa
        shape = (len(self.days),) + self._day_shape()
        template = dataset(dsa.full(shape, np.nan, dtype=np.float32, chunks=(1,) + shape[1:]),
                           self.days, self.store, self.members, self.attrs, self.member0, self.species)
        return DayStore(self.out, template, self.attrs)

    def _day_shape(self) -> tuple:
        """One day's values: (members, [K,] lat, lon)."""
        k = (len(self.species),) if self.species else ()
        return (self.members,) + k + (self.store.ds["lat"].size, self.store.ds["lon"].size)

    def _check_signature(self):
        sig = self.parts / "signature.json" if self.parts is not None else None
        if sig is not None and sig.exists():
            old = json.loads(sig.read_text())
            if old != self.attrs:
                raise ValueError(f"sample: {self.parts} holds days from a different request ({old}); "
                                 "remove it or use another --out")

    def _inputs(self, day, state, history) -> DayInputs:
        """The day's normalised inputs, its lag window assembled from predictions, the fine
        record or (cold start) the stand-in, as ``cfg.mode`` and ``cfg.lag_history`` say; a
        joint model's species side by side (coarse (K, H, W), lags (members or 1, K·t_lag, H,
        W))."""
        fds, stores = (state.fd, self.species) if self.species else ([state.fd], [self.store])
        parts = [self._lags(day, fd, st, state.t_lag, history, k if self.species else None)
                 for k, (fd, st) in enumerate(zip(fds, stores))]
        shared = all(sh for _, sh in parts)
        # one field's arrays are used as they are (a copy of a long lag stack costs per day)
        lags = parts[0][0] if len(parts) == 1 else np.concatenate([lg for lg, _ in parts], 1)
        c = self.store.times_c.get_loc(day)
        coarse = [fd.coarse_at(c) for fd in fds]
        return DayInputs(coarse[0] if len(coarse) == 1 else np.concatenate(coarse), fds[0].covariates_at(day),
                         lags[:1] if shared else lags)

    def _lags(self, day, fd, store, t_lag, history, channel=None):
        """One field's lag window (members, t_lag, H, W) in lag units and whether every
        member shares it; ``channel``: the species of a joint model's predicted days."""
        cfg, members = self.cfg, self.members

        def predicted(ld):
            return history[ld] if channel is None else history[ld][:, channel]
        s = fd.season
        lag_days = pd.date_range(day - pd.Timedelta(days=t_lag), periods=t_lag, freq="D")
        lags = np.empty((members, t_lag) + fd.shape, np.float32)
        shared = True
        for j, ld in enumerate(lag_days):
            use_pred = ld in history and (cfg.mode == "strict" or ld not in self.fine_set)
            if use_pred and cfg.lag_history == "mean" and members > 1:
                # one shared history: the ensemble mean (log space) of the day
                lags[:, j] = store.norm_y.forward_log(np.log10(np.maximum(predicted(ld), 1e-6)).mean(0), s)
            elif use_pred:
                lags[:, j] = store.norm_y.forward(predicted(ld), s)
                shared = shared and members == 1
            elif ld in self.fine_set:
                lags[:, j] = fd.y[fd.index_of(ld)]
            elif self.cold_start and ld < day and store.times_c.get_indexer([ld])[0] >= 0:
                lags[:, j] = store.norm_y.forward_log(fd.stand_in_log(store.times_c.get_loc(ld)), s)
            else:
                raise ValueError(
                    f"sample: {day:%Y-%m-%d} needs {ld:%Y-%m-%d} in its {t_lag}-day lag window, which "
                    f"is neither in the fine record ({store.times[0]:%Y-%m-%d}..{store.times[-1]:%Y-%m-%d}) "
                    f"nor predicted yet; start the rollout no later than "
                    f"{store.times[-1] + pd.Timedelta(days=1):%Y-%m-%d}")
        return lags, shared

    def _assemble(self, results, sink) -> xr.Dataset:
        store, days = self.store, self.days
        if self.out is None:
            return dataset(np.stack(results), days, store, self.members, self.attrs, self.member0, self.species)
        if sink is not None:  # every day is in the Zarr already
            ds = sink.close()
            shutil.rmtree(self.parts, ignore_errors=True)
            return ds
        # the file is written day by day from the parts (dask, one day per chunk): the whole
        # period is never in memory; the returned Dataset reads it lazily
        import dask
        import dask.array as dsa
        shape = self._day_shape()
        stack = dsa.stack([dsa.from_delayed(dask.delayed(np.load)(self.parts / f"{d:%Y%m%d}.npy"),
                                            shape, np.float32) for d in days])
        # this call's scheduler, not a process-wide setting (threads of a worker share it)
        write_output(dataset(stack, days, store, self.members, self.attrs, self.member0, self.species), self.out)
        shutil.rmtree(self.parts, ignore_errors=True)
        return open_output(self.out)
