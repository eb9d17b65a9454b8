import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.stats import wasserstein_distance
from statsmodels.tsa.stattools import acf, pacf

from fastds.metrics import (acf_pacf, crps, day_scores, lag_curves, power_spectrum, rank_histogram,
                            semivariogram, semivariogram_ref, spread_skill, summarize,
                            wasserstein_by_day)


def _da(v, times=None, lat=None, lon=None, member=False):
    T = v.shape[0]
    dims = ("time", "member", "lat", "lon") if member else ("time", "lat", "lon")
    coords = {"time": times if times is not None else pd.date_range("2005-06-01", periods=T),
              "lat": lat if lat is not None else 20 + 0.0625 * np.arange(v.shape[-2]),
              "lon": lon if lon is not None else 40 + 0.0625 * np.arange(v.shape[-1])}
    return xr.DataArray(v, dims=dims, coords=coords)


def test_day_scores_against_direct_formulas(rng):
    t = 10 ** rng.normal(-1, 0.3, (5, 7, 9))
    p = t * 10 ** rng.normal(0, 0.1, t.shape)
    s = day_scores(_da(p), _da(t))
    lp, lt = np.log10(p[2]).ravel(), np.log10(t[2]).ravel()
    from scipy.stats import pearsonr
    assert s["r2"].iloc[2] == pytest.approx(pearsonr(lp, lt)[0] ** 2)
    from sklearn_like import r2_score_ref
    assert s["r2_nse"].iloc[2] == pytest.approx(r2_score_ref(lt, lp))
    assert s["rmse"].iloc[2] == pytest.approx(np.sqrt(np.mean((lp - lt) ** 2)))
    assert s["mae"].iloc[2] == pytest.approx(np.mean(np.abs(lp - lt)))
    assert s["bias"].iloc[2] == pytest.approx(np.mean(lp - lt))
    phys = day_scores(_da(p), _da(t), space="physical")
    assert phys["rmse"].iloc[0] == pytest.approx(np.sqrt(np.mean((p[0] - t[0]) ** 2)))
    table = summarize(s, area="a", model="m")
    assert table["r2_mean"].iloc[0] == pytest.approx(s["r2"].mean())
    assert table["r2_sd"].iloc[0] == pytest.approx(s["r2"].std(ddof=1))


def test_day_scores_ensemble_mean_in_the_scored_space(rng):
    """An ensemble is scored by its members' mean in the scored space: the geometric mean for
    log10 scores, the arithmetic mean for physical ones (they differ for spread members)."""
    t = 10 ** rng.normal(-1, 0.3, (3, 7, 9))
    ens = t[:, None] * 10 ** rng.normal(0, 0.3, (3, 4, 7, 9))
    s = day_scores(_da(ens, member=True), _da(t))
    geo = day_scores(_da(10 ** np.log10(ens).mean(1)), _da(t))
    np.testing.assert_allclose(s.values, geo.values, rtol=1e-12)
    arith = day_scores(_da(ens.mean(1)), _da(t))
    assert not np.allclose(s["rmse"].values, arith["rmse"].values)
    phys = day_scores(_da(ens, member=True), _da(t), space="physical")
    np.testing.assert_allclose(phys.values, day_scores(_da(ens.mean(1)), _da(t), space="physical").values,
                               rtol=1e-12)


