import dataclasses
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from fastds.config import SampleConfig
from fastds.data.store import open_store
from fastds.sampling.graphs import StaticSampler
from fastds.sampling.pipeline import DayInputs, downscale_day, sample
from fastds.sampling.samplers import make_plan, run_plan
from fastds.stitch import plan_patches
from fastds.training.stages import load_trained

from conftest import TRITON_DEVICE, requires_cuda, requires_triton, requires_triton_run, run_aot

# fp32: several tests compare with a reference computed in fp32 (precision="auto" would
# sample in bf16 on a CPU that has it)
FAST = SampleConfig(sampler="ddim", steps=10, tile=16, halo=4, stride=8, batch=256, precision="fp32")


def _r2_per_day(pred, truth):
    out = []
    for d in pred.time.values:
        a = np.log10(pred.sel(time=d).values).ravel()
        b = np.log10(truth.sel(time=d).values).ravel()
        out.append(np.corrcoef(a, b)[0, 1] ** 2)
    return np.array(out)


@pytest.fixture(scope="module")
def test_days(store_path):
    st = open_store(store_path)
    sel = (st.ds["split"].values == 2) & st.times.month.isin([6, 7, 8]) & (st.times > st.times[10])
    return st.times[sel][:6]


def test_tiny_ddpm_ensemble_beats_interpolation(trained_run, twin_files, test_days):
    """A proper score: the DDPM ensemble's CRPS against interpolation's MAE (the CRPS of a
    deterministic forecast), on the same held-out days."""
    from fastds.metrics import crps
    truth = xr.open_dataset(twin_files / "fine_truth.nc")["DUEXTTAU"].load()
    cfg = dataclasses.replace(FAST, mode="lenient", members=4)
    ddpm = xr.concat([sample(run=trained_run, start=d, end=d, cfg=cfg, progress=False)["DUEXTTAU"]
                      for d in test_days], "time")
    interp = sample(run=trained_run, start=test_days[0], end=test_days[-1], model="interp",
                    cfg=FAST, progress=False)["DUEXTTAU"].sel(time=test_days)
    t = np.log10(truth.sel(time=test_days).values)
    mae_interp = np.abs(np.log10(interp.values) - t).mean()
    c = crps(ddpm, truth).mean()
    r_mean, r_interp = _r2_per_day(ddpm.mean("member"), truth).mean(), _r2_per_day(interp, truth).mean()
    print(f"held-out twin days: DDPM CRPS {c:.3f} vs interpolation MAE {mae_interp:.3f}; R² of the "
          f"4-member mean {r_mean:.3f}, interpolation {r_interp:.3f}")
    assert c < mae_interp


def _day_inputs(trained_run, store_path, day, t_lag):
    from fastds.training.stages import fine_days
    model, conf = load_trained(trained_run, 3)
    fd = fine_days(open_store(store_path), conf, 3, anchor=model.anchor)
    d = fd.index_of(day)
    return DayInputs(fd.coarse_on_fine(d), fd.covariates(d), fd.y[d - t_lag:d][None])


def test_stitched_equals_single_patch(trained_run, store_path, test_days, tiny_config):
    """Where one patch covers the image, patching + stitching changes nothing."""
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    sub = DayInputs(inp.coarse[:, :24, :24], inp.covariates[:, :24, :24], inp.lags[..., :24, :24])
    # "crps": the saved α itself (the default moves the common factor to spread/skill 1)
    cfg = dataclasses.replace(FAST, tile=24, stride=8, calibrate_bands=False, calibrate_to="crps")
    got = downscale_day(model, sub, cfg=cfg, T=conf.diffusion.T, prediction=conf.diffusion.prediction,
                        seed=4)
    # the same computation written out for one whole-image patch: the U-Net mean plus the
    # scaled residual sample (CorrDiff), widened by the calibration saved with the model
    x_T = torch.randn((1, 1, 24, 24), generator=torch.Generator().manual_seed(4 * 1_000_003))
    args = (torch.from_numpy(sub.coarse[None]), torch.from_numpy(sub.covariates[None]),
            torch.from_numpy(sub.lags))
    plan = make_plan("ddim", T=conf.diffusion.T, steps=10, prediction=conf.diffusion.prediction)
    x0 = run_plan(model, x_T, plan, cond=model.cond(*args))
    width = model.regression_scale * model.regression_inflation
    want = (model.regression_mean(*args) + width * x0)[0, 0].numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
    uncal = downscale_day(model, sub, cfg=dataclasses.replace(cfg, calibrate=False), T=conf.diffusion.T,
                          prediction=conf.diffusion.prediction, seed=4)
    want0 = (model.regression_mean(*args) + model.regression_scale * x0)[0, 0].numpy()
    np.testing.assert_allclose(uncal[0], want0, rtol=1e-5, atol=1e-6)
    # sample.spread_scale: the residual times the user's factor, around the same mean
    half = downscale_day(model, sub, cfg=dataclasses.replace(cfg, calibrate=False, spread_scale=0.5),
                         T=conf.diffusion.T, prediction=conf.diffusion.prediction, seed=4)
    want_h = (model.regression_mean(*args) + 0.5 * model.regression_scale * x0)[0, 0].numpy()
    np.testing.assert_allclose(half[0], want_h, rtol=1e-5, atol=1e-6)
    unet, _ = load_trained(trained_run, 3, "unet")
    with pytest.raises(ValueError, match="spread_scale=0.5 scales an ensemble's spread"):
        downscale_day(unet, sub, kind="unet", cfg=dataclasses.replace(cfg, spread_scale=0.5),
                      T=conf.diffusion.T, prediction=conf.diffusion.prediction, seed=4)
    # per-band widening (the default): the residual's bands each scaled by the saved gains
    from fastds.sampling.spread import filter_bands
    gains = model.regression_bands.double().numpy()
    from fastds.sampling.spread import BAND_SIGMAS
    assert gains.shape == (len(BAND_SIGMAS) + 1,)
    banded = downscale_day(model, sub, cfg=dataclasses.replace(cfg, calibrate_bands=True),
                           T=conf.diffusion.T, prediction=conf.diffusion.prediction, seed=4)
    res = (model.regression_scale * x0)[0, 0].numpy()
    want_b = model.regression_mean(*args)[0, 0].numpy() + filter_bands(res[None], gains)[0]
    np.testing.assert_allclose(banded[0], want_b, rtol=1e-5, atol=1e-5)


def test_mean_stride_changes_only_the_mean(trained_run, store_path, test_days):
    """``sample.mean_stride``: the CorrDiff mean on its own (sparser) patch geometry; the
    residual is the same draw, the mean is the U-Net's on those patches, and the default
    (0) is the sampler's own stride, bit for bit."""
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    kw = dict(T=conf.diffusion.T, prediction=conf.diffusion.prediction, seed=4, members=2, parts=True)
    m0, r0 = downscale_day(model, inp, cfg=FAST, **kw)
    m1, r1 = downscale_day(model, inp, cfg=dataclasses.replace(FAST, mean_stride=FAST.stride), **kw)
    np.testing.assert_array_equal(m0, m1)
    m8, r8 = downscale_day(model, inp, cfg=dataclasses.replace(FAST, mean_stride=8 if FAST.stride != 8 else 4), **kw)
    np.testing.assert_array_equal(r0, r8)
    assert not np.array_equal(m0, m8)
    unet = downscale_day(model.regression, inp, kind="unet",
                         cfg=dataclasses.replace(FAST, stride=8 if FAST.stride != 8 else 4))[0]
    np.testing.assert_array_equal(m8[0], unet)
    with pytest.raises(ValueError, match="parts=True"):
        downscale_day(model.regression, inp, kind="unet", cfg=FAST, parts=True)


