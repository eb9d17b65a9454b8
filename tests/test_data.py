import shutil

import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from fastds.data.datasets import FinePatches, LagSequences
from fastds.data.readers import DataError, DataWarning, open_coarse, open_elevation, open_fine
from fastds.data.regions import AREAS, parse_region, season_of
from fastds.data.store import open_store, prepare
from fastds.data.synthetic import TwinSpec, make_twin, write_twin
from fastds.data.transforms import align_index, fit_minmax, split_days

SPEC = TwinSpec(coarse_start="2005-01-01", coarse_end="2005-12-31",
                fine_start="2005-05-16", fine_end="2005-09-30", seed=3)
BOX = ",".join(map(str, SPEC.region.as_tuple()))


@pytest.fixture(scope="module")
def twin():
    return make_twin(SPEC)


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory, twin):
    out = tmp_path_factory.mktemp("twin")
    write_twin(out, SPEC, twin=twin, native_days=3)
    return out


def test_native_round_trip(twin, twin_dir):
    c = open_coarse(twin_dir / "coarse")
    f = open_fine(str(twin_dir / "fine" / "*.nc4"))
    assert c.dims == ("time", "lat", "lon") and len(c.time) == 3 and len(f.time) == 3
    np.testing.assert_allclose(c.values, twin["coarse"].sel(time=c.time).values, rtol=2e-6)
    np.testing.assert_allclose(f.values, twin["fine_truth"].sel(time=f.time).values, rtol=2e-6)
    np.testing.assert_allclose(c.lat, twin.lat_c)
    np.testing.assert_allclose(f.lon, twin.lon)


def test_cube_equals_native(twin_dir):
    days = slice("2005-05-16", "2005-05-18")
    np.testing.assert_allclose(open_coarse(twin_dir / "coarse").values,
                               open_coarse(twin_dir / "coarse_daily.nc").sel(time=days).values,
                               rtol=2e-6)
    np.testing.assert_allclose(open_fine(twin_dir / "fine").values,
                               open_fine(twin_dir / "fine_daily.nc").sel(time=days).values, rtol=2e-6)


def test_zarr_cube(twin_dir, tmp_path):
    ds = xr.open_dataset(twin_dir / "coarse_daily.nc").load()
    ds.to_zarr(tmp_path / "c.zarr")
    np.testing.assert_allclose(open_coarse(tmp_path / "c.zarr").values,
                               open_coarse(twin_dir / "coarse_daily.nc").values)


def test_descending_lat_0_360_lon_and_subset(twin, tmp_path):
    write_twin(tmp_path, SPEC, twin=twin, native_days=2, cubes=False, lat_descending=True, lon_360=True)
    c = open_coarse(tmp_path / "coarse")
    assert np.all(np.diff(c.lat) > 0) and np.all(np.diff(c.lon) > 0) and c.lon.min() < 180
    np.testing.assert_allclose(c.values, twin["coarse"].sel(time=c.time).values, rtol=2e-6)
    sub = open_fine(tmp_path / "fine", region="25,26,45,46")
    assert float(sub.lat.min()) >= 25 and float(sub.lat.max()) <= 26
    np.testing.assert_allclose(sub.values, twin["fine_truth"].sel(time=sub.time, lat=sub.lat, lon=sub.lon).values,
                               rtol=2e-6)


def test_fill_values_become_nan_and_are_reported(twin, tmp_path):
    write_twin(tmp_path, SPEC, twin=twin, native_days=2, cubes=False, fill_fraction=0.7)
    with pytest.warns(DataWarning, match="2005-05-1[67]: only"):
        c = open_coarse(tmp_path / "coarse").values
    assert np.nanmax(c) < 10 and np.isfinite(c).mean() > 0.9
    path = next((tmp_path / "coarse").glob("*.nc4"))
    with netCDF4.Dataset(path, "r+") as nc:
        nc["DUEXTTAU"][:] = 1e15
    with pytest.warns(DataWarning):
        c = open_coarse(tmp_path / "coarse").values
    assert np.isnan(c).any() and not (c > 1e10).any()


