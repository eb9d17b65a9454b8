"""Null ensembles reproduce their target statistics, and sample like every other model."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

from fastds.sampling.nulls import NULLS, draw_null, fit_null_stats, grf_field, null_rng, radial_spectrum


def _textured(rng, n, shape, scale=4.0):
    """Fields with a red spectrum (smooth blobs of ~scale px) and sd 0.2."""
    ky, kx = np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :]
    filt = (1 + (np.sqrt(ky ** 2 + kx ** 2) * scale * 2 * np.pi) ** 2) ** -1.0
    out = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n,) + shape)) * filt).real
    return 0.2 * out / out.std() + 0.05  # bias 0.05


def test_each_null_reproduces_its_target_variance_and_spectrum():
    rng = np.random.default_rng(0)
    shape = (48, 56)
    stats = fit_null_stats(_textured(rng, 40, shape))
    assert stats.bias == pytest.approx(0.05, abs=0.01) and stats.sd == pytest.approx(0.2, rel=0.05)
    draws = {kind: np.stack([draw_null(kind, stats, shape, null_rng(1, m, 3, kind)) for m in range(60)])
             for kind in NULLS}
    for kind, d in draws.items():
        assert d.std() == pytest.approx(stats.sd, rel=0.05), kind
        assert abs(d.mean()) < 0.02, kind
    k, want = stats.k, stats.power
    band = (k > 0.03) & (k < 0.45)
    for kind in ("unet+grf", "unet+resample"):  # the residuals' texture
        _, got = radial_spectrum(draws[kind])
        ratio = got[band] / want[band]
        assert np.all((ratio > 0.6) & (ratio < 1.6)), (kind, ratio.round(2))
    _, flat = radial_spectrum(draws["unet+iid"])  # white: flat, unlike the residuals'
    assert flat[band].max() / flat[band].min() < 2 and want[band].max() / want[band].min() > 10


def test_nulls_keep_the_texture_of_fields_that_are_not_periodic():
    """Real residual fields do not wrap around: a rolled field has a seam where its edges
    meet, and a spectrum estimated without a taper counts the wrap's jump as fine-scale
    power. Both would make the nulls rougher than the residuals they imitate (on the plume
    twin 2.2-2.4x the residuals' power near Nyquist). On crops of a larger textured field,
    the draws' fine-scale power stays that of the fields themselves."""
    from fastds.metrics.proper import _radial_power  # the protocol's (Hann-tapered) spectrum

    def power(fields):
        return np.mean([_radial_power(f, 32)[1] for f in fields], axis=0)
    rng = np.random.default_rng(2)
    big = _textured(rng, 40, (96, 112), scale=6.0)
    fields = big[:, 20:68, 30:86]  # (48, 56) crops: not periodic
    stats = fit_null_stats(fields)
    k = _radial_power(fields[0], 32)[0]
    fine = k > 0.25
    want = power(fields)
    for kind in ("unet+grf", "unet+resample"):
        d = np.stack([draw_null(kind, stats, fields.shape[1:], null_rng(1, m, 3, kind)) for m in range(80)])
        ratio = power(d)[fine] / want[fine]
        assert np.all((ratio > 0.6) & (ratio < 1.5)), (kind, ratio.round(2))


def test_draws_are_a_pure_function_of_seed_member_and_day():
    rng = np.random.default_rng(1)
    stats = fit_null_stats(_textured(rng, 5, (16, 20)))
    for kind in NULLS:
        a = draw_null(kind, stats, (16, 20), null_rng(3, 1, 9, kind))
        b = draw_null(kind, stats, (16, 20), null_rng(3, 1, 9, kind))
        c = draw_null(kind, stats, (16, 20), null_rng(3, 2, 9, kind))
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)


def test_grf_field_sd_and_errors():
    k = np.linspace(0, 0.7, 10)
    f = grf_field((30, 40), k, np.exp(-10 * k), 0.3, np.random.default_rng(0))
    assert f.std() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="kind must be one of"):
        draw_null("unet+nothing", fit_null_stats(np.zeros((1, 4, 4)) + 1e-3), (4, 4), np.random.default_rng(0))


