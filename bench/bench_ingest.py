"""Real-scale ingest: `prepare` of global native files vs a plain read of the same hyperslabs.

The files have the real products' global grids and cadence: G5NR 2881 x 5760 cells, one
half-hourly instant a file, 48 a day (66 MB a step, 3.2 GB a day raw); MERRA-2 361 x 576
cells, 24 hourly means a file. They are chunked and deflated as NASA's are (MERRA-2:
(1, 91, 144); G5NR: (1, 721, 1440) here, an assumption: a hyperslab read decompresses only
the chunks it meets). Values are smooth fields, so files compress as real ones roughly do.

Sizes: ``toy`` (regional files, seconds; runs in bench-check) and ``global_week`` (slow: a week
of G5NR and a month of MERRA-2 at global size; written once into ``FASTDS_INGEST_DIR``, default
``~/.cache/fastds-bench/ingest``, and reused).

Providers, same days, same region (Area 1), same process count (``WORKERS`` = 2):
``plain`` (the peer and the rate target: each day's files opened with netCDF4 and the region's
hyperslab read, nothing else, in 2 processes), ``prepare`` (fastds, ``workers=2``: reads,
daily means, the Zarr store, the normalisation), ``prepare_threads`` (``workers=0``: dask
threads on the one HDF5 lock), ``xarray_mfdataset`` (what a user writes first:
``open_mfdataset`` on each record, the region selected, daily means, Zarr; with
``parallel=True`` it crashed the interpreter in HDF5 on these files, so it opens serially).
Each provider also runs once in a fresh process to report its peak RSS, the process's own and
its worker processes' largest.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

WORKERS = 2
REGION = "area1"
SIZES = {
    "toy": dict(fine_days=2, coarse_days=3, box=(0.0, 50.0, 20.0, 70.0)),
    "global_week": dict(fine_days=7, coarse_days=30, box=None),
}
FINE_CHUNK = (1, 721, 1440)
COARSE_CHUNK = (1, 91, 144)


def _axis(lo, hi, step, origin, n_global):
    full = origin + step * np.arange(n_global)
    return full if lo is None else full[(full >= lo) & (full <= hi)]


def _write_day(args):
    """One day's native files (a worker task: writing a global day is seconds of deflate)."""
    import netCDF4
    kind, path_or_dir, day, box = args
    lat0, lat1, lon0, lon1 = box if box else (None, None, None, None)
    if kind == "coarse":
        lat, lon = _axis(lat0, lat1, 0.5, -90.0, 361), _axis(lon0, lon1, 0.625, -180.0, 576)
        names = [(Path(path_or_dir) / f"MERRA2_400.tavg1_2d_aer_Nx.{day:%Y%m%d}.nc4", 24, 0)]
        chunk = COARSE_CHUNK
    else:
        lat, lon = _axis(lat0, lat1, 0.0625, -90.0, 2881), _axis(lon0, lon1, 0.0625, -180.0, 5760)
        names = [(Path(path_or_dir) / f"c1440_NR.inst30mn_2d_aer1_Nx.{day:%Y%m%d}_{h // 2:02d}{30 * (h % 2):02d}z.nc4", 1, h)
                 for h in range(48)]
        chunk = FINE_CHUNK
    plat = np.cos(np.radians(lat))[:, None].astype(np.float32)
    plon = (1.0 + 0.5 * np.sin(np.radians(3 * lon)))[None, :].astype(np.float32)
    for path, steps, h0 in names:
        tmp = path.with_suffix(".tmp")
        with netCDF4.Dataset(tmp, "w") as nc:
            nc.createDimension("time", steps)
            nc.createDimension("lat", lat.size)
            nc.createDimension("lon", lon.size)
            nc.createVariable("lat", "f8", ("lat",))[:] = lat
            nc.createVariable("lon", "f8", ("lon",))[:] = lon
            t = nc.createVariable("time", "i4", ("time",))
            t.units = f"minutes since {day:%Y-%m-%d} 00:00:00"
            t[:] = 30 * h0 + 60 * np.arange(steps) if steps > 1 else [30 * h0]
            v = nc.createVariable("DUEXTTAU", "f4", ("time", "lat", "lon"), zlib=True, complevel=1,
                                  shuffle=True, fill_value=np.float32(1e15),
                                  chunksizes=tuple(min(c, n) for c, n in zip(chunk, (steps, lat.size, lon.size))))
            v.units = "1"
            v.long_name = "Dust Extinction AOT [550 nm]"
            for s in range(steps):
                phase = 0.1 * (day.dayofyear + (h0 + s) / 48)
                v[s] = (0.05 + 0.2 * plat * plon * (1.0 + 0.3 * np.float32(np.sin(phase)))).astype(np.float32)
        os.replace(tmp, path)
    return len(names)