def test_bad_inputs(twin, twin_dir, tmp_path):
    with pytest.raises(DataError, match="no variable 'SUEXTTAU'.*has: .*DUEXTTAU"):
        open_coarse(twin_dir / "coarse", "SUEXTTAU").values
    with pytest.raises(DataError, match="not on the MERRA-2"):
        open_coarse(twin_dir / "fine_daily.nc")
    with pytest.raises(DataError, match="is a G5NR file"):
        open_coarse(twin_dir / "fine")
    # gaps
    gap = tmp_path / "gap"
    shutil.copytree(twin_dir / "coarse", gap)
    sorted(gap.glob("*.nc4"))[1].unlink()
    with pytest.raises(DataError, match="1 missing day.*2005-05-17"):
        open_coarse(gap)
    assert open_coarse(gap, allow_gaps=True).isel(time=1).isnull().all()
    # duplicated day (stream 300 and a reprocessed 401 file)
    dup = tmp_path / "dup"
    shutil.copytree(twin_dir / "coarse", dup)
    f = sorted(dup.glob("*.nc4"))[0]
    shutil.copy(f, dup / f.name.replace("MERRA2_300", "MERRA2_401"))
    with pytest.raises(DataError, match="duplicated day 2005-05-16: .*MERRA2_"):
        open_coarse(dup)
    # truncated file
    bad = tmp_path / "trunc"
    shutil.copytree(twin_dir / "coarse", bad)
    f = sorted(bad.glob("*.nc4"))[0]
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(DataError, match="cannot read .*MERRA2_300.*truncated"):
        open_coarse(bad).values
    # not NetCDF at all
    txt = tmp_path / "notes.nc"
    txt.write_text("hello")
    with pytest.raises(DataError, match="notes.nc.*truncated or not NetCDF"):
        open_coarse(txt)
    with pytest.raises(DataError, match="does not exist"):
        open_fine(tmp_path / "nowhere")
    with pytest.raises(DataError, match="matches no file"):
        open_fine(str(tmp_path / "*.nothing"))
    with pytest.raises(DataError, match="does not overlap region"):
        open_coarse(twin_dir / "coarse", region="area0")
    with pytest.raises(ValueError, match="neither a known area"):
        parse_region("mars")


def test_prepare_idempotent_and_errors(twin_dir, tmp_path):
    kw = dict(coarse=twin_dir / "coarse_daily.nc", fine=twin_dir / "fine_daily.nc",
              elevation=twin_dir / "elevation.nc", region=BOX)
    out = prepare(out=tmp_path / "s.zarr", **kw)
    stamp = (out / "zarr.json").stat().st_mtime_ns
    assert prepare(out=tmp_path / "s.zarr", **kw) == out
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    st = open_store(out)
    assert st.fine.shape[1:] == st.elevation.shape
    assert not list(tmp_path.glob(".s.zarr.tmp-*"))
    with pytest.raises(DataError, match="does not overlap"):
        prepare(out=tmp_path / "x.zarr", coarse=twin_dir / "coarse_daily.nc",
                fine=twin_dir / "fine_daily.nc", region="area0")
    with pytest.raises(DataError, match="not a fastds store|does not exist"):
        open_store(tmp_path / "x.zarr")


def test_prepare_interrupted_leaves_no_store(twin_dir, tmp_path, monkeypatch):
    import fastds.data.store as store_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "fit_minmax", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(out=tmp_path / "s.zarr", coarse=twin_dir / "coarse_daily.nc",
                fine=twin_dir / "fine_daily.nc", region=BOX)
    assert not (tmp_path / "s.zarr").exists()
    assert not list(tmp_path.iterdir())


