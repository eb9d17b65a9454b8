"""Exposure-robust training (issue 10): pushforward lag windows, conditioning dropout,
checkpoint selection by a strict-rollout score, and the sampler options that use them."""
import dataclasses

import numpy as np
import pytest
import torch

from fastds.data.datasets import FinePatches
from fastds.data.store import open_store, prepare
from fastds.models.conditional import build_model
from fastds.training.loop import FitSettings, fit, load_checkpoint

KW = dict(season=3, split="train", tile=16, stride=8, t_lag=6, space="residual",
          covariates="bounded")


@pytest.fixture(scope="module")
def blocked_store(twin_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("blocked") / "s.zarr"
    return open_store(prepare(out=out, coarse=twin_files / "coarse_daily.nc",
                              fine=twin_files / "fine_daily.nc", region="24.0,28.0,44.0,49.0",
                              block=10))


def test_augmentation_off_items_are_todays(blocked_store):
    """pushforward = cond_dropout = 0: the lags are the true fine days, untouched, drop off."""
    fp = FinePatches(blocked_store, **KW)
    for i in (0, 7, len(fp) - 1):
        item = fp[i]
        d = int(item["day"])
        y0, x0 = (int(v) for v in item["start"])
        want = fp.y[d - 6:d, y0:y0 + 16, x0:x0 + 16]
        np.testing.assert_array_equal(item["lags"].numpy(), want)
        assert not bool(item["drop"])


def test_pushforward_replaces_trailing_lag_days(blocked_store):
    fp = FinePatches(blocked_store, pushforward=1.0, seed=3, **KW)
    seen = set()
    for i in range(0, len(fp), max(1, len(fp) // 40)):
        item = fp[i]
        L, drop = fp.lag_sources(i)
        assert 1 <= L <= 6 and not drop
        seen.add(L)
        d = int(item["day"])
        y0, x0 = (int(v) for v in item["start"])
        win = (slice(y0, y0 + 16), slice(x0, x0 + 16))
        lags = item["lags"].numpy()
        np.testing.assert_array_equal(lags[:6 - L], fp.y[d - 6:d - L][(slice(None),) + win])
        for j, e in enumerate(range(d - L, d)):
            np.testing.assert_allclose(lags[6 - L + j], fp.surrogate_at(e, win), rtol=0, atol=1e-6)
    assert len(seen) >= 4  # leads drawn over the whole window
    # seeded per (seed, epoch, item): the same item again is the same, another epoch is not all the same
    a = fp.lag_sources(5)
    assert fp.lag_sources(5) == a
    draws = []
    for ep in range(6):
        fp.set_epoch(ep)
        draws.append(fp.lag_sources(5))
    assert len(set(draws)) > 1


def test_pushforward_batches_never_contain_test_days(blocked_store):
    """Neither a training item's truth (target and true lags) nor any prediction standing in
    its lag window was made from a test day."""
    sp = blocked_store.ds["split"].values
    assert (sp[season_days(blocked_store)] == 2).sum() >= 5
    fp = FinePatches(blocked_store, pushforward=0.7, **KW)
    allowed = fp.alt_allowed()
    alt = np.zeros((len(fp.times),) + tuple(fp.shape), np.float32)
    fp.set_alternative(alt, allowed)
    used_alt = 0
    for i in range(len(fp)):
        true, pushed = fp.source_days(i)
        assert not (sp[true] == 2).any()
        for e in pushed:  # the prediction of e read e's own lag window
            assert not (sp[e - 6:e] == 2).any()
        used_alt += len(pushed)
    assert used_alt > 0
    bad = np.zeros(len(fp.times), bool)
    test_day = int(np.flatnonzero(sp == 2)[-1])
    bad[test_day + 1] = True  # its window holds the test day
    with pytest.raises(ValueError, match="test day"):
        fp.set_alternative(alt, bad)
    with pytest.raises(ValueError, match="probability"):
        FinePatches(blocked_store, pushforward=1.5, **KW)


def season_days(store):
    from fastds.data.regions import season_of
    return np.flatnonzero(season_of(store.times.month) == 3)


def test_prediction_error_sd_matches_brute_force(blocked_store):
    """The lag-noise size: the sd of (prediction - truth) over the set's target days, from the
    anchor surrogate μ, or from ``alt`` on the days it holds."""
    fp = FinePatches(blocked_store, pushforward=1.0, **KW)
    full = (slice(None), slice(None))
    days = np.unique(fp.days)
    d = np.concatenate([(fp.surrogate_at(e, full) - fp.y[e]).ravel() for e in days])
    np.testing.assert_allclose(fp.prediction_error_sd(), d[np.isfinite(d)].std(), rtol=1e-6)
    ok = fp.alt_allowed() & (np.arange(len(fp.times)) % 2 == 0)
    g = np.random.default_rng(0)
    alt = np.where(ok[:, None, None], fp.y + 0.05 * g.standard_normal(fp.y.shape), 0).astype(np.float32)
    fp.set_alternative(alt, ok)
    d = np.concatenate([((alt[e] if ok[e] else fp.surrogate_at(e, full)) - fp.y[e]).ravel() for e in days])
    np.testing.assert_allclose(fp.prediction_error_sd(), d[np.isfinite(d)].std(), rtol=1e-6)
    assert ok[days].any() and (~ok[days]).any()


def test_cond_dropout_zeroes_the_lag_information_only():
    torch.manual_seed(0)
    m = build_model("unet", widths=(8, 16, 16), t_lag=6, transfer_widths=(8, 16, 16),
                    n_covariates=7, target="residual", lag_channels=2)
    coarse, cov, lags = torch.rand(3, 1, 16, 16), torch.rand(3, 7, 16, 16), torch.rand(3, 6, 16, 16)
    full = m.cond(coarse, cov, lags)
    torch.testing.assert_close(m.cond(coarse, cov, lags, torch.zeros(3, dtype=torch.bool)), full)
    some = m.cond(coarse, cov, lags, torch.tensor([False, True, False]))
    torch.testing.assert_close(some[[0, 2]], full[[0, 2]])
    torch.testing.assert_close(some[1, :8], full[1, :8])  # coarse + covariates kept
    assert torch.count_nonzero(some[1, 8:]) == 0
    assert torch.count_nonzero(full[1, 8:]) > 0


def test_cond_dropout_flags_items(blocked_store):
    fp = FinePatches(blocked_store, cond_dropout=0.4, **KW)
    flags = [bool(fp[i]["drop"]) for i in range(0, len(fp), 3)]
    assert 0.2 < np.mean(flags) < 0.6
    assert all(fp.lag_sources(i)[0] == 0 for i in range(20))  # no pushforward asked


def test_fit_keeps_the_checkpoint_with_the_best_selection_score(tmp_path):
    """select(model) (e.g. minus a rollout R²) picks the best checkpoint, not the val loss."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [2.0], [0.5], [-1.0]])
    data = list(zip(x, y))
    scores = iter([3.0, 1.0, 2.0, 5.0])
    calls = []

    def select(m):
        calls.append(m.weight.detach().clone())
        return next(scores)

    def loss(m, b, g):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    fit(model, loss, data, data, settings=FitSettings(lr=0.05, batch=16, epochs=4, early_stop=10),
        ckpt_path=tmp_path / "m.pt", progress=False, select=select)
    best = load_checkpoint(tmp_path / "m.best.pt")
    assert best["epoch"] == 2
    torch.testing.assert_close(best["model"]["weight"], calls[1])
    hist = load_checkpoint(tmp_path / "m.pt")["loop"]["history"]
    assert [h["select"] for h in hist] == [3.0, 1.0, 2.0, 5.0]


def test_early_stopping_counts_epochs_without_a_better_selection_score(tmp_path):
    """With ``select``, patience counts epochs whose score did not beat the best (the
    checkpoint could not change), however the validation loss moves; without it, the loss."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = list(zip(x, x @ torch.tensor([[1.0], [2.0], [0.5], [-1.0]])))

    def loss(m, b, g):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    scores = iter([1.0, 2.0, 3.0, 0.5, 0.4])
    model = torch.nn.Linear(4, 1)
    fit(model, loss, data, data, settings=FitSettings(lr=0.05, batch=16, epochs=5, early_stop=2),
        ckpt_path=tmp_path / "m.pt", progress=False, select=lambda m: next(scores))
    hist = load_checkpoint(tmp_path / "m.pt")["loop"]["history"]
    assert [h["select"] for h in hist] == [1.0, 2.0, 3.0]  # stopped after two worse scores
    assert hist[2]["val_loss"] < hist[0]["val_loss"]  # while the loss still fell
    assert load_checkpoint(tmp_path / "m.best.pt")["epoch"] == 1
    # a NaN score (no rollout blocks) leaves patience to the validation loss
    model = torch.nn.Linear(4, 1)
    fit(model, loss, data, data, settings=FitSettings(lr=0.05, batch=16, epochs=3, early_stop=1),
        ckpt_path=tmp_path / "n.pt", progress=False, select=lambda m: float("nan"))
    assert len(load_checkpoint(tmp_path / "n.pt")["loop"]["history"]) == 3  # the loss fell every epoch


def test_rollout_selection_and_pushforward_train_end_to_end(store_path, tiny_config, trained_run, tmp_path):
    """A U-Net trained with anchor pushforward, conditioning dropout and rollout selection,
    then a DDPM with U-Net pushforward; the fallback sampler refuses a model without dropout."""
    import shutil

    from fastds.sampling.pipeline import sample
    from fastds.training.stages import rollout_score, train
    run = tmp_path / "run"
    (run / "season3").mkdir(parents=True)
    for f in ("run.json", "config.toml"):
        shutil.copy(trained_run / f, run / f)
    for f in (trained_run / "season3").glob("pretrain*"):
        shutil.copy(f, run / "season3" / f.name)
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(
        tiny_config.train, epochs=2, pushforward=0.5, cond_dropout=0.2, select="rollout"))
    train(data=store_path, run=run, config=cfg, model="unet", progress=False)
    log = load_checkpoint(run / "season3" / "unet.pt")["loop"]["history"]
    assert all(np.isfinite(h["select"]) and -1.0 <= h["select"] <= 0.0 for h in log)
    best = load_checkpoint(run / "season3" / "unet.best.pt")
    assert best["epoch"] == 1 + int(np.argmin([h["select"] for h in log]))
    st = open_store(store_path)
    days = st.times[st.times.month.isin([6, 7])][10:14]
    c = dataclasses.replace(cfg.sample, sampler="ddim", steps=4, stride=8, batch=256)
    fb = sample(run=run, start=days[0], end=days[-1], model="unet", progress=False,
                cfg=dataclasses.replace(c, mode="lenient", lag_conditioning=False))
    full = sample(run=run, start=days[0], end=days[-1], model="unet", progress=False,
                  cfg=dataclasses.replace(c, mode="lenient"))
    assert np.isfinite(fb["DUEXTTAU"].values).all()
    assert not np.allclose(fb["DUEXTTAU"].values, full["DUEXTTAU"].values)
    with pytest.raises(ValueError, match="cond_dropout"):
        sample(run=trained_run, start=days[0], end=days[0], model="unet", progress=False,
               cfg=dataclasses.replace(c, lag_conditioning=False))
    # the DDPM over the new U-Net, its lag windows partly from that U-Net's predictions
    # and lag noise sized from that U-Net's one-day errors
    dcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, select="loss",
                                                              pushforward_source="unet",
                                                              lag_noise_scale=0.5,
                                                              calibration_rollouts=1,
                                                              state_rollouts=1))
    train(data=store_path, run=run, config=dcfg, model="ddpm", progress=False)
    assert (run / "season3" / "ddpm.best.pt").exists()
    best = load_checkpoint(run / "season3" / "ddpm.best.pt")
    assert 0.0 < best["lag_noise"] < 0.5 and load_checkpoint(run / "season3" / "unet.best.pt")["lag_noise"] == 0.0
    # the spread calibration written after training: the validation fair-CRPS minimiser, with
    # the sampler that ships (its fusion, steps and projection), and the raw spread/skill
    from fastds.training.stages import calibration_sampler
    cal = best["calibration"]
    assert cal["inflation"] == cal["inflations"][int(np.argmin(cal["crps_fair"]))]
    # spread/skill rises with α up to 1 (beyond, a wider ensemble's mean also errs more)
    up_to_1 = cal["inflations"].index(1.0) + 1
    assert len(cal["spread_skill"]) == len(cal["inflations"]) and np.all(np.diff(cal["spread_skill"][:up_to_1]) > 0)
    assert len(cal["crps_fair"]) == len(cal["inflations"]) and np.isfinite(cal["crps_fair"]).all()
    assert len(cal["days"]) > 0 and len(set(cal["crps_fair"])) > 1
    assert cal["raw_spread_skill"] == cal["spread_skill"][cal["inflations"].index(1.0)]
    assert cal["sampler"] == {"fusion": dcfg.sample.fusion, "sampler": dcfg.sample.sampler,
                              "steps": dcfg.sample.steps, "spacing": dcfg.sample.spacing,
                              "projection": dcfg.sample.consistency}
    # the per-band gains: one per band, positive, the CRPS-picked factor folded into the saved ones
    from fastds.sampling.spread import BAND_SIGMAS
    gains = np.asarray(cal["band_gains"])
    assert gains.shape == (len(BAND_SIGMAS) + 1,) and (gains > 0).all() and np.isfinite(gains).all()
    assert cal["band_factor"] == cal["inflations"][int(np.argmin(cal["crps_fair_bands"]))]
    # the gains fitted after the projection (sample.calibrate_to="bands", the default), within
    # their limits before the rollout factor below
    from fastds.training.stages import FINAL_BAND_LIMITS
    final = np.asarray(cal["final_band_gains"]) / cal["rollout_factor"]
    assert final.shape == gains.shape and len(cal["final_band_spread_skill"]) == len(final)
    assert ((final >= FINAL_BAND_LIMITS[0] - 1e-9) & (final <= FINAL_BAND_LIMITS[1] + 1e-9)).all()
    # refined by strict rollouts over validation blocks: one factor on both widenings
    f = cal["rollout_factor"]
    assert cal["rollout_days"] > 0 and f == cal["inflations"][int(np.argmin(cal["rollout_crps_fair"]))]
    np.testing.assert_allclose(best["ema"]["regression_bands"].numpy(), f * cal["band_factor"] * gains, rtol=1e-5)
    # and the coarse-state gains' shape refit on rollouts: one factor per node, the gains within
    # their limits
    assert cal["state_rollout_days"] > 0 and len(cal["state_rollout_factors"]) == len(cal["state_nodes"])
    assert len(cal["state_gains"]) == len(cal["state_nodes"]) and np.isfinite(cal["state_rollout_spread_skill"]).all()
    assert all(FINAL_BAND_LIMITS[0] <= g <= FINAL_BAND_LIMITS[1] for g in cal["state_gains"])
    # calibration samples exactly as `sample` does with the run's settings: only the member
    # count, α itself, true lags and the eager loop may differ (fails if the two drift apart)
    shipped = calibration_sampler(dcfg)
    # calibrate: widening off; spread_scale: the user's factor on what the calibration fits
    own = {"members", "calibrate", "mode", "cuda_graphs", "segments", "spread_scale"}
    drift = [f.name for f in dataclasses.fields(shipped)
             if f.name not in own and getattr(shipped, f.name) != getattr(dcfg.sample, f.name)]
    assert not drift, drift
    for key in ("model", "ema"):
        assert float(best[key]["regression_inflation"]) == pytest.approx(f * cal["inflation"])
    from fastds.training.stages import load_trained
    assert float(load_trained(run, 3)[0].regression_inflation) == pytest.approx(f * cal["inflation"])
    with pytest.raises(ValueError, match="applies to ddpm/vae"):
        train(data=store_path, run=tmp_path / "other", config=dcfg, model="unet", progress=False)
    # the score itself: a perfect model (the truth as its prediction) would score 1; ours is a
    # fraction of that, and the same weights score the same
    from fastds.training.stages import fine_days, load_trained
    unet, conf = load_trained(run, 3, "unet")
    fd = fine_days(st, conf, 3, anchor=unet.anchor)
    val = FinePatches(st, season=3, split="val", tile=16, stride=8, t_lag=conf.data.t_lag).days
    a = rollout_score(unet, fd, val, conf)
    assert 0.0 < a < 1.0 and a == rollout_score(unet, fd, val, conf)


