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
from fastds.training.stages import load_trained

from conftest import TRITON_DEVICE, requires_cuda, requires_triton, requires_triton_run, run_aot

FAST = SampleConfig(sampler="ddim", steps=10, tile=16, halo=4, stride=8, batch=256)


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


def test_tiny_ddpm_beats_interpolation(trained_run, twin_files, test_days):
    truth = xr.open_dataset(twin_files / "fine_truth.nc")["DUEXTTAU"]
    ddpm = xr.concat([sample(run=trained_run, start=d, end=d, cfg=dataclasses.replace(FAST, mode="lenient"),
                             progress=False)["DUEXTTAU"] for d in test_days], "time")
    interp = sample(run=trained_run, start=test_days[0], end=test_days[-1], model="interp",
                    cfg=FAST, progress=False)["DUEXTTAU"].sel(time=test_days)
    r_ddpm, r_interp = _r2_per_day(ddpm, truth).mean(), _r2_per_day(interp, truth).mean()
    print(f"held-out twin days R² (squared Pearson, log10): DDPM {r_ddpm:.3f}, interpolation {r_interp:.3f}")
    assert r_ddpm > r_interp


def _day_inputs(trained_run, store_path, day, t_lag):
    from fastds.data.datasets import FineDays
    st = open_store(store_path)
    fd = FineDays(st, season=3, t_lag=t_lag)
    d = fd.index_of(day)
    return DayInputs(fd.coarse_on_fine(d), fd.covariates(d), fd.y[d - t_lag:d][None])


def test_stitched_equals_single_patch(trained_run, store_path, test_days, tiny_config):
    """Where one patch covers the image, patching + stitching changes nothing."""
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    sub = DayInputs(inp.coarse[:, :24, :24], inp.covariates[:, :24, :24], inp.lags[..., :24, :24])
    cfg = dataclasses.replace(FAST, tile=24, stride=8)
    got = downscale_day(model, sub, cfg=cfg, T=conf.diffusion.T, seed=4)
    # the same computation written out for one whole-image patch
    x_T = torch.randn((1, 1, 24, 24), generator=torch.Generator().manual_seed(4 * 1_000_003))
    cond = model.cond(torch.from_numpy(sub.coarse[None]), torch.from_numpy(sub.covariates[None]),
                      torch.from_numpy(sub.lags))
    plan = make_plan("ddim", T=conf.diffusion.T, steps=10)
    want = run_plan(model, x_T, plan, cond=cond)[0, 0].numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


def test_few_step_samplers_match_ddpm_statistics(trained_run, store_path, test_days):
    model, conf = load_trained(trained_run, 3)
    inp = _day_inputs(trained_run, store_path, test_days[1], conf.data.t_lag)
    ref = downscale_day(model, inp, cfg=dataclasses.replace(FAST, sampler="ddpm", steps=100),
                        T=conf.diffusion.T, members=2)
    stats = {}
    for sampler, steps in (("ddim", 10), ("dpmpp", 10), ("ddim", 25)):
        out = downscale_day(model, inp, cfg=dataclasses.replace(FAST, sampler=sampler, steps=steps),
                            T=conf.diffusion.T, members=2)
        corr = np.corrcoef(out.ravel(), ref.ravel())[0, 1]
        stats[f"{sampler}{steps}"] = (out.mean(), out.std(), corr)
        assert abs(out.mean() - ref.mean()) < 0.05 * max(ref.std(), 1e-3) + 0.02
        assert abs(out.std() - ref.std()) < 0.25 * ref.std()
        assert corr > 0.8
    print("DDPM-100:", ref.mean(), ref.std(), "few-step (mean, sd, corr with DDPM):", stats)


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


