"""End to end: seconds per downscaled day on an Area-1-sized grid (357 x 432 fine pixels),
tiny model, CPU.

(a) ``ref``: the reference code's recipe: tile 16, halo 4, stride 2 (~36k patches), 200 DDPM
    steps, transfer encoder recomputed at every step. A full day takes hours on 2 cores, so
    it is timed on a fixed subset of patches and scaled by the patch count (stated in the
    output; stitching is timed in bench_stitch and is negligible next to the network).
(b) ``fastds``: tile 16, halo 2, stride 8 (kept regions of 12 px overlap by 4, so the Hann
    blending still hides seams), DDIM 20 steps, conditioning cached, the whole day.
Skill (R² in log10, held-out days) of both recipes is measured on the twin's grid with a
trained tiny model (trained in the fixture) and printed.
"""
import dataclasses
import time

import numpy as np
import pytest
import torch
import xarray as xr

from fastds.config import SampleConfig, load_config
from fastds.data.store import open_store, prepare
from fastds.data.synthetic import TwinSpec, write_twin
from fastds.models.conditional import build_model
from fastds.sampling.pipeline import DayInputs, downscale_day, sample
from fastds.stitch import plan_patches
from fastds.training.stages import pretrain, train

H, W = 357, 432
REF = SampleConfig(sampler="ddpm", steps=200, tile=16, halo=4, stride=2, batch=256)
FAST = SampleConfig(sampler="ddim", steps=20, tile=16, halo=2, stride=8, batch=1024)
SUBSET = 256  # patches timed for the reference recipe


def _inputs(t_lag):
    rng = np.random.default_rng(0)
    return DayInputs(rng.random((1, H, W), dtype=np.float32), rng.random((6, H, W), dtype=np.float32),
                     rng.random((1, t_lag, H, W), dtype=np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["ref", "fastds"])
def test_seconds_per_day(benchmark, record, provider):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model("ddpm", widths=cfg.train.widths, t_lag=cfg.data.t_lag,
                        transfer_widths=cfg.pretrain.widths).eval()
    inp = _inputs(cfg.data.t_lag)
    benchmark.group = "seconds per downscaled day, 357x432, tiny model"
    if provider == "fastds":
        benchmark.pedantic(lambda: downscale_day(model, inp, cfg=FAST), rounds=1, iterations=1)
        record(benchmark, benchmark.group, provider, items=1, unit="days")
        return
    n_all = len(plan_patches((H, W), 16, 4, 2))
    # time SUBSET patches through the reference recipe, on a crop holding about that many
    crop = 16 + 2 * (int(np.sqrt(SUBSET)) - 1)
    sub = DayInputs(inp.coarse[:, :crop, :crop], inp.covariates[:, :crop, :crop], inp.lags[..., :crop, :crop])
    n_sub = len(plan_patches((crop, crop), 16, 4, 2))
    benchmark.pedantic(lambda: downscale_day(model, sub, cfg=REF, cache_conditioning=False),
                       rounds=1, iterations=1)
    benchmark.extra_info["timed_patches"] = n_sub
    if benchmark.stats:
        per_day = benchmark.stats.stats.median / n_sub * n_all
        print(f"reference recipe: {n_sub} patches x 200 steps in {benchmark.stats.stats.median:.1f} s; "
              f"scaled to the day's {n_all} patches: {per_day:.0f} s per day")
        record(benchmark, benchmark.group, provider, items=1, unit="days", median_s=per_day)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    spec = TwinSpec(coarse_start="2005-01-01", coarse_end="2006-09-30")
    write_twin(out / "twin", spec, native_days=0)
    store = prepare(coarse=out / "twin/coarse_daily.nc", fine=out / "twin/fine_daily.nc",
                    elevation=out / "twin/elevation.nc", region="24,28,44,49", out=out / "s.zarr")
    cfg = load_config("tiny", overrides=["data.seasons=[3]"])
    pretrain(data=store, run=out / "run", config=cfg, progress=False)
    train(data=store, run=out / "run", config=cfg, model="unet", progress=False)
    train(data=store, run=out / "run", config=cfg, progress=False)
    return out, store


@pytest.mark.slow
def test_skill_of_both_recipes(trained):
    out, store = trained
    st = open_store(store)
    days = st.times[(st.ds["split"].values == 2) & st.times.month.isin([7, 8])][:2]
    truth = xr.open_dataset(out / "twin/fine_truth.nc")["DUEXTTAU"]
    res = {}
    for name, cfg, cache in (("ref", REF, False), ("fastds", FAST, True), ("interp", FAST, True)):
        t0 = time.perf_counter()
        r2 = []
        for d in days:
            p = sample(run=out / "run", start=d, end=d, cfg=dataclasses.replace(cfg, mode="lenient"),
                       model="interp" if name == "interp" else "ddpm", cache_conditioning=cache,
                       progress=False)["DUEXTTAU"][0]
            a, b = np.log10(p.values).ravel(), np.log10(truth.sel(time=d).values).ravel()
            r2.append(np.corrcoef(a, b)[0, 1] ** 2)
        res[name] = (float(np.mean(r2)), (time.perf_counter() - t0) / len(days))
    print("skill on held-out twin days (R², s/day on the 65x81 twin grid):", res)
    assert res["fastds"][0] > res["interp"][0]
