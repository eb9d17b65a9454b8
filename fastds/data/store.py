"""``prepare``: raw files -> one cached, chunked Zarr store per region.

Store layout (Zarr, written to a temporary folder and renamed into place)::

    coarse      (time_c, lat_c, lon_c) float32  daily coarse field, physical units
    fine        (time, lat, lon)       float32  daily fine field over the fine record
    elevation   (lat, lon)             float32  metres (zeros when none was given)
    split_c     (time_c)               int8     0 train, 1 val, 2 test (by target day)
    split       (time)                 int8     the same split at the fine days
    attrs: norm_x, norm_y (per-season min/max of log10, train days), region, variable,
           align, manifest (inputs and settings), warnings (days with few valid hours)

Re-running with the same inputs and settings returns at once (the manifest matches); an
interrupted run leaves the previous store (or none) and a ``.tmp-*`` folder that is ignored.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .._io import atomic_path
from .readers import GRIDS, MIN_VALID_FRACTION, DataError, DataWarning, _open, _resolve, open_elevation
from .regions import Region, parse_region, wrap_lon
from .species import cf_attrs
from .transforms import ALIGN_METHODS, MinMax, fit_minmax, split_days

__all__ = ["prepare", "open_store", "Store"]

STORE_VERSION = 1


def _fingerprint(paths, what):
    if isinstance(paths, (xr.Dataset, xr.DataArray)):
        import dask.base
        # dask's token covers the values (numpy-backed) or the graph that reads them (lazy)
        return {"xarray": type(paths).__name__, "token": dask.base.tokenize(paths)}
    files = _resolve(paths, what)
    h = hashlib.sha256()
    for f in files:
        if f.is_dir():  # a Zarr cube: its metadata files stand for it
            for g in sorted(f.rglob("*")):
                if g.is_file() and (g.name.startswith(".z") or g.name == "zarr.json"):
                    st = g.stat()
                    h.update(f"{g}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return {"files": len(files), "sha256": h.hexdigest()}


def _box(da: xr.DataArray, grid) -> tuple:
    """(lat0, lat1, lon0, lon1) of a region's cell edges; longitudes as the reader keeps them
    (ascending, past 180 for a region across the antimeridian)."""
    return (float(da.lat.min()) - grid.dlat / 2, float(da.lat.max()) + grid.dlat / 2,
            float(da.lon.min()) - grid.dlon / 2, float(da.lon.max()) + grid.dlon / 2)


def _check_cover(coarse: xr.DataArray, fine: xr.DataArray):
    cbox, fbox = _box(coarse, GRIDS["coarse"]), _box(fine, GRIDS["fine"])
    if not (cbox[0] < fbox[1] and fbox[0] < cbox[1] and cbox[2] < fbox[3] and fbox[2] < cbox[3]):
        raise DataError(f"prepare: the coarse region {tuple(round(v, 4) for v in cbox)} and the fine "
                        f"region {tuple(round(v, 4) for v in fbox)} do not overlap; check --region "
                        "and the input files")
    tf = pd.DatetimeIndex(fine.time.values)
    tc = pd.DatetimeIndex(coarse.time.values)
    missing = tf.difference(tc)
    if len(missing) == len(tf):
        raise DataError(f"prepare: the fine record {tf.min():%Y-%m-%d}..{tf.max():%Y-%m-%d} and the "
                        f"coarse record {tc.min():%Y-%m-%d}..{tc.max():%Y-%m-%d} share no day")
    if len(missing):
        raise DataError(f"prepare: {len(missing)} fine day(s) have no coarse day, e.g. "
                        f"{', '.join(f'{d:%Y-%m-%d}' for d in missing[:5])}")


def prepare(*, coarse, fine, out, region, elevation=None, variable="DUEXTTAU",
            align="bilinear", val=0.2, test=0.1, seed=0, block=14, allow_gaps=False,
            workers=0, progress=False) -> Path:
    """Build the store for one region from raw files (see the module doc for its layout).

    Parameters
    ----------
    coarse, fine : anything :func:`open_coarse` / :func:`open_fine` take: files, a folder, a
        glob, a merged cube, or an ``xarray.Dataset`` / ``DataArray`` already open.
    out : the store folder (``*.zarr`` by convention).
    region : ``"area0"``, ``"area1"``, a box string, or a :class:`Region`.
    elevation : NetCDF with elevation (see :func:`open_elevation`), or None for zeros.
    align : coarse -> fine alignment the datasets use unless a config names another:
        ``"bilinear"`` (default), ``"nearest"`` (the reference code) or ``"conservative"``
        (see :func:`~fastds.data.transforms.align_index`).
    val, test, seed, block : the split (see :func:`split_days`), fixed here so every stage
        uses the same one. ``block`` days are assigned together (default 14: contiguous
        held-out blocks, and training targets whose lag window holds a test day are purged
        by the datasets); ``block=1`` is the reference code's day-level split.
    workers : 0 reads days on dask threads in this process (native reads then take turns on
        the one HDF5 lock); N > 0 reads and writes days in N processes, each with its own
        HDF5 library: what global native files want (see ``bench/bench_ingest.py``).
    progress : a progress bar per day read (native files) or per dask task (cubes).

    Returns the store path. Warnings about days with few valid hours are re-issued and
    kept in the store's ``warnings`` attribute.
    """
    region = parse_region(region)
    out = Path(out)
    manifest = {
        "version": STORE_VERSION, "coarse": _fingerprint(coarse, "prepare --coarse"),
        "fine": _fingerprint(fine, "prepare --fine"),
        "elevation": _fingerprint(elevation, "prepare --elevation") if elevation else None,
        "region": [region.name, *region.as_tuple()], "variable": variable, "align": align,
        "split": {"val": val, "test": test, "seed": seed, "block": block},
        "allow_gaps": allow_gaps,
    }
    if (out / "zarr.json").exists() or (out / ".zattrs").exists():
        try:
            old = json.loads(xr.open_zarr(str(out), consolidated=False).attrs.get("manifest", "{}"))
        except Exception:
            old = None
        if old == manifest:
            return out
    if align not in ALIGN_METHODS:
        raise ValueError(f"prepare: align must be one of {', '.join(ALIGN_METHODS)}, got {align!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"prepare: block must be a positive number of days, got {block!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"prepare: workers must be 0 (threads) or a number of processes, got {workers!r}")

    with _notes_sink(workers) as sink:
        xc = _open(coarse, "coarse", variable, region, MIN_VALID_FRACTION, allow_gaps, sink)
        yf = _open(fine, "fine", variable, region, MIN_VALID_FRACTION, allow_gaps, sink)
        _write_prepared(xc, yf, out=out, region=region, elevation=elevation, variable=variable,
                        align=align, val=val, test=test, seed=seed, block=block,
                        manifest=manifest, workers=workers, sink=sink, progress=progress)
    return out


def _mp_context():
    """fork where the platform has it: workers start in milliseconds, and a user's script
    needs no ``if __name__ == "__main__"`` guard (spawn re-imports the main module). The
    readers' work in a child is netCDF4, numpy and zarr only, nothing that fork breaks."""
    import multiprocessing
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


