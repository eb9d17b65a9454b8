"""A run folder: what training writes and sampling reads, below both.

Layout: ``run.json`` (the store and region), ``config.toml`` (the resolved config the run was
trained with, its ``[sample]`` section included), ``seasonS/{pretrain,unet,vae,ddpm}[.best].pt``.
This module owns reading it: the run's config and sample settings (one resolution path for
the API and the CLI), checkpoints, a trained model with its anchor, regression mean and
spread calibration, and the whole-day inputs a config sees. Layers: data → models →
diffusion → runs → sampling → training → report/CLI (``tests/test_layers.py``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ._io import atomic_path
from .config import Config, SampleConfig, config_from_toml, to_toml
from .data.datasets import FineDays
from .data.transforms import COVARIATE_SETS, Anchor

__all__ = ["season_dir", "write_run_meta", "run_store", "run_variable", "species_names", "joint_species", "run_config", "write_run_config", "distill_settings", "sample_settings", "load_checkpoint", "checkpoint_weights", "covariate_set", "season_config", "trained_covariates", "fine_kwargs",
           "fine_days", "model_for", "load_trained"]


def season_dir(run, season) -> Path:
    """``run/seasonS``: a season's checkpoints."""
    return Path(run) / f"season{int(season)}"


def write_run_meta(run, store, config: Config, extra=None):
    """Record the store and the resolved config of a run (atomically); ``extra``: more of
    ``run.json`` (a joint run's species and their runs)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    meta = {"store": str(Path(store.path).resolve()), "region": [store.region.name, *store.region.as_tuple()],
            "variable": store.variable, **(extra or {})}
    with atomic_path(run / "run.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    write_run_config(run, config)


def write_run_config(run, config: Config):
    """Replace a run's ``config.toml`` (atomically): the settings ``sample`` uses by default."""
    with atomic_path(Path(run) / "config.toml") as tmp:
        tmp.write_text(to_toml(config))


def run_store(run, what="sample") -> str:
    """The store path a run was trained on (its ``run.json``); an error naming the file when
    ``run`` is not a run folder."""
    meta = Path(run) / "run.json"
    if not meta.exists():
        raise FileNotFoundError(f"{what}: {meta} is missing; is {run} a fastds run folder?")
    return json.loads(meta.read_text())["store"]


def run_variable(run) -> str | None:
    """The species a run was trained on (its ``run.json``); None for a run folder without one
    (the store then must hold a single species)."""
    meta = Path(run) / "run.json"
    return json.loads(meta.read_text()).get("variable") if meta.exists() else None


def species_names(runs, what) -> list[str]:
    """The species of one run per species (``runs``), in order; an error naming the run
    folder without a species, or the species named twice (``what``: the caller)."""
    names = [run_variable(r) for r in runs]
    if None in names:
        raise ValueError(f"{what}: {runs[names.index(None)]} has no run.json naming its species; "
                         "is it a fastds run folder?")
    twice = sorted({v for v in names if names.count(v) > 1})
    if twice:
        raise ValueError(f"{what}: two runs are of {twice[0]}; give one run per species")
    return names


def joint_species(run) -> list[Path]:
    """The species runs a joint run was trained over (its ``run.json``: ``fastds train
    --model joint``), in channel order; [] for any other run folder."""
    meta = Path(run) / "run.json"
    return [Path(r) for r in json.loads(meta.read_text()).get("species_runs", [])] if meta.exists() else []


def run_config(run) -> Config:
    """The resolved config a run was trained with (the dataclass defaults if it has none yet:
    a run folder used only for the untrained baselines)."""
    path = Path(run) / "config.toml"
    return config_from_toml(path.read_text()) if path.exists() else Config()


def sample_settings(run, cfg: SampleConfig | None = None, **overrides) -> SampleConfig:
    """The sample settings of a call: ``cfg`` if given, else the run's saved ``[sample]``
    (what the CLI uses too), then ``overrides`` (SampleConfig fields by keyword)."""
    base = cfg if cfg is not None else run_config(run).sample
    names = {f.name for f in dataclasses.fields(SampleConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"sample: unknown setting(s) {', '.join(unknown)}; sample settings are "
                        f"{', '.join(sorted(names))}")
    return dataclasses.replace(base, **overrides) if overrides else base


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint dict; a missing or unreadable file is an error that names it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                           "delete it to start over") from None


def checkpoint_weights(ck: dict, use_ema=True) -> dict:
    """A checkpoint's weights: the EMA's where it saved them (best checkpoints store the EMA
    as the averaged module's own state_dict, same keys) and ``use_ema``, else the model's."""
    return ck["ema"] if use_ema and ck.get("ema") is not None else ck["model"]