def test_rollout_beyond_record_and_resume(trained_run, store_path, tmp_path):
    st = open_store(store_path)
    end_rec = st.times[-1]
    start, end = end_rec - pd.Timedelta(days=2), end_rec + pd.Timedelta(days=4)
    cfg = dataclasses.replace(FAST, mode="strict", seed=2)
    full = sample(run=trained_run, start=start, end=end, out=tmp_path / "full.nc", cfg=cfg, progress=False)
    assert full["DUEXTTAU"].dims == ("time", "lat", "lon") and len(full.time) == 7
    assert np.isfinite(full["DUEXTTAU"].values).all() and (full["DUEXTTAU"].values > 0).all()
    assert full["DUEXTTAU"].attrs["units"] == "1" and full.attrs["Conventions"] == "CF-1.8"

    import fastds.sampling.pipeline as pipe
    real = pipe.downscale_day
    calls = {"n": 0}

    def dies_on_day_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "resumed.nc"
    pipe.downscale_day = dies_on_day_4
    try:
        with pytest.raises(KeyboardInterrupt):
            sample(run=trained_run, start=start, end=end, out=out, cfg=cfg, progress=False)
    finally:
        pipe.downscale_day = real
    assert not out.exists() and len(list((tmp_path / "resumed.nc.parts").glob("*.npy"))) == 3
    resumed = sample(run=trained_run, start=start, end=end, out=out, cfg=cfg, progress=False)
    xr.testing.assert_allclose(resumed, full)
    assert not (tmp_path / "resumed.nc.parts").exists()
    on_disk = xr.open_dataset(out)
    np.testing.assert_allclose(on_disk["DUEXTTAU"].values, full["DUEXTTAU"].values)


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
    from fastds.sampling import pipeline as pipe
    model, conf = load_trained(trained_run, 3, device="cuda")
    inp = _day_inputs(trained_run, store_path, test_days[0], conf.data.t_lag)
    eager = downscale_day(model, inp, cfg=dataclasses.replace(FAST, cuda_graphs=False), T=conf.diffusion.T,
                          device="cuda")
    graphed = downscale_day(model, inp, cfg=FAST, T=conf.diffusion.T, device="cuda")
    assert pipe._GRAPHS.get(id(model)), "no graph was captured"
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
        got = st(x_T, cond, 0 * ts(len(plan)))
        torch.testing.assert_close(got, run_plan(model, x_T, plan, cond=cond), rtol=1e-5, atol=1e-5)
    plan = make_plan("ddpm", T=conf.diffusion.T, steps=6)
    st = StaticSampler(model, plan, x_T, cond, use_graph=False)
    a = st(x_T, cond, ts(6))
    b = st(x_T, cond, ts(6))
    c = st(x_T, cond, ts(6, 1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


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
    torch.testing.assert_close(graphed(x_T, cond, torch.zeros(8, dtype=torch.long, device="cuda")),
                               run_plan(model, x_T, plan, cond=cond), rtol=1e-4, atol=1e-4)


AOT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastds.kernels.sampler_step import fused_step_kernel, BLOCK
    names = fused_step_kernel.arg_names
    for dtype in ("fp32", "fp16", "fp64"):
        for flags in ((True, False, True, True, True), (False, True, False, False, False)):
            sig = {n: "*" + dtype for n in names[:7]}
            sig.update(step_ptr="*i64", seed_ptr="*i64", n="i32", clip="fp32")
            consts = dict(zip(("HAS_NOISE", "RNG", "HAS_PREV", "WRITE_X0", "CLIP"), flags), BLOCK=BLOCK)
            sig.update({k: "constexpr" for k in consts})
            src = ASTSource(fn=fused_step_kernel, signature=sig,
                            constexprs={(names.index(k),): v for k, v in consts.items()})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
            assert k.asm["cubin"] and ".target sm_90" in k.asm["ptx"], dtype
            print("compiled", dtype, flags, "shared", k.metadata.shared, "regs", getattr(k, "n_regs", "?"))
""")


@requires_triton
def test_triton_kernels_compile_ahead_of_time_for_sm90():
    assert run_aot(AOT).count("compiled") == 6