@contextlib.contextmanager
def _notes_sink(workers):
    """A queue the day readers of worker processes put their warnings in (None on threads)."""
    if not workers:
        yield None
        return
    with _mp_context().Manager() as manager:
        yield manager.Queue()


def _write_prepared(xc, yf, *, out, region, elevation, variable, align, val, test, seed, block,
                    manifest, workers, sink, progress):
    _check_cover(xc, yf)
    elev, elev_note = _elevation_on(elevation, yf)
    tc = pd.DatetimeIndex(xc.time.values)
    split_c = split_days(tc, val=val, test=test, seed=seed, block=block)
    split_f = split_c[tc.get_indexer(pd.DatetimeIndex(yf.time.values))]
    ds = xr.Dataset(
        {
            "coarse": xc.rename({"time": "time_c", "lat": "lat_c", "lon": "lon_c"}).chunk({"time_c": 256}),
            "fine": yf.chunk({"time": 16}),
            "elevation": elev.drop_vars([c for c in elev.coords if c not in ("lat", "lon")]).load(),
            "split_c": ("time_c", split_c),
            "split": ("time", split_f),
        })
    for v, src in (("coarse", xc), ("fine", yf)):
        ds[v].attrs = cf_attrs(variable, units=src.attrs.get("units"), long_name=src.attrs.get("long_name"))
        ds[v].encoding = {}
    attrs = {"region": json.dumps([region.name, *region.as_tuple()]), "variable": variable,
             "align": align, "elevation_source": elev_note, "manifest": json.dumps(manifest),
             "fastds_store_version": STORE_VERSION}
    notes = _write_store(ds, out, attrs, tc, split_c, yf.time.values, split_f, workers, sink, progress)
    for note in notes:
        warnings.warn(DataWarning(note), stacklevel=3)


def _elevation_on(elevation, yf):
    """Elevation on the fine grid (float32) and a note of its source; zeros without a file."""
    if not elevation:
        return xr.zeros_like(yf.isel(time=0, drop=True)).astype(np.float32), "none (zeros)"
    elev = open_elevation(elevation)
    # the elevation file is read in -180..180; a region across the antimeridian asks past 180
    elev = elev.interp(lat=yf.lat, lon=xr.DataArray(wrap_lon(yf.lon.values), dims="lon"), method="nearest",
                       kwargs={"fill_value": None}).assign_coords(lon=yf.lon).astype(np.float32)
    if elev.isnull().any():
        raise DataError(f"prepare: elevation file {elevation} does not cover the fine region")
    return elev, str(elevation)


