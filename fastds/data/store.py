"""``prepare``: raw files -> one cached, chunked Zarr store per region.

Store layout (Zarr, written to a temporary folder and renamed into place)::

    coarse      (species, time_c, lat_c, lon_c) float32  daily coarse fields, physical units
    fine        (species, time, lat, lon)       float32  daily fine fields over the fine record
    elevation   (lat, lon)             float32  metres (zeros when none was given)
    split_c     (time_c)               int8     0 train, 1 val, 2 test (by target day)
    split       (time)                 int8     the same split at the fine days
    attrs: variables (the species, in order), species_attrs (each one's units, long name and
           CF standard name), norm_x, norm_y ({species: per-season min/max of log10, train
           days}), region, align, manifest (inputs and settings), warnings (days with few
           valid hours)

One species is one variable (``DUEXTTAU``, ``SSEXTTAU``, ...), chunked on its own, so a
single-species consumer reads only its own. Stores of version 1 (one variable, no species
dim) still open.

Re-running with the same inputs and settings returns at once (the manifest matches); an
interrupted run leaves the previous store (or none) and a ``.tmp-*`` folder that is ignored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .._io import atomic_path
from .._warn import warn_caller
from .readers import GRIDS, MIN_VALID_FRACTION, DataError, DataWarning, _open_many, _resolve, open_elevation
from .regions import Region, parse_region, wrap_lon
from .species import cf_attrs
from .transforms import ALIGN_METHODS, MinMax, fit_minmax, split_days

__all__ = ["prepare", "open_store", "Store"]

STORE_VERSION = 2


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


def _variable_list(variable, variables) -> tuple:
    """The species to prepare: ``variables`` (a sequence, or a comma-separated string) or
    ``variable``; a name given twice or an empty one is an error that names it."""
    if variables is None:
        variables = [variable]
    elif isinstance(variables, str):
        variables = variables.split(",")
    names = [str(v).strip() for v in variables]
    if not names or any(not v for v in names):
        raise ValueError(f"prepare: variables must be non-empty names, got {list(variables)!r}")
    twice = sorted({v for v in names if names.count(v) > 1})
    if twice:
        raise ValueError(f"prepare: variable {twice[0]} is named twice in variables={names}")
    return tuple(names)


def prepare(*, coarse, fine, out, region, elevation=None, variable="DUEXTTAU", variables=None,
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
    variable, variables : the species to prepare: one name, or several (``variables``, a list
        or ``"DUEXTTAU,SSEXTTAU"``), each with its own normalisation and CF attributes. Every
        input must hold every species (a missing one is an error naming the file and the
        variable; nothing is written).
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
    names = _variable_list(variable, variables)
    out = Path(out)
    manifest = {
        "version": STORE_VERSION, "coarse": _fingerprint(coarse, "prepare --coarse"),
        "fine": _fingerprint(fine, "prepare --fine"),
        "elevation": _fingerprint(elevation, "prepare --elevation") if elevation else None,
        "region": [region.name, *region.as_tuple()], "variables": list(names), "align": align,
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
        xc = _species(coarse, "coarse", names, region, allow_gaps, sink)
        yf = _species(fine, "fine", names, region, allow_gaps, sink)
        _write_prepared(xc, yf, out=out, region=region, elevation=elevation,
                        align=align, val=val, test=test, seed=seed, block=block,
                        manifest=manifest, workers=workers, sink=sink, progress=progress)
    return out


def _species(paths, kind, names, region, allow_gaps, sink) -> xr.DataArray:
    """The inputs' daily fields of every species, stacked on a leading ``species`` dim (lazy);
    each species' units and long name go in the ``species_attrs`` attribute."""
    fields = _open_many(paths, kind, names, region, MIN_VALID_FRACTION, allow_gaps, sink)
    for v, da in zip(names[1:], fields[1:]):
        for dim in ("time", "lat", "lon"):
            if da[dim].size != fields[0][dim].size or not np.array_equal(da[dim].values, fields[0][dim].values):
                raise DataError(f"prepare: the {kind} {v} is on other {dim} values than {names[0]} "
                                f"({da[dim].size} vs {fields[0][dim].size}); every species must share "
                                "the days and the grid")
    out = xr.concat([da.drop_attrs() for da in fields], dim=pd.Index(list(names), name="species"),
                    coords="minimal", compat="override", join="override")
    out.attrs["species_attrs"] = {v: {a: da.attrs[a] for a in ("units", "long_name") if a in da.attrs}
                                  for v, da in zip(names, fields)}
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