def test_null_models_sample_like_the_unet(trained_run, store_path):
    """A null ensemble is the U-Net's day (bias removed) plus one residual field per member:
    its members' mean in log10 tracks the U-Net's, its spread is the validation error's sd, and
    the null statistics are cached in the run."""
    from fastds.config import load_config
    from fastds.data.store import open_store
    from fastds.sampling.nulls import NullStats
    from fastds.sampling.pipeline import sample
    st = open_store(store_path)
    days = st.times[(st.ds["split"].values == 2) & st.times.month.isin([6, 7, 8])][:2]
    cfg = dataclasses.replace(load_config("tiny").sample, members=4, mode="lenient", consistency=False)
    unet = np.log10(sample(run=trained_run, start=days[0], end=days[-1], model="unet", cfg=cfg,
                           progress=False)["DUEXTTAU"].values)
    for kind in NULLS:
        got = np.log10(sample(run=trained_run, start=days[0], end=days[-1], model=kind, cfg=cfg,
                              progress=False)["DUEXTTAU"].values)
        assert got.shape == unet.shape
        cached = sorted((trained_run / "nulls").glob("season3_c0_*.npz"))
        assert cached, "the null statistics are cached in the run"
        stats = NullStats.load(cached[0])
        resid = got - (unet - stats.bias)
        assert resid.std() == pytest.approx(stats.sd, rel=0.15), kind
        assert not np.allclose(got[:, 0], got[:, 1]), "members differ"
        # antithetic pairs (the default, as the DDPM's): the odd member adds the negated field
        assert cfg.antithetic
        np.testing.assert_allclose(resid[:, 1], -resid[:, 0], atol=1e-4)
        np.testing.assert_allclose(resid[:, 3], -resid[:, 2], atol=1e-4)
        assert not np.allclose(resid[:, 2], resid[:, 0])
        # independent members: member 0 draws the same, member 1 a field of its own
        ind = np.log10(sample(run=trained_run, start=days[0], end=days[-1], model=kind,
                              cfg=dataclasses.replace(cfg, antithetic=False), progress=False)["DUEXTTAU"].values)
        np.testing.assert_allclose(ind[:, 0], got[:, 0], atol=1e-6)
        assert not np.allclose(ind[:, 1] - (unet[:, 1] - stats.bias), -resid[:, 0], atol=1e-3)


def test_spread_scale_scales_a_null_ensembles_noise_and_is_refused_where_nothing_spreads(
        tmp_path, trained_run, store_path):
    """``sample.spread_scale``: a null's members are the same U-Net day plus the same draws
    times the factor (strict rollouts: each member's lags its own, so the check is on one
    lenient day), also when the null's statistics are fitted in the same call (its U-Net
    runs unscaled); a model with no spread around a mean refuses the setting by name, and a
    factor that is not positive is refused."""
    import shutil
    from fastds.config import load_config
    from fastds.data.store import open_store
    from fastds.sampling.pipeline import sample
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("nulls"))
    st = open_store(store_path)
    day = st.times[(st.ds["split"].values == 2) & st.times.month.isin([6, 7, 8])][0]
    cfg = dataclasses.replace(load_config("tiny").sample, members=2, mode="lenient", consistency=False)
    unet = np.log10(sample(run=run, start=day, end=day, model="unet", cfg=cfg,
                           progress=False)["DUEXTTAU"].values)
    half, one = (np.log10(sample(run=run, start=day, end=day, model="unet+grf",
                                 cfg=dataclasses.replace(cfg, spread_scale=f), progress=False)["DUEXTTAU"].values)
                 for f in (0.5, 1.0))  # 0.5 first: its call fits and caches the statistics
    assert np.abs(one - half).max() > 1e-3
    centre = one.mean(1, keepdims=True)  # an antithetic pair's mean: the U-Net less its bias
    np.testing.assert_allclose(half.mean(1, keepdims=True), centre, atol=2e-5)
    np.testing.assert_allclose(half - centre, 0.5 * (one - centre), atol=2e-5)
    np.testing.assert_allclose(centre, unet.mean(1, keepdims=True) - (unet - centre).mean(), atol=2e-5)
    with pytest.raises(ValueError, match="spread_scale.*unet has none"):
        sample(run=run, start=day, end=day, model="unet", progress=False,
               cfg=dataclasses.replace(cfg, spread_scale=0.5))
    with pytest.raises(ValueError, match="spread_scale must be a positive number"):
        sample(run=run, start=day, end=day, model="unet+iid", progress=False,
               cfg=dataclasses.replace(cfg, spread_scale=0.0))