def native_files(size) -> Path:
    """The size's native files, written once (a ``complete`` marker makes them reusable)."""
    cfg = SIZES[size]
    root = Path(os.environ.get("FASTDS_INGEST_DIR", Path.home() / ".cache" / "fastds-bench" / "ingest")) / size
    if (root / "complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "coarse").mkdir(parents=True)
    (root / "fine").mkdir()
    fine_days = pd.date_range("2006-07-01", periods=cfg["fine_days"])
    coarse_days = pd.date_range("2006-07-01", periods=cfg["coarse_days"])
    jobs = [("coarse", root / "coarse", d, cfg["box"]) for d in coarse_days]
    jobs += [("fine", root / "fine", d, cfg["box"]) for d in fine_days]
    with ProcessPoolExecutor(WORKERS) as pool:
        list(pool.map(_write_day, jobs))
    (root / "complete").write_text(json.dumps({"fine_days": len(fine_days), "coarse_days": len(coarse_days)}))
    return root


# ---------------------------------------------------------------------------- providers
def _plain_day(files_and_slices):
    """Read the hyperslab of each file of a day; nothing else (the rate target)."""
    import netCDF4
    files, lat_sl, lon_sl = files_and_slices
    n = 0
    for f in files:
        with netCDF4.Dataset(f) as nc:
            var = nc.variables["DUEXTTAU"]
            var.set_auto_maskandscale(False)
            n += np.asarray(var[:, lat_sl, lon_sl]).size
    return n


def _slices(files, region):
    """The region's (lat, lon) index slices in these files, found independently of fastds'
    reader: cell centres inside the box, coarse cells padded by half a cell as prepare does."""
    import netCDF4
    from fastds.data.regions import parse_region
    r = parse_region(region)
    with netCDF4.Dataset(files[0]) as nc:
        lat, lon = nc["lat"][:], nc["lon"][:]
    pad_lat, pad_lon = (0.25, 0.3125) if "MERRA2" in files[0].name else (0.0, 0.0)
    i = np.flatnonzero((lat > r.lat_min - pad_lat - 1e-9) & (lat < r.lat_max + pad_lat + 1e-9))
    j = np.flatnonzero((lon > r.lon_min - pad_lon - 1e-9) & (lon < r.lon_max + pad_lon + 1e-9))
    return slice(int(i[0]), int(i[-1]) + 1), slice(int(j[0]), int(j[-1]) + 1)


def plain(root, out):
    jobs = []
    for kind in ("coarse", "fine"):
        files = sorted((root / kind).glob("*.nc4"))
        lat_sl, lon_sl = _slices(files, REGION)
        by_day = {}
        for f in files:
            by_day.setdefault(f.name.split(".")[2][:8], []).append(f)
        jobs += [(fs, lat_sl, lon_sl) for fs in by_day.values()]
    with ProcessPoolExecutor(WORKERS) as pool:
        return sum(pool.map(_plain_day, jobs))


def run_prepare(root, out, workers):
    from fastds.data.store import prepare
    prepare(coarse=root / "coarse", fine=root / "fine", region=REGION, out=out, workers=workers,
            block=1, val=0.3, test=0.0)


def xarray_mfdataset(root, out):
    import xarray as xr
    from fastds.data.regions import parse_region
    r = parse_region(REGION)
    for kind in ("coarse", "fine"):
        ds = xr.open_mfdataset(sorted((root / kind).glob("*.nc4")), combine="nested",
                               concat_dim="time")  # parallel=True crashed here (segfault in HDF5)
        ds = ds.sel(lat=slice(r.lat_min, r.lat_max), lon=slice(r.lon_min, r.lon_max))
        ds.resample(time="1D").mean().to_zarr(f"{out}-{kind}.zarr", mode="w")


PROVIDERS = {
    "plain": plain,
    "prepare": lambda root, out: run_prepare(root, out, WORKERS),
    "prepare_threads": lambda root, out: run_prepare(root, out, 0),
    "xarray_mfdataset": xarray_mfdataset,
}

RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    import bench_ingest as b
    t = time.perf_counter()
    b.PROVIDERS[sys.argv[2]](Path(sys.argv[3]), Path(sys.argv[4]))
    wall = time.perf_counter() - t
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print({"wall_s": wall, "peak_rss_mb": own, "worker_peak_rss_mb": kids})
""")


def peak_rss(provider, root, out):
    """Run ``provider`` once in a fresh process: its wall time and peak RSS (MB), its own and
    the largest of its worker processes'."""
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(Path(__file__).parent), provider,
                          str(root), str(out)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    return eval(res.stdout.strip().splitlines()[-1])  # a dict literal printed by the script


@pytest.mark.parametrize("size", [s if s == "toy" else pytest.param(s, marks=pytest.mark.slow) for s in SIZES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_ingest(benchmark, record, tmp_path, size, provider):
    root = native_files(size)
    days = json.loads((root / "complete").read_text())["fine_days"]
    benchmark.group = f"ingest {size}: {days} G5NR days (48 files each) + MERRA-2 month, Area 1, {WORKERS} processes"
    counter = iter(range(10 ** 6))
    fn = PROVIDERS[provider]
    benchmark.pedantic(lambda: fn(root, tmp_path / f"o{next(counter)}.zarr"), rounds=2, iterations=1)
    if provider.startswith("prepare"):  # the store is right: every fine day, finite values
        from fastds.data.store import open_store
        st = open_store(tmp_path / "o0.zarr")
        assert st.fine.sizes["time"] == days and np.isfinite(st.fine.values).all()
    if benchmark.stats is None:
        return
    rss = peak_rss(provider, root, tmp_path / "rss.zarr")
    print(f"\n{provider}: {rss}")
    record(benchmark, benchmark.group, provider, items=days, unit="fine days", peer=provider == "plain",
           extra={"peak RSS MB": round(rss["peak_rss_mb"]), "worker peak RSS MB": round(rss["worker_peak_rss_mb"])})


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-c", str(Path(__file__).parent / "pytest.ini")]))
