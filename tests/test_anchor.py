"""The anchored residual formulation and what it rests on: residual round trip, coarse
consistency, cell alignment, blocked splits, bounded covariates, ensemble statistics, and
scoring every model on the same days."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from fastds.data.datasets import FineDays, FinePatches
from fastds.data.regions import season_of
from fastds.data.store import open_store, prepare
from fastds.data.transforms import (Anchor, align_index, cell_of, covariate_maps, fit_anchor,
                                    split_days, upsample)
from fastds.metrics import crps, rank_histogram, spread_skill
from fastds.sampling.consistency import cell_means, fit_projection


# ------------------------------------------------------------------ alignment on cell edges
def test_cell_of_sends_edge_pixels_to_the_cell_above():
    lat_c = np.arange(24.0, 28.01, 0.5)                   # MERRA-2 centres
    lat = np.round(np.arange(24.0, 28.0001, 0.0625), 6)  # G5NR centres: every 8th on an edge
    cells = cell_of(lat_c, lat)
    # cell k is [c_k - 0.25, c_k + 0.25): 24.25 is the lower edge of the cell centred at 24.5
    assert cells[lat.tolist().index(24.25)] == 1
    assert cells[lat.tolist().index(24.1875)] == 0
    for k, c in enumerate(lat_c):
        inside = (lat >= c - 0.25 - 1e-9) & (lat < c + 0.25 - 1e-9)
        assert (cells[inside] == k).all()
    # accumulated float error in an arange-built axis does not move a pixel off its edge
    lon_c = np.arange(44.0, 49.01, 0.625)
    lon = np.arange(44.0, 49.0001, 0.0625)
    assert cell_of(lon_c, lon)[np.argmin(np.abs(lon - 44.3125))] == 1
    # nearest alignment is exactly this cell membership
    np.testing.assert_array_equal(align_index(lat_c, lat), cells)


def test_nearest_alignment_reproduces_box_means():
    """A coarse field made as the mean over each half-open cell is recovered exactly by the
    cell means of the fine pixels nearest alignment assigns to it."""
    rng = np.random.default_rng(0)
    lat_c, lon_c = np.arange(24.0, 26.01, 0.5), np.arange(44.0, 46.0, 0.625)
    lat = np.round(np.arange(23.75, 26.25 - 1e-9, 0.0625), 6)
    lon = np.round(np.arange(43.6875, 46.1875 - 1e-9, 0.0625), 6)
    fine = rng.random((lat.size, lon.size))
    iy, ix = align_index(lat_c, lat), align_index(lon_c, lon)
    for i in range(lat_c.size):
        for j in range(lon_c.size):
            my = (lat >= lat_c[i] - 0.25) & (lat < lat_c[i] + 0.25)
            mx = (lon >= lon_c[j] - 0.3125) & (lon < lon_c[j] + 0.3125)
            want = fine[np.ix_(my, mx)].mean()
            got = fine[np.ix_(iy == i, ix == j)].mean()
            assert got == pytest.approx(want, rel=1e-12)


def test_conservative_alignment_weights():
    src = np.array([0.0, 0.5, 1.0])
    dst = np.arange(0.0, 1.0001, 0.125)  # pixels of width 0.125; 0.25 and 0.75 sit on edges
    i0, w = align_index(src, dst, method="conservative")
    got = upsample(np.array([[10.0, 20.0, 30.0]]), (np.zeros(1, np.int64), np.zeros(1)), (i0, w))[0]
    # an edge pixel is half in each cell; others wholly in one
    np.testing.assert_allclose(got, [10, 10, 15, 20, 20, 20, 25, 30, 30])


# ------------------------------------------------------------------ residual round trip
def test_anchor_round_trip_and_fit(rng):
    times = pd.date_range("2005-03-01", periods=60)
    logf = rng.normal(-1, 0.3, (60, 9, 11))
    up = logf + rng.normal(0, 0.1, logf.shape) + 0.2
    anchor = fit_anchor(logf, up, times, np.ones(60, bool))
    for s in sorted(anchor.clim):
        sel = season_of(times.month) == s
        np.testing.assert_allclose(anchor.clim[s], (logf - up)[sel].mean(0), atol=1e-6)
        mu = anchor.mu(up[sel], s)
        r = anchor.forward(logf[sel], mu, s)
        assert abs(r.mean()) < 1e-4 and r.std() == pytest.approx(1.0, rel=1e-3)
        np.testing.assert_allclose(anchor.inverse(r, mu, s), logf[sel], atol=2e-6)
    again = Anchor.from_dict(anchor.to_dict())
    for s in anchor.clim:
        np.testing.assert_array_equal(again.clim[s], anchor.clim[s])
        assert again.sd[s] == anchor.sd[s] and again.mean[s] == anchor.mean[s]


# ------------------------------------------------------------------ coarse consistency
def _grid():
    lat_c, lon_c = np.arange(24.0, 26.01, 0.5), np.arange(44.0, 46.0, 0.625)
    lat = np.round(np.arange(23.75, 26.25 - 1e-9, 0.0625), 6)
    lon = np.round(np.arange(43.6875, 46.1875 - 1e-9, 0.0625), 6)
    return lat, lon, lat_c, lon_c


def test_projection_hits_every_cell_target_and_fixes_satisfied_fields(rng):
    lat, lon, lat_c, lon_c = _grid()
    times = pd.date_range("2005-06-01", periods=20)
    fine = 10 ** rng.normal(-1, 0.3, (20, lat.size, lon.size))
    coarse = 10 ** rng.normal(-1, 0.2, (20, lat_c.size, lon_c.size))
    proj = fit_projection(fine, coarse, times, np.ones(20, bool), lat=lat, lon=lon, lat_c=lat_c, lon_c=lon_c)
    field = (10 ** rng.normal(-1, 0.3, (3, lat.size, lon.size))).astype(np.float32)
    out = proj(field, coarse[0], 3)
    assert out.shape == field.shape and out.dtype == field.dtype and (out > 0).all()
    n = lat_c.size * lon_c.size
    means = cell_means(out, proj.ids, proj.weights, n)
    target = proj.target(coarse[0], 3).ravel()
    for k in range(3):
        np.testing.assert_allclose(means[k], target, rtol=2e-6)
    # a field that already satisfies the constraint is left as it is
    exact = proj(field.astype(np.float64), coarse[0], 3)
    np.testing.assert_allclose(proj(exact, coarse[0], 3), exact, rtol=1e-13)
    # the ratio is learned: a fine record that is 1.5x the coarse cell means gives ratio 1.5
    ids, w = proj.ids, proj.weights
    coarse_like = cell_means(fine, ids, w, n).reshape(20, lat_c.size, lon_c.size) / 1.5
    p2 = fit_projection(fine, coarse_like, times, np.ones(20, bool), lat=lat, lon=lon,
                        lat_c=lat_c, lon_c=lon_c)
    np.testing.assert_allclose(p2.ratio[3], 1.5, rtol=1e-10)


def test_smooth_projection_leaves_no_steps_at_cell_edges(rng):
    """A smooth field projected onto cell targets far from its own means: per-cell factors
    put steps at the cell edges, the smooth factor does not; both hit every target."""
    lat, lon, lat_c, lon_c = _grid()
    times = pd.date_range("2005-06-01", periods=4)
    yy, xx = np.meshgrid(np.arange(lat.size), np.arange(lon.size), indexing="ij")
    field = 10 ** (-1 + 0.05 * np.sin(yy / 4.0) + 0.05 * np.cos(xx / 5.0))
    coarse = 10 ** rng.normal(-1, 0.15, (4, lat_c.size, lon_c.size))
    kw = dict(lat=lat, lon=lon, lat_c=lat_c, lon_c=lon_c)
    fine = np.repeat(field[None], 4, 0)
    smooth = fit_projection(fine, coarse, times, np.ones(4, bool), **kw)
    blocky = fit_projection(fine, coarse, times, np.ones(4, bool), smooth=False, **kw)
    n = lat_c.size * lon_c.size

    def edge_jump(v):  # mean |Δ log10| across lat lines where the cell changes, over elsewhere
        d = np.abs(np.diff(np.log10(v), axis=0)).mean(1)
        edge = np.diff(smooth.ids[:, 0]) != 0
        return d[edge].mean() / d[~edge].mean()
    outs = {}
    for name, proj in (("smooth", smooth), ("blocky", blocky)):
        outs[name] = proj(field, coarse[1], 3)
        np.testing.assert_allclose(cell_means(outs[name], proj.ids, proj.weights, n)[..., :],
                                   proj.target(coarse[1], 3).ravel(), rtol=2e-6)
    assert edge_jump(outs["blocky"]) > 3 * edge_jump(outs["smooth"])
    assert edge_jump(outs["smooth"]) < 2.0


# ------------------------------------------------------------------ split blocks and purge
def test_blocked_split_keeps_test_days_out_of_training_lag_windows(twin_files, tmp_path):
    box = "24.0,28.0,44.0,49.0"
    out = prepare(out=tmp_path / "s.zarr", coarse=twin_files / "coarse_daily.nc",
                  fine=twin_files / "fine_daily.nc", region=box, block=10)
    st = open_store(out)
    sp = st.ds["split"].values
    test_idx = np.flatnonzero(sp == 2)
    assert len(test_idx) > 0
    # contiguous: every test day but the last of a block has a test day after it
    runs = np.split(test_idx, np.flatnonzero(np.diff(test_idx) != 1) + 1)
    assert max(len(r) for r in runs) >= 5
    for season in sorted(set(season_of(st.times.month))):
        for split in ("train", "val"):
            fp = FinePatches(st, season=season, split=split, tile=16, stride=8, t_lag=10)
            for d in fp.days:
                assert not (sp[d - 10:d] == 2).any(), (split, st.times[d])
    # the reference's day-level split stays available and is not purged
    out1 = prepare(out=tmp_path / "s1.zarr", coarse=twin_files / "coarse_daily.nc",
                   fine=twin_files / "fine_daily.nc", region=box, block=1)
    st1 = open_store(out1)
    fp1 = FinePatches(st1, season=3, split="train", tile=16, stride=8, t_lag=10)
    assert any((st1.ds["split"].values[d - 10:d] == 2).any() for d in fp1.days)
    with pytest.raises(ValueError, match="block must be"):
        prepare(out=tmp_path / "s2.zarr", coarse=twin_files / "coarse_daily.nc",
                fine=twin_files / "fine_daily.nc", region=box, block=0)


def test_split_blocks_are_whole():
    times = pd.date_range("2005-01-01", "2006-12-31")
    sp = split_days(times, block=14, seed=3)
    blocks = np.arange(len(times)) // 14
    seasons = season_of(times.month)
    for b in np.unique(blocks):
        for s in np.unique(seasons[blocks == b]):
            assert len(set(sp[(blocks == b) & (seasons == s)])) == 1


# ------------------------------------------------------------------ prepare's align is used
def test_prepare_align_takes_effect(twin_files, tmp_path):
    box = "24.0,28.0,44.0,49.0"
    near = open_store(prepare(out=tmp_path / "n.zarr", coarse=twin_files / "coarse_daily.nc",
                              fine=twin_files / "fine_daily.nc", region=box, align="nearest"))
    bil = open_store(prepare(out=tmp_path / "b.zarr", coarse=twin_files / "coarse_daily.nc",
                             fine=twin_files / "fine_daily.nc", region=box, align="bilinear"))
    assert near.align == "nearest" and bil.align == "bilinear"
    # the config default "store" defers to what prepare chose; a named method overrides it
    assert FineDays(near, season=3, t_lag=5, align="store").align == "nearest"
    assert FineDays(bil, season=3, t_lag=5, align="store").align == "bilinear"
    assert FineDays(bil, season=3, t_lag=5, align="nearest").align == "nearest"
    a = FineDays(near, season=3, t_lag=5, align="store").coarse_at(0)
    b = FineDays(bil, season=3, t_lag=5, align="store").coarse_at(0)
    assert not np.allclose(a, b)


def test_cli_prepare_passes_align_and_block(twin_files, tmp_path):
    from fastds.cli import main
    code = main(["prepare", "--coarse", str(twin_files / "coarse_daily.nc"), "--fine",
                 str(twin_files / "fine_daily.nc"), "--region", "24.0,28.0,44.0,49.0", "--out",
                 str(tmp_path / "c.zarr"), "--set", "data.align=conservative",
                 "--set", "data.split_block=7", "--quiet"])
    assert code == 0
    st = open_store(tmp_path / "c.zarr")
    import json
    assert st.align == "conservative"
    assert json.loads(st.ds.attrs["manifest"])["split"]["block"] == 7


# ------------------------------------------------------------------ random patch offsets
def test_random_offsets_cover_cell_phases_and_are_seeded(twin_files, tmp_path):
    st = open_store(prepare(out=tmp_path / "s.zarr", coarse=twin_files / "coarse_daily.nc",
                            fine=twin_files / "fine_daily.nc", region="24.0,28.0,44.0,49.0"))
    fixed = FinePatches(st, season=3, tile=16, stride=8, t_lag=5)
    jit = FinePatches(st, season=3, tile=16, stride=8, t_lag=5, random_offsets=True, seed=1)
    n = len(fixed.starts)
    grid = {tuple(fixed[i]["start"].tolist()) for i in range(n)}
    starts = [tuple(jit[i]["start"].tolist()) for i in range(3 * n)]
    assert {(y % 8, x % 8) for y, x in starts} > {(y % 8, x % 8) for y, x in grid}
    assert starts == [tuple(jit[i]["start"].tolist()) for i in range(3 * n)]  # deterministic
    jit.set_epoch(1)
    assert starts != [tuple(jit[i]["start"].tolist()) for i in range(3 * n)]  # new each epoch
    H, W = jit.shape
    for y, x in starts:
        assert 0 <= y <= H - 16 and 0 <= x <= W - 16
    item = jit[5]
    y0, x0 = item["start"].tolist()
    np.testing.assert_allclose(item["lags"][-1].numpy(), jit.y[int(item["day"]) - 1, y0:y0 + 16, x0:x0 + 16])


# ------------------------------------------------------------------ bounded covariates
def test_bounded_covariates_stay_in_training_range_years_out():
    kw = dict(lat_range=(0, 1), lon_range=(0, 1), elev_scale=1.0, day_scale=1000.0)
    e, lat, lon = np.zeros((4, 5)), np.linspace(0, 1, 4), np.linspace(0, 1, 5)
    record = pd.date_range("2005-05-16", "2007-05-15")
    train = np.stack([covariate_maps(e, lat, lon, time=t, day_index=i, encoding="bounded",
                                     year_range=(2005, 2007), **kw)[:, 0, 0] for i, t in enumerate(record)])
    for t in pd.date_range("2009-01-01", "2009-12-31", freq="17D"):
        c = covariate_maps(e, lat, lon, time=t, day_index=2000, encoding="bounded",
                           year_range=(2005, 2007), **kw)[:, 0, 0]
        assert (c >= train.min(0) - 1e-6).all() and (c <= train.max(0) + 1e-6).all(), t
        p = covariate_maps(e, lat, lon, time=t, day_index=2000, encoding="paper", **kw)[:, 0, 0]
        assert p[4] > 1.5 and p[5] > 0.35  # the paper's encoding extrapolates
    same_doy = [covariate_maps(e, lat, lon, time=t, day_index=0, encoding="bounded",
                               year_range=(2005, 2007), **kw)[:, 0, 0] for t in ("2007-03-01", "2010-03-01")]
    np.testing.assert_allclose(same_doy[0], same_doy[1])


# ------------------------------------------------------------------ ensemble statistics
def _ens(rng, T=3, M=5, H=4, W=6):
    times = pd.date_range("2007-06-01", periods=T)
    truth = xr.DataArray(10 ** rng.normal(-1, 0.3, (T, H, W)), dims=("time", "lat", "lon"),
                         coords={"time": times})
    pred = xr.DataArray(10 ** rng.normal(-1, 0.3, (T, M, H, W)), dims=("time", "member", "lat", "lon"),
                        coords={"time": times})
    return pred, truth


def test_crps_matches_properscoring_and_brute_force(rng):
    import properscoring as ps  # a declared test dependency (the [test] extra)
    pred, truth = _ens(rng)
    got = crps(pred, truth)
    p = np.log10(pred.values)
    t = np.log10(truth.values)
    lib = ps.crps_ensemble(t, np.moveaxis(p, 1, -1)).mean(axis=(1, 2))
    np.testing.assert_allclose(got, lib, rtol=1e-10)
    brute = (np.abs(p - t[:, None]).mean(1)
             - 0.5 * np.abs(p[:, :, None] - p[:, None, :]).mean((1, 2))).mean((1, 2))
    np.testing.assert_allclose(got, brute, rtol=1e-10)


def test_spread_skill_and_rank_histogram_brute_force(rng):
    pred, truth = _ens(rng, M=4)
    p, t = np.log10(pred.values), np.log10(truth.values)
    M = 4
    spread = np.sqrt((M + 1) / M * np.mean(p.var(1, ddof=1)))
    skill = np.sqrt(np.mean((p.mean(1) - t) ** 2))
    assert spread_skill(pred, truth) == pytest.approx(spread / skill, rel=1e-12)
    h = rank_histogram(pred, truth)
    want = np.bincount((p < t[:, None]).sum(1).ravel(), minlength=M + 1)
    np.testing.assert_array_equal(h, want)  # continuous values: no ties
    # a calibrated ensemble (truth is one more draw) has spread/skill near 1
    r = np.random.default_rng(5)
    base = r.normal(-1, 0.3, (40, 1, 8, 8))
    draws = base + r.normal(0, 0.2, (40, 9, 8, 8))
    times = pd.date_range("2007-01-01", periods=40)
    pe = xr.DataArray(10 ** draws[:, 1:], dims=("time", "member", "lat", "lon"), coords={"time": times})
    te = xr.DataArray(10 ** draws[:, 0], dims=("time", "lat", "lon"), coords={"time": times})
    assert 0.9 < spread_skill(pe, te) < 1.1
    # independent members read as pairs: the same calibration in expectation
    assert 0.9 < spread_skill(pe.isel(member=slice(0, 8)), te, pairs=True) < 1.1


def test_spread_skill_of_antithetic_pairs():
    """Exact ± pairs around the truth's conditional mean (a calibrated antithetic ensemble):
    the pair-aware ratio is ~1 where the independent-member formula reads ~sqrt((M+1)/(M-1));
    and the pair-aware form against brute force."""
    r = np.random.default_rng(6)
    M = 8
    base = r.normal(-1, 0.3, (60, 1, 8, 8))
    d = r.normal(0, 0.2, (60, M // 2, 8, 8))
    members = base + np.stack([d, -d], 2).reshape(60, M, 8, 8)
    truth = base[:, 0] + r.normal(0, 0.2, (60, 8, 8))
    times = pd.date_range("2007-01-01", periods=60)
    pe = xr.DataArray(10 ** members, dims=("time", "member", "lat", "lon"), coords={"time": times})
    te = xr.DataArray(10 ** truth, dims=("time", "lat", "lon"), coords={"time": times})
    assert 0.95 < spread_skill(pe, te, pairs=True) < 1.05
    assert spread_skill(pe, te) == pytest.approx(np.sqrt((M + 1) / (M - 1)), rel=0.03)
    p, t = members.reshape(60, M, -1), truth.reshape(60, -1)
    var = 0.5 * (p[:, 0::2].var(1, ddof=1) + p[:, 1::2].var(1, ddof=1)).mean()
    pm = 0.5 * (p[:, 0::2] + p[:, 1::2])
    want = np.sqrt(var + pm.var(1, ddof=1).mean() / (M // 2)) / np.sqrt(((p.mean(1) - t) ** 2).mean())
    assert spread_skill(pe, te, pairs=True) == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="even number of members"):
        spread_skill(pe.isel(member=slice(0, 3)), te, pairs=True)


# ------------------------------------------------------------------ same days for every model
def test_evaluate_scores_every_model_on_the_same_days(rng, tmp_path):
    from fastds.report import evaluate
    times = pd.date_range("2007-05-16", periods=12)
    lat, lon = np.linspace(24, 25, 9), np.linspace(44, 45, 10)
    da = lambda v, t: xr.DataArray(v, dims=("time", "lat", "lon"), coords={"time": t, "lat": lat, "lon": lon})  # noqa: E731
    truth = da(10 ** rng.normal(-1, 0.3, (12, 9, 10)), times)
    a = da(10 ** rng.normal(-1, 0.3, (10, 9, 10)), times[:10])
    b = da(10 ** rng.normal(-1, 0.3, (9, 9, 10)), times[3:])
    ens = xr.DataArray(10 ** rng.normal(-1, 0.3, (12, 3, 9, 10)), dims=("time", "member", "lat", "lon"),
                       coords={"time": times, "lat": lat, "lon": lon})
    m = evaluate({"a": a, "b": b, "e": ens}, truth, out=tmp_path, plots=False,
                 record_end=pd.Timestamp("2007-05-15"))
    days = {k: v["days"] for k, v in m["models"].items()}
    assert days["a"] == days["b"] == days["e"] and len(days["a"]) == 7
    assert {r["model"] for r in m["table"]} == {"a", "b", "e", "e-member"}
    assert all(r["days"] == 7 for r in m["table"])
    leads = m["models"]["a"]["leads"]["lead"]
    assert leads == list(range(4, 11))
    e = m["models"]["e"]["ensemble"]
    assert e["members"] == 3 and len(e["crps"]) == 7 and sum(e["rank_histogram"]) == 7 * 90
    assert (tmp_path / "leads.md").exists()
    own = evaluate({"a": a, "b": b}, truth, out=tmp_path / "own", plots=False, same_days=False)
    assert len(own["models"]["a"]["days"]) == 10 and len(own["models"]["b"]["days"]) == 9


def test_shrunk_anchor_keeps_fixed_structure_and_drops_weather_noise():
    r = np.random.default_rng(2)
    times = pd.date_range("2005-03-01", periods=92)
    n, H, W = 92, 12, 14
    # persistent "weather" residual: AR(1) with rho 0.8, so 92 days hold ~10 independent ones
    w = np.empty((n, H, W))
    w[0] = r.normal(0, 0.25, (H, W))
    for i in range(1, n):
        w[i] = 0.8 * w[i - 1] + 0.6 * r.normal(0, 0.25, (H, W))
    up = np.zeros((n, H, W))
    for fixed_sd, expect in ((0.0, "noise"), (0.3, "signal")):
        fixed = r.normal(0, fixed_sd, (H, W)) if fixed_sd else np.zeros((H, W))
        logf = up + 0.1 + fixed + w
        plain = fit_anchor(logf, up, times, np.ones(n, bool)).clim[2]
        shrunk = fit_anchor(logf, up, times, np.ones(n, bool), shrink=True).clim[2]
        err_plain = np.sqrt(np.mean((plain - 0.1 - fixed) ** 2))
        err_shrunk = np.sqrt(np.mean((shrunk - 0.1 - fixed) ** 2))
        assert err_shrunk < err_plain
        assert shrunk.mean() == pytest.approx(plain.mean(), abs=2e-3)  # the regional bias stays
        if expect == "noise":
            assert shrunk.std() < 0.3 * plain.std()
        else:
            assert shrunk.std() > 0.8 * plain.std()
        # the map's reliability, what data.covariates="auto" reads: signal / (signal + noise),
        # here 0.09 / (0.09 + 0.0625 / n_eff) with n_eff = 92 (1 - 0.8) / (1 + 0.8) ≈ 10.2: 0.94
        rel = fit_anchor(logf, up, times, np.ones(n, bool)).reliability[2]
        assert rel == fit_anchor(logf, up, times, np.ones(n, bool), shrink=True).reliability[2]
        assert (rel < 0.15) if expect == "noise" else (0.88 < rel < 0.99)
        assert Anchor.from_dict(Anchor(reliability={2: rel}).to_dict()).reliability == {2: rel}
