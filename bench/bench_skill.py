"""Skill on the twin, every model on the same days: the demo's whole pipeline (train, held-out
days with true lags, a strict rollout beyond the fine record) with the default recipe and the
paper's, side by side with the baselines a user could run themselves (``interp``, ``clim``).

Providers are models; the figures are skill, not speed: each row records R², RMSE and (for
ensembles) CRPS and spread/skill in ``extra_info`` and prints them, with the ratio of each
model's rollout RMSE to ``clim``'s. Minutes long (marked slow): ``make bench`` runs it,
``bench-check`` does not.
"""
import json

import pytest

from fastds.config import load_config
from fastds.demo import run_demo

RECIPES = {
    "default": [],
    # the paper's formulation on the same twin and the same small network
    "paper": ["train.target=absolute", "diffusion.prediction=sample", "train.mean=clim",
              "sample.fusion=final", "data.covariates=paper", "data.random_offsets=false"],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_twin_skill(benchmark, tmp_path, recipe):
    cfg = load_config("tiny", overrides=RECIPES[recipe])
    lines = []
    result = {}

    def run():
        result.update(run_demo(out=tmp_path / recipe, config=cfg, progress=False,
                               echo=lines.append, rollout_days=30, members=8))

    benchmark.pedantic(run, rounds=1, iterations=1)
    roll = {r["model"]: r for r in result["rollout"]["table"]}
    held = {r["model"]: r for r in result["held_out"]["table"]}
    ens = result["rollout"]["models"]["ddpm"].get("ensemble", {})
    info = {"recipe": recipe,
            "held_out_r2": {k: round(v["r2_mean"], 3) for k, v in held.items()},
            "rollout_r2": {k: round(v["r2_mean"], 3) for k, v in roll.items()},
            "rollout_rmse": {k: round(v["rmse_mean"], 3) for k, v in roll.items()},
            "rollout_rmse_vs_clim": {k: round(v["rmse_mean"] / roll["clim"]["rmse_mean"], 3)
                                     for k, v in roll.items()},
            "rollout_crps": round(ens.get("crps_mean", float("nan")), 3),
            "rollout_spread_skill": round(ens.get("spread_skill", float("nan")), 3),
            "rollout_sd_ratio": round(ens.get("sd_ratio_member", float("nan")), 3)}
    benchmark.extra_info.update(info)
    print(json.dumps(info, indent=1))
    print("\n".join(lines[-60:]))
    assert roll.keys() >= {"ddpm", "ddpm-member", "unet", "vae", "interp", "clim"}
    days = {e["days"][0] for e in result["rollout"]["models"].values()}
    assert len(days) == 1  # every model scored on the same days