def _write_prepared(xc, yf, *, out, region, elevation, align, val, test, seed, block,
                    manifest, workers, sink, progress):
    _check_cover(xc, yf)
    elev, elev_note = _elevation_on(elevation, yf)
    tc = pd.DatetimeIndex(xc.time.values)
    split_c = split_days(tc, val=val, test=test, seed=seed, block=block)
    split_f = split_c[tc.get_indexer(pd.DatetimeIndex(yf.time.values))]
    ds = xr.Dataset(
        {
            "coarse": xc.rename({"time": "time_c", "lat": "lat_c", "lon": "lon_c"}).chunk({"species": 1, "time_c": 256}),
            "fine": yf.chunk({"species": 1, "time": 16}),
            "elevation": elev.drop_vars([c for c in elev.coords if c not in ("lat", "lon")]).load(),
            "split_c": ("time_c", split_c),
            "split": ("time", split_f),
        })
    names = [str(v) for v in xc["species"].values]
    species_attrs = {v: cf_attrs(v, **yf.attrs["species_attrs"][v]) for v in names}
    for v in ("coarse", "fine"):
        ds[v].attrs = {}
        ds[v].encoding = {}
    attrs = {"region": json.dumps([region.name, *region.as_tuple()]), "variables": json.dumps(names),
             "variable": names[0], "species_attrs": json.dumps(species_attrs),
             "align": align, "elevation_source": elev_note, "manifest": json.dumps(manifest),
             "fastds_store_version": STORE_VERSION}
    notes = _write_store(ds, out, attrs, tc, split_c, yf.time.values, split_f, workers, sink, progress)
    for note in notes:  # at the caller's line (the API, the CLI, the demo), once per note
        warn_caller(note, DataWarning)


def _elevation_on(elevation, yf):
    """Elevation on the fine grid (float32) and a note of its source; zeros without a file."""
    if not elevation:
        return xr.zeros_like(yf.isel(time=0, species=0, drop=True)).astype(np.float32), "none (zeros)"
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
        names = [str(v) for v in written["species"].values]
        # one species at a time: memory is one species' record, not all of them
        norm_x = {v: fit_minmax(written["coarse"].sel(species=v).values, tc, split_c == 0).to_dict()
                  for v in names}
        norm_y = {v: fit_minmax(written["fine"].sel(species=v).values, tf, split_f == 0).to_dict()
                  for v in names}
        notes = {str(w.message) for w in caught if issubclass(w.category, DataWarning)}
        while sink is not None and not sink.empty():
            notes.add(sink.get())
        notes = sorted(notes)
        import zarr
        group = zarr.open_group(str(tmp), mode="r+")
        group.attrs.update({**attrs, "norm_x": json.dumps(norm_x),
                            "norm_y": json.dumps(norm_y), "warnings": json.dumps(notes)})
    return notes


def _compute(write, workers, progress):
    """Run the store's write graph: on the default scheduler (threads), or in ``workers``
    processes (their day readers put warnings in `_notes_sink`'s queue)."""
    import dask
    if not workers:
        with _day_progress(progress), _joined_thread_pool(write) as pool:
            dask.compute(write, **({"scheduler": "threads", "pool": pool} if pool else {}))
        return
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(int(workers), mp_context=_mp_context()) as pool, _day_progress(progress):
        # chunksize 1: dask batches 6 tasks per submission by default, which gave one worker
        # six of a week's seven days
        dask.compute(write, scheduler="processes", pool=pool, chunksize=1)