def _write_store(ds, out, attrs, tc, split_c, tf, split_f, workers, sink, progress) -> list:
    """Write ``ds`` to ``out`` atomically, fit the normalisation on its training days and add
    it to the attributes; returns the data warnings raised while reading."""
    with atomic_path(out, directory=True) as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        _compute(ds.to_zarr(str(tmp), mode="w", consolidated=False, compute=False), workers, progress)
        written = xr.open_zarr(str(tmp), consolidated=False)
        norm_x = fit_minmax(written["coarse"].values, tc, split_c == 0)
        norm_y = fit_minmax(written["fine"].values, tf, split_f == 0)
        notes = {str(w.message) for w in caught if issubclass(w.category, DataWarning)}
        while sink is not None and not sink.empty():
            notes.add(sink.get())
        notes = sorted(notes)
        import zarr
        group = zarr.open_group(str(tmp), mode="r+")
        group.attrs.update({**attrs, "norm_x": json.dumps(norm_x.to_dict()),
                            "norm_y": json.dumps(norm_y.to_dict()), "warnings": json.dumps(notes)})
    return notes


def _compute(write, workers, progress):
    """Run the store's write graph: on the default scheduler (threads), or in ``workers``
    processes (their day readers put warnings in `_notes_sink`'s queue)."""
    import dask
    if not workers:
        with _day_progress(progress):
            dask.compute(write)
        return
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(int(workers), mp_context=_mp_context()) as pool, _day_progress(progress):
        # chunksize 1: dask batches 6 tasks per submission by default, which gave one worker
        # six of a week's seven days
        dask.compute(write, scheduler="processes", pool=pool, chunksize=1)


def _is_day(key) -> bool:
    """A task that reads a native day (fusion renames `_daily_mean-*` to `daily_mean-from-…`)."""
    return "daily_mean" in str(key[0] if isinstance(key, tuple) else key)


def _day_progress(enabled):
    """A tqdm bar over the days read from native files (see `_is_day`), or over all tasks
    when the inputs are cubes (a dask callback); a null context when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    from dask.callbacks import Callback
    from tqdm.auto import tqdm

    class DayBar(Callback):
        def _start(self, dsk):
            days = sum(map(_is_day, dsk))
            self.days = days > 0
            self.bar = tqdm(total=days or len(dsk), unit="day" if days else "task",
                            desc="prepare: days read" if days else "prepare")

        def _posttask(self, key, result, dsk, state, id):
            if not self.days or _is_day(key):
                self.bar.update()

        def _finish(self, dsk, state, errored):
            self.bar.close()

    return DayBar()


@dataclass
class Store:
    """An opened store: lazy arrays plus the parameters every stage needs."""
    path: Path
    ds: xr.Dataset
    norm_x: MinMax
    norm_y: MinMax
    region: Region
    variable: str
    align: str

    @property
    def coarse(self) -> xr.DataArray:
        return self.ds["coarse"]

    @property
    def fine(self) -> xr.DataArray:
        return self.ds["fine"]

    @property
    def elevation(self) -> xr.DataArray:
        return self.ds["elevation"]

    @property
    def times_c(self) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(self.ds["time_c"].values)

    @property
    def times(self) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(self.ds["time"].values)


def open_store(path, *, dask=True) -> Store:
    """Open a store written by :func:`prepare`; a clear error if ``path`` is not one.

    ``dask=False`` reads arrays lazily without dask (zarr directly, on first access): what a
    task inside a dask worker wants, where a dask read would become nested tasks on the
    cluster (or need a process-wide scheduler setting)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"store {path} does not exist; create it with `fastds prepare`")
    try:
        ds = xr.open_zarr(str(path), consolidated=False, **({} if dask else {"chunks": None}))
    except Exception as err:
        raise DataError(f"{path} is not a fastds store ({type(err).__name__}: {err})") from None
    if "norm_x" not in ds.attrs:
        raise DataError(f"{path} is a Zarr store but not a complete fastds store (no norm_x); "
                        "re-run `fastds prepare`")
    name, *box = json.loads(ds.attrs["region"])
    return Store(path, ds, MinMax.from_dict(json.loads(ds.attrs["norm_x"])),
                 MinMax.from_dict(json.loads(ds.attrs["norm_y"])), Region(name, *box),
                 ds.attrs["variable"], ds.attrs["align"])
