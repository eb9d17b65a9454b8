"""Several species, one day: the joint model (one denoiser, the species as channels of one
field) against the separate species' CorrDiff DDPMs (one sampler run per species).

Both produce the same thing: K species x 8 members of one strict-rollout day, each member
with its own lag windows, each species with its own U-Net mean and Stage-A transfer
features. The separate models run the denoiser once per species; the joint model runs one
denoiser over K channels (its input: every species' conditioning). Tiny preset networks,
untrained (the time does not depend on the weights), the preset's sampler and precision, 2
threads. ``separate`` is the reference; the ratio says what the joint model saves. A ``toy``
grid (64 x 80) runs in bench-check; a quarter of Area 1 (179 x 216) is marked slow.
"""
import dataclasses
import sys

import numpy as np
import pytest
import torch

from fastds.config import load_config
from fastds.data.transforms import COVARIATE_SETS
from fastds.models.conditional import build_model
from fastds.models.joint import build_joint
from fastds.runs import covariate_set
from fastds.sampling.day import DayInputs, downscale_day

MEMBERS = 8
SPECIES = 5
GRIDS = {"toy": (64, 80), "quarter": (179, 216)}  # a quarter of Area 1: 5 x 8 members of it fit minutes


def _kw(config):
    tc = config.train
    return dict(widths=tc.widths, attention=tc.attention, t_lag=config.data.t_lag,
                transfer_widths=config.pretrain.widths, transfer_attention=config.pretrain.attention,
                prediction=config.diffusion.prediction, target="residual",
                n_covariates=len(COVARIATE_SETS[covariate_set(config)]))


def _separate(config, k):
    """Species k's CorrDiff DDPM, its mean sharing its transfer weights as trained runs do."""
    torch.manual_seed(k)
    model = build_model("ddpm", **_kw(config))
    model.set_regression(build_model("unet", **_kw(config)))
    model.regression.transfer.load_state_dict(model.transfer.state_dict())
    return model.eval()


def _joint(config, models):
    torch.manual_seed(SPECIES)
    return build_joint([m.regression for m in models], [f"S{k}" for k in range(SPECIES)],
                       widths=config.train.widths, attention=config.train.attention,
                       n_covariates=len(COVARIATE_SETS[covariate_set(config)])).eval()


@pytest.mark.parametrize("grid", [g if g == "toy" else pytest.param(g, marks=pytest.mark.slow) for g in GRIDS])
@pytest.mark.parametrize("provider", ["separate", "joint"])
def test_species_day(benchmark, record, grid, provider):
    config = load_config("tiny")
    H, W = GRIDS[grid]
    t_lag = config.data.t_lag
    rng = np.random.default_rng(0)
    n_cov = len(COVARIATE_SETS[covariate_set(config)])
    coarse = rng.random((SPECIES, H, W), np.float32)
    cov = rng.random((n_cov, H, W), np.float32)
    lags = rng.random((MEMBERS, SPECIES * t_lag, H, W), np.float32)
    cfg = dataclasses.replace(config.sample, members=MEMBERS)
    kw = dict(cfg=cfg, T=config.diffusion.T, prediction=config.diffusion.prediction, members=MEMBERS,
              seed=0, day_key=1)
    models = [_separate(config, k) for k in range(SPECIES)]
    if provider == "joint":
        joint = _joint(config, models)
        inputs = DayInputs(coarse, cov, lags)

        def day():
            return downscale_day(joint, inputs, **kw)
    else:
        per = [DayInputs(coarse[k:k + 1], cov, lags[:, k * t_lag:(k + 1) * t_lag]) for k in range(SPECIES)]

        def day():
            return np.stack([downscale_day(m, x, **kw) for m, x in zip(models, per)], 1)
    benchmark.group = f"{SPECIES} species, one day, {grid} {H}x{W}, {MEMBERS} members with their own lags"
    day()  # warm-up (allocator, oneDNN primitives)
    out = benchmark.pedantic(day, rounds=3, iterations=1)
    assert out.shape == (MEMBERS, SPECIES, H, W) and np.isfinite(out).all()
    record(benchmark, benchmark.group, provider,  # separate runs first: the ratios are to it
           items=MEMBERS * SPECIES, unit="species-members", extra={"precision": cfg.precision})


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