@pytest.mark.parametrize("mean", ["same", "every other patch"])
def test_shared_conditioning_computes_the_mean_from_the_samplers_conditioning(
        trained_run, store_path, test_days, monkeypatch, mean):
    """Mean on the residual's geometry (or on every other residual patch, kept whole:
    ``mean_stride`` twice the stride, ``mean_halo`` 0), regression with the DDPM's transfer
    weights (as training leaves them: both Stage A's): each member's transfer features are
    computed once and the mean comes from the step-fused sampler's own conditioning, equal
    bit for bit to the mean computed apart; with other transfer weights the mean is
    computed apart."""
    import copy

    import fastds.models.transfer as transfer_mod
    model, conf = load_trained(trained_run, 3)
    assert model.shares_conditioning()
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    rng = np.random.default_rng(0)
    own = DayInputs(inp.coarse, inp.covariates,
                    np.concatenate([inp.lags, inp.lags + 0.05 * rng.standard_normal(inp.lags.shape).astype(np.float32)]))
    cfg = dataclasses.replace(FAST, fusion="step", mean_stride=0) if mean == "same" else \
        dataclasses.replace(FAST, fusion="step", mean_stride=2 * FAST.stride, mean_halo=0)
    kw = dict(T=conf.diffusion.T, prediction=conf.diffusion.prediction, seed=4, members=2, parts=True)
    calls = []
    forward = transfer_mod.TransferEncoder.forward
    monkeypatch.setattr(transfer_mod.TransferEncoder, "forward",
                        lambda self, lags: calls.append(self) or forward(self, lags))
    m_shared, r_shared = downscale_day(model, own, cfg=cfg, **kw)
    assert calls and all(c is model.transfer for c in calls)  # the regression's never ran
    calls.clear()
    monkeypatch.setattr(type(model), "shares_conditioning", lambda self: False)
    m_apart, r_apart = downscale_day(model, own, cfg=cfg, **kw)
    assert any(c is model.regression.transfer for c in calls)
    np.testing.assert_array_equal(m_shared, m_apart)
    np.testing.assert_array_equal(r_shared, r_apart)
    assert not np.array_equal(m_shared[0], m_shared[1])  # each member's own lags, its own mean
    monkeypatch.undo()
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.regression.transfer.parameters()).add_(1.0)
    assert not other.shares_conditioning()


@pytest.mark.parametrize("sampler,lags,precision", [("dpmpp", "own", "fp32"), ("dpmpp", "own", "bf16"),
                                                    ("ddim", "shared", "fp32"), ("ddpm", "own", "fp32")])
def test_members_sampled_together_equal_members_one_by_one(trained_run, store_path, test_days, monkeypatch,
                                                          sampler, lags, precision):
    """Step fusion with a plan that draws no noise after x_T (DPM-Solver++, DDIM η = 0):
    the members' images run as one batch (their patches in the same network calls, in
    groups bounded by MEMBER_BATCH_BYTES); the samples equal those of members sampled one by
    one, antithetic partners, own lag histories and the regression mean included. A noisy
    plan (DDPM) keeps one trajectory per member."""
    import fastds.sampling.day as day_mod
    import fastds.sampling.fusion as fusion_mod
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    rng = np.random.default_rng(1)
    if lags == "own":
        inp = DayInputs(inp.coarse, inp.covariates, np.concatenate(
            [inp.lags + 0.05 * k * rng.standard_normal(inp.lags.shape).astype(np.float32) for k in range(5)]))
    cfg = dataclasses.replace(FAST, fusion="step", sampler=sampler, steps=4, precision=precision)
    kw = dict(T=conf.diffusion.T, prediction=conf.diffusion.prediction, seed=4, members=5, parts=True)
    images, real = [], fusion_mod.PatchFusedModel.__call__
    monkeypatch.setattr(fusion_mod.PatchFusedModel, "__call__",
                        lambda self, x, t, c=None: images.append(x.shape[0]) or real(self, x, t, c))
    together = downscale_day(model, inp, cfg=cfg, **kw)
    batched = set(images)
    images.clear()
    channels = model.cond(*(torch.zeros(1, *a.shape[-3:]) for a in (inp.coarse, inp.covariates, inp.lags[0]))).shape[1]
    cond_bytes = len(plan_patches(inp.coarse.shape[-2:], tile=cfg.tile, halo=cfg.halo, stride=cfg.stride)) \
        * channels * cfg.tile ** 2 * 4  # one member's fp32 conditioning
    monkeypatch.setattr(day_mod, "MEMBER_BATCH_BYTES", 2 * cond_bytes)  # groups of two: 2, 2, 1
    pairs = downscale_day(model, inp, cfg=cfg, **kw)
    assert set(images) == ({1} if sampler == "ddpm" else {2, 1})
    images.clear()
    monkeypatch.setattr(day_mod, "MEMBER_BATCH_BYTES", 0)  # one member at a time
    alone = downscale_day(model, inp, cfg=cfg, **kw)
    assert set(images) == {1}
    assert batched == ({1} if sampler == "ddpm" else {5})
    for a, b, c in zip(together, pairs, alone):  # (means, residuals)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    assert not np.allclose(together[1][0], together[1][2])  # the members differ


def test_few_step_samplers_match_ddpm_statistics(trained_run, store_path, test_days):
    """Few-step samplers draw from the same distribution as 100-step DDPM (mean and sd of the
    members), and the two deterministic ODE solvers agree with each other from the same x_T."""
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[1], conf.data.t_lag)
    kw = dict(T=conf.diffusion.T, prediction=conf.diffusion.prediction, members=4)
    ref = downscale_day(model, inp, cfg=dataclasses.replace(FAST, sampler="ddpm", steps=100), **kw)
    stats, outs = {}, {}
    for sampler, steps in (("ddim", 10), ("dpmpp", 10), ("ddim", 25)):
        out = downscale_day(model, inp, cfg=dataclasses.replace(FAST, sampler=sampler, steps=steps), **kw)
        outs[f"{sampler}{steps}"] = out
        stats[f"{sampler}{steps}"] = (out.mean(), out.std())
        assert abs(out.mean() - ref.mean()) < 0.1 * ref.std() + 0.02
        assert abs(out.std() - ref.std()) < 0.25 * ref.std()
    corr = np.corrcoef(outs["ddim25"].ravel(), outs["dpmpp10"].ravel())[0, 1]
    print("DDPM-100 (mean, sd):", ref.mean(), ref.std(), "few-step:", stats, "DDIM-25 vs DPM++-10 corr", corr)
    assert corr > 0.8


def test_ensemble_members_and_determinism(trained_run, test_days):
    cfg = dataclasses.replace(FAST, sampler="ddpm", steps=20, members=3, mode="lenient", seed=5)
    a = sample(run=trained_run, start=test_days[0], end=test_days[0], cfg=cfg, progress=False)
    b = sample(run=trained_run, start=test_days[0], end=test_days[0], cfg=cfg, progress=False)
    assert a["DUEXTTAU"].dims == ("time", "member", "lat", "lon")
    xr.testing.assert_equal(a, b)
    v = a["DUEXTTAU"].values[0]
    assert not np.allclose(v[0], v[1])
    c = sample(run=trained_run, start=test_days[0], end=test_days[0],
               cfg=dataclasses.replace(cfg, seed=6), progress=False)
    assert not np.allclose(c["DUEXTTAU"].values, a["DUEXTTAU"].values)


