"""Readers: native MERRA-2 and G5NR files, or pre-merged daily cubes -> daily DataArray.

Every reader returns ``xarray.DataArray`` with dims ``(time, lat, lon)``, daily time stamps at
00:00, ascending ``lat``, ``lon`` in -180..180 ascending, physical units, fill values as NaN,
lazily backed by dask (one task per day), so a 25-year record costs nothing until computed.
"""
from __future__ import annotations

import glob as _glob
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from xarray.backends.locks import HDF5_LOCK, NETCDFC_LOCK, combine_locks

from .regions import Region, parse_region, wrap_lon

__all__ = ["DataError", "DataWarning", "open_coarse", "open_fine", "open_elevation",
           "GRIDS", "FILL_VALUE"]

FILL_VALUE = 1e15
# netCDF-C and HDF5 are not thread-safe, and dask reads days on threads. xarray guards its own
# lazy reads of a cube with this same pair of locks (netCDF-C, then HDF5, in that order), so a
# native read here and a cube read in xarray never run HDF5 at once. A lock of our own would
# only serialise our reads among themselves: that was prepare's intermittent "HDF error".
# The lock is not reentrant: nothing called while holding it may take it again.
_NC_LOCK = combine_locks([NETCDFC_LOCK, HDF5_LOCK])
# A day whose worst pixel has fewer valid steps than this share of the expected is reported.
MIN_VALID_FRACTION = 0.5
# Values at or above this are fill even where a file forgot to declare _FillValue.
_FILL_THRESHOLD = 1e14


class DataError(ValueError):
    """Input data is not what fastds can use; the message names the file and the problem."""


class DataWarning(UserWarning):
    """Input data is usable but suspicious (e.g. a day with few valid hours)."""


@dataclass(frozen=True)
class Grid:
    name: str
    dlat: float
    dlon: float
    lat0: float = -90.0
    lon0: float = -180.0
    steps_per_day: int = 1
    pattern: str = ""


GRIDS = {
    "coarse": Grid("MERRA-2 0.5x0.625", 0.5, 0.625, steps_per_day=24,
                   pattern=r"MERRA2_(?P<stream>\d{3})\.tavg1_2d_aer_Nx\.(?P<date>\d{8})(?:\.SUB)?\.nc4?$"),
    "fine": Grid("G5NR 0.0625", 0.0625, 0.0625, steps_per_day=48,
                 pattern=r"c1440_NR\.inst30mn_2d_aer1_Nx\.(?P<date>\d{8})_(?P<hhmm>\d{4})z(?:\.SUB)?\.nc4?$"),
}


# ----------------------------------------------------------------------------- paths
def _resolve(paths, what) -> list[Path]:
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        if p.is_dir() and p.suffix != ".zarr":
            files = sorted(f for f in p.rglob("*") if f.is_file() and ".nc" in f.name)
            if not files:
                raise DataError(f"{what}: directory {p} holds no NetCDF files (*.nc, *.nc4)")
            return files
        if any(ch in str(paths) for ch in "*?["):
            files = sorted(Path(f) for f in _glob.glob(str(paths), recursive=True))
            if not files:
                raise DataError(f"{what}: the pattern {paths} matches no file")
            return files
        if not p.exists():
            raise DataError(f"{what}: {p} does not exist")
        return [p]
    files = [Path(f) for f in paths]
    if not files:
        raise DataError(f"{what}: empty list of files")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(f"{what}: {len(missing)} file(s) do not exist, e.g. {missing[0]}")
    return sorted(files)


