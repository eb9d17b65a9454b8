"""Each library score equals a brute-force computation of its definition on a small case."""
import itertools

import numpy as np
import pytest

from fastds.metrics import proper

rng = np.random.default_rng(5)


def test_fair_crps_is_the_unbiased_pair_formula():
    M = 6
    ens, obs = rng.normal(size=(M, 4)), rng.normal(size=4)
    brute = [np.mean(np.abs(ens[:, j] - obs[j]))
             - sum(abs(a - b) for a, b in itertools.permutations(ens[:, j], 2)) / (2 * M * (M - 1))
             for j in range(4)]
    np.testing.assert_allclose(proper.fair_crps(ens, obs), brute, rtol=1e-12)


def test_one_member_scores_are_plain_distances():
    """A deterministic forecast: CRPS = MAE, energy score = Euclidean distance, twCRPS = the
    distance of the chained values (the fair estimators' M(M-1) would divide by zero)."""
    x, y = rng.normal(size=(1, 6)), rng.normal(size=6)
    np.testing.assert_allclose(proper.fair_crps(x, y), np.abs(x[0] - y))
    assert proper.energy_score(x, y) == pytest.approx(np.linalg.norm(x[0] - y))
    np.testing.assert_allclose(proper.tw_crps(x, y, 0.2), np.abs(np.maximum(x[0], 0.2) - np.maximum(y, 0.2)))


def test_fair_crps_matches_properscoring_in_the_large_ensemble_limit():
    properscoring = pytest.importorskip("properscoring")
    ens, obs = rng.normal(size=(4000, 3)), rng.normal(size=3)
    np.testing.assert_allclose(proper.fair_crps(ens, obs),
                               properscoring.crps_ensemble(obs, ens.T), rtol=2e-3)


def test_energy_score_brute_force():
    M, D = 5, 3
    ens, obs = rng.normal(size=(M, D)), rng.normal(size=D)
    brute = (np.mean([np.linalg.norm(e - obs) for e in ens])
             - sum(np.linalg.norm(a - b) for a, b in itertools.permutations(ens, 2)) / (2 * M * (M - 1)))
    assert proper.energy_score(ens, obs) == pytest.approx(brute, rel=1e-12)


def test_variogram_score_brute_force():
    M, D, p = 4, 5, 0.5
    ens, obs = rng.normal(size=(M, D)), rng.normal(size=D)
    brute = sum((abs(obs[i] - obs[j]) ** p - np.mean(np.abs(ens[:, i] - ens[:, j]) ** p)) ** 2
                for i in range(D) for j in range(D))
    assert proper.variogram_score(ens, obs, p=p) == pytest.approx(brute, rel=1e-10)


def test_tw_crps_is_the_fair_crps_of_chained_values():
    """twCRPS with weight 1{z > t} equals the CRPS of v(z) = max(z, t) (Allen et al. 2023)."""
    ens, obs, t = rng.normal(size=(7, 10)), rng.normal(size=10), 0.4
    np.testing.assert_allclose(proper.tw_crps(ens, obs, t),
                               proper.fair_crps(np.maximum(ens, t), np.maximum(obs, t)), rtol=1e-12)


def test_brier_and_fss_brute_force():
    ens, obs, t = rng.normal(size=(8, 12, 14)), rng.normal(size=(12, 14)), 0.8
    prob = (ens > t).mean(0)
    np.testing.assert_allclose(proper.brier(ens, obs, t), (prob - (obs > t)) ** 2)
    f, o, w = ens[0], obs, 3
    pad = w // 2

    def fractions(a):
        b = (a > t).astype(float)
        out = np.zeros_like(b)
        for y in range(b.shape[0]):
            for x in range(b.shape[1]):
                out[y, x] = b[max(0, y - pad):y + pad + 1, max(0, x - pad):x + pad + 1].sum() / (w * w)
        return out
    # scores' FSS without zero padding uses the windows that fit inside the field
    pf, po = fractions(f)[pad:-pad, pad:-pad], fractions(o)[pad:-pad, pad:-pad]
    brute = 1 - ((pf - po) ** 2).sum() / ((pf ** 2).sum() + (po ** 2).sum())
    assert proper.fss(f, o, t, w) == pytest.approx(brute, rel=1e-9)


def test_ensemble_fss_brute_force():
    """The ensemble FSS's forecast fraction is the members' mean neighbourhood fraction; one
    member gives that member's FSS, and members that straddle the truth's edge beat any one
    of them (no double penalty)."""
    ens, obs, t, w = rng.normal(size=(5, 11, 13)), rng.normal(size=(11, 13)), 0.6, 3
    pad = w // 2

    def fractions(b):
        return np.array([[b[y - pad:y + pad + 1, x - pad:x + pad + 1].mean()
                          for x in range(pad, b.shape[1] - pad)] for y in range(pad, b.shape[0] - pad)])
    pf = np.mean([fractions((e > t).astype(float)) for e in ens], axis=0)
    po = fractions((obs > t).astype(float))
    brute = 1 - ((pf - po) ** 2).sum() / ((pf ** 2).sum() + (po ** 2).sum())
    assert proper.fss_ensemble(ens, obs, t, w) == pytest.approx(brute, rel=1e-9)
    assert proper.fss_ensemble(ens[:1], obs, t, w) == pytest.approx(proper.fss(ens[0], obs, t, w), rel=1e-12)
    truth = np.zeros((20, 20))
    truth[:, 10:] = 1.0  # an edge at column 10; the two members put it at 8 and 12
    left, right = np.zeros_like(truth), np.zeros_like(truth)
    left[:, 8:], right[:, 12:] = 1.0, 1.0
    pair = np.stack([left, right])
    assert proper.fss_ensemble(pair, truth, 0.5, 3) > max(proper.fss(m, truth, 0.5, 3) for m in pair)
    scores = proper.day_scores_ensemble(ens, obs, thresholds={"q90": t}, pools=(1,), fss_window=w)
    assert scores["fss_ens_q90"] == pytest.approx(brute, rel=1e-9)
    assert scores["fss_q90"] == pytest.approx(proper.fss(ens[0], obs, t, w), rel=1e-12)