def _killed_on_day(n, run, before=None):
    """``run()`` with the day sampler interrupted (KeyboardInterrupt) on its n-th day;
    ``before(k)`` is called as day k starts."""
    import fastds.sampling.downscalers as pipe
    real, calls = pipe.downscale_day, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if before is not None:
            before(calls["n"])
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    pipe.downscale_day = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        pipe.downscale_day = real


def test_rollout_beyond_record_and_resume(trained_run, store_path, tmp_path):
    st = open_store(store_path)
    end_rec = st.times[-1]
    start, end = end_rec - pd.Timedelta(days=2), end_rec + pd.Timedelta(days=4)
    cfg = dataclasses.replace(FAST, mode="strict", seed=2)
    full = sample(run=trained_run, start=start, end=end, out=tmp_path / "full.nc", cfg=cfg, progress=False)
    assert full["DUEXTTAU"].dims == ("time", "lat", "lon") and len(full.time) == 7
    assert np.isfinite(full["DUEXTTAU"].values).all() and (full["DUEXTTAU"].values > 0).all()
    assert full["DUEXTTAU"].attrs["units"] == "1" and full.attrs["Conventions"] == "CF-1.8"

    out = tmp_path / "resumed.nc"
    _killed_on_day(4, lambda: sample(run=trained_run, start=start, end=end, out=out, cfg=cfg, progress=False))
    parts = sorted((tmp_path / "resumed.nc.parts").glob("*.npy"))
    assert not out.exists() and len(parts) == 3
    # a day file cut short (a copy interrupted, a full disk) is sampled again, not fatal
    parts[-1].write_bytes(parts[-1].read_bytes()[:40])
    resumed = sample(run=trained_run, start=start, end=end, out=out, cfg=cfg, progress=False)
    xr.testing.assert_allclose(resumed, full)
    assert not (tmp_path / "resumed.nc.parts").exists()
    on_disk = xr.open_dataset(out)
    np.testing.assert_allclose(on_disk["DUEXTTAU"].values, full["DUEXTTAU"].values)


def test_zarr_output_is_readable_while_running_and_resumes(trained_run, store_path, tmp_path):
    """``--out x.zarr``: days land in the store as they finish (chunked by day, flagged
    written), a reader mid-run sees exactly the finished days, a killed run resumes, and the
    result equals the NetCDF output bit for bit; evaluate's loader reads it too."""
    from fastds.report import load_field
    from fastds.sampling.output import open_output
    st = open_store(store_path)
    start, end = st.times[-1] - pd.Timedelta(days=1), st.times[-1] + pd.Timedelta(days=3)
    cfg = dataclasses.replace(FAST, mode="strict", seed=2, members=2)
    nc = sample(run=trained_run, start=start, end=end, out=tmp_path / "a.nc", cfg=cfg, progress=False)

    out, seen = tmp_path / "a.zarr", {}

    def reader(day):
        if day == 3:  # a reader opens the store while the run is on its third day
            seen["mid"] = open_output(out).load()
            seen["raw"] = xr.open_zarr(out, consolidated=False).load()

    _killed_on_day(4, lambda: sample(run=trained_run, start=start, end=end, out=out, cfg=cfg, progress=False),
                   before=reader)
    mid, raw = seen["mid"], seen["raw"]
    assert len(mid.time) == 2 and raw.attrs["complete"] == 0 and raw["written"].values.tolist() == [1, 1, 0, 0, 0]
    np.testing.assert_array_equal(mid["DUEXTTAU"].values, nc["DUEXTTAU"].values[:2])
    assert np.isnan(raw["DUEXTTAU"].values[2:]).all()
    assert xr.open_zarr(out, consolidated=False)["DUEXTTAU"].chunks[0] == (1,) * 5
    with pytest.raises(ValueError, match="different request"):
        sample(run=trained_run, start=start, end=end, out=out, cfg=dataclasses.replace(cfg, seed=3),
               progress=False)
    z = sample(run=trained_run, start=start, end=end, out=out, cfg=cfg, progress=False)
    np.testing.assert_array_equal(z["DUEXTTAU"].values, nc["DUEXTTAU"].values)
    assert z["DUEXTTAU"].dims == nc["DUEXTTAU"].dims and z["DUEXTTAU"].attrs == nc["DUEXTTAU"].attrs
    assert xr.open_zarr(out, consolidated=False).attrs["complete"] == 1
    assert not (tmp_path / "a.zarr.parts").exists()
    np.testing.assert_array_equal(load_field(out).values, nc["DUEXTTAU"].values)


def test_rollout_history_keeps_only_the_lag_window(tmp_path):
    """Memory of a long rollout: days older than the window leave memory but stay readable
    from their part files (a resumed run's days start there)."""
    from fastds.sampling.rollout import History as _History
    parts = tmp_path / "p.parts"
    parts.mkdir()
    days = pd.date_range("2030-01-01", periods=6)
    np.save(parts / f"{days[0]:%Y%m%d}.npy", np.full((1, 2, 2), 0.0, np.float32))
    h = _History(parts)
    assert days[0] in h and days[1] not in h and not h.mem
    for i, d in enumerate(days[1:], 1):
        v = np.full((1, 2, 2), float(i), np.float32)
        np.save(parts / f"{d:%Y%m%d}.npy", v)
        h.keep(d, v, since=d - pd.Timedelta(days=2))
    assert sorted(h.mem) == list(days[3:])
    assert all(d in h for d in days)
    assert float(h[days[0]][0, 0, 0]) == 0.0 and float(h[days[2]][0, 0, 0]) == 2.0
    mem = _History(None)
    for i, d in enumerate(days):
        mem.keep(d, np.zeros(1))
    assert sorted(mem.mem) == list(days)


def test_long_rollout_to_a_file_equals_the_in_memory_one(trained_run, store_path, tmp_path):
    """Longer than the lag window: the file (written from the parts, lag days read back from
    them once out of memory) holds what the in-memory rollout returns."""
    st = open_store(store_path)
    start = st.times[st.times.month == 7][0]  # strict inside the record: July, the trained season
    end = start + pd.Timedelta(days=11)
    cfg = dataclasses.replace(FAST, mode="strict", seed=3)
    mem = sample(run=trained_run, start=start, end=end, cfg=cfg, progress=False)
    got = sample(run=trained_run, start=start, end=end, out=tmp_path / "r.nc", cfg=cfg, progress=False)
    assert got["DUEXTTAU"].dims == mem["DUEXTTAU"].dims and len(got.time) == 12
    np.testing.assert_array_equal(got["DUEXTTAU"].values, mem["DUEXTTAU"].values)
    assert got.attrs["mode"] == "strict" and not (tmp_path / "r.nc.parts").exists()


