"""``pretrain`` (Stage A) and ``train`` (Stage C and baselines), per season x area.

Run folder layout::

    RUN/run.json                 store path, region, variable (written by pretrain)
    RUN/config.toml              the resolved config of the last stage run
    RUN/season{S}/pretrain.pt    Stage A: last state (resumable); .best.pt best weights
    RUN/season{S}/{ddpm,unet,vae}.pt, .best.pt, .log.json
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .._io import atomic_path
from ..config import Config, config_from_toml, to_toml
from ..data.datasets import FineDays, FinePatches, LagSequences
from ..data.transforms import COVARIATE_SETS, Anchor
from ..data.regions import season_of
from ..data.store import open_store
from ..diffusion.schedule import Diffusion
from ..models.conditional import build_model
from ..models.unet import TemporalUNet
from .loop import FitSettings, fit, load_checkpoint

__all__ = ["pretrain", "train", "season_dir", "load_trained", "fine_days"]


def season_dir(run, season) -> Path:
    return Path(run) / f"season{int(season)}"


def _settings(section, *, epoch_subset=0, **extra) -> FitSettings:
    names = {f.name for f in dataclasses.fields(FitSettings)}
    values = {k: v for k, v in dataclasses.asdict(section).items() if k in names}
    values.update(extra)
    return FitSettings(epoch_subset=epoch_subset, **values)


def _write_run_meta(run, store, config):
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    meta = {"store": str(Path(store.path).resolve()), "region": [store.region.name, *store.region.as_tuple()],
            "variable": store.variable}
    with atomic_path(run / "run.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    with atomic_path(run / "config.toml") as tmp:
        tmp.write_text(to_toml(config))


def _seasons(store, config, season):
    if season is not None:
        return [int(season)]
    present = set(season_of(store.times.month).tolist())
    return [s for s in config.data.seasons if s in present]


def pretrain(*, data, run, config: Config, season=None, resume=False, progress=True,
             device="cpu", on_step=None) -> list[Path]:
    """Stage A: train the temporal U-Net on the coarse record of each season (L1 loss).

    data : a store path; run : the run folder; season : one season (1..4) or None for all in
    ``config.data.seasons`` that the fine record has. Returns the best-checkpoint paths.
    """
    store = open_store(data)
    _write_run_meta(run, store, config)
    out = []
    for s in _seasons(store, config, season):
        cfg = config.pretrain
        train_set = LagSequences(store, season=s, split="train", t_lag=config.data.t_lag)
        val_set = LagSequences(store, season=s, split="val", t_lag=config.data.t_lag)
        if len(train_set) == 0:
            raise ValueError(f"pretrain: season {s} has no training day with a full "
                             f"{config.data.t_lag}-day lag window in {data}")
        torch.manual_seed(cfg.seed)
        model = TemporalUNet(config.data.t_lag, cfg.widths, cfg.attention)

        def loss_fn(m, batch, gen):
            lags, target = batch
            return F.l1_loss(m(lags), target)

        ckpt = season_dir(run, s) / "pretrain.pt"
        fit(model, loss_fn, train_set, val_set, settings=_settings(cfg), ckpt_path=ckpt,
            extra_state={"kind": "pretrain", "season": s, "config": to_toml(config),
                         "norm_x": store.norm_x.to_dict(), "t_lag": config.data.t_lag},
            resume=resume, progress=progress, device=device, on_step=on_step,
            desc=f"pretrain season {s}")
        out.append(ckpt.with_suffix(".best.pt"))
    return out


def _fine_kwargs(config: Config) -> dict:
    """How a config sees the fine record: the one mapping from settings to dataset options,
    shared by training and sampling so both see the same inputs."""
    d = config.data
    if config.train.anchor not in ("shrunk", "clim"):
        raise ValueError(f"train.anchor must be 'shrunk' or 'clim', got {config.train.anchor!r}")
    return {"t_lag": d.t_lag, "align": d.align, "space": config.train.target,
            "covariates": d.covariates, "shrink": config.train.anchor == "shrunk"}


def fine_days(store, config: Config, season, *, anchor: Anchor | None = None) -> FineDays:
    """Whole-day inputs of ``season`` as ``config`` trains on them (``anchor``: the one saved
    with a model; None fits it on the store's training days)."""
    return FineDays(store, season=season, anchor=anchor, **_fine_kwargs(config))


def _model_for(kind, config: Config, run, season):
    tcfg = config.train
    transfer_widths = config.pretrain.widths if tcfg.transfer else None
    torch.manual_seed(tcfg.seed)
    model = build_model(kind, widths=tcfg.widths, attention=tcfg.attention, t_lag=config.data.t_lag,
                        transfer_widths=transfer_widths, transfer_attention=config.pretrain.attention,
                        prediction=config.diffusion.prediction, vae_latent=tcfg.vae_latent,
                        n_covariates=len(COVARIATE_SETS[config.data.covariates]),
                        target=tcfg.target, lag_channels=tcfg.lag_channels)
    if kind == "ddpm" and tcfg.mean == "unet":
        if tcfg.target != "residual":
            raise ValueError("train.mean='unet' needs train.target='residual'")
        model.set_regression(_model_for("unet", config, run, season))
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


def _attach_regression(model, run, season, train_set, config: Config):
    """CorrDiff: load the season's trained U-Net into the DDPM as its frozen mean and set the
    residual's scale from training patches (so the diffused residual has unit sd)."""
    best = season_dir(run, season) / "unet.best.pt"
    if not best.exists():
        raise FileNotFoundError(f"train: {best} is missing; train.mean='unet' diffuses the residual "
                                f"of the U-Net, so run `fastds train --model unet` first")
    ck = load_checkpoint(best)
    model.regression.load_state_dict(ck["ema"] if ck.get("ema") is not None else ck["model"])
    g = torch.Generator().manual_seed(config.train.seed + 3)
    idx = torch.randperm(len(train_set), generator=g)[:1024].tolist()
    from torch.utils.data import default_collate
    b = default_collate([train_set[i] for i in idx])
    res = b["target"] - model.regression_mean(b["coarse"], b["covariates"], b["lags"])
    model.set_regression(model.regression, float(res.std().clamp_min(1e-3)))


def _loss_for(kind, config: Config):
    diffusion = Diffusion(config.diffusion.T, config.diffusion.prediction, config.diffusion.schedule)
    beta = config.train.vae_beta

    def ddpm(m, b, gen):
        cond = m.cond(b["coarse"], b["covariates"], b["lags"])
        target = b["target"]
        mean = m.regression_mean(b["coarse"], b["covariates"], b["lags"])
        if mean is not None:  # CorrDiff: diffuse the scaled residual of the regression
            target = (target - mean) / m.regression_scale
        return diffusion.loss(m, target, cond, generator=gen)

    def unet(m, b, gen):
        cond = m.cond(b["coarse"], b["covariates"], b["lags"])
        return F.l1_loss(m(None, None, cond), b["target"])

    def vae(m, b, gen):
        cond = m.cond(b["coarse"], b["covariates"], b["lags"])
        recon, mu, logvar = m.net(b["target"], cond)
        kl = -0.5 * torch.mean(1 + logvar - mu ** 2 - logvar.exp())
        return F.mse_loss(recon, b["target"]) + beta * kl

    return {"ddpm": ddpm, "unet": unet, "vae": vae}[kind]


def train(*, data, run, config: Config, model="ddpm", season=None, resume=False, progress=True,
          device="cpu", on_step=None) -> list[Path]:
    """Stage C: train the conditional DDPM (or a baseline: ``model="unet"`` / ``"vae"``) on
    fine patches of each season, with the frozen Stage-A encoder's features as conditioning
    (unless ``config.train.transfer`` is false). Returns the best-checkpoint paths."""
    store = open_store(data)
    run = Path(run)
    out = []
    for s in _seasons(store, config, season):
        d = config.data
        train_set = FinePatches(store, season=s, split="train", tile=d.tile, stride=d.train_stride,
                                random_offsets=d.random_offsets, seed=config.train.seed,
                                lag_noise=config.train.lag_noise, **_fine_kwargs(config))
        val_set = FinePatches(store, season=s, split="val", tile=d.tile, stride=d.train_stride,
                              anchor=train_set.anchor, **_fine_kwargs(config))
        if len(train_set) == 0:
            raise ValueError(f"train: season {s} has no fine training day with a full "
                             f"{d.t_lag}-day lag window in {data}")
        net = _model_for(model, config, run, s)
        if net.regression is not None:
            _attach_regression(net, run, s, train_set, config)
        ckpt = season_dir(run, s) / f"{model}.pt"
        fit(net, _loss_for(model, config), train_set, val_set,
            settings=_settings(config.train, epoch_subset=d.max_train_patches,
                               ema=config.train.ema if model == "ddpm" else 0.0),
            ckpt_path=ckpt,
            extra_state={"kind": model, "season": s, "config": to_toml(config),
                         "norm_x": store.norm_x.to_dict(), "norm_y": store.norm_y.to_dict(),
                         "anchor": train_set.anchor.to_dict() if train_set.anchor else None},
            resume=resume, progress=progress, device=device, on_step=on_step,
            desc=f"train {model} season {s}")
        out.append(ckpt.with_suffix(".best.pt"))
    return out


def load_trained(run, season, kind="ddpm", *, use_ema=True, device="cpu"):
    """(model in eval mode, Config) from a run's best checkpoint for ``season``.

    ``model.anchor`` is the :class:`~fastds.data.transforms.Anchor` the model was trained
    around (residual target), or None (absolute target)."""
    path = season_dir(run, season) / f"{kind}.best.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `fastds train --model {kind}` for season {season}")
    ck = load_checkpoint(path, map_location=device)
    config = config_from_toml(ck["config"])
    model = _model_for(kind, config, run, season)
    # best checkpoints store the EMA as the averaged module's own state_dict (same keys)
    model.load_state_dict(ck["ema"] if use_ema and ck.get("ema") is not None else ck["model"])
    model.anchor = Anchor.from_dict(ck["anchor"]) if ck.get("anchor") else None
    return model.to(device).eval(), config