@pytest.mark.parametrize("max_km,bins", [(150, 10), (600, 24), (90, 7)])
def test_semivariogram_exact_equals_all_pairs(rng, max_km, bins):
    lat = 20 + 0.0625 * np.arange(21)
    lon = 40 + 0.0625 * np.arange(26)
    z = rng.random((21, 26))
    z[3, 4] = np.nan
    c, g, n = semivariogram(z, lat, lon, max_km=max_km, bins=bins)
    c2, g2, n2 = semivariogram_ref(z, lat, lon, max_km=max_km, bins=bins)
    np.testing.assert_allclose(g, g2, rtol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(n, n2)
    cr, gr, nr = semivariogram(z, lat, lon, max_km=max_km, bins=bins, method="random", n_pairs=200_000)
    ok = (nr > 2000)
    np.testing.assert_allclose(gr[ok], g2[ok], rtol=0.1)


def test_semivariogram_distances_are_great_circle():
    from fastds.metrics.spatial import great_circle_km
    assert great_circle_km(0, 0, 0, 1) == pytest.approx(111.195, rel=1e-4)
    assert great_circle_km(60, 10, 60, 11) == pytest.approx(111.195 * 0.5, rel=2e-3)


def test_acf_pacf_match_statsmodels(rng):
    series = np.cumsum(rng.normal(size=80)) * 0.05
    field = 10 ** (series[:, None, None] + 0.01 * rng.normal(size=(80, 4, 5)))
    a, p = acf_pacf(_da(field), nlags=30)
    s = np.log10(field).reshape(80, -1).mean(1)
    np.testing.assert_allclose(a, acf(s, nlags=30, fft=True))
    np.testing.assert_allclose(p, pacf(s, nlags=30, method="ywadjusted"))


def test_lag_curves_against_loop(rng):
    v = 10 ** rng.normal(-1, 0.3, (15, 6, 7))
    lc = lag_curves(_da(v), kmax=4)
    lv = np.log10(v)
    k = 3
    want = np.mean([np.sqrt(np.mean((lv[t] - lv[t - k]) ** 2)) for t in range(k, 15)])
    assert lc["rmse"][k - 1] == pytest.approx(want)
    want_r2 = np.mean([np.corrcoef(lv[t].ravel(), lv[t - k].ravel())[0, 1] ** 2 for t in range(k, 15)])
    assert lc["r2"][k - 1] == pytest.approx(want_r2)


def test_wasserstein_matches_scipy(rng):
    x, y = rng.random((3, 4, 4)), rng.random((3, 16, 16)) ** 2
    w = wasserstein_by_day(x, y, pd.date_range("2005-01-01", periods=3))
    assert w.iloc[1] == pytest.approx(wasserstein_distance(x[1].ravel(), y[1].ravel()))


def test_ensemble_scores(rng):
    truth = 10 ** rng.normal(-1, 0.3, (4, 5, 6))
    members = truth[:, None] * 10 ** rng.normal(0, 0.2, (4, 8, 5, 6))
    p, t = _da(members, member=True), _da(truth)
    c = crps(p, t)
    lp, lt = np.log10(members), np.log10(truth)
    # brute force CRPS: E|X-y| - 0.5 E|X-X'|
    brute = (np.abs(lp - lt[:, None]).mean(1) - 0.5 * np.abs(lp[:, :, None] - lp[:, None]).mean((1, 2))).mean((1, 2))
    np.testing.assert_allclose(c, brute, rtol=1e-10)
    h = rank_histogram(p, t)
    assert h.sum() == truth.size and len(h) == 9
    calibrated = 10 ** rng.normal(-1, 0.3, (50, 9, 5, 6))
    ss = spread_skill(_da(calibrated[:, 1:], member=True, times=pd.date_range("2005-01-01", periods=50)),
                      _da(calibrated[:, 0], times=pd.date_range("2005-01-01", periods=50)))
    assert 0.85 < ss < 1.15


def test_power_spectrum_peak():
    lat = 20 + 0.0625 * np.arange(64)
    lon = 40 + 0.0625 * np.arange(64)
    yy, xx = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    z = np.sin(2 * np.pi * 8 * xx / 64)
    k, P = power_spectrum(z, lat, lon)
    assert np.argmax(P) == 7  # radius 8 -> index 7 (radius 0 dropped)


def test_seam_statistic_finds_seams_and_ignores_smooth_fields():
    from fastds.metrics import seam_statistic
    from fastds.stitch import plan_patches
    H, W, tile, halo = 37, 45, 16, 3
    starts = plan_patches((H, W), tile, halo, 6)
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    smooth = 10 ** (0.1 * np.sin(yy / 5.0) + 0.1 * np.cos(xx / 7.0) - 1)
    assert seam_statistic(smooth, starts, tile=tile, halo=halo)[2] == pytest.approx(1.0, abs=0.1)
    # steps exactly on the kept-region borders: seams
    log = np.log10(smooth)
    for y0, x0 in starts:
        log[y0 + halo:, :] += 0.01
        log[:, x0 + tile - halo:] -= 0.01
    seam, inner, ratio = seam_statistic(10 ** log, starts, tile=tile, halo=halo)
    assert ratio > 2 and seam > inner
    # time stacks are averaged; a plan without inner borders is an error
    assert seam_statistic(np.stack([smooth, smooth]), starts, tile=tile, halo=halo)[2] == pytest.approx(
        seam_statistic(smooth, starts, tile=tile, halo=halo)[2])
    with pytest.raises(ValueError, match="no kept-region border"):
        seam_statistic(smooth[:16, :16], np.array([[0, 0]]), tile=16, halo=0)


def test_rollout_drift_sees_a_trend_without_truth():
    from fastds.report import rollout_drift
    rng = np.random.default_rng(0)
    ref_days = pd.date_range("2007-03-01", "2007-04-30")
    ref = xr.DataArray(10 ** (-1 + 0.3 * rng.standard_normal((len(ref_days), 12, 14))),
                       dims=("time", "lat", "lon"), coords={"time": ref_days})
    days = pd.date_range("2007-05-01", periods=20)
    grow = 0.3 * (1 + 0.05 * np.arange(20))[:, None, None]
    pred = xr.DataArray(10 ** (-1 + grow * rng.standard_normal((20, 12, 14))), dims=("time", "lat", "lon"),
                        coords={"time": days})
    d = rollout_drift(pred, "2007-04-30")
    assert list(d.index) == list(range(1, 21))
    assert np.polyfit(d.index, d["sd"], 1)[0] > 0.01
    # same month in the reference: May has none here, so z-scores need a May reference
    ref_may = ref.assign_coords(time=pd.date_range("2006-05-01", periods=len(ref_days)))
    z = rollout_drift(pred, "2007-04-30", reference=ref_may)
    assert z["sd_z"].iloc[-1] > 3 > abs(z["sd_z"].iloc[0])
    assert np.isnan(rollout_drift(pred, "2007-04-30", reference=ref)["sd_z"]).all()


def test_crps_of_antithetic_pairs_leaves_out_their_own_distances(rng):
    """Brute force: with ``pairs`` the spread term is (M-1)/M times the mean distance over
    members of different pairs. On pairs ± z around the truth's mean (N(0, 1) in log10) it
    has the expectation of M independent members' CRPS, 1.128 (1 - (M-1)/(2M)) = 0.635 at
    M = 8; scored as independent members the pairs read about 0.60."""
    T, M, H, W = 3, 8, 60, 60
    z = rng.normal(size=(T, M // 2, H, W))
    logp = np.stack([s * z[:, k] for k in range(M // 2) for s in (1, -1)], axis=1)
    logt = rng.normal(size=(T, H, W))
    p, t = _da(10 ** logp, member=True), _da(10 ** logt)
    got = crps(p, t, pairs=True)
    d = np.abs(logp[:, :, None] - logp[:, None])           # (T, M, M, H, W)
    cross = np.ones((M, M), bool)
    np.fill_diagonal(cross, False)
    for k in range(0, M, 2):
        cross[k, k + 1] = cross[k + 1, k] = False
    brute = (np.abs(logp - logt[:, None]).mean(1)
             - 0.5 * (M - 1) / M * d[:, cross].mean(1)).mean((1, 2))
    np.testing.assert_allclose(got, brute, rtol=1e-10)
    want = 2 / np.sqrt(np.pi) * (1 - (M - 1) / (2 * M))
    assert abs(got.mean() - want) < 0.01
    assert crps(p, t).mean() < want - 0.02
    with pytest.raises(ValueError, match="even number of members >= 4"):
        crps(p.isel(member=slice(0, 3)), t, pairs=True)