def test_compiled_network_samples_what_the_eager_one_does(trained_run, test_days):
    """sample.compile: the U-Net through torch.compile (inductor) gives the eager days to
    float rounding (fused kernels reorder sums)."""
    cfg = dataclasses.replace(FAST, mode="lenient")
    kw = dict(run=trained_run, start=test_days[0], end=test_days[1], model="unet", progress=False)
    eager = sample(cfg=cfg, **kw)["DUEXTTAU"].values
    compiled = sample(cfg=dataclasses.replace(cfg, compile=True), **kw)["DUEXTTAU"].values
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-6)


def test_compiled_networks_keep_one_shape_across_partial_batches_and_domains(trained_run, store_path, test_days):
    """A compiled twin (FixedBatch) pads each partial batch to the batch size: two domains
    whose last batches differ, with members that have their own lags, compile each network
    once (without it every partial batch is a new shape, and past dynamo's recompile limit
    the calls fall back to eager without an error), and the days equal the eager model's."""
    import copy
    from fastds.sampling import day as day_mod
    model, conf = load_trained(trained_run, 3)
    compiled_shapes = []

    def counting(gm, example_inputs):
        compiled_shapes.append(tuple(tuple(x.shape) for x in example_inputs if torch.is_tensor(x)))
        return gm.forward
    twin = copy.deepcopy(model).compile_for_sampling(backend=counting)
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    own = np.concatenate([inp.lags, inp.lags[:, ::-1], inp.lags[:, ::2].repeat(2, 1)])  # 3 members' lags
    cfg = dataclasses.replace(FAST, steps=3, batch=7, stride=4)
    kw = dict(T=conf.diffusion.T, prediction=conf.diffusion.prediction, members=3, seed=2)
    counts = []
    for h, w in ((24, 30), (29, 21)):
        sub = DayInputs(inp.coarse[:, :h, :w], inp.covariates[:, :h, :w], own[..., :h, :w])
        got = downscale_day(twin, sub, cfg=cfg, **kw)
        np.testing.assert_allclose(got, downscale_day(model, sub, cfg=cfg, **kw), rtol=1e-5, atol=1e-6)
        counts.append(len(compiled_shapes))
    assert counts[0] == counts[1] == 2, compiled_shapes  # the denoiser and the regression mean
    assert all(shapes[0][0] == 7 for shapes in compiled_shapes)
    # a smaller batch size later: its own shape (not padded to 7), once per network
    small = dataclasses.replace(cfg, batch=5, compile=True)
    day_mod._TWINS[model] = (day_mod._weights_key(model), twin)  # downscale_day's cached twin
    np.testing.assert_allclose(downscale_day(model, sub, cfg=small, **kw),
                               downscale_day(model, sub, cfg=dataclasses.replace(small, compile=False), **kw),
                               rtol=1e-5, atol=1e-6)
    assert len(compiled_shapes) == 4 and all(shapes[0][0] == 5 for shapes in compiled_shapes[2:])
    net = twin.net
    assert net.rows == 5 and type(net._orig_mod) is type(model.net)  # the name torch.compile's wrapper uses
    with pytest.raises(AttributeError, match="no_such"):
        net.no_such


def test_compiled_sampling_twin_leaves_the_model_alone(trained_run):
    """sample.compile compiles a cached copy of the model's networks (downscale_day's twin),
    never the caller's model; a weight update makes a new twin, and a twin goes with its
    model (it does not keep it alive)."""
    import gc
    import weakref
    from fastds.sampling import day as day_mod
    model, _ = load_trained(trained_run, 3)
    assert day_mod.sampling_twin(model, compile=False) is model
    with pytest.raises(TypeError, match="sample.compile"):
        day_mod.sampling_twin(torch.nn.Linear(2, 2), compile=True)
    twin = day_mod.sampling_twin(model, compile=True)
    assert twin is day_mod.sampling_twin(model, compile=True)
    assert hasattr(twin.net, "_orig_mod") and hasattr(twin.regression.net, "_orig_mod")
    assert not hasattr(model.net, "_orig_mod") and not hasattr(model.regression.net, "_orig_mod")
    with torch.no_grad():
        next(model.net.parameters()).mul_(1.0)  # an in-place update: a new version
    assert day_mod.sampling_twin(model, compile=True) is not twin
    n, alive = len(day_mod._TWINS), weakref.ref(model)
    assert model in day_mod._TWINS
    del model, twin
    gc.collect()
    assert alive() is None and len(day_mod._TWINS) == n - 1


def test_compile_auto_compiles_where_the_job_pays_the_compilation_back():
    """sample.compile = "auto" (the default): compiled where the job's network
    pixel-evaluations reach COMPILE_PAYBACK, never for the demo's short rollouts; true and
    false as set; anything else refused, naming the setting."""
    from fastds.config import load_config
    from fastds.sampling.day import COMPILE_PAYBACK, compile_pays
    cfg = load_config("tiny").sample
    assert cfg.compile == "auto" and SampleConfig().compile == "auto"
    assert load_config("tiny", overrides=["sample.compile=true"]).sample.compile is True
    assert load_config("tiny", overrides=["sample.compile=auto"]).sample.compile == "auto"
    kw = dict(cfg=cfg, members=8, evals=cfg.steps)
    # Area 1 (357x432): 572 residual patches of 32 px, 5 steps: 23.4 M pixel-evaluations a day
    day = 8 * 572 * 5 * 32 ** 2
    assert len(plan_patches((357, 432), cfg.tile, cfg.halo, cfg.stride)) == 572
    need = int(np.ceil(COMPILE_PAYBACK / day))
    assert not compile_pays("auto", shape=(357, 432), days=need - 1, **kw)
    assert compile_pays("auto", shape=(357, 432), days=need, **kw)
    assert 5 <= need <= 12
    # the demo's twin (64x80, 12 patches), 16 members: over 200 days before it pays
    assert not compile_pays("auto", shape=(64, 80), days=200, cfg=cfg, members=16, evals=5)
    assert compile_pays(True, shape=(64, 80), days=1, **kw) is True
    assert compile_pays(False, shape=(357, 432), days=10 ** 6, **kw) is False
    with pytest.raises(ValueError, match="sample.compile must be true, false or"):
        compile_pays("yes", shape=(64, 80), days=1, **kw)
    with pytest.raises(TypeError, match="sample.compile"):
        load_config("tiny", overrides=["sample.compile=3"])


def test_sample_resolves_compile_auto_for_its_job(trained_run, test_days, monkeypatch):
    """sample() resolves "auto" for the whole job (days x members x patches x steps) and the
    days see a plain bool; the baselines, with no network, are never compiled."""
    from fastds.sampling import day as day_mod
    from fastds.sampling import pipeline as pipe
    asked = []

    def spy(model, *, compile):
        asked.append(compile)
        return model
    monkeypatch.setattr(day_mod, "sampling_twin", spy)
    kw = dict(run=trained_run, start=test_days[0], end=test_days[1], model="unet", progress=False,
              cfg=dataclasses.replace(FAST, mode="lenient", compile="auto"))
    sample(**kw)
    assert asked and not any(asked)
    monkeypatch.setattr(day_mod, "COMPILE_PAYBACK", 1.0)
    asked.clear()
    sample(**kw)
    assert asked and all(a is True for a in asked)
    st = open_store(pipe.run_store(trained_run), variable=pipe.run_variable(trained_run))
    assert pipe._compiled_for(FAST, st, run=trained_run, model="clim", days=10 ** 6, device="cpu").compile is False
    assert pipe._compiled_for(FAST, st, run=trained_run, model="ddpm", days=1, device="cpu").compile is True
    # where torch.compile cannot run, "auto" says why and samples eager; an explicit true is
    # left to fail where it fails
    from fastds import _backend
    assert _backend.compile_unavailable("cpu") is None  # this machine compiles (CI too)
    monkeypatch.setattr(_backend, "compile_unavailable", lambda device_type: "no C++ compiler (a test)")
    with pytest.warns(UserWarning, match=r"sample.compile='auto' would compile this job, but no C\+\+ compiler"):
        assert pipe._compiled_for(FAST, st, run=trained_run, model="ddpm", days=1, device="cpu").compile is False
    forced = dataclasses.replace(FAST, compile=True)
    assert pipe._compiled_for(forced, st, run=trained_run, model="ddpm", days=1, device="cpu").compile is True