def test_lag_history_mean_shares_one_history(trained_run):
    """Strict rollout with members: day 1 reads only true lags (same either way); later days
    differ between a per-member history and the shared ensemble-mean history."""
    from fastds.sampling.pipeline import sample
    st_days = ("2005-08-25", "2005-08-27")  # the three days after the fine record
    c = dataclasses.replace(load_cfg(trained_run).sample, sampler="ddim", steps=4, stride=8,
                            batch=256, members=2, mode="strict")
    own = sample(run=trained_run, start=st_days[0], end=st_days[1], model="ddpm", progress=False,
                 cfg=c)["DUEXTTAU"].values
    shared = sample(run=trained_run, start=st_days[0], end=st_days[1], model="ddpm", progress=False,
                    cfg=dataclasses.replace(c, lag_history="mean"))["DUEXTTAU"].values
    np.testing.assert_array_equal(own[0], shared[0])
    assert not np.allclose(own[1:], shared[1:])
    with pytest.raises(ValueError, match="lag_history"):
        sample(run=trained_run, start=st_days[0], end=st_days[0], model="ddpm", progress=False,
               cfg=dataclasses.replace(c, lag_history="both"))


def load_cfg(run):
    from fastds.config import config_from_toml
    return config_from_toml((run / "config.toml").read_text())