# data.covariates = "auto": the anchor's map reliability (signal share of its mean residual
# map's variance) from which a season's DDPM reads the source maps: signal equal to noise.
# Measured on the twins (round 36): plume 0.71 (summer) / 0.55 (winter), smooth 0.35 / 0.27,
# rough 0.15 / 0.25; not fitted to them.
SOURCE_RELIABILITY = 0.5


def covariate_set(config: Config) -> str:
    """The covariate set ``config`` builds inputs with: ``data.covariates``, with ``"auto"``
    meaning ``"bounded"`` wherever no season's DDPM has decided (:func:`season_config`)."""
    return "bounded" if config.data.covariates == "auto" else config.data.covariates


def season_config(config: Config, *, kind, store, season, run=None) -> Config:
    """``config`` as ``train --model kind`` fits season ``season`` with it: unchanged unless
    ``data.covariates = "auto"``, which becomes a concrete set (the one its checkpoint keeps).
    A CorrDiff DDPM (residual target, U-Net mean, no out-of-fold U-Nets) reads the source maps
    (``"sources"``, its U-Net mean staying on ``"bounded"``) where the season's anchor map is at
    least :data:`SOURCE_RELIABILITY` signal (fixed sources or terrain), ``"bounded"`` elsewhere;
    a distilled student takes its teacher's choice; every other model ``"bounded"``."""
    if config.data.covariates != "auto":
        return config
    tc = config.train
    if kind == "distill" and run is not None and (season_dir(run, season) / "ddpm.best.pt").exists():
        return trained_covariates(config, season_dir(run, season) / "ddpm.best.pt")
    cov, mean_cov = "bounded", tc.mean_covariates
    if kind == "ddpm" and tc.mean == "unet" and tc.target == "residual" and not tc.oof_folds:
        bounded = dataclasses.replace(config, data=dataclasses.replace(config.data, covariates="bounded"))
        if fine_days(store, bounded, season).anchor.reliability.get(int(season), 0.0) >= SOURCE_RELIABILITY:
            cov, mean_cov = "sources", mean_cov or "bounded"
    return dataclasses.replace(config, data=dataclasses.replace(config.data, covariates=cov),
                               train=dataclasses.replace(tc, mean_covariates=mean_cov))


def trained_covariates(config: Config, checkpoint) -> Config:
    """``config`` with ``data.covariates = "auto"`` replaced by the covariate sets the model in
    ``checkpoint`` (a path) was trained on (and so must be fed); other configs unchanged."""
    if config.data.covariates != "auto":
        return config
    saved = config_from_toml(load_checkpoint(checkpoint)["config"])
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, covariates=saved.data.covariates),
        train=dataclasses.replace(config.train, mean_covariates=saved.train.mean_covariates))


def fine_kwargs(config: Config) -> dict:
    """How a config sees the fine record: the one mapping from settings to dataset options,
    shared by training and sampling so both see the same inputs."""
    d = config.data
    if config.train.anchor not in ("shrunk", "clim"):
        raise ValueError(f"train.anchor must be 'shrunk' or 'clim', got {config.train.anchor!r}")
    return {"t_lag": d.t_lag, "align": d.align, "space": config.train.target,
            "covariates": covariate_set(config), "shrink": config.train.anchor == "shrunk"}


def fine_days(store, config: Config, season, *, anchor: Anchor | None = None) -> FineDays:
    """Whole-day inputs of ``season`` as ``config`` trains on them (``anchor``: the one saved
    with a model; None fits it on the store's training days)."""
    return FineDays(store, season=season, anchor=anchor, **fine_kwargs(config))


def distill_settings(cfg: SampleConfig, config: Config) -> SampleConfig:
    """The sampler a distilled student runs (``kind="distill"``): deterministic DDIM with
    trailing spacing over ``config.train.distill_steps`` network evaluations, the grid it was
    trained on; every other setting (members, fusion, widening, ...) as ``cfg``."""
    return dataclasses.replace(cfg, sampler="ddim", steps=int(config.train.distill_steps), spacing="trailing",
                               eta=0.0)