def test_strict_and_lenient_differ_inside_record(trained_run, test_days):
    day0 = test_days[2]
    kw = dict(run=trained_run, start=day0 - pd.Timedelta(days=3), end=day0, progress=False)
    s = sample(cfg=dataclasses.replace(FAST, mode="strict"), **kw)
    l = sample(cfg=dataclasses.replace(FAST, mode="lenient"), **kw)
    np.testing.assert_allclose(s["DUEXTTAU"].values[0], l["DUEXTTAU"].values[0], rtol=1e-5)
    assert not np.allclose(s["DUEXTTAU"].values[-1], l["DUEXTTAU"].values[-1])


def test_rollout_needs_its_lag_window(trained_run, store_path):
    st = open_store(store_path)
    far = st.times[-1] + pd.Timedelta(days=5)
    with pytest.raises(ValueError, match="neither in the fine record .* start the rollout no later than"):
        sample(run=trained_run, start=far, end=far, cfg=FAST, progress=False)
    with pytest.raises(ValueError, match="no coarse data"):
        sample(run=trained_run, start="1999-01-01", end="1999-01-02", cfg=FAST, progress=False)
    with pytest.raises(ValueError, match="mode must be"):
        sample(run=trained_run, start=far, end=far, cfg=dataclasses.replace(FAST, mode="loose"), progress=False)


def test_encoder_recompute_matches_cached(trained_run, store_path, test_days):
    """The reference recipe (transfer features recomputed every step) gives the same field."""
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    a = downscale_day(model, inp, cfg=FAST, T=conf.diffusion.T)
    b = downscale_day(model, inp, cfg=FAST, T=conf.diffusion.T, cache_conditioning=False)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@requires_cuda
@requires_triton
def test_downscale_day_uses_cuda_graphs(trained_run, store_path, test_days):
    """On a GPU the day's batches replay captured graphs (DDIM with eta 0 draws no noise, so the
    graphed and eager days agree)."""
    from fastds.sampling import day as pipe  # the graph cache lives with the day
    model, conf = load_trained(trained_run, 3, device="cuda")
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    eager = downscale_day(model, inp, cfg=dataclasses.replace(FAST, cuda_graphs=False), T=conf.diffusion.T,
                          device="cuda")
    graphed = downscale_day(model, inp, cfg=FAST, T=conf.diffusion.T, device="cuda")
    assert pipe._GRAPHS.has(model), "no graph was captured"
    np.testing.assert_allclose(graphed, eager, rtol=1e-4, atol=1e-4)


