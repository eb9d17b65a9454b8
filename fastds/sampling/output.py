"""Where a rollout's days go: a NetCDF file assembled when the run ends, or a Zarr store
(``OUT`` ending in ``.zarr``) written a day at a time, readable while a long run goes on.

Zarr layout: the data variable ``VAR(time[, member], lat, lon)`` chunked one day a chunk,
``written(time)`` int8 set to 1 once a day's values are in (zarr writes each chunk file
atomically, and the flag is written after the values), and the attribute ``complete`` (0
until the last day). A reader that opens the store mid-run keeps the days with
``written == 1`` (:func:`open_output` does so); the days not yet written read as NaN.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .._io import atomic_path

__all__ = ["is_zarr", "write_output", "open_output", "DayStore"]


def is_zarr(out) -> bool:
    return out is not None and Path(out).suffix == ".zarr"


def _plain(ds: xr.Dataset) -> xr.Dataset:
    """Without the encodings a source file left (chunk sizes of another layout)."""
    ds = ds.copy()
    for v in ds.variables.values():
        v.encoding = {}
    return ds


def write_output(ds: xr.Dataset, out) -> None:
    """The finished ``ds`` to ``out`` atomically, streamed a day at a time (dask chunks of one
    day are read and written in turn on this call's scheduler, never the whole period in
    memory): NetCDF, or Zarr chunked by day with every day flagged written."""
    out = Path(out)
    with atomic_path(out, directory=is_zarr(out)) as tmp:
        if is_zarr(out):
            ds = _plain(ds).chunk({"time": 1})
            ds["written"] = ("time", np.ones(ds.sizes["time"], np.int8))
            ds.attrs["complete"] = 1
            ds.to_zarr(tmp, mode="w", consolidated=False, compute=False).compute(scheduler="synchronous")
        else:
            ds.to_netcdf(tmp, compute=False).compute(scheduler="synchronous")


def open_output(out, *, written_only=True) -> xr.Dataset:
    """A sample output, lazily: NetCDF, or Zarr (``written_only``: the days written so far,
    for a store a run is still writing)."""
    out = Path(out)
    if not is_zarr(out):
        return xr.open_dataset(out)
    ds = xr.open_zarr(out, consolidated=False)
    if "written" in ds:
        if written_only:
            ds = ds.isel(time=np.flatnonzero(ds["written"].values == 1))
        ds = ds.drop_vars("written")
    return ds


class DayStore:
    """A Zarr output filled a day at a time (see the module docstring).

    ``template``: the whole output as a lazy Dataset (its values are never computed: only its
    coordinates and attributes are written at creation). ``signature``: the request; a store
    left by a different request is refused, one left by the same request (a killed run) is
    filled on."""

    def __init__(self, out, template: xr.Dataset, signature: dict):
        self.out = Path(out)
        self.vars = list(template.data_vars)  # one, or a joint model's species in channel order
        self.dims = template[self.vars[0]].dims
        self.day_shape = template[self.vars[0]].shape[1:]
        self.days = pd.DatetimeIndex(template["time"].values)
        sig = json.dumps(signature, sort_keys=True, default=str)
        if self.out.exists():
            old = xr.open_zarr(self.out, consolidated=False)
            if old.attrs.get("fastds_request") != sig or not self.days.equals(pd.DatetimeIndex(old["time"].values)):
                raise ValueError(f"sample: {self.out} holds a different request's days; remove it "
                                 "or use another --out")
            self.done = set(self.days[old["written"].values == 1])
            return
        ds = _plain(template).chunk({"time": 1})
        ds["written"] = ("time", np.zeros(len(self.days), np.int8))
        ds["written"] = ds["written"].chunk({"time": 1})
        ds.attrs.update(complete=0, fastds_request=sig)
        # coordinates now; the data and the flags stay unwritten (fill: NaN and 0)
        ds.to_zarr(self.out, mode="w-", consolidated=False, compute=False)
        self.done = set()

    def put(self, day, values: np.ndarray) -> None:
        """Write one day's ``values`` ([member,] lat, lon), or (member, K, lat, lon) for K
        species, then flag it written."""
        i = self.days.get_loc(day)
        region = {"time": slice(i, i + 1)}
        arr = np.asarray(values, np.float32)
        # one member without a member dim: (1, lat, lon) -> (lat, lon), as the template has it
        fields = [arr.reshape(self.day_shape)] if len(self.vars) == 1 else \
                 [arr[:, k].reshape(self.day_shape) for k in range(len(self.vars))]
        xr.Dataset({v: (self.dims, f[None]) for v, f in zip(self.vars, fields)}).to_zarr(
            self.out, region=region, consolidated=False)
        xr.Dataset({"written": ("time", np.ones(1, np.int8))}).to_zarr(self.out, region=region,
                                                                      consolidated=False)
        self.done.add(day)

    def close(self) -> xr.Dataset:
        import zarr
        zarr.open_group(str(self.out), mode="r+").attrs["complete"] = 1
        return open_output(self.out)