def _open_nc(path: Path, what):
    import netCDF4
    try:
        return netCDF4.Dataset(str(path))
    except (OSError, RuntimeError, ValueError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise DataError(f"{what}: cannot read {path} as NetCDF ({err}); the file is "
                        f"{size} bytes: truncated download or not a NetCDF file?") from None


# ----------------------------------------------------------------------------- grids
def _coord_name(ds_vars, names, path, what):
    for n in names:
        if n in ds_vars:
            return n
    raise DataError(f"{what}: {path} has no {names[0]} coordinate (looked for {', '.join(names)})")


def _check_lattice(values, step, origin, axis, grid, path, what):
    if values.size == 0:
        raise DataError(f"{what}: {path} has an empty {axis} axis")
    k = (values - origin) / step
    if not np.allclose(k, np.round(k), atol=1e-3):
        raise DataError(
            f"{what}: {path}: {axis} values {values[:3].round(4).tolist()}... are not on the "
            f"{grid.name} grid (multiples of {step} deg from {origin}); is this the right product?")
    if values.size > 1:
        d = np.abs(np.diff(np.sort(values)))
        if axis == "lon":  # circular: one gap (the rest of the globe) is where a region ends
            v = np.sort(values)
            d = np.append(d, v[0] + 360.0 - v[-1])
            d = np.delete(d, np.argmax(d))
        if not np.allclose(d, step, atol=1e-4):
            raise DataError(f"{what}: {path}: {axis} spacing {np.unique(d.round(5))[:4].tolist()} "
                            f"is not the {grid.name} spacing {step}")


@dataclass
class _Layout:
    """How to turn a raw (…, lat, lon) array of one file into the normalised region: the
    region's hyperslab is read as ``lat_slice`` by a few contiguous ``lon_runs`` (one, or two
    where the region wraps around the file's longitude seam), and ``lon_perm`` puts the
    columns read in ascending longitude."""
    lat_slice: slice
    lat_flip: bool
    lon_runs: list
    lon_perm: np.ndarray | None
    lat: np.ndarray
    lon: np.ndarray
    raw_shape: tuple

    @property
    def lon_index(self) -> np.ndarray:
        """The raw longitude index of every output column."""
        raw = np.concatenate([np.arange(a, b) for a, b in self.lon_runs])
        return raw if self.lon_perm is None else raw[self.lon_perm]


def _lon_runs(index: np.ndarray):
    """Contiguous runs of raw longitude indices covering ``index``, and the permutation from
    the columns read run after run to the order of ``index`` (None when it is the same)."""
    raw = np.sort(index)
    cuts = np.flatnonzero(np.diff(raw) != 1) + 1
    runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(raw, cuts)]
    perm = np.searchsorted(raw, index)
    return runs, None if np.array_equal(perm, np.arange(perm.size)) else perm


def _layout(lat_raw, lon_raw, grid: Grid, region: Region | None, kind, path, what) -> _Layout:
    lon_wrapped = wrap_lon(lon_raw)
    lat_raw = np.asarray(lat_raw, float)
    _check_lattice(lat_raw, grid.dlat, grid.lat0, "lat", grid, path, what)
    _check_lattice(lon_wrapped, grid.dlon, grid.lon0, "lon", grid, path, what)
    flip = lat_raw.size > 1 and lat_raw[0] > lat_raw[-1]
    lat_asc = lat_raw[::-1] if flip else lat_raw
    if region is None:
        lat_keep = np.arange(lat_asc.size)
        lon_order = np.argsort(lon_wrapped, kind="stable")
        lon_out = lon_wrapped[lon_order]
    else:
        # Coarse cells are kept when they overlap the box (the fine region is then inside the
        # coarse one); fine pixels when their centre lies in it.
        pad_lat, pad_lon = (grid.dlat / 2, grid.dlon / 2) if kind == "coarse" else (0.0, 0.0)
        lat_keep = np.flatnonzero((lat_asc > region.lat_min - pad_lat - 1e-9)
                                  & (lat_asc < region.lat_max + pad_lat + 1e-9))
        sel = np.flatnonzero(region.lon_inside(lon_wrapped, pad_lon))
        if lat_keep.size == 0 or sel.size == 0:
            raise DataError(
                f"{what}: {path} covers lat {lat_asc.min():.3f}..{lat_asc.max():.3f}, lon "
                f"{lon_wrapped.min():.3f}..{lon_wrapped.max():.3f}, which does not overlap region "
                f"{region.name} {region.as_tuple()}")
        key = region.unwrap_lon(lon_wrapped[sel], pad_lon)
        order = np.argsort(key, kind="stable")
        lon_order, lon_out = sel[order], key[order]
    lo, hi = int(lat_keep[0]), int(lat_keep[-1]) + 1
    if flip:  # indices into the raw (descending) axis
        n = lat_raw.size
        lat_slice = slice(n - hi, n - lo)
    else:
        lat_slice = slice(lo, hi)
    runs, perm = _lon_runs(lon_order)
    return _Layout(lat_slice, flip, runs, perm, lat_asc[lo:hi].copy(), lon_out,
                   (lat_raw.size, lon_raw.size))