@requires_triton_run
def test_static_sampler_eager_twin_matches_loop(trained_run, store_path, test_days):
    """The graph path's eager twin (device tables, device step counter, in-kernel RNG)."""
    model, conf = load_trained(trained_run, 3, device=TRITON_DEVICE)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4, 1, 16, 16, generator=g).to(TRITON_DEVICE)
    cond = torch.rand(4, model.net.encoder.inp.in_channels - 1, 16, 16, generator=g).to(TRITON_DEVICE)
    ts = lambda n, off=0: torch.arange(n, device=TRITON_DEVICE) + off  # noqa: E731
    for sampler in ("ddim", "dpmpp"):
        plan = make_plan(sampler, T=conf.diffusion.T, steps=6)
        st = StaticSampler(model, plan, x_T, cond, use_graph=False)
        got = st(x_T, cond, ts(1))
        torch.testing.assert_close(got, run_plan(model, x_T, plan, cond=cond), rtol=1e-5, atol=1e-5)
    plan = make_plan("ddpm", T=conf.diffusion.T, steps=6)
    st = StaticSampler(model, plan, x_T, cond, use_graph=False)
    a = st(x_T, cond, ts(1))
    b = st(x_T, cond, ts(1))
    c = st(x_T, cond, ts(1, 1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="built for x"):  # a new batch shape is refused
        st(x_T[:2], cond[:2], ts(1))
    # the CPU step draws the Triton kernel's noise stream: one seed, one trajectory
    cpu = StaticSampler(model.cpu() if TRITON_DEVICE != "cpu" else model, plan, x_T.cpu(), cond.cpu(),
                        use_graph=False, backend="cpu")
    torch.testing.assert_close(cpu(x_T.cpu(), cond.cpu(), ts(1).cpu()), a.cpu(),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="backend 'cuda' cannot"):
        StaticSampler(model, plan, x_T, cond, use_graph=False, backend="cuda")


@requires_cuda
@requires_triton
def test_cuda_graph_replay_matches_eager(trained_run):
    model, conf = load_trained(trained_run, 3, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x_T = torch.randn(8, 1, 16, 16, generator=g, device="cuda")
    cond = torch.rand(8, model.net.encoder.inp.in_channels - 1, 16, 16, generator=g, device="cuda")
    plan = make_plan("ddim", T=conf.diffusion.T, steps=8)
    graphed = StaticSampler(model, plan, x_T, cond, use_graph=True)
    assert graphed.graph is not None
    torch.testing.assert_close(graphed(x_T, cond, torch.zeros(1, dtype=torch.long, device="cuda")),
                               run_plan(model, x_T, plan, cond=cond), rtol=1e-4, atol=1e-4)


AOT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastds.kernels.sampler_step import fused_step_kernel, BLOCK
    names = fused_step_kernel.arg_names
    for dtype in ("fp32", "fp16", "bf16", "fp64"):
        compute = "fp64" if dtype == "fp64" else "fp32"  # the coefficient table's dtype
        for flags in ((True, False, True, True, True), (False, True, False, False, False)):
            # n is i64 when the launch passes 2**31 elements (Triton specialises on it)
            for n_type in ("i32", "i64"):
                sig = {n: "*" + dtype for n in names[:6]}
                sig.update(coef_ptr="*" + compute, step_ptr="*i64", seed_ptr="*i64", n=n_type,
                           clip="fp32")
                consts = dict(zip(("HAS_NOISE", "RNG", "HAS_PREV", "WRITE_X0", "CLIP"), flags), BLOCK=BLOCK,
                              TABLE=flags[0])
                sig.update({k: "constexpr" for k in consts})
                src = ASTSource(fn=fused_step_kernel, signature=sig,
                                constexprs={(names.index(k),): v for k, v in consts.items()})
                k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
                assert k.asm["cubin"] and ".target sm_90" in k.asm["ptx"], dtype
                # element offsets are 64-bit from the program id on (no wrap at 2**31)
                ttir = k.asm["ttir"]
                assert "tt.get_program_id" in ttir and "i32 to i64" in ttir, ttir[:2000]
                print("compiled", dtype, flags, n_type, "shared", k.metadata.shared)
""")


@requires_triton
def test_triton_kernels_compile_ahead_of_time_for_sm90():
    assert run_aot(AOT).count("compiled") == 16


def test_clim_baseline_is_interpolation_plus_mean_residual(trained_run, store_path, test_days):
    from fastds.data.regions import season_of
    from fastds.data.transforms import align_index, upsample
    st = open_store(store_path)
    days = test_days[:2]
    got = sample(run=trained_run, start=days[0], end=days[-1], model="clim",
                 cfg=dataclasses.replace(FAST, project_baselines=False), progress=False)["DUEXTTAU"]
    # written out: log10 fine ≈ bilinear(log10 coarse) + mean over training days of the residual
    lat, lon = st.ds["lat"].values, st.ds["lon"].values
    iy = align_index(st.ds["lat_c"].values, lat, method=st.align)
    ix = align_index(st.ds["lon_c"].values, lon, method=st.align)
    logc = np.log10(np.maximum(st.coarse.values, 1e-6))
    up = upsample(logc[st.times_c.get_indexer(st.times)], iy, ix).astype(np.float64)
    logf = np.log10(np.maximum(st.fine.values, 1e-6))
    train = (st.ds["split"].values == 0) & (season_of(st.times.month) == 3)
    clim = (logf[train] - up[train]).mean(0)
    for d in days:
        want = 10 ** (upsample(logc[st.times_c.get_loc(d)], iy, ix) + clim)
        np.testing.assert_allclose(got.sel(time=d).values, want, rtol=2e-4)


def test_baselines_written_day_by_day_equal_the_in_memory_result(trained_run, store_path, test_days,
                                                                 tmp_path):
    from fastds.sampling.pipeline import interpolate_coarse
    days = test_days[:3]
    cfg = dataclasses.replace(FAST, members=2)
    for model in ("interp", "clim"):
        mem = sample(run=trained_run, start=days[0], end=days[-1], model=model, cfg=cfg,
                     progress=False)["DUEXTTAU"]
        out = tmp_path / f"{model}.nc"
        disk = sample(run=trained_run, start=days[0], end=days[-1], model=model, cfg=cfg, out=out,
                      progress=False)
        assert out.exists() and disk.attrs["model"] == model
        np.testing.assert_array_equal(disk["DUEXTTAU"].values, mem.values)
        assert mem.dims == ("time", "member", "lat", "lon") and mem.sizes["member"] == 2
        np.testing.assert_array_equal(mem.values[:, 0], mem.values[:, 1])
        disk.close()
    # the day-by-day plain interp is the public whole-period interpolate_coarse
    one = sample(run=trained_run, start=days[0], end=days[-1], model="interp",
                 cfg=dataclasses.replace(FAST, project_baselines=False), progress=False)["DUEXTTAU"]
    want = interpolate_coarse(open_store(store_path), pd.date_range(days[0], days[-1]))
    np.testing.assert_allclose(one.values, want.values, rtol=1e-6)


def test_the_coarse_cube_is_not_read_per_day(trained_run, test_days, monkeypatch):
    """The store is lazy: reading its whole coarse cube for every sampled day (the coarse-
    consistency projection, the baselines) would cost a full decompress per day."""
    from fastds.data.store import Store
    reads = []
    real = Store.coarse.fget
    monkeypatch.setattr(Store, "coarse", property(lambda self: reads.append(1) or real(self)))
    counts = {}
    for n in (1, 3):
        for model in ("unet", "interp"):
            reads.clear()
            sample(run=trained_run, start=test_days[0], end=test_days[0] + pd.Timedelta(days=n - 1),
                   model=model, cfg=dataclasses.replace(FAST, consistency=True, mode="lenient"),
                   progress=False)
            counts[model, n] = len(reads)
    assert counts["unet", 1] == counts["unet", 3] and counts["interp", 1] == counts["interp", 3], counts


def test_residual_model_is_anchored_and_unbounded(trained_run, store_path, test_days):
    model, conf = load_trained(trained_run, 3)
    assert conf.train.target == "residual" and model.anchor is not None
    assert model.net.output == "linear"
    assert 3 in model.anchor.clim and model.anchor.sd[3] > 0
    # members keep their own dim; their spread is that of a generative model, not ≈ 0
    cfg = dataclasses.replace(FAST, sampler="ddpm", steps=20, members=3, mode="lenient")
    v = np.log10(sample(run=trained_run, start=test_days[0], end=test_days[0], cfg=cfg,
                        progress=False)["DUEXTTAU"].values[0])
    assert v.shape[0] == 3
    assert v.std(0).mean() > 0.2 * model.anchor.sd[3]


def test_consistency_projection_in_sample(trained_run, store_path, test_days):
    from fastds.sampling.consistency import cell_means
    from fastds.sampling.pipeline import _projection
    st = open_store(store_path)
    cfg = dataclasses.replace(FAST, consistency=True, mode="lenient")
    plain = sample(run=trained_run, start=test_days[0], end=test_days[0], model="clim",
                   cfg=dataclasses.replace(cfg, project_baselines=False), progress=False)["DUEXTTAU"]
    off = sample(run=trained_run, start=test_days[0], end=test_days[0], model="clim",
                 cfg=dataclasses.replace(cfg, consistency=False), progress=False)["DUEXTTAU"]
    np.testing.assert_array_equal(plain.values, off.values)  # project_baselines=False: plain
    # every model, the baselines included, gets the same projection by default
    for kind in ("ddpm", "clim", "interp", "anchor"):
        ds = sample(run=trained_run, start=test_days[0], end=test_days[0], cfg=cfg, model=kind,
                    progress=False)["DUEXTTAU"]
        proj = _projection(st)
        means = cell_means(ds.values[0], proj.ids, proj.weights, int(np.prod(proj.shape_c)))
        target = proj.target(st.coarse.values[st.times_c.get_loc(test_days[0])], 3).ravel()
        np.testing.assert_allclose(means, target, rtol=1e-5)


@pytest.mark.parametrize("antithetic", [False, True])
def test_step_fusion_with_one_patch_equals_unfused(trained_run, store_path, test_days, antithetic):
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    sub = DayInputs(inp.coarse[:, :24, :24], inp.covariates[:, :24, :24], inp.lags[..., :24, :24])
    for sampler in ("ddpm", "ddim"):
        cfg = dataclasses.replace(FAST, tile=24, stride=8, sampler=sampler, steps=8, antithetic=antithetic)
        fused = downscale_day(model, sub, cfg=dataclasses.replace(cfg, fusion="step"), T=conf.diffusion.T,
                              prediction=conf.diffusion.prediction, seed=4, members=2)
        final = downscale_day(model, sub, cfg=dataclasses.replace(cfg, fusion="final"), T=conf.diffusion.T,
                              prediction=conf.diffusion.prediction, seed=4, members=2)
        np.testing.assert_allclose(fused, final, rtol=1e-4, atol=1e-5)


def test_step_fusion_keeps_variance_where_final_averages_it(trained_run, store_path, test_days):
    """Overlapping kept regions: the finished-sample stitch averages independent draws there
    (less spread between members); step fusion keeps one field, and recomputing the
    conditioning every step changes nothing."""
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    cfg = dataclasses.replace(FAST, sampler="ddpm", steps=10, tile=16, halo=2, stride=4)
    kw = dict(T=conf.diffusion.T, prediction=conf.diffusion.prediction, members=6, seed=1)
    step = downscale_day(model, inp, cfg=dataclasses.replace(cfg, fusion="step"), **kw)
    final = downscale_day(model, inp, cfg=dataclasses.replace(cfg, fusion="final"), **kw)
    assert step.std(0).mean() > 1.2 * final.std(0).mean()
    again = downscale_day(model, inp, cfg=dataclasses.replace(cfg, fusion="step"),
                          cache_conditioning=False, **kw)
    np.testing.assert_allclose(again, step, rtol=1e-4, atol=1e-5)


def test_graph_cache_is_bounded_reuses_and_forgets_dead_models():
    import gc
    from fastds.sampling.graphs import GraphCache
    cache = GraphCache(max_entries=2)
    made = []

    def factory(tag):
        return lambda: made.append(tag) or tag

    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert cache.get(a, "k1", factory("a1")) == "a1"
    assert cache.get(a, "k1", factory("again")) == "a1"      # reused, not rebuilt
    cache.get(a, "k2", factory("a2"))
    cache.get(a, "k1", factory("x"))                          # k1 is now the newest
    cache.get(b, "k1", factory("b1"))                         # evicts the oldest: (a, k2)
    assert made == ["a1", "a2", "b1"] and len(cache) == 2
    assert cache.get(a, "k2", factory("a2'")) == "a2'"        # it had been evicted
    del b
    gc.collect()
    assert len(cache) == 1 and cache.has(a)                   # b's entry went with b


class _WithNetwork(torch.nn.Module):
    """A trained CorrDiff DDPM (its conditioning, regression mean and scale) whose residual
    network is replaced by ``fn(x_t)``."""

    def __init__(self, inner, fn):
        super().__init__()
        self.inner, self.regression, self.regression_scale = inner, inner.regression, inner.regression_scale
        self.regression_mean, self.fn = inner.regression_mean, fn
        self.shares_conditioning, self.regression_mean_of = inner.shares_conditioning, inner.regression_mean_of

    def cond(self, *a):
        return self.inner.cond(*a)

    def forward(self, x, t, cond):
        return self.fn(x)


def test_corrdiff_mean_is_the_frozen_unet(trained_run, store_path, test_days):
    """The default DDPM diffuses the scaled residual of the run's U-Net: the U-Net is frozen
    inside it (same weights as its own checkpoint, no gradient), and with the residual
    sampler's output fixed at zero a day is the U-Net's prediction."""
    model, conf = load_trained(trained_run, 3)
    unet, _ = load_trained(trained_run, 3, kind="unet")
    assert conf.train.mean == "unet" and model.regression is not None
    assert all(not p.requires_grad for p in model.regression.parameters())
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(model.regression.state_dict()[k], v)
    scale = float(model.regression_scale)
    assert 0.05 < scale < 1.5
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    # a DDIM sampler whose network always answers "x0 = 0" returns 0: the field is the mean
    cfg = dataclasses.replace(FAST, tile=16, halo=2, stride=8)
    got = downscale_day(_WithNetwork(model, torch.zeros_like), inp, cfg=cfg, T=conf.diffusion.T, prediction="sample")
    want = downscale_day(unet, inp, kind="unet", cfg=cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ddpm_needs_its_unet_first(store_path, tiny_config, tmp_path):
    from fastds.training.stages import pretrain, train
    pretrain(data=store_path, run=tmp_path, config=tiny_config, progress=False)
    with pytest.raises(FileNotFoundError, match="run `fastds train --model unet` first"):
        train(data=store_path, run=tmp_path, config=tiny_config, progress=False)


@pytest.mark.parametrize("fusion", ["step", "final"])
def test_antithetic_members(trained_run, store_path, test_days, fusion):
    """Antithetic members: member 0 and member 2k are the plain ensemble's members 0 and k;
    with a residual network odd in x_t each pair averages exactly to the U-Net mean; with
    the trained network the pair's residuals are negatively correlated."""
    model, conf = load_trained(trained_run, 3)
    unet, _ = load_trained(trained_run, 3, kind="unet")
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    # calibrate_to="crps": the widening is the saved α the test sets (not the spread/skill-1 factor)
    cfg = dataclasses.replace(FAST, sampler="ddpm", steps=10, halo=2, stride=8, fusion=fusion,
                              calibrate_bands=False, calibrate_to="crps")
    kw = dict(T=conf.diffusion.T, prediction=conf.diffusion.prediction, members=4, seed=2)
    raw = dataclasses.replace(cfg, calibrate=False)
    plain = downscale_day(model, inp, cfg=dataclasses.replace(raw, antithetic=False), **{**kw, "members": 2})
    anti = downscale_day(model, inp, cfg=dataclasses.replace(raw, antithetic=True), **kw)
    np.testing.assert_array_equal(anti[0], plain[0])
    np.testing.assert_array_equal(anti[2], plain[1])
    mean = downscale_day(unet, inp, kind="unet", cfg=cfg)[0]
    # calibrated: each pair widened around its own mean by the saved α (pair means kept)
    saved, alpha = model.regression_inflation.clone(), 1.3
    model.regression_inflation.fill_(alpha)
    try:
        wide = downscale_day(model, inp, cfg=dataclasses.replace(cfg, antithetic=True), **kw)
    finally:
        model.regression_inflation.copy_(saved)
    for a, b in ((0, 1), (2, 3)):
        np.testing.assert_allclose(wide[a] + wide[b], anti[a] + anti[b], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(wide[a] - wide[b], alpha * (anti[a] - anti[b]), rtol=1e-4, atol=1e-5)
    # per-band gains: the pair means kept, each pair's half-difference filtered band by band
    from fastds.sampling.spread import filter_bands
    saved = model.regression_bands.clone()
    gains = np.array([2.2, 2.0, 1.5, 1.2, 1.0, 0.5])
    model.regression_bands = torch.tensor(gains, dtype=torch.float32)
    try:
        banded = downscale_day(model, inp, cfg=dataclasses.replace(cfg, antithetic=True, calibrate_bands=True), **kw)
    finally:
        model.regression_bands = saved
    for a, b in ((0, 1), (2, 3)):
        np.testing.assert_allclose(banded[a] + banded[b], anti[a] + anti[b], rtol=1e-5, atol=1e-5)
        half = filter_bands(0.5 * (anti[a] - anti[b])[None], gains)[0]
        np.testing.assert_allclose(0.5 * (banded[a] - banded[b]), half, rtol=1e-4, atol=1e-5)
    r = (anti - mean).reshape(4, -1)
    c = np.corrcoef(r)
    print(f"{fusion}: pair correlations {c[0, 1]:.3f}, {c[2, 3]:.3f}; across pairs {c[0, 2]:.3f}, {c[1, 3]:.3f}")
    # pairs anti-correlated, clearly more than members of different pairs
    assert c[0, 1] < -0.15 and c[2, 3] < -0.15
    assert max(c[0, 1], c[2, 3]) < min(c[0, 2], c[1, 3], c[0, 3], c[1, 2]) - 0.15

    odd = downscale_day(_WithNetwork(model, lambda x: 0.5 * x), inp, cfg=dataclasses.replace(cfg, antithetic=True, calibrate=False), **kw)
    np.testing.assert_allclose((odd[0] + odd[1]) / 2, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose((odd[2] + odd[3]) / 2, mean, rtol=1e-5, atol=1e-5)
    assert np.abs(odd[0] - mean).mean() > 1e-3


def test_write_output_zarr_and_netcdf_agree(tmp_path):
    """The finished-output writer (the distributed path's) gives the same days in either
    format, the Zarr chunked by day and flagged complete."""
    from fastds.sampling.output import open_output, write_output
    t = pd.date_range("2030-01-01", periods=3)
    ds = xr.Dataset({"V": (("time", "member", "lat", "lon"), np.random.default_rng(0).random((3, 2, 4, 5), np.float32))},
                    coords={"time": t, "member": [0, 1], "lat": np.arange(4.0), "lon": np.arange(5.0)})
    write_output(ds.chunk({"time": 1}), tmp_path / "a.nc")
    write_output(ds.chunk({"time": 2}), tmp_path / "a.zarr")
    a, z = open_output(tmp_path / "a.nc"), open_output(tmp_path / "a.zarr")
    xr.testing.assert_identical(a.load().assign_attrs(complete=1), z.load())
    raw = xr.open_zarr(tmp_path / "a.zarr", consolidated=False)
    assert raw.attrs["complete"] == 1 and raw["written"].values.tolist() == [1, 1, 1]
    assert raw["V"].chunks[0] == (1, 1, 1)
    assert not list(tmp_path.glob(".a.*tmp-*"))


@pytest.mark.parametrize("change, named", [
    (dict(halo=8), "sample.halo=8 leaves no kept region in sample.tile=16"),
    (dict(halo=-1), "sample.halo=-1 leaves no kept region"),
    (dict(stride=9), "sample.stride=9 must be between 1 and tile - 2\\*halo = 8"),
    (dict(stride=0), "sample.stride=0 must be between 1"),
    (dict(mean_stride=12), "sample.mean_stride=12 must be between 1 and tile - 2\\*mean_halo = 8"),
    (dict(mean_halo=0, mean_stride=16), None),  # every patch kept whole: allowed
    (dict(mean_halo=0, mean_stride=17), "sample.mean_stride=17 must be between 1 and tile - 2\\*mean_halo = 16"),
    (dict(mean_halo=-3), "sample.mean_halo=-3 leaves no kept region"),
    (dict(steps=0), "sample.steps must be >= 1"),
    (dict(batch=0), "sample.batch must be >= 1"),
    (dict(tile=0), "sample.tile must be >= 1"),
])
def test_a_patch_geometry_that_leaves_gaps_is_refused_not_clipped(change, named):
    """Settings a user asks for are never changed silently: a halo with no kept region, a
    stride that leaves gaps between kept regions (the residual's or the mean's), no steps or
    no patches per call are refused, naming the setting, by ``sample`` and by
    ``downscale_day`` before any work; only a domain smaller than the tile shrinks them."""
    from fastds.sampling.day import check_geometry
    from fastds.sampling.pipeline import _check
    cfg = dataclasses.replace(FAST, **change)
    if named is None:
        check_geometry(cfg)
        return
    for call in (lambda: check_geometry(cfg), lambda: _check(cfg, "ddpm"),
                 lambda: downscale_day(None, None, cfg=cfg)):
        with pytest.raises(ValueError, match=named):
            call()


def test_a_domain_smaller_than_the_tile_shrinks_the_geometry_and_the_output_says_so(trained_run, store_path,
                                                                                      test_days, tmp_path):
    """On a domain smaller than ``sample.tile`` the tile shrinks to it, then the halos and
    strides to fit (:func:`fit_to_domain`, what a day's patches are cut with); ``sample``
    warns with the values it runs and its output's attributes record them, not the request."""
    from fastds.sampling.day import _Patches, fit_to_domain
    cfg = dataclasses.replace(FAST, tile=64, halo=20, stride=24, mean_stride=20, mean_halo=-1)
    assert fit_to_domain(cfg, (64, 70)) is cfg
    small = fit_to_domain(cfg, (30, 41))
    assert (small.tile, small.halo, small.stride, small.mean_halo, small.mean_stride) == (30, 14, 2, -1, 2)
    explicit = fit_to_domain(dataclasses.replace(cfg, mean_halo=3, mean_stride=40), (30, 41))
    assert (explicit.halo, explicit.mean_halo, explicit.mean_stride) == (14, 3, 24)
    inputs = DayInputs(np.zeros((1, 30, 41), np.float32), np.zeros((2, 30, 41), np.float32), None)
    patches = _Patches.of(inputs, cfg, "cpu")
    assert (patches.tile, patches.halo) == (30, 14)
    np.testing.assert_array_equal(patches.starts, plan_patches((30, 41), 30, 14, 2))
    st = open_store(store_path)
    H, W = st.ds.sizes["lat"], st.ds.sizes["lon"]
    big = dataclasses.replace(FAST, tile=max(H, W) + 8, halo=4, stride=8, members=1)
    with pytest.warns(UserWarning, match=rf"smaller than sample.tile={big.tile}; sampling with tile={min(H, W)}"):
        out = sample(run=trained_run, start=test_days[0], end=test_days[0], cfg=big, model="unet",
                     progress=False)
    assert (out.attrs["tile"], out.attrs["halo"], out.attrs["stride"]) == (min(H, W), 4, 8)
    # cut into units (two time segments, each its own sample call), it warns once, not per unit
    with pytest.warns(UserWarning) as seen:
        out = sample(run=trained_run, start="2005-08-25", end="2005-08-30", model="unet", progress=False,
                     cfg=dataclasses.replace(big, segments=2, burn_in=2), out=tmp_path / "units.nc")
    assert [str(w.message).count("smaller than sample.tile") for w in seen] == [1]
    assert out.attrs["tile"] == min(H, W)


def test_make_plan_refuses_zero_steps_instead_of_taking_a_default():
    """``steps=0`` once meant "the sampler's default" (20 for DPM-Solver++, 50 for DDIM)."""
    for sampler in ("ddpm", "ddim", "dpmpp"):
        with pytest.raises(ValueError, match=f"{sampler} plan: steps must be >= 1"):
            make_plan(sampler, T=100, steps=0)
    assert len(make_plan("dpmpp", T=100, steps=None)) == 20


@pytest.mark.parametrize("spacing", ["leading", "karras"])
def test_the_network_is_called_at_the_spacings_timesteps(trained_run, store_path, test_days, spacing):
    """``sample.spacing`` reaches the sampler a day runs: DPM-Solver++ with 5 steps calls the
    residual network exactly at that spacing's timesteps (karras: 991, 965, 802, 164, 0)."""
    from fastds.sampling.samplers import alpha_bar_for
    from fastds.sampling.steps import timesteps
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    seen = set()

    class Recording(_WithNetwork):
        def forward(self, x, t, cond):
            seen.update(int(v) for v in t.unique())
            return torch.zeros_like(x)

    cfg = dataclasses.replace(FAST, sampler="dpmpp", steps=5, spacing=spacing)
    downscale_day(Recording(model, None), inp, cfg=cfg, T=conf.diffusion.T, prediction="sample")
    want = timesteps(conf.diffusion.T, 5, spacing, alpha_bar_for(conf.diffusion.T))[0]
    assert seen == set(want.tolist())
    if spacing == "karras":
        assert sorted(seen) == [0, 164, 802, 965, 991]