def test_scan_factors_finds_the_factor_that_makes_an_ensemble_calibrated(rng):
    """The fair CRPS of mean + f·spread is lowest where the members' spread equals the
    error's: draws 1/1.3 too narrow give a factor near 1.3 and spread/skill near 1 there."""
    from fastds.sampling.spread import INFLATIONS, scan_factors
    sd = 0.2
    days = [(0, np.zeros((8, 24, 24)), (0.0, rng.normal(0, sd / 1.3, (8, 24, 24))), rng.normal(0, sd, (24, 24)))
            for _ in range(30)]
    scores, ratios = scan_factors(days, lambda c, z: z)
    assert len(scores) == len(ratios) == len(INFLATIONS)
    k = int(np.argmin(scores))
    assert abs(INFLATIONS[k] - 1.3) <= 0.1
    assert 0.9 < ratios[k] < 1.1
    one = int(np.argmin(np.abs(INFLATIONS - 1.0)))
    assert 0.7 < ratios[one] < 0.85  # 1 / 1.3, sampled
    assert scores[one] > scores[k]


def test_null_spread_rollouts_fits_a_factor_on_validation_rollouts_and_scales_the_draws(
        tmp_path, trained_run, store_path, monkeypatch):
    """``sample.null_spread = "rollouts"``: one factor per season, picked by the fair CRPS
    of the null's strict rollouts over the season's validation days (the pick is the
    argmin of its own curve, the days are validation days), cached in the run and read back
    without rolling out again; a day sampled with it equals the same null at
    ``spread_scale`` = that factor. Other models and unknown values are refused by name."""
    import json
    import shutil
    from fastds.config import load_config
    from fastds.data.store import open_store
    from fastds.sampling import pipeline
    from fastds.sampling.pipeline import null_factor, sample
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("nulls"))
    st = open_store(store_path)
    cfg = dataclasses.replace(load_config("tiny").sample, consistency=False)
    fit = null_factor(run, st, 3, "unet+grf", cfg)
    assert fit["days"] > 0 and fit["members"] == 8
    assert fit["factor"] == fit["factors"][int(np.argmin(fit["crps_fair"]))]
    val = set(st.times[(st.ds["split"].values == 1) & st.times.month.isin([6, 7, 8])])
    for first, last in fit["blocks"]:
        assert pd.Timestamp(first) in val and pd.Timestamp(last) in val
    cached = list((run / "nulls").glob("factor_unet-grf_season3_*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["factor"] == fit["factor"]
    monkeypatch.setattr(pipeline.Rollout, "run", lambda *a, **k: pytest.fail("the cached factor was fitted again"))
    assert null_factor(run, st, 3, "unet+grf", cfg) == fit
    monkeypatch.undo()
    # a setting that changes the U-Net's days (its halo, its lag inputs) is not served another's cache
    before = set((run / "nulls").iterdir())
    pipeline.null_stats(run, st, 3, dataclasses.replace(cfg, halo=2))
    assert len(set((run / "nulls").iterdir()) - before) == 1

    day = st.times[(st.ds["split"].values == 2) & st.times.month.isin([6, 7, 8])][0]
    lenient = dataclasses.replace(cfg, members=2, mode="lenient")
    fitted = sample(run=run, start=day, end=day, model="unet+grf", progress=False,
                    cfg=dataclasses.replace(lenient, null_spread="rollouts"))
    by_hand = sample(run=run, start=day, end=day, model="unet+grf", progress=False,
                     cfg=dataclasses.replace(lenient, spread_scale=fit["factor"]))
    np.testing.assert_allclose(np.log10(fitted["DUEXTTAU"].values), np.log10(by_hand["DUEXTTAU"].values), atol=1e-5)
    assert fitted.attrs["null_spread"] == "rollouts" and "null_spread" not in by_hand.attrs
    with pytest.raises(ValueError, match="null_spread='rollouts' sets a null ensemble's noise; unet is none"):
        sample(run=run, start=day, end=day, model="unet", progress=False,
               cfg=dataclasses.replace(lenient, null_spread="rollouts"))
    with pytest.raises(ValueError, match="null_spread must be one of validation, rollouts"):
        sample(run=run, start=day, end=day, model="unet+iid", progress=False,
               cfg=dataclasses.replace(lenient, null_spread="fit"))


def test_null_without_a_unet_says_which_command(tmp_path, trained_run):
    import shutil
    from fastds.config import load_config
    from fastds.sampling.pipeline import sample
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for f in run.rglob("*unet*"):
        if f.is_file():
            f.unlink()
    cfg = dataclasses.replace(load_config("tiny").sample, mode="lenient")
    with pytest.raises(FileNotFoundError, match="fastds train --model unet"):
        sample(run=run, start="2005-07-20", end="2005-07-20", model="unet+grf", cfg=cfg, progress=False)