def _read_var(nc, variable, layout: _Layout, path, what):
    """The region of every time step of ``variable`` in one open file: (steps, lat, lon)
    float64 in physical units, NaN where fill. Only the region's hyperslab is read."""
    if variable not in nc.variables:
        raise DataError(f"{what}: {path} has no variable {variable!r} (it has: "
                        f"{', '.join(sorted(nc.variables))})")
    var = nc.variables[variable]
    var.set_auto_maskandscale(False)
    if tuple(var.shape[-2:]) != layout.raw_shape:
        raise DataError(f"{what}: {path}: {variable} has grid {tuple(var.shape[-2:])}, but the first "
                        f"file had {layout.raw_shape}; mixed grids in one record")
    try:
        parts = [np.asarray(var[..., layout.lat_slice, a:b], dtype=np.float64) for a, b in layout.lon_runs]
    except (OSError, RuntimeError, IndexError) as err:
        raise DataError(f"{what}: {path}: reading {variable} failed ({err}); truncated file?") from None
    raw = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    if layout.lon_perm is not None:
        raw = raw[..., layout.lon_perm]
    if layout.lat_flip:
        raw = raw[..., ::-1, :]
    bad = ~np.isfinite(raw) | (np.abs(raw) >= _FILL_THRESHOLD)
    for attr in ("_FillValue", "missing_value"):
        if attr in var.ncattrs():
            bad |= raw == float(np.asarray(var.getncattr(attr)).ravel()[0])
    scale = float(var.getncattr("scale_factor")) if "scale_factor" in var.ncattrs() else 1.0
    offset = float(var.getncattr("add_offset")) if "add_offset" in var.ncattrs() else 0.0
    raw = raw * scale + offset
    raw[bad] = np.nan
    return raw.reshape((-1,) + raw.shape[-2:])


