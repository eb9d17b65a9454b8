"""Data layer: `prepare` throughput (days/s) and the memory of a training epoch.

Providers for prepare (one run, same twin): fastds from native files, fastds from merged
cubes, and the peer recipe `xarray.open_mfdataset(...).resample(time="1D").mean()` (the
obvious xarray way to reduce native files to daily means).
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr

from fastds.data.store import prepare
from fastds.data.synthetic import TwinSpec, write_twin

SPEC = TwinSpec(coarse_start="2005-05-01", coarse_end="2005-06-30",
                fine_start="2005-05-16", fine_end="2005-06-30")
NATIVE_DAYS = 8


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_twin")
    write_twin(out, SPEC, native_days=NATIVE_DAYS)
    return out


@pytest.mark.parametrize("provider", ["ref", "fastds_native", "fastds_cube", "xarray_mfdataset"])
def test_prepare(benchmark, record, twin_dir, tmp_path, provider):
    box = ",".join(map(str, SPEC.region.as_tuple()))
    benchmark.group = f"prepare {NATIVE_DAYS} days (coarse 24 + fine 48 files a day)"
    counter = iter(range(10 ** 6))
    days = NATIVE_DAYS

    if provider in ("ref", "fastds_native"):
        # "ref" is the same call through dask's single-threaded scheduler.
        def fn():
            import dask
            sched = "synchronous" if provider == "ref" else "threads"
            with dask.config.set(scheduler=sched):
                prepare(coarse=twin_dir / "coarse", fine=twin_dir / "fine", region=box,
                        out=tmp_path / f"s{next(counter)}.zarr")
    elif provider == "fastds_cube":
        days = len(xr.open_dataset(twin_dir / "fine_daily.nc").time)

        def fn():
            prepare(coarse=twin_dir / "coarse_daily.nc", fine=twin_dir / "fine_daily.nc",
                    region=box, out=tmp_path / f"s{next(counter)}.zarr")
    else:
        def fn():
            out = tmp_path / f"p{next(counter)}"
            for kind in ("coarse", "fine"):
                ds = xr.open_mfdataset(sorted((twin_dir / kind).glob("*.nc4")), combine="nested",
                                       concat_dim="time", decode_times=False)
                ds = ds.assign_coords(time=np.repeat(np.arange(days), ds.sizes["time"] // days))
                ds.groupby("time").mean().to_zarr(f"{out}-{kind}.zarr")
    benchmark.pedantic(fn, rounds=3, iterations=1)
    record(benchmark, benchmark.group, provider, items=days, unit="days")


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, numpy as np, pandas as pd, xarray as xr, torch
    from fastds.data.regions import AREAS
    from fastds.data.store import prepare, open_store
    from fastds.data.datasets import LagSequences
    out = sys.argv[1]
    # Area 1 on the MERRA-2 grid: 2000-01-01 .. 2024-12-31 (9,132 days), log-normal values.
    lat = np.arange(10.5, 38.0, 0.5); lon = -180 + 0.625 * np.arange(344, 381)
    t = pd.date_range("2000-01-01", "2024-12-31")
    rng = np.random.default_rng(0)
    v = (10 ** rng.normal(-1, 0.3, (len(t), lat.size, lon.size))).astype("float32")
    xr.Dataset({"DUEXTTAU": (("time", "lat", "lon"), v)}, coords={"time": t, "lat": lat, "lon": lon}).to_netcdf(out + "/c.nc")
    flat = np.arange(10.6875, 37.6, 0.0625); flon = np.arange(34.3125, 56.6, 0.0625)
    ft = pd.date_range("2005-05-16", periods=60)
    fv = (10 ** rng.normal(-1, 0.3, (len(ft), flat.size, flon.size))).astype("float32")
    xr.Dataset({"DUEXTTAU": (("time", "lat", "lon"), fv)}, coords={"time": ft, "lat": flat, "lon": flon}).to_netcdf(out + "/f.nc")
    del v, fv
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepare(coarse=out + "/c.nc", fine=out + "/f.nc", region="area1", out=out + "/s.zarr")
    after_prepare = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    st = open_store(out + "/s.zarr")
    ds = LagSequences(st, season=3, split="train", t_lag=40)
    n = 0
    for lags, target in torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True):
        n += lags.shape[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print({"days": len(t), "grid": [lat.size, lon.size], "samples": n,
           "rss_before_mb": base / 1024, "rss_after_prepare_mb": after_prepare / 1024,
           "peak_rss_epoch_mb": peak / 1024})
""")


@pytest.mark.slow
def test_epoch_peak_rss(tmp_path):
    """Peak RSS of prepare + one Stage-A epoch over Area 1's full coarse record (printed)."""
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    print(res.stdout)
    stats = eval(res.stdout.strip().splitlines()[-1])  # a dict literal printed by the script
    (tmp_path / "rss.json").write_text(json.dumps(stats))
    assert stats["samples"] > 1000
