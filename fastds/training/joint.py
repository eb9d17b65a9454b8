"""The joint model of several species (``fastds train --model joint``).

Trained over species runs that each hold their species' Stage A and trained U-Net (one store,
one run per species, as ``fastds train`` leaves them): the U-Nets stay frozen as the species'
means and conditioning, and one denoiser learns the species' scaled residuals as the
channels of one field (:class:`~fastds.models.joint.JointModel`). Its widening is fitted
per species, as a single species' DDPM's is, with the sampler that ships.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..config import Config, to_toml
from ..data.datasets import SpeciesPatches
from ..data.store import open_store
from ..diffusion.schedule import Diffusion
from ..runs import (load_checkpoint, load_trained, model_for, run_config, run_store, season_dir, species_names,
                    write_run_meta)
from ..sampling.spread import sampler_record
from .loop import fit
from .stages import (_calibration_draws, _model_settings, _seasons, _settings,
                     calibration_days, calibration_sampler, nothing_left, prepared_sets, residual_scale,
                     save_widening, train_bf16, widening_fit, CALIBRATION_MEMBERS)

__all__ = ["train_joint", "joint_loss", "calibrate_joint"]

# what every species run must share for their U-Nets to condition one denoiser
_SHARED = (("data", "tile"), ("data", "t_lag"), ("data", "covariates"), ("data", "align"),
           ("data", "seasons"), ("train", "target"))


def _species_of(runs) -> tuple[list[Path], list[str], str]:
    """(runs, species names, store path), each checked: named, distinct, one store."""
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ValueError(f"train --model joint: needs the runs of at least two species, got {len(runs)}")
    names = species_names(runs, "train --model joint")
    stores = [run_store(r, "train --model joint") for r in runs]
    if len(set(stores)) > 1:
        raise ValueError(f"train --model joint: the runs come from different stores ({', '.join(sorted(set(stores)))}); "
                         "the species of a joint model must come from one store")
    return runs, names, stores[0]


def _check_configs(runs, configs, config: Config):
    """The species runs' configs (``configs``) agree with each other and with ``config`` where
    the joint model needs them to; an error naming the setting and the run otherwise."""
    for run, other in zip(runs, configs):
        for section, name in _SHARED:
            a, b = getattr(getattr(config, section), name), getattr(getattr(other, section), name)
            if a != b:
                raise ValueError(f"train --model joint: {section}.{name} is {b!r} in {run} but {a!r} "
                                 "for the joint model; the species runs must share it")
    if config.train.target != "residual":
        raise ValueError("train --model joint: needs train.target='residual' (the species' U-Net means)")
    if config.data.covariates in ("events", "sources"):
        raise ValueError(f"train --model joint: data.covariates={config.data.covariates!r} differ "
                         "per species (each species' own coarse field or anchor); use 'bounded' or "
                         "'paper'")
    for name in ("calibration_rollouts", "state_rollouts"):
        if getattr(config.train, name) > 0:
            raise ValueError(f"train --model joint: train.{name} > 0 is not supported "
                             "(the joint widening is fitted on validation days with true lags)")


def joint_loss(config: Config):
    """The joint model's loss ``(model, batch, generator) -> scalar``: the DDPM loss on the K
    species' residuals over their U-Net means, each divided by its own scale."""
    diffusion = Diffusion(config.diffusion.T, config.diffusion.prediction, config.diffusion.schedule)

    def loss(m, b, gen):
        cond = m.cond(b["coarse"], b["covariates"], b["lags"], b.get("drop"))
        residual = (b["target"] - m.regression_mean_of(cond)) / m.regression_scale.view(1, -1, 1, 1)
        return diffusion.loss(m, residual, cond, generator=gen)
    return loss