def test_pooling():
    f = rng.normal(size=(3, 9, 10))
    np.testing.assert_allclose(proper.pool(f, 4)[1, 1, 1], f[1, 4:8, 4:8].mean())
    assert proper.pool(f, 4).shape == (3, 2, 2)
    iy, ix = np.repeat(np.arange(3), 3), np.repeat(np.arange(2), 5)
    cells = proper.pool_cells(f, iy, ix)
    assert cells.shape == (3, 6)
    np.testing.assert_allclose(cells[2, 3], f[2, 3:6, 5:10].mean())


def test_spectrum_ratio_and_ralsd_see_texture():
    truth = rng.normal(size=(64, 64))
    from scipy.ndimage import gaussian_filter
    smooth = gaussian_filter(truth, 2)
    np.testing.assert_allclose(proper.power_spectrum_ratio(truth, truth), 1.0)
    assert proper.ralsd(truth, truth) == pytest.approx(0.0)
    r = proper.power_spectrum_ratio(smooth, truth)
    assert (r < 0.5).all() and r[-1] < r[0]  # the smoothed field lacks fine-scale power
    assert proper.ralsd(smooth, truth) > 10


def test_spread_error_by_bin_is_one_for_a_calibrated_heteroscedastic_ensemble():
    n, M = 20000, 20
    by = rng.uniform(size=n)
    sd = 0.2 + by  # error grows with the covariate
    centre = rng.normal(size=n)
    obs = centre + sd * rng.normal(size=n)
    ens = centre + sd * rng.normal(size=(M, n))
    np.testing.assert_allclose(proper.spread_error_by_bin(ens, obs, by), 1.0, atol=0.05)
    flat = centre + sd.mean() * rng.normal(size=(M, n))  # right on average, wrong per bin
    r = proper.spread_error_by_bin(flat, obs, by)
    assert r[0] > 1.3 and r[-1] < 0.8


def test_day_scores_ensemble_runs_and_is_proper_on_a_known_case():
    """A calibrated ensemble beats a too-narrow and a too-wide one on every proper score."""
    H, W, M = 24, 32, 8
    centre = rng.normal(size=(H, W))
    obs = centre + 0.3 * rng.normal(size=(H, W))
    th = {"q90": float(np.quantile(obs, 0.9))}
    res = {s: [proper.day_scores_ensemble(centre + s * rng.normal(size=(M, H, W)), obs,
                                          thresholds=th, pools=(1, 4)) for _ in range(6)]
           for s in (0.05, 0.3, 1.2)}
    mean = {s: {k: np.mean([r[k] for r in v]) for k in v[0]} for s, v in res.items()}
    for key in ("crps_fair", "energy_p1", "energy_p4", "twcrps_q90"):
        assert mean[0.3][key] < mean[0.05][key] and mean[0.3][key] < mean[1.2][key], key
    assert 0.8 < mean[0.3]["spread_skill"] < 1.2


def test_antithetic_pairs_are_scored_without_their_negative_correlation():
    """Members in ± pairs (``sample.antithetic``) around the true mean, unit spread, truth
    N(0, 1): the expected CRPS is 1/√π. Scored as pairs (fair scores on the even and the odd
    members, the pairs' spread form) the day's fair CRPS and spread/skill are unbiased; scored
    as independent members the pairs' widened mutual distances lower the fair CRPS by about
    6 % and the spread/skill reads 9/7's root instead of 1."""
    rng = np.random.default_rng(5)
    H = W = 200
    obs = rng.normal(size=(H, W))
    z = rng.normal(size=(4, H, W))
    ens = np.stack([s * z[k] for k in range(4) for s in (1, -1)])  # (8, H, W): pairs (0,1), (2,3), ...
    kw = dict(thresholds={"q90": float(np.quantile(obs, 0.9))}, pools=(1,))
    paired = proper.day_scores_ensemble(ens, obs, pairs=True, **kw)
    plain = proper.day_scores_ensemble(ens, obs, **kw)
    want = 1 / np.sqrt(np.pi)
    assert abs(paired["crps_fair"] - want) < 0.01
    assert plain["crps_fair"] < want - 0.025  # the bias the pairs hide (−0.034 expected)
    assert abs(paired["spread_skill"] - 1.0) < 0.02
    assert abs(plain["spread_skill"] - np.sqrt(9 / 7)) < 0.02
    # with independent members both forms are unbiased
    indep = rng.normal(size=(8, H, W))
    for pairs in (False, True):
        got = proper.day_scores_ensemble(indep, obs, pairs=pairs, **kw)
        assert abs(got["crps_fair"] - want) < 0.01 and abs(got["spread_skill"] - 1.0) < 0.03
    with pytest.raises(ValueError, match="even number of members >= 4"):
        proper.independent_sets(ens[:3], pairs=True)