def test_a_failed_prepare_returns_only_after_its_day_readers_stopped(twin_dir, tmp_path, monkeypatch):
    """A day that fails must not leave other days' readers inside netCDF-C after prepare
    raised: the caller's next xarray open races them (xarray's metadata reads take no HDF5
    lock) and crashed the test suite with a segmentation fault. Three readers on three
    threads; the bad day fails at once, the others are still reading when it does."""
    import threading
    import time

    import dask

    import fastds.data.readers as readers
    fine = tmp_path / "fine"
    fine.mkdir()
    for f in sorted((twin_dir / "fine").glob("*.nc4")):
        (fine / f.name).symlink_to(f)
    bad = next(fine.glob("*20050517_1200z.nc4"))
    bad.unlink()
    bad.write_bytes(b"not a NetCDF file")
    running, started, lock = [0], [0], threading.Lock()
    real = readers._daily_mean

    def slow(files, *args, **kwargs):
        with lock:
            running[0] += 1
            started[0] += 1
        try:
            if bad not in files:
                time.sleep(1.0)
            return real(files, *args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(readers, "_daily_mean", slow)
    with dask.config.set(num_workers=3), pytest.raises(DataError, match=bad.name):
        prepare(out=tmp_path / "s.zarr", coarse=twin_dir / "coarse_daily.nc", fine=fine,
                region=BOX, allow_gaps=True, block=1)
    assert started[0] == 3 and running[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fine"]


def test_normalisation_inverts(rng):
    times = pd.date_range("2005-01-01", periods=400)
    v = 10 ** rng.normal(-1, 0.4, (400, 5, 6))
    mm = fit_minmax(v, times, np.ones(400, bool))
    for s in (1, 2, 3, 4):
        z = mm.forward(v, s)
        np.testing.assert_allclose(mm.inverse(z, s), v, rtol=2e-6)
    z = mm.forward(v[season_of(times.month) == 3], 3)
    assert z.min() == pytest.approx(0, abs=1e-6) and z.max() == pytest.approx(1, abs=1e-6)


def test_split_no_leak_and_fractions():
    times = pd.date_range("2000-01-01", "2004-12-31")
    sp = split_days(times, seed=1)
    assert set(np.unique(sp)) == {0, 1, 2}
    for s in (1, 2, 3, 4):
        sel = season_of(times.month) == s
        assert abs((sp[sel] == 2).mean() - 0.1) < 0.01 and abs((sp[sel] == 1).mean() - 0.2) < 0.01
    np.testing.assert_array_equal(sp, split_days(times, seed=1))
    assert not np.array_equal(sp, split_days(times, seed=2))


def test_datasets_respect_splits(twin_dir, tmp_path):
    out = prepare(out=tmp_path / "s.zarr", coarse=twin_dir / "coarse_daily.nc",
                  fine=twin_dir / "fine_daily.nc", region=BOX)
    st = open_store(out)
    test_days = set(np.flatnonzero(st.ds["split"].values == 2))
    fp = FinePatches(st, season=3, split="train", tile=16, stride=8, t_lag=10)
    assert len(fp) > 0 and not (set(fp.days.tolist()) & test_days)
    item = fp[len(fp) - 1]
    d = int(item["day"])
    y0, x0 = item["start"].tolist()
    np.testing.assert_allclose(item["lags"][-1].numpy(), fp.y[d - 1, y0:y0 + 16, x0:x0 + 16])
    ls = LagSequences(st, season=3, split="test", t_lag=10)
    assert set(ls.days.tolist()) <= set(np.flatnonzero(st.ds["split_c"].values == 2))
    lags, target = ls[0]
    assert lags.shape[0] == 10 and target.shape[0] == 1


def test_twin_statistics(twin):
    logf = np.log10(twin["fine_truth"].values)
    a = logf - logf.mean(0)
    acf1 = ((a[1:] * a[:-1]).mean(0) / a.var(0)).mean()
    assert 0.6 <= acf1 <= 0.8
    # coarse = area mean over each MERRA-2 cell of a related, not identical, fine field
    lat, lon = twin.lat.values, twin.lon.values
    pairs = []
    for i, cl in enumerate(twin.lat_c.values):
        for j, cn in enumerate(twin.lon_c.values):
            my = (lat >= cl - 0.25 - 1e-9) & (lat < cl + 0.25 - 1e-9)
            mx = (lon >= cn - 0.3125 - 1e-9) & (lon < cn + 0.3125 - 1e-9)
            if my.sum() == 8 and mx.sum() == 10:
                block = twin["fine_truth"].values[:, my][:, :, mx].mean(axis=(1, 2))
                pairs.append((block, twin["coarse"].values[:, i, j]))
    assert len(pairs) >= 4
    blocks, cells = (np.concatenate(x) for x in zip(*pairs))
    r = np.corrcoef(np.log10(blocks), np.log10(cells))[0, 1]
    assert 0.9 < r < 0.9999, r
    # summer dustier than winter; high terrain cleaner
    summer = logf[pd.DatetimeIndex(twin.time.values).month == 7].mean()
    winter = logf[pd.DatetimeIndex(twin.time.values).month == 1].mean()
    assert summer > winter
    e = twin["elevation"].values
    assert logf.mean(0)[e > np.percentile(e, 80)].mean() < logf.mean(0)[e < np.percentile(e, 20)].mean()
    np.testing.assert_array_equal(make_twin(SPEC)["fine_truth"].values[:5], twin["fine_truth"].values[:5])


def test_align_index():
    src = np.array([0.0, 0.5, 1.0])
    dst = np.array([0.0, 0.2, 0.3, 0.9, 1.0])
    np.testing.assert_array_equal(align_index(src, dst), [0, 0, 1, 2, 2])
    i0, w = align_index(src, dst, method="bilinear")
    np.testing.assert_allclose((1 - w) * src[i0] + w * src[i0 + 1], dst)


def test_elevation_reader(twin_dir):
    e = open_elevation(twin_dir / "elevation.nc")
    assert e.dims == ("lat", "lon") and float(e.max()) > 100


def test_areas():
    assert parse_region("area1") is AREAS["area1"]
    assert parse_region("10,20,30,40").as_tuple() == (10, 20, 30, 40)


def test_native_and_cube_reads_share_one_hdf5_lock(twin_dir):
    """prepare reads native files (netCDF4, our reader) and a cube (xarray) in one dask graph,
    on threads. HDF5 is not thread-safe: with two different locks the reads overlapped and
    failed intermittently ("NetCDF: HDF error", or a heap corruption). 200 mixed reads on 8
    threads, each checked against a serial read, must all succeed and agree."""
    import dask

    def graph():
        return (open_coarse(twin_dir / "coarse").data, open_fine(twin_dir / "fine_daily.nc").data,
                open_coarse(twin_dir / "coarse_daily.nc").data,
                open_fine(sorted((twin_dir / "fine").glob("*20050516_0*")), allow_gaps=True,
                          min_valid_fraction=0).data)

    with dask.config.set(scheduler="synchronous"):
        want = dask.compute(*graph())
    failures = []
    with dask.config.set(scheduler="threads", num_workers=8):
        for i in range(200):
            try:
                got = dask.compute(*graph())
            except Exception as err:  # noqa: BLE001 - every failure is counted, none hidden
                failures.append(f"read {i}: {type(err).__name__}: {err}")
                continue
            for w, g in zip(want, got):
                np.testing.assert_array_equal(g, w)
    assert not failures, f"{len(failures)} of 200 concurrent reads failed: {failures[:3]}"


def test_every_season_with_two_blocks_gets_validation_days():
    """A short record (here: two 14-day blocks of summer) still gets a validation block in
    that season and keeps one training block, where rounding 0.2 x 2 would give none."""
    times = pd.date_range("2006-07-01", periods=28, freq="D")
    sp = split_days(times, val=0.2, test=0.1, block=14)
    assert set(sp.tolist()) == {0, 1} and (sp == 1).sum() == 14
    one = split_days(times[:14], val=0.2, test=0.1, block=14)  # one block: all training
    assert set(one.tolist()) == {0}
    # longer records keep the plain fractions
    long = split_days(pd.date_range("2006-06-01", periods=92, freq="D"), val=0.2, test=0.1, block=1)
    assert (long == 1).sum() == round(0.2 * 92) and (long == 2).sum() == round(0.1 * 92)


def _cube_ds(lat, lon, days, seed, name="DUEXTTAU"):
    """A daily (time, lat, lon) Dataset with smooth positive values, any lon convention."""
    rng = np.random.default_rng(seed)
    t = pd.date_range("2006-06-01", periods=days, freq="D")
    base = np.exp(np.sin(np.radians(lon))[None, None, :] + 0.1 * rng.standard_normal((days, lat.size, 1)))
    vals = (0.1 * base * (1 + 0.01 * np.arange(lat.size))[None, :, None]).astype(np.float32)
    return xr.Dataset({name: (("time", "lat", "lon"), vals)},
                      coords={"time": t, "lat": lat, "lon": lon})


def test_region_across_the_antimeridian(tmp_path):
    """A box with lon_min > lon_max crosses 180: its data keep ascending longitudes past 180,
    whatever the source's convention (here: coarse in -180..180, fine in 0..360), and the
    whole prepare -> store path works on it."""
    box = parse_region("10,12,170,-170")
    assert box.crosses_antimeridian and box.lon_span == (170, 190)
    assert box.overlaps(parse_region("10,12,-175,-160")) and not box.overlaps(AREAS["area1"])
    with pytest.raises(ValueError, match="lon_min != lon_max"):
        parse_region("10,12,5,5")
    np.testing.assert_array_equal(box.lon_inside([175, -175, 0, 185, 160]), [True, True, False, True, False])

    clon = np.arange(-180, 180, 0.625)
    coarse = _cube_ds(np.arange(5, 17.01, 0.5), clon, 40, seed=1)
    flon = np.arange(160, 200, 0.0625)  # 0..360: the seam of this source is not at 180
    fine = _cube_ds(np.arange(9, 13, 0.0625), flon, 20, seed=2)
    c = open_coarse(coarse, region=box)
    f = open_fine(fine, region=box)
    for da, src in ((c, coarse), (f, fine)):
        assert np.all(np.diff(da.lon) > 0) and da.lon.min() < 180 < da.lon.max() < 190.5
        # every value is the source's at the same longitude (mod 360)
        src_lon = ((src.lon.values + 180) % 360) - 180
        idx = [int(np.argmin(np.abs(src_lon - (((x + 180) % 360) - 180)))) for x in da.lon.values]
        np.testing.assert_array_equal(da.values, src.DUEXTTAU.sel(lat=da.lat).values[:, :, idx])
    assert float(f.lon.min()) == 170 and float(f.lon.max()) == 190  # edges included

    out = prepare(coarse=coarse, fine=fine, region=box, out=tmp_path / "am.zarr", block=5)
    st = open_store(out)
    assert st.region.crosses_antimeridian and np.all(np.diff(st.fine.lon) > 0)
    assert st.fine.shape == f.shape and np.isfinite(st.fine.values).all()
    # the same data in another coarse convention (0..360) give the same store values
    coarse360 = coarse.assign_coords(lon=np.where(clon < 0, clon + 360, clon)).sortby("lon")
    out2 = prepare(coarse=coarse360, fine=fine, region=box, out=tmp_path / "am2.zarr", block=5)
    np.testing.assert_array_equal(open_store(out2).coarse.values, st.coarse.values)


def test_native_reads_only_the_region_hyperslab(twin, tmp_path, monkeypatch):
    """A region is read as contiguous lon runs (two where it wraps the file's seam), never as
    whole rows of the globe; values equal a whole read indexed afterwards."""
    import fastds.data.readers as rd
    write_twin(tmp_path, SPEC, twin=twin, native_days=1, cubes=False, lon_360=True)
    sub = open_fine(tmp_path / "fine", region="25,26,45,46", min_valid_fraction=0)
    first = sorted((tmp_path / "fine").glob("*.nc4"))[0]
    with netCDF4.Dataset(first) as nc:
        layout = rd._layout(nc["lat"][:], nc["lon"][:], rd.GRIDS["fine"], parse_region("25,26,45,46"),
                            "fine", first, "t")
        whole = np.asarray(nc["DUEXTTAU"][0], np.float64)
    assert sum(b - a for a, b in layout.lon_runs) == sub.sizes["lon"] == layout.lon.size
    np.testing.assert_array_equal(np.asarray(whole[layout.lat_slice][:, layout.lon_index]).shape[1],
                                  sub.sizes["lon"])
    # a seam inside the region: raw lon 0..360 and a box around 0 E -> two runs
    lon360 = np.arange(0, 360, 0.625)
    lay = rd._layout(np.arange(-10, 10.1, 0.5), lon360, rd.GRIDS["coarse"], parse_region("-5,5,-3,3"),
                     "coarse", "x", "t")
    assert len(lay.lon_runs) == 2 and np.all(np.diff(lay.lon) > 0)
    np.testing.assert_allclose(((lon360[lay.lon_index] + 180) % 360) - 180, lay.lon)
    # _read_var reads each run once: count the slices a fake variable is asked for
    asked = []

    class Var:
        shape = (1, 41, lon360.size)
        def set_auto_maskandscale(self, on): pass
        def ncattrs(self): return []
        def __getitem__(self, key):
            asked.append(key[-1])
            return np.broadcast_to(lon360, (1, 41, lon360.size))[key]

    got = rd._read_var(type("NC", (), {"variables": {"V": Var()}})(), "V", lay, "x", "t")
    assert all(isinstance(k, slice) for k in asked) and len(asked) == 2
    np.testing.assert_array_equal(got[0, 0], lon360[lay.lon_index])


def test_prepare_from_xarray_objects_equals_from_files(twin_dir, tmp_path):
    kw = dict(elevation=twin_dir / "elevation.nc", region=BOX)
    a = open_store(prepare(out=tmp_path / "a.zarr", coarse=twin_dir / "coarse_daily.nc",
                           fine=twin_dir / "fine_daily.nc", **kw))
    cds = xr.open_dataset(twin_dir / "coarse_daily.nc")
    fda = xr.open_dataset(twin_dir / "fine_daily.nc")["DUEXTTAU"].load()
    out = prepare(out=tmp_path / "b.zarr", coarse=cds, fine=fda, **kw)
    b = open_store(out)
    np.testing.assert_array_equal(a.coarse.values, b.coarse.values)
    np.testing.assert_array_equal(a.fine.values, b.fine.values)
    assert a.norm_y.to_dict() == b.norm_y.to_dict()
    stamp = (out / "zarr.json").stat().st_mtime_ns
    assert prepare(out=out, coarse=cds, fine=fda, **kw) == out  # same objects: cached
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="has no variable 'SSEXTTAU'"):
        prepare(out=tmp_path / "c.zarr", coarse=cds, fine=fda, variable="SSEXTTAU", **kw)
    with pytest.raises(DataError, match="expected \\(time, lat, lon\\)"):
        prepare(out=tmp_path / "c.zarr", coarse=cds, fine=fda.isel(time=0), **kw)
    assert not (tmp_path / "c.zarr").exists()


def test_prepare_in_processes_equals_threads(twin_dir, tmp_path, capsys):
    """workers=2 reads the native days in two processes (each its own HDF5): the same store,
    bit for bit, the same recorded warnings (a worker's warnings come back), and a progress
    bar counting days."""
    fine = tmp_path / "fine"
    fine.mkdir()
    for f in sorted((twin_dir / "fine").glob("*.nc4"))[:-3]:  # the last day lacks 3 steps
        (fine / f.name).symlink_to(f)
    kw = dict(coarse=twin_dir / "coarse", fine=fine, region=BOX, block=1)
    with pytest.warns(DataWarning, match="expected valid time steps") as in_threads:
        a = open_store(prepare(out=tmp_path / "t.zarr", **kw))
    with pytest.warns(DataWarning, match="expected valid time steps") as in_processes:
        b = open_store(prepare(out=tmp_path / "p.zarr", workers=2, progress=True, **kw))
    from fastds.cli import main
    with pytest.warns(DataWarning, match="expected valid time steps") as via_cli:
        assert main(["prepare", "--coarse", str(kw["coarse"]), "--fine", str(fine), "--region", BOX,
                     "--set", "data.split_block=1", "--out", str(tmp_path / "c.zarr"), "--quiet"]) == 0
    # raised inside dask's readers, re-raised once at the caller's line (here, not the CLI's)
    assert {w.filename for w in [*in_threads, *in_processes, *via_cli] if w.category is DataWarning} == {__file__}
    np.testing.assert_array_equal(a.coarse.values, b.coarse.values)
    np.testing.assert_array_equal(a.fine.values, b.fine.values)
    assert a.ds.attrs["warnings"] == b.ds.attrs["warnings"] != "[]"
    assert "days read" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers must be"):
        prepare(out=tmp_path / "x.zarr", workers=-1, **kw)


def test_cf_attributes_of_species_and_unknown_variables(twin_dir, tmp_path):
    """A known species gets its CF standard name; any other variable keeps its own units and
    long name and gets no standard_name (its NetCDF name is not a CF standard name)."""
    from fastds.data.species import SPECIES, cf_attrs
    a = cf_attrs("SSEXTTAU")
    assert a["standard_name"].endswith("sea_salt_ambient_aerosol_particles") and a["units"] == "1"
    assert all(s.startswith("atmosphere_optical_thickness_due_to") for _, s in SPECIES.values())
    other = cf_attrs("MYVAR", units="kg m-2", long_name="my column load")
    assert other == {"units": "kg m-2", "long_name": "my column load"}
    assert "standard_name" not in cf_attrs("PM25")
    ds = xr.open_dataset(twin_dir / "fine_daily.nc").rename({"DUEXTTAU": "MYVAR"}).load()
    ds["MYVAR"].attrs = {"units": "kg m-2", "long_name": "my column load"}
    cds = xr.open_dataset(twin_dir / "coarse_daily.nc").rename({"DUEXTTAU": "MYVAR"}).load()
    st = open_store(prepare(out=tmp_path / "m.zarr", coarse=cds, fine=ds, region=BOX, variable="MYVAR"))
    assert st.fine.attrs == {"units": "kg m-2", "long_name": "my column load"}


def test_source_covariates_are_the_training_days_anchor_maps(twin_dir, tmp_path):
    """covariates='sources': the bounded set plus the anchor's static maps, from the training
    days only: its mean fine-scale residual (less the regional mean, in residual sds) and the
    log of each pixel's residual sd over the season's, smoothed; the same for every day, a
    patch's maps are the day's on its window; the anchor's round trip keeps them; an anchor
    without them, or the absolute target, is refused by name."""
    from scipy.ndimage import gaussian_filter
    from fastds.data.datasets import FineDays
    from fastds.data.transforms import (COVARIATE_SETS, SPLITS, SPREAD_SMOOTH, Anchor, covariate_maps,
                                        source_maps)
    st = open_store(prepare(out=tmp_path / "s.zarr", coarse=twin_dir / "coarse_daily.nc",
                            fine=twin_dir / "fine_daily.nc", region=BOX))
    fd = FineDays(st, season=3, t_lag=10, space="residual", covariates="sources")
    a = fd.anchor
    whole = fd.covariates_at(st.times[20])
    assert whole.shape == (len(COVARIATE_SETS["sources"]),) + fd.shape
    np.testing.assert_array_equal(whole[7:], fd.covariates_at(st.times[30])[7:])  # static
    win = (slice(5, 21), slice(7, 23))
    np.testing.assert_array_equal(fd.covariates_at(st.times[20], win), whole[:, win[0], win[1]])
    bounded = FineDays(st, season=3, t_lag=10, space="residual", covariates="bounded")
    np.testing.assert_array_equal(whole[:7], bounded.covariates_at(st.times[20]))
    # brute force from the season's training days
    idx = np.flatnonzero((st.ds["split"].values == SPLITS["train"]) & (st.times.month.isin([6, 7, 8])))
    res = fd.logy[idx].astype(np.float64) - fd.coarse_log_at(fd.cidx[idx]) - a.clim[3]
    sd = np.nanstd(res)
    np.testing.assert_allclose(whole[7], (a.clim[3] - a.clim[3].mean()) / a.sd[3], rtol=1e-5, atol=1e-6)
    want = gaussian_filter(np.log(np.nanstd(res, axis=0) / sd), SPREAD_SMOOTH, mode="nearest")
    np.testing.assert_allclose(whole[8], want, atol=2e-4)
    assert whole[8].std() > 0.01  # the twin's residual sd varies over the region
    back = Anchor.from_dict(a.to_dict())
    np.testing.assert_array_equal(source_maps(back, 3), whole[7:])
    old = a.to_dict()
    del old["spread"]
    with pytest.raises(ValueError, match="no residual spread map for season 3.*retrain"):
        source_maps(Anchor.from_dict(old), 3)
    with pytest.raises(ValueError, match="covariates='sources' needs the residual target"):
        FineDays(st, season=3, t_lag=10, covariates="sources")
    with pytest.raises(ValueError, match="needs the day's sources maps"):
        covariate_maps(np.zeros((4, 4)), np.arange(4.0), np.arange(4.0), lat_range=(0, 3), lon_range=(0, 3),
                       elev_scale=1.0, time=st.times[0], day_index=0, day_scale=1.0, encoding="sources")


def test_event_covariates(twin_dir, tmp_path):
    """covariates='events': the bounded set plus the log10 coarse field's gradient magnitude
    and its change since the day before, per coarse cell and interpolated like the field; a
    patch's maps are the day's maps on its window (no edge of its own)."""
    from fastds.data.datasets import FineDays
    from fastds.data.transforms import COVARIATE_SETS, event_maps, to_log
    st = open_store(prepare(out=tmp_path / "s.zarr", coarse=twin_dir / "coarse_daily.nc",
                            fine=twin_dir / "fine_daily.nc", region=BOX))
    fd = FineDays(st, season=3, t_lag=10, covariates="events")
    t = st.times[20]
    whole = fd.covariates_at(t)
    assert whole.shape == (len(COVARIATE_SETS["events"]),) + fd.shape
    win = (slice(5, 21), slice(7, 23))
    np.testing.assert_array_equal(fd.covariates_at(t, win), whole[:, win[0], win[1]])
    np.testing.assert_array_equal(whole[:7], FineDays(st, season=3, t_lag=10, covariates="bounded").covariates_at(t))
    c = st.times_c.get_loc(t)
    logc = to_log(st.coarse.values)
    maps = event_maps(logc[c], logc[c - 1])
    np.testing.assert_allclose(maps[1], logc[c] - logc[c - 1], atol=1e-6)
    gy, gx = np.gradient(logc[c].astype(np.float64))
    np.testing.assert_allclose(maps[0], np.hypot(gy, gx), rtol=1e-5)
    assert np.all(event_maps(logc[0], None)[1] == 0)
    with pytest.raises(ValueError, match="events maps"):
        from fastds.data.transforms import covariate_maps
        covariate_maps(np.zeros((4, 4)), np.arange(4.0), np.arange(4.0), lat_range=(0, 3), lon_range=(0, 3),
                       elev_scale=1.0, time=t, day_index=0, day_scale=1.0, encoding="events")