def train_joint(*, runs, run, config: Config | None = None, season=None, resume=False, progress=True,
                device="cpu", on_step=None) -> list[Path]:
    """Train the joint model of the species of ``runs`` (one run per species of one store,
    each with Stage A and a trained U-Net for the seasons asked) into the run folder ``run``.

    ``config``: the joint model's training settings (network widths, epochs, ...); None takes
    the first species run's. The species (channel) order is ``runs``'. Each species' residual
    scale and inflation come from its own U-Net as for its own DDPM
    (:func:`~fastds.training.stages.residual_scale`); after training the widening is fitted
    per species (:func:`calibrate_joint`). Returns the best-checkpoint paths."""
    runs, names, store_path = _species_of(runs)
    configs = [run_config(r) for r in runs]  # each species' own settings, read once
    config = config if config is not None else configs[0]
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, variable=""))
    _check_configs(runs, configs, config)
    stores = [open_store(store_path, variable=v) for v in names]
    run = Path(run)
    write_run_meta(run, stores[0], config, extra={"variable": None, "species": list(names),
                                                  "species_runs": [str(r.resolve()) for r in runs]})
    out = []
    for s in _seasons(stores[0], config, season):
        ckpt = season_dir(run, s) / "joint.pt"
        best = ckpt.with_suffix(".best.pt")
        if resume and nothing_left(ckpt, config.train.calibrate_spread):
            out.append(best)  # trained and calibrated: nothing to rebuild
            continue
        # each species' sets as its own training builds them (its pushforward and lag noise)
        sets = [prepared_sets(r, st, s, c, device) for r, st, c in zip(runs, stores, configs)]
        model = model_for("joint", config, run, s)
        scales = [residual_scale(m, t, v, c) for m, (t, v), c in zip(model.means, sets, configs)]
        model.regression_scale.copy_(torch.tensor([a for a, _ in scales]))
        model.regression_inflation.copy_(torch.tensor([b for _, b in scales]))
        train_set, val_set = (SpeciesPatches([st[i] for st in sets]) for i in (0, 1))
        done = fit(model, joint_loss(config), train_set, val_set,
                   settings=_settings(config.train, epoch_subset=config.data.max_train_patches,
                                      bf16=train_bf16(config.train, device), **_joint_settings(config, len(runs))),
                   ckpt_path=ckpt, extra_state={"kind": "joint", "season": s, "config": to_toml(config),
                                                "species": names, "anchor": None},
                   resume=resume, progress=progress, device=device, on_step=on_step,
                   desc=f"train joint season {s}")
        calibrated = done.get("already_done") and load_checkpoint(best).get("calibration") is not None
        if config.train.calibrate_spread and not calibrated:
            calibrate_joint(run, s, [t for t, _ in sets], sets[0][1], config, device)
        out.append(best)
    return out


def _joint_settings(config: Config, k: int) -> dict:
    """The DDPM's fit settings with the joint model's epochs (``train.joint_epochs``; 0: the
    K separate DDPMs' together: one denoiser learns K species from a K-times wider input)."""
    out = _model_settings("ddpm", config.train)
    if config.train.joint_epochs < 0:
        raise ValueError(f"train.joint_epochs must be >= 0, got {config.train.joint_epochs}")
    out["epochs"] = config.train.joint_epochs or k * out["epochs"]
    return out


def calibrate_joint(run, season, fds, val_set, config: Config, device="cpu", days=8,
                    members=CALIBRATION_MEMBERS):
    """Fit a trained joint model's widening per species (as
    :func:`~fastds.training.stages.calibrate_spread` fits one species' DDPM's, on the same
    validation days with true lags, with the sampler that ships, each species projected on its
    own coarse cells) and save it in its best checkpoint: ``calibration["species"]`` holds each
    species' curves. ``fds``: each species' training FinePatches (channel order); a no-op
    (None) without usable validation days."""
    from ..sampling.pipeline import _CoarseDays, _projection
    if val_set is None or len(val_set) == 0:
        return None
    pick = calibration_days(fds[0], val_set, days)
    if len(pick) == 0:
        return None
    best = season_dir(run, season) / "joint.best.pt"
    ck = load_checkpoint(best)
    model, _ = load_trained(run, season, "joint", device=device)
    cfg = calibration_sampler(config, members)
    pairs = cfg.antithetic and members >= 4 and members % 2 == 0
    cals = []
    draws = _calibration_draws(model, fds, pick, cfg, config, members, pairs, device)
    for fd, d in zip(fds, draws):
        coarse = _CoarseDays(fd.store).values if cfg.consistency else None
        project = _projection(fd.store, coarse) if cfg.consistency else None
        cals.append(widening_fit(fd, pick, d, cfg, project, coarse, pairs))
    model.regression_inflation.copy_(torch.tensor([c["inflation"] for c in cals]))
    model.regression_bands = torch.tensor(np.stack([c["band_factor"] * np.asarray(c["band_gains"]) for c in cals]),
                                          dtype=torch.float32)
    cal = {"species": cals, "names": list(model.names), "members": members, "sampler": sampler_record(cfg),
           "raw_spread_skill": [c["raw_spread_skill"] for c in cals]}
    save_widening(best, ck, model, cal)
    return cal