@contextlib.contextmanager
def _joined_thread_pool(write):
    """A thread pool of prepare's own, shut down (waiting) before prepare returns or raises;
    None where the user has chosen another scheduler (a distributed client, a pool of theirs).

    dask's threaded scheduler raises a task's error at once and leaves the other tasks it
    started running on its shared pool. A day reader still inside netCDF-C after prepare
    raised met the caller's next `xarray.open_dataset`, whose metadata reads run outside the
    HDF5 lock (pydata/xarray#9779): the test suite's intermittent segmentation fault. Joining
    the readers also keeps a late chunk write out of the temporary store being removed."""
    import dask
    import dask.threaded
    if dask.base.get_scheduler(collections=[write]) is not dask.threaded.get or dask.config.get("pool", None):
        yield None
        return
    executor = getattr(dask.threaded, "ContextAwareThreadPoolExecutor", None)
    if executor is None:  # dask before 2025: warnings and contextvars need no propagation there
        from concurrent.futures import ThreadPoolExecutor as executor
    pool = executor(dask.config.get("num_workers", None) or dask.threaded.CPU_COUNT)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    """An opened store: lazy arrays plus the parameters every stage needs.

    A store holds one or several species (``variables``); the single-field consumers
    (datasets, training, sampling) see the selected one, ``variable`` (:meth:`select`): its
    ``coarse`` (time_c, lat_c, lon_c), ``fine`` (time, lat, lon), ``norm_x``/``norm_y`` and
    ``attrs`` (units, long name, CF standard name). A store of one species selects it."""
    path: Path
    ds: xr.Dataset
    region: Region
    align: str
    variables: tuple
    norms_x: dict
    norms_y: dict
    species_attrs: dict
    variable: str | None = None

    def select(self, variable) -> "Store":
        """This store with ``variable`` selected (an error names the species it holds)."""
        if variable not in self.variables:
            raise DataError(f"store {self.path} has no variable {variable!r}; it holds "
                            f"{', '.join(self.variables)}")
        return dataclasses.replace(self, variable=variable)

    def _selected(self) -> str:
        if self.variable is None:
            raise DataError(f"store {self.path} holds {len(self.variables)} species "
                            f"({', '.join(self.variables)}); choose one: open_store(..., variable=...), "
                            "data.variable in the run's config, or --variable")
        return self.variable

    @property
    def norm_x(self) -> MinMax:
        return self.norms_x[self._selected()]

    @property
    def norm_y(self) -> MinMax:
        return self.norms_y[self._selected()]

    @property
    def attrs(self) -> dict:
        """The selected species' ``units``, ``long_name`` and (where CF has one) ``standard_name``."""
        return dict(self.species_attrs[self._selected()])

    @property
    def coarse(self) -> xr.DataArray:
        return self.ds["coarse"].sel(species=self._selected(), drop=True).assign_attrs(self.attrs)

    @property
    def fine(self) -> xr.DataArray:
        return self.ds["fine"].sel(species=self._selected(), drop=True).assign_attrs(self.attrs)

    @property
    def elevation(self) -> xr.DataArray:
        return self.ds["elevation"]

    @property
    def times_c(self) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(self.ds["time_c"].values)

    @property
    def times(self) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(self.ds["time"].values)


def open_store(path, *, dask=True, variable=None) -> Store:
    """Open a store written by :func:`prepare`; a clear error if ``path`` is not one.

    ``variable`` selects one species (see :class:`Store`); None selects the only one of a
    single-species store and none of a multi-species store.
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
    norm_x, norm_y = json.loads(ds.attrs["norm_x"]), json.loads(ds.attrs["norm_y"])
    if "species" in ds.dims:
        names = tuple(json.loads(ds.attrs["variables"]))
        species_attrs = json.loads(ds.attrs["species_attrs"])
    else:  # version 1: one variable, no species dim
        names = (ds.attrs["variable"],)
        species_attrs = {names[0]: {k: v for k, v in ds["fine"].attrs.items()
                                    if k in ("units", "long_name", "standard_name")}}
        ds = ds.assign(coarse=ds["coarse"].expand_dims(species=list(names)),
                       fine=ds["fine"].expand_dims(species=list(names)))
        norm_x, norm_y = {names[0]: norm_x}, {names[0]: norm_y}
    store = Store(path, ds, Region(name, *box), ds.attrs["align"], names,
                  {v: MinMax.from_dict(norm_x[v]) for v in names},
                  {v: MinMax.from_dict(norm_y[v]) for v in names}, species_attrs)
    if variable is not None:
        return store.select(variable)
    return store.select(names[0]) if len(names) == 1 else store