def _daily_mean(files, variables, layout, expected, min_valid, day, what, sink=None):
    """Mean over the time steps of one day's files, per variable: (V, lat, lon) float32 for
    the V names in ``variables``; NaN where a pixel has no valid step.

    Each file is opened once for all the variables (several species in one file cost one
    open and one metadata read per file, not one per species). The sum and the count are
    accumulated file by file (the same additions, in the same order, as a sum over the
    stacked steps), so memory is two region-sized arrays per variable plus one file's steps,
    not the whole day: 48 global G5NR steps would be 6 GB stacked.
    ``sink``: a queue that takes the day's warning instead of ``warnings`` (a worker process's
    warnings never reach the caller's filters; `prepare` passes one when it reads in processes)."""
    total = np.zeros((len(variables),) + layout.lat.shape + layout.lon.shape)
    count = np.zeros(total.shape, np.int64)
    steps = np.zeros(len(variables), np.int64)
    for f in files:
        with _NC_LOCK:
            nc = _open_nc(f, what)
            try:
                data = [_read_var(nc, v, layout, f, what) for v in variables]
            finally:
                nc.close()
        for k, block in enumerate(data):
            for step in block:
                valid = np.isfinite(step)
                total[k] += np.where(valid, step, 0.0)
                count[k] += valid
            steps[k] += block.shape[0]
    for k, v in enumerate(variables):
        frac = count[k].min() / expected if expected else 1.0
        if steps[k] != expected or frac < min_valid:
            name = f" {v}" if len(variables) > 1 else ""
            note = (f"{what}: {day}:{name} only {int(count[k].min())} of {expected} expected valid time "
                    f"steps at some pixels ({steps[k]} steps in {len(files)} file(s): {files[0].name}...)")
            if sink is not None:
                sink.put(note)
            else:
                warnings.warn(DataWarning(note), stacklevel=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean.astype(np.float32)


def _gap_report(dates: pd.DatetimeIndex, what, source):
    full = pd.date_range(dates.min(), dates.max(), freq="D")
    missing = full.difference(dates)
    if len(missing):
        shown = ", ".join(d.strftime("%Y-%m-%d") for d in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{what}: {len(missing)} missing day(s) in {source}: {shown}{more}; "
                        "supply them or pass allow_gaps=True to keep the gaps as NaN days")


def _native(files, grid: Grid, kind, variables, region, min_valid, allow_gaps, what, sink):
    """One lazy (time, lat, lon) DataArray per name in ``variables``, all read by the same
    day tasks (a day's files are opened once for every variable)."""
    rx = re.compile(grid.pattern)
    by_day: dict[pd.Timestamp, list[Path]] = {}
    seen: dict[tuple, Path] = {}
    for f in files:
        m = rx.search(f.name)
        if not m:
            continue
        try:
            day = pd.Timestamp(m.group("date"))
        except ValueError:
            raise DataError(f"{what}: {f}: bad date {m.group('date')!r} in the file name") from None
        key = (day, m.groupdict().get("hhmm"))
        if key in seen:
            raise DataError(f"{what}: duplicated {'day' if kind == 'coarse' else 'time'} "
                            f"{day:%Y-%m-%d}{' ' + key[1] + 'z' if key[1] else ''}: {seen[key]} and {f}")
        seen[key] = f
        by_day.setdefault(day, []).append(f)
    if not by_day:
        raise DataError(f"{what}: none of the {len(files)} file(s) is named like a native "
                        f"{grid.name} file (e.g. {files[0].name}); expected /{grid.pattern}/ or a merged "
                        "daily cube with DUEXTTAU(time, lat, lon)")
    dates = pd.DatetimeIndex(sorted(by_day))
    if not allow_gaps:
        _gap_report(dates, what, f"{len(files)} native files")
    first = by_day[dates[0]][0]
    with _NC_LOCK:
        return _native_arrays(by_day, dates, first, grid, kind, variables, region, min_valid,
                              allow_gaps, files, what, sink)


def _native_arrays(by_day, dates, first, grid, kind, variables, region, min_valid, allow_gaps,
                   files, what, sink):
    import dask
    import dask.array as dsa
    nc = _open_nc(first, what)
    try:
        for variable in variables:
            if variable not in nc.variables:
                raise DataError(f"{what}: {first} has no variable {variable!r} (it has: "
                                f"{', '.join(sorted(nc.variables))})")
        lat_name = _coord_name(nc.variables, ("lat", "latitude"), first, what)
        lon_name = _coord_name(nc.variables, ("lon", "longitude"), first, what)
        layout = _layout(nc.variables[lat_name][:], nc.variables[lon_name][:], grid, region,
                         kind, first, what)
        attrs = [{a: nc.variables[v].getncattr(a) for a in ("units", "long_name")
                  if a in nc.variables[v].ncattrs()} for v in variables]
    finally:
        nc.close()
    shape = (len(variables), layout.lat.size, layout.lon.size)
    days = []
    for d in pd.date_range(dates.min(), dates.max(), freq="D") if allow_gaps else dates:
        if d in by_day:
            task = dask.delayed(_daily_mean, pure=True)(sorted(by_day[d]), tuple(variables), layout,
                                                        grid.steps_per_day, min_valid,
                                                        f"{d:%Y-%m-%d}", what, sink)
            days.append(dsa.from_delayed(task, shape, dtype=np.float32))
        else:
            days.append(dsa.full(shape, np.nan, dtype=np.float32))
    data = dsa.stack(days)  # (time, V, lat, lon): every variable's slice depends on one day task
    times = pd.date_range(dates.min(), dates.max(), freq="D") if allow_gaps else dates
    return [xr.DataArray(data[:, k], dims=("time", "lat", "lon"),
                         coords={"time": times, "lat": layout.lat, "lon": layout.lon},
                         name=v, attrs={**a, "grid": grid.name, "source_files": len(files)})
            for k, (v, a) in enumerate(zip(variables, attrs))]


def _cube(path: Path, grid: Grid, kind, variable, region, allow_gaps, what):
    try:
        if path.suffix == ".zarr" or (path.is_dir() and (path / ".zgroup").exists()
                                      or (path / "zarr.json").exists()):
            ds = xr.open_zarr(str(path))
        else:
            ds = xr.open_dataset(str(path), chunks={"time": 32})
    except Exception as err:
        size = path.stat().st_size if path.is_file() else "?"
        first = (str(err).splitlines() or [""])[0][:160]
        raise DataError(f"{what}: cannot open {path} as a NetCDF or Zarr cube ({type(err).__name__}: "
                        f"{first}); the file is {size} bytes: truncated or not NetCDF?") from None
    return _from_xarray(ds, str(path), grid, kind, variable, region, allow_gaps, what)


def _from_xarray(obj, source, grid: Grid, kind, variable, region, allow_gaps, what):
    """A cube already opened (a file's, or a user's Dataset/DataArray from OPeNDAP,
    earthaccess or their own pipeline): the region's daily (time, lat, lon) field."""
    if isinstance(obj, xr.DataArray):
        da = obj
    elif variable not in obj:
        raise DataError(f"{what}: {source} has no variable {variable!r} (it has: "
                        f"{', '.join(sorted(map(str, obj.data_vars)))})")
    else:
        da = obj[variable]
    da = da.rename({k: v for k, v in (("latitude", "lat"), ("longitude", "lon")) if k in da.dims})
    if set(da.dims) != {"time", "lat", "lon"}:
        raise DataError(f"{what}: {source}: {variable} has dims {da.dims}; expected (time, lat, lon)")
    if "lat" not in da.coords or "lon" not in da.coords or "time" not in da.coords:
        raise DataError(f"{what}: {source}: {variable} needs time, lat and lon coordinates")
    da = da.transpose("time", "lat", "lon")
    times = pd.DatetimeIndex(da["time"].values)
    dup = times[times.duplicated()]
    if len(dup) and (times.normalize() == times).all():
        raise DataError(f"{what}: {source}: duplicated day(s) {', '.join(f'{d:%Y-%m-%d}' for d in dup[:10])}")
    if not (times.normalize() == times).all() or times.normalize().duplicated().any():
        da = da.resample(time="1D").mean()  # a sub-daily cube: reduce it to daily means
    layout = _layout(da["lat"].values, da["lon"].values, grid, region, kind, source, what)
    da = _region_of(da, layout)
    da = da.assign_coords(lat=layout.lat, lon=layout.lon, time=pd.DatetimeIndex(da["time"].values).normalize())
    da = da.where(np.isfinite(da) & (np.abs(da) < _FILL_THRESHOLD)).astype(np.float32)
    if not allow_gaps:
        _gap_report(pd.DatetimeIndex(da["time"].values), what, source)
    da.name = variable
    da.attrs.update(grid=grid.name, source_files=1)
    return da


def _region_of(da: xr.DataArray, layout: _Layout) -> xr.DataArray:
    """The region's hyperslab of a lazy (…, lat, lon) array, as `_read_var` reads it."""
    parts = [da.isel(lat=layout.lat_slice, lon=slice(a, b)) for a, b in layout.lon_runs]
    da = parts[0] if len(parts) == 1 else xr.concat(parts, "lon")
    if layout.lon_perm is not None:
        da = da.isel(lon=layout.lon_perm)
    return da.isel(lat=slice(None, None, -1)) if layout.lat_flip else da


def _open(paths, kind, variable, region, min_valid_fraction, allow_gaps, sink=None):
    return _open_many(paths, kind, (variable,), region, min_valid_fraction, allow_gaps, sink)[0]


def _open_many(paths, kind, variables, region, min_valid_fraction, allow_gaps, sink=None) -> list:
    """One daily (time, lat, lon) DataArray per name in ``variables`` (lazy). Native files
    are read once for all of them; a cube or an xarray object is opened per variable."""
    grid = GRIDS[kind]
    region = parse_region(region) if region is not None else None
    what = f"open_{kind}({','.join(variables)})"
    if isinstance(paths, (xr.Dataset, xr.DataArray)):
        das = [_from_xarray(paths, f"the {type(paths).__name__} passed", grid, kind, v,
                            region, allow_gaps, f"open_{kind}({v})") for v in variables]
    else:
        das = _from_paths(paths, grid, kind, variables, region, min_valid_fraction, allow_gaps,
                          what, sink)
    for da in das:
        da.attrs.setdefault("units", "1")
    return das


def _from_paths(paths, grid: Grid, kind, variables, region, min_valid_fraction, allow_gaps, what, sink):
    """Files (native, or one merged cube): their region's daily (time, lat, lon) field per
    name in ``variables``."""
    files = _resolve(paths, what)
    native = [f for f in files if re.search(grid.pattern, f.name)]
    other_native = [f for f in files if re.search(GRIDS["fine" if kind == "coarse" else "coarse"].pattern, f.name)]
    if other_native and not native:
        raise DataError(f"{what}: {other_native[0]} is a {'G5NR' if kind == 'coarse' else 'MERRA-2'} "
                        f"file; open_{kind} expects {grid.name} data")
    if len(files) == 1 and not native:
        return [_cube(files[0], grid, kind, v, region, allow_gaps, f"open_{kind}({v})") for v in variables]
    return _native(files, grid, kind, variables, region, min_valid_fraction, allow_gaps, what, sink)


def open_coarse(paths, variable="DUEXTTAU", *, region=None, min_valid_fraction=MIN_VALID_FRACTION,
                allow_gaps=False) -> xr.DataArray:
    """Daily MERRA-2 field ``(time, lat, lon)`` from native files or a merged daily cube.

    Parameters
    ----------
    paths : directory, glob, list of files, one merged cube (NetCDF or Zarr), or an
        ``xarray.Dataset`` / ``DataArray`` with (time, lat, lon). Native files
        are ``MERRA2_{stream}.tavg1_2d_aer_Nx.YYYYMMDD.nc4`` (also GES DISC ``.SUB.nc``
        subsets), 24 hourly means each; their mean is the day's value.
    variable : e.g. ``"DUEXTTAU"`` or ``"SUEXTTAU"``.
    region : None (all), ``"area0"``, ``"area1"``, ``"LAT_MIN,LAT_MAX,LON_MIN,LON_MAX"`` or a
        :class:`Region`; coarse cells overlapping the box are kept.
    min_valid_fraction : a day whose worst pixel has fewer valid hours than this fraction of
        24 is reported with a :class:`DataWarning` (its value is the mean of the valid hours).
    allow_gaps : False raises on missing days (listing them); True fills them with NaN.

    Returns
    -------
    xarray.DataArray float32 ``(time, lat, lon)``, lazy (dask), NaN where no valid data.
    """
    return _open(paths, "coarse", variable, region, min_valid_fraction, allow_gaps)


def open_fine(paths, variable="DUEXTTAU", *, region=None, min_valid_fraction=MIN_VALID_FRACTION,
              allow_gaps=False) -> xr.DataArray:
    """Daily G5NR field ``(time, lat, lon)`` on the 0.0625° grid; same contract as
    :func:`open_coarse`. Native files are ``c1440_NR.inst30mn_2d_aer1_Nx.YYYYMMDD_HHMMz.nc4``,
    one instant each, 48 a day; fine pixels whose centre lies in ``region`` are kept."""
    return _open(paths, "fine", variable, region, min_valid_fraction, allow_gaps)


def open_elevation(path, *, variable=None) -> xr.DataArray:
    """Elevation ``(lat, lon)`` in metres from a NetCDF file (any regular lat/lon grid).

    ``variable`` defaults to the first of ``elevation``, ``z``, ``PHIS`` (geopotential, divided
    by g), ``height`` found in the file.
    """
    path = Path(path)
    what = "open_elevation"
    try:
        ds = xr.open_dataset(str(path))
    except Exception as err:
        raise DataError(f"{what}: cannot open {path} as NetCDF ({err})") from None
    names = [variable] if variable else ["elevation", "z", "PHIS", "height"]
    for n in names:
        if n in ds:
            da = ds[n].squeeze(drop=True)
            break
    else:
        raise DataError(f"{what}: {path} has none of {names} (it has: {', '.join(map(str, ds.data_vars))})")
    da = da.rename({k: v for k, v in (("latitude", "lat"), ("longitude", "lon")) if k in da.dims})
    if set(da.dims) != {"lat", "lon"}:
        raise DataError(f"{what}: {path}: {da.name} has dims {da.dims}; expected (lat, lon)")
    if da.name == "PHIS":
        da = da / 9.80665
    da = da.assign_coords(lon=((da["lon"] + 180.0) % 360.0) - 180.0).sortby("lat").sortby("lon")
    return da.transpose("lat", "lon").astype(np.float32).load()
