"""Work repeated per ensemble member: the share of a strict-rollout day that is not the
denoiser's sampler steps.

In a strict rollout each member keeps its own lag history, so its conditioning (the frozen
transfer features of its lag window) and its CorrDiff mean (the U-Net on its lags) are its
own. This benchmark times one day of 8 such members on the Area-1 grid (357 x 432) with the
tiny preset's networks (untrained: the time does not depend on the weights) and reports how
the day splits between the conditioning, the U-Net mean and the denoiser, for four mean
geometries: ``24`` (the preset's: ``mean_stride`` 24, kept regions tiling the image once),
``28h2`` (``mean_stride`` 28, ``mean_halo`` 2: fewer patches, also tiling the image once;
round 35, not kept: it loses twCRPS above q90 on the development days), ``0`` (the mean on
the sampler's own overlapping patches, the round-3 default; the peer) and
``32h0`` (``mean_stride`` 32, ``mean_halo`` 0: every other residual patch kept whole, its
conditioning shared with the residual's). Same inputs, the same precision and 2 threads for
all. A ``toy`` grid (64 x 80) runs in bench-check.
"""
import dataclasses
import sys
import time

import numpy as np
import pytest
import torch

import fastds.models.conditional as C
from fastds.config import load_config
from fastds.data.transforms import COVARIATE_SETS
from fastds.models.conditional import build_model
from fastds.runs import covariate_set
from fastds.sampling.day import DayInputs, downscale_day

MEMBERS = 8
GRIDS = {"toy": (64, 80), "area1": (357, 432)}


def _model(config):
    tc = config.train
    kw = dict(widths=tc.widths, attention=tc.attention, t_lag=config.data.t_lag,
              transfer_widths=config.pretrain.widths, transfer_attention=config.pretrain.attention,
              prediction=config.diffusion.prediction, target="residual",
              n_covariates=len(COVARIATE_SETS[covariate_set(config)]))
    torch.manual_seed(0)
    model = build_model("ddpm", **kw)
    model.set_regression(build_model("unet", **kw))
    # trained runs load Stage A's encoder into both networks: so here
    model.regression.transfer.load_state_dict(model.transfer.state_dict())
    return model.eval()


class _Timers:
    """Wall time inside the conditioning, the U-Net mean and the denoiser (outermost calls)."""

    def __init__(self):
        self.t = {"cond": 0.0, "mean": 0.0, "denoise": 0.0}
        self.depth = 0

    def wrap(self, name, fn):
        def timed(*a, **k):
            if self.depth:
                return fn(*a, **k)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[name] += time.perf_counter() - t0
                self.depth -= 1
        return timed


@pytest.mark.parametrize("grid", [g if g == "toy" else pytest.param(g, marks=pytest.mark.slow) for g in GRIDS])
@pytest.mark.parametrize("mean", ["24", "28h2", "0", "32h0"])
def test_per_member_fixed_work(benchmark, record, monkeypatch, grid, mean):
    config = load_config("tiny")
    model = _model(config)
    H, W = GRIDS[grid]
    rng = np.random.default_rng(0)
    n_cov = len(COVARIATE_SETS[covariate_set(config)])
    inputs = DayInputs(rng.random((1, H, W), np.float32), rng.random((n_cov, H, W), np.float32),
                       rng.random((MEMBERS, config.data.t_lag, H, W), np.float32))
    mean_stride, _, mean_halo = mean.partition("h")
    cfg = dataclasses.replace(config.sample, members=MEMBERS, mean_stride=int(mean_stride),
                              mean_halo=int(mean_halo or -1))
    timers = _Timers()
    for name, attr in (("cond", "cond"), ("mean", "regression_mean"), ("mean", "regression_mean_of"),
                       ("denoise", "forward")):
        monkeypatch.setattr(C.ConditionalModel, attr, timers.wrap(name, getattr(C.ConditionalModel, attr)))
    kw = dict(cfg=cfg, T=config.diffusion.T, prediction=config.diffusion.prediction,
              members=MEMBERS, seed=0, day_key=1)
    benchmark.group = f"per-member work, {grid} {H}x{W}, {MEMBERS} members with their own lags"
    downscale_day(model, inputs, **kw)  # warm-up (allocator, oneDNN primitives)
    timers.t = dict.fromkeys(timers.t, 0.0)
    out = benchmark.pedantic(lambda: downscale_day(model, inputs, **kw), rounds=3, iterations=1)
    assert out.shape == (MEMBERS, H, W) and np.isfinite(out).all()
    if benchmark.stats is None:
        return
    wall = benchmark.stats.stats.total
    share = {k: round(100 * v / wall, 1) for k, v in timers.t.items()}
    print(f"\nmean {mean}: {share} % of {wall / 3:.1f} s per day")
    record(benchmark, benchmark.group, f"mean_{mean}", items=MEMBERS, unit="members",
           peer=mean == "0",
           extra={"per-member fixed %": round(share["cond"] + share["mean"], 1),
                  "mean %": share["mean"], "cond %": share["cond"], "precision": cfg.precision})


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