def model_for(kind, config: Config, run, season):
    """An untrained ``kind`` network as ``config`` builds it, its frozen Stage-A encoder loaded
    from the run (and, for the CorrDiff DDPM, an untrained U-Net mean attached). A distilled
    student (``"distill"``) is a DDPM network."""
    from .models.conditional import build_model
    if kind == "joint":
        return _joint_for(config, run, season)
    tcfg = config.train
    transfer_widths = config.pretrain.widths if tcfg.transfer else None
    torch.manual_seed(tcfg.seed)
    kind = "ddpm" if kind.startswith("distill") else kind  # a student, or a progressive round's
    model = build_model(kind, widths=tcfg.widths, attention=tcfg.attention, t_lag=config.data.t_lag,
                        transfer_widths=transfer_widths, transfer_attention=config.pretrain.attention,
                        prediction=config.diffusion.prediction, vae_latent=tcfg.vae_latent,
                        n_covariates=len(COVARIATE_SETS[covariate_set(config)]),
                        target=tcfg.target, lag_channels=tcfg.lag_channels)
    if kind == "ddpm" and tcfg.mean == "unet":
        if tcfg.target != "residual":
            raise ValueError("train.mean='unet' needs train.target='residual'")
        model.set_regression(_mean_for(config, run, season))
    elif tcfg.mean not in ("clim", "unet"):
        raise ValueError(f"train.mean must be 'clim' or 'unet', got {tcfg.mean!r}")
    if model.transfer is not None:
        best = season_dir(run, season) / "pretrain.best.pt"
        if not best.exists():
            raise FileNotFoundError(f"train: {best} is missing; run `fastds pretrain` for season "
                                    f"{season} first (or set train.transfer=false for the ablation)")
        ck = load_checkpoint(best)
        enc = {k[len("encoder."):]: v for k, v in ck["model"].items() if k.startswith("encoder.")}
        model.transfer.encoder.load_state_dict(enc)
    return model


def _mean_for(config: Config, run, season):
    """A CorrDiff DDPM's untrained U-Net mean: on the DDPM's covariates, or on
    ``train.mean_covariates``, a set whose channels lead the DDPM's (the mean then reads
    those leading channels of whatever the DDPM is given)."""
    own = covariate_set(config)
    mean_cov = config.train.mean_covariates or own
    if mean_cov == own:
        return model_for("unet", config, run, season)
    if mean_cov not in COVARIATE_SETS:
        raise ValueError(f"train.mean_covariates must be one of {', '.join(COVARIATE_SETS)} (or \"\"), "
                         f"got {mean_cov!r}")
    lead = COVARIATE_SETS[mean_cov]
    if COVARIATE_SETS[own][:len(lead)] != lead:
        raise ValueError(f"train.mean_covariates={mean_cov!r}: its channels {list(lead)} do not lead "
                         f"data.covariates={own!r}'s {list(COVARIATE_SETS[own])}, so the U-Net mean cannot "
                         "read them from the DDPM's inputs")
    if config.train.oof_folds:
        raise ValueError("train.mean_covariates and train.oof_folds: the out-of-fold U-Nets are trained "
                         "on data.covariates; set one of them")
    mean = model_for("unet", dataclasses.replace(config, data=dataclasses.replace(config.data, covariates=mean_cov)),
                     run, season)
    mean.covariate_channels = len(lead)
    return mean


def _joint_for(config: Config, run, season):
    """An untrained joint denoiser over the trained U-Nets of the joint run's species runs."""
    from .models.joint import build_joint
    runs = joint_species(run)
    if not runs:
        raise FileNotFoundError(f"{Path(run) / 'run.json'} names no species runs; is {run} a joint run "
                                "(`fastds train --model joint --species-run A --species-run B ...`)?")
    means = [load_trained(r, season, "unet")[0] for r in runs]
    torch.manual_seed(config.train.seed)
    return build_joint(means, [run_variable(r) for r in runs], widths=config.train.widths,
                       attention=config.train.attention,
                       n_covariates=len(COVARIATE_SETS[covariate_set(config)]))


def load_trained(run, season, kind="ddpm", *, use_ema=True, device="cpu"):
    """(model in eval mode, Config) from a run's best checkpoint for ``season``.

    ``model.anchor`` is the :class:`~fastds.data.transforms.Anchor` the model was trained
    around (residual target), or None (absolute target)."""
    path = season_dir(run, season) / f"{kind}.best.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `fastds train --model {kind}` for season {season}")
    ck = load_checkpoint(path, map_location=device)
    config = config_from_toml(ck["config"])
    model = model_for(kind, config, run, season)
    state = dict(checkpoint_weights(ck, use_ema))
    model.load_state_dict(state)  # (older checkpoints: see ConditionalModel._load_from_state_dict)
    model.anchor = Anchor.from_dict(ck["anchor"]) if ck.get("anchor") else None
    model.calibration = ck.get("calibration")  # the spread calibration's curves (DDPM), or None
    return model.to(device).eval(), config
