"""``pretrain`` (Stage A) and ``train`` (Stage C and baselines), per season x area.

Run folder layout::

    RUN/run.json                 store path, region, variable (written by pretrain)
    RUN/config.toml              the resolved config of the last stage run
    RUN/season{S}/pretrain.pt    Stage A: last state (resumable); .best.pt best weights
    RUN/season{S}/{ddpm,unet,vae}.pt, .best.pt, .log.json
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._warn import warn_caller
from ..config import Config, SampleConfig, config_from_toml, to_toml
from ..data.datasets import FinePatches, LagSequences
from ..data.regions import season_of
from ..data.store import open_store
from ..diffusion.schedule import Diffusion
from ..models.unet import TemporalUNet
from ..runs import (checkpoint_weights, distill_settings, fine_days, fine_kwargs, load_checkpoint, load_trained,
                    model_for, run_store, run_variable, season_config, season_dir, trained_covariates,
                    write_run_config, write_run_meta)
from ..sampling.spread import INFLATIONS, RAW, sampler_record, scan_factors
from .distill import DISTILL_METHODS, distill_rounds, progressive_loss, trajectory_loss
from .loop import FitSettings, fit
from .oof import fit_fold_means

__all__ = ["pretrain", "train", "default_chain", "season_dir", "load_trained", "fine_days"]


def _settings(section, *, epoch_subset=0, **extra) -> FitSettings:
    names = {f.name for f in dataclasses.fields(FitSettings)}
    values = {k: v for k, v in dataclasses.asdict(section).items() if k in names}
    values.update(extra)
    return FitSettings(epoch_subset=epoch_subset, **values)


def train_bf16(tc, device) -> bool:
    """Whether Stage C trains under bf16 autocast: ``train.precision`` resolved on ``device``
    (``"auto"``: where it has bf16 natively), or the older ``train.bf16 = true``."""
    from .._backend import resolve_precision
    return resolve_precision(tc.precision, device, setting="train.precision") == "bf16" or bool(tc.bf16)


def _model_settings(model, tc) -> dict:
    """What differs per model in Stage C: only the DDPM keeps an EMA, and it may train longer."""
    if tc.ddpm_epoch_factor < 1:
        raise ValueError(f"train.ddpm_epoch_factor must be >= 1, got {tc.ddpm_epoch_factor}")
    if model.startswith("distill"):  # a student, or a progressive round's
        return {"ema": tc.ema, "epochs": tc.distill_epochs or tc.epochs}
    if model != "ddpm":
        return {"ema": 0.0}
    return {"ema": tc.ema, "epochs": tc.epochs * tc.ddpm_epoch_factor}


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
    store = open_store(data, variable=config.data.variable or None)
    write_run_meta(run, store, config)
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


def _network_and_loss(model, config: Config, run, season, train_set, val_set, device, fit_round=None):
    """The network ``train`` fits and its loss: a fresh one (the CorrDiff DDPM with its U-Net
    mean attached), or, for ``"distill"``, a student started from its teacher: the run's
    trained DDPM, or with ``train.distill_method = "progressive"`` the student of the
    previous round, each round but the last fitted here by ``fit_round(kind, net, loss)``
    (checkpoints ``distill-r{i}``, resumable like any fit)."""
    if model != "distill":
        net = model_for(model, config, run, season)
        if net.regression is not None:
            _attach_regression(net, run, season, train_set, config, val_set)
        return net, _loss_for(model, config)
    method = config.train.distill_method
    if method not in DISTILL_METHODS:
        raise ValueError(f"train.distill_method must be one of {', '.join(DISTILL_METHODS)}, got {method!r}")
    teacher, _ = load_trained(run, season, "ddpm", device=device)
    rounds = distill_rounds(config) if method == "progressive" else []
    for i, (steps, _) in enumerate(rounds[:-1]):
        student = _student_of(teacher, config, run, season)
        fit_round(f"distill-r{i}", student, progressive_loss(teacher, config, steps))
        teacher, _ = load_trained(run, season, f"distill-r{i}", device=device)
    student = _student_of(teacher, config, run, season)
    if rounds:
        return student, progressive_loss(teacher, config, rounds[-1][0])
    return student, trajectory_loss(teacher, config)


def _student_of(teacher, config: Config, run, season):
    """A student started from its teacher: the EMA weights, mean, residual scale and widening
    (the student diffuses the same residual, so all but its network stay the teacher's)."""
    student = model_for("distill", config, run, season)
    student.load_state_dict(teacher.state_dict())
    student.anchor = teacher.anchor
    return student


def _attach_regression(model, run, season, train_set, config: Config, val_set=None):
    """CorrDiff: load the season's trained U-Net into the DDPM as its frozen mean and set the
    residual's scale and inflation (:func:`residual_scale`)."""
    best = season_dir(run, season) / "unet.best.pt"
    if not best.exists():
        raise FileNotFoundError(f"train: {best} is missing; train.mean='unet' diffuses the residual "
                                f"of the U-Net, so run `fastds train --model unet` first (`fastds "
                                f"train` with no --model trains both, in order)")
    ck = load_checkpoint(best)
    model.regression.load_state_dict(checkpoint_weights(ck))
    scale, inflation = residual_scale(model.regression, train_set, val_set, config)
    model.set_regression(model.regression, scale, inflation)


def residual_scale(mean, train_set, val_set, config: Config) -> tuple[float, float]:
    """(scale, inflation) of a CorrDiff residual over the deterministic model ``mean`` (a
    trained U-Net): the sd of target − mean on up to 1024 validation patches (training ones
    without validation days), so the diffused residual has unit sd; and the ratio of the
    mean's strict-rollout error sd on the validation days to it (≥ 1; 1 without them): the
    U-Net's errors on days it was not fitted to are what a sample must spread over (on its own
    training days they are smaller, which under-disperses)."""
    source = val_set if val_set is not None and len(val_set) > 0 else train_set
    g = torch.Generator().manual_seed(config.train.seed + 3)
    idx = torch.randperm(len(source), generator=g)[:1024].tolist()
    from torch.utils.data import default_collate
    b = default_collate([source[i] for i in idx])
    mean.eval()
    with torch.no_grad():
        pred = mean(None, None, mean.cond(b["coarse"], b["covariates"], b["lags"], b.get("drop")))
    scale = float((b["target"] - pred).std().clamp_min(1e-3))
    inflation = 1.0
    if val_set is not None and len(val_set) > 0 and config.train.target == "residual":
        # the training set already holds every whole-day input a rollout reads
        sd = rollout_residual_sd(mean, train_set, val_set.days, config)
        if np.isfinite(sd):
            inflation = max(sd / scale, 1.0)
    return scale, inflation


def _sample_cfg(config: Config):
    """The patch geometry whole-day predictions use inside training (one member, eager, and
    none of a user's ``spread_scale``, which only ensembles around a mean take)."""
    return dataclasses.replace(config.sample, members=1, fusion="final", lag_conditioning=True,
                               cuda_graphs=False, spread_scale=1.0)


def _day_prediction(model, fd, e, lags, config: Config, device):
    """A deterministic model's (U-Net) prediction of fine day ``e`` from ``lags``
    (t_lag, H, W) in lag units: log10 (H, W)."""
    from ..sampling.day import DayInputs, downscale_day
    inputs = DayInputs(fd.coarse_on_fine(e), fd.covariates(e), lags[None])
    z = downscale_day(model, inputs, kind=model.kind, cfg=_sample_cfg(config), device=device)[0]
    if fd.space == "absolute":
        return fd.store.norm_y.inverse_log(np.maximum(z, 0.0), fd.season)
    return fd.anchor.inverse(z, fd.mu_at(fd.cidx[e]), fd.season)


def _pushforward_alternative(run, season, sets, config: Config, device):
    """The run's U-Net one-step predictions of every lag day that the items of ``sets``
    (training and validation FinePatches) read, in lag units, for
    ``train.pushforward_source = "unet"``; only days whose own lag window holds no test day
    (FinePatches.alt_allowed)."""
    train_set = sets[0]
    best = season_dir(run, season) / "unet.best.pt"
    if not best.exists():
        raise FileNotFoundError(f"train: {best} is missing; train.pushforward_source='unet' builds "
                                "lag windows from the U-Net's predictions, so train the U-Net first")
    unet, _ = load_trained(run, season, "unet", device=device)
    fd = fine_days(train_set.store, config, season, anchor=unet.anchor)
    t_lag = train_set.t_lag
    need = sorted({e for fp in sets for d in fp.days for e in range(d - t_lag, d)})
    allowed = train_set.alt_allowed()
    alt = np.zeros((len(train_set.times),) + tuple(train_set.shape), np.float32)
    ok = np.zeros(len(train_set.times), bool)
    for e in need:
        if allowed[e]:
            log = _day_prediction(unet, fd, e, fd.y[e - t_lag:e], config, device)
            alt[e] = train_set.store.norm_y.forward_log(log, season)
            ok[e] = True
    for fp in sets:
        fp.set_alternative(alt, ok)


def validation_blocks(days):
    """Runs of consecutive validation target days: [(first, last), ...] fine indices."""
    days = np.asarray(sorted(days))
    if len(days) == 0:
        return []
    cut = np.flatnonzero(np.diff(days) != 1)
    return list(zip(days[np.r_[0, cut + 1]], days[np.r_[cut, len(days) - 1]]))


def _rollouts(model, fd, days, config: Config, device):
    """Strict rollouts of a deterministic model through each run of consecutive ``days``
    (fine indices), each started from the true lag window before its run; yields (e, log10
    prediction (H, W)). Runs whose starting window holds a test day are skipped."""
    t_lag = fd.t_lag
    clean = fd.test_free_window()
    for a, b in validation_blocks(days):
        if a < t_lag or not clean[a]:
            continue
        lags = fd.y[a - t_lag:a].copy()
        for e in range(a, b + 1):
            log = _day_prediction(model, fd, e, lags, config, device)
            yield e, log
            lags = np.concatenate([lags[1:], fd.store.norm_y.forward_log(log, fd.season)[None]])


def rollout_score(model, fd, days, config: Config, device="cpu") -> float:
    """Mean R² (squared correlation, log10) of a deterministic model's strict rollouts
    through the runs of consecutive ``days`` (see _rollouts): what ``train.select =
    "rollout"`` maximises."""
    scores = []
    for e, log in _rollouts(model, fd, days, config, device):
        truth = fd.logy_at(e)
        ok = np.isfinite(truth)
        scores.append(np.corrcoef(log[ok], truth[ok])[0, 1] ** 2)
    return float(np.mean(scores)) if scores else float("nan")


def rollout_residual_sd(model, fd, days, config: Config, device="cpu") -> float:
    """The sd, in model units (the standardised residual), of truth minus a deterministic
    model's strict rollout over validation runs: the error a generated residual must cover
    in a rollout. NaN without usable runs (or for the absolute target)."""
    if fd.space != "residual":
        return float("nan")
    res = []
    for e, log in _rollouts(model, fd, days, config, device):
        mu = fd.mu_at(fd.cidx[e])
        d = fd.anchor.forward(fd.logy_at(e), mu, fd.season) - fd.anchor.forward(log, mu, fd.season)
        res.append(d[np.isfinite(d)])
    return float(np.concatenate(res).std()) if res else float("nan")


CALIBRATED = (0.8, 1.2)  # the band a calibrated ensemble's spread/skill should fall in
CALIBRATION_MEMBERS = 8


def calibrate_spread(best, train_set, val_set, config: Config, device="cpu", days=8,
                     members=CALIBRATION_MEMBERS, kind="ddpm"):
    """Fit a trained CorrDiff DDPM's spread widening on validation days with true lag
    windows free of test days, with the ensemble that ships, and save it in ``best``.

    "That ships": the run's own sampler settings (fusion, steps, patch geometry, antithetic
    pairs) through :func:`~fastds.sampling.pipeline.downscale_day`, each member widened by the
    sampler's rule (:func:`~fastds.sampling.spread.widen`) and then projected on the coarse
    cells as ``sample`` projects it when ``sample.consistency`` is on. Two widenings:

    - one inflation α (members = mean + α·scale·r): the α that minimises the fair CRPS (log10),
      saved as ``regression_inflation``;
    - one gain per spatial band (:func:`~fastds.sampling.spread.band_split`): each band's gain
      makes the ensemble's spread in that band match its mean's error there (moments, in the
      model's residual space), then one common factor picked by the fair CRPS; saved as
      ``regression_bands`` (the factor folded in) and used when ``sample.calibrate_bands``;
      the gains fitted after the projection (:func:`final_band_gains`) and, on top of them,
      the grid-scale texture gain (:func:`texture_gain`) go into the calibration record.

    The fair estimator does not reward an under-dispersed small ensemble (the ordinary one's
    optimum at 4 members is about 0.75 of the true spread), so no band rule is needed. One
    sampling pass: members drawn once unwidened, widened for every factor in INFLATIONS. The
    fair-CRPS and spread/skill curves and the raw (α = 1) spread/skill go under
    ``"calibration"``; a no-op (None) without usable validation days."""
    from ..sampling.pipeline import _CoarseDays, _projection
    if val_set is None or len(val_set) == 0 or config.train.target != "residual":
        return None
    fd = train_set
    pick = calibration_days(fd, val_set, days)
    if len(pick) == 0:
        return None
    ck = load_checkpoint(best)
    model, _ = load_trained(best.parent.parent, int(ck["season"]), kind, device=device)
    cfg = calibration_sampler(config, members, kind)
    coarse_days = _CoarseDays(fd.store)  # the coarse cube read once, for every use below
    coarse = coarse_days.values if cfg.consistency else None
    project = _projection(fd.store, coarse) if cfg.consistency else None
    pairs = cfg.antithetic and members >= 4 and members % 2 == 0
    draws = _calibration_draws(model, [fd], pick, cfg, config, members, pairs, device)[0]
    cal = widening_fit(fd, pick, draws, cfg, project, coarse, pairs)
    cal.update(members=members, sampler=sampler_record(cfg))
    gains = np.asarray(cal["band_gains"])
    model.regression_inflation.fill_(cal["inflation"])
    model.regression_bands = torch.tensor(cal["band_factor"] * gains, dtype=torch.float32)
    model.calibration = cal  # the rollouts below widen as `sample` will, from this calibration
    if config.train.calibration_rollouts > 0:
        cal.update(_rollout_factor(model, fd, val_set, config, members, project, coarse_days, pairs,
                                   device, kind))
        f = cal["rollout_factor"]
        model.regression_inflation.mul_(f)
        model.regression_bands.mul_(f)
        cal["final_band_gains"] = [f * g for g in cal["final_band_gains"]]
    if config.train.state_rollouts > 0 and cal.get("state_nodes"):
        cal.update(_rollout_state(model, fd, val_set, config, members, project, coarse_days, pairs, device,
                                  cal, kind))
    save_widening(best, ck, model, cal)
    return cal


def calibration_days(fd, val_set, days=8):
    """Up to ``days`` validation target days (fine indices), evenly spread, whose true lag
    window is complete and free of test days."""
    pick = np.unique(val_set.days)
    pick = pick[(pick >= fd.t_lag) & fd.test_free_window()[pick]]
    return pick[np.linspace(0, len(pick) - 1, min(days, len(pick))).round().astype(int)] if len(pick) else pick


def save_widening(best, ck, model, cal):
    """Write a calibrated model's widening (its inflation and band buffers, in the weights and
    the EMA weights) and the calibration record into checkpoint ``ck`` at ``best``."""
    from .loop import save_checkpoint
    for key in ("model", "ema"):
        if ck.get(key) is not None:
            ck[key]["regression_inflation"] = model.regression_inflation.detach().cpu().clone()
            ck[key]["regression_bands"] = model.regression_bands.detach().cpu().clone()
    ck["calibration"] = cal
    save_checkpoint(best, ck)


def widening_fit(fd, pick, draws, cfg, project, coarse, pairs) -> dict:
    """One field's widening from the shipped sampler's unwidened draws on the calibration
    days ``pick`` (fine indices of ``fd``): ``draws`` = (means, residuals (members, H, W),
    truths, per-band gains) per day as :func:`_calibration_draws` returns them. The α that
    minimises the fair CRPS, the common factor of the band gains likewise, and their fair-CRPS
    and spread/skill curves."""
    from ..sampling.spread import widen_parts
    mean_z, res_z, truth, gains = draws

    def scan(gains):
        """fair CRPS and spread/skill for every factor a: members = mean + base + a·spread."""
        widened = [widen_parts(r, gains, antithetic=cfg.antithetic) for r in res_z]
        days = [(fd.cidx[e], m, w, t) for e, m, w, t in zip(pick, mean_z, widened, truth)]
        return _scan_factors(fd, days, project, coarse, pairs)

    scores, ratios = scan(None)
    scores_b, ratios_b = scan(gains)
    final, final_ratios = final_band_gains(fd, pick, mean_z, res_z, truth, gains, cfg, project, coarse, pairs)
    texture, texture_power = texture_gain(fd, pick, mean_z, res_z, truth, final, cfg, project, coarse)
    nodes, state, state_ratios = state_gains(fd, pick, mean_z, res_z, truth, final, texture, cfg, project, coarse,
                                             pairs)
    return {"inflation": float(INFLATIONS[int(np.argmin(scores))]), "inflations": INFLATIONS.tolist(),
            "crps_fair": scores, "spread_skill": ratios, "raw_spread_skill": ratios[RAW],
            "band_gains": gains.tolist(), "band_factor": float(INFLATIONS[int(np.argmin(scores_b))]),
            "crps_fair_bands": scores_b, "spread_skill_bands": ratios_b,
            "final_band_gains": final.tolist(), "final_band_spread_skill": final_ratios.tolist(),
            "texture_gain": texture, "texture_power": texture_power, "state_nodes": nodes.tolist(),
            "state_gains": state.tolist(), "state_spread_skill": state_ratios.tolist(),
            "days": [int(d) for d in pick]}


FINAL_BAND_ITERATIONS = 4
FINAL_BAND_LIMITS = (0.25, 4.0)  # a band the projection empties (the coarse cell's mean) cannot
                                 # be widened into spread/skill 1: its gain stops at the limit


def final_band_gains(fd, pick, mean_z, res_z, truth, gains, cfg, project, coarse, pairs,
                     iterations=FINAL_BAND_ITERATIONS):
    """Per-band gains (bands,) at which each band's spread matches its mean's error where the
    user sees the field: log10, after the coarse-cell projection (``sample.calibrate_to =
    "bands"``). The model-space gains (``gains``, spread matched to error on the unprojected
    residual) need a common factor afterwards, since the projection removes spread at the
    coarse cell's scale; that one factor then over-widens the fine bands (the texture
    overshoot of the previous default). Here each band is fitted after the projection, so no
    common factor is needed and the fine bands' power comes out near the truth's. Per
    calibration day of ``pick``: ``mean_z`` (H, W) and ``res_z`` (members, H, W) in the
    model's space, ``truth`` (H, W) log10, as :func:`widening_fit` gets them; ``gains``
    (bands,). Fixed-point iterations from ``gains``: g_b <- g_b · error_b / spread_b (a
    band's spread is near linear in its gain), clipped to FINAL_BAND_LIMITS. Returns (gains
    (bands,), the per-band spread/skill of the last iteration, before its update)."""
    from ..metrics.ensemble import calibrated_variance
    from ..sampling.spread import band_split, widen
    g = np.asarray(gains, np.float64).copy()
    ratio = np.ones_like(g)
    for _ in range(iterations):
        spread_b, err_b = np.zeros_like(g), np.zeros_like(g)
        for e, m, r, t in zip(pick, mean_z, res_z, truth):
            log = _log10_as_sampled(fd, fd.cidx[e], m + widen(r, gains=g, antithetic=cfg.antithetic),
                                    project, coarse)
            ok = np.isfinite(t)
            bands, miss = band_split(np.where(ok, log, 0.0)), band_split(np.where(ok, log.mean(0) - t, 0.0))
            spread_b += [calibrated_variance(b[:, ok], pairs=pairs) for b in bands]
            err_b += [np.mean(b[ok] ** 2) for b in miss]
        ratio = np.sqrt(spread_b / np.maximum(err_b, 1e-300))
        g = np.clip(g / np.maximum(ratio, 1e-12), *FINAL_BAND_LIMITS)
    return g, ratio


def texture_gain(fd, pick, mean_z, res_z, truth, gains, cfg, project, coarse,
                 iterations=FINAL_BAND_ITERATIONS) -> tuple[float, float]:
    """The grid-scale texture gain κ (``widen(..., texture=κ)``) at which the members' power
    at the grid scale (:func:`~fastds.sampling.spread.grid_texture`) matches the truth's,
    in log10 after the projection, on top of the final band gains ``gains`` (bands,); the
    days as :func:`final_band_gains` gets them. Fixed-point iterations from κ = 1:
    κ <- κ · sqrt(truth's power / members'), clipped to FINAL_BAND_LIMITS. Returns (κ, the
    members' power over the truth's at the last iteration, before its update). The truth's
    unknown pixels are filled with the ensemble mean (no texture of its own) and powers are
    taken over the known ones."""
    from ..sampling.spread import grid_texture, widen
    kappa, ratio = 1.0, 1.0
    for _ in range(iterations):
        members, target = 0.0, 0.0
        for e, m, r, t in zip(pick, mean_z, res_z, truth):
            log = _log10_as_sampled(fd, fd.cidx[e], m + widen(r, gains=gains, texture=kappa, antithetic=cfg.antithetic),
                                    project, coarse)
            ok = np.isfinite(t)
            members += np.mean(grid_texture(log)[:, ok] ** 2)
            target += np.mean(grid_texture(np.where(ok, t, log.mean(0)))[ok] ** 2)
        ratio = float(members / max(target, 1e-300))
        kappa = float(np.clip(kappa / np.sqrt(max(ratio, 1e-12)), *FINAL_BAND_LIMITS))
    return kappa, ratio


def state_gains(fd, pick, mean_z, res_z, truth, gains, texture, cfg, project, coarse, pairs,
                iterations=FINAL_BAND_ITERATIONS):
    """The coarse-state spread gains (``widen(..., state=state_gain(coarse, nodes, g))``) at
    which the spread matches its mean's error in each quantile bin of the day's coarse field
    on the fine grid (``fd.coarse_on_fine``, the units ``sample`` sees), log10 after the
    projection, on top of the final band gains ``gains`` (bands,) and texture gain
    ``texture``; the days as :func:`final_band_gains` gets them. Nodes from the calibration
    days' pixels with a known truth (:func:`~fastds.sampling.spread.state_nodes`), each pixel
    in its nearest node's bin (:func:`~fastds.sampling.spread.state_bin`); fixed-point
    iterations from 1: g_q <- g_q · error_q / spread_q, clipped to FINAL_BAND_LIMITS. Returns
    (nodes (n,), gains (n,), the per-bin spread/skill of the last iteration, before its
    update)."""
    from ..sampling.spread import state_bin, state_gain, state_nodes, widen
    levels = [fd.coarse_on_fine(e)[0].astype(np.float64) for e in pick]
    nodes = state_nodes(np.concatenate([c[np.isfinite(t)] for c, t in zip(levels, truth)]))
    which = [state_bin(c, nodes) for c in levels]
    g, ratio = np.ones(len(nodes)), np.ones(len(nodes))
    for _ in range(iterations):
        var, err = np.zeros_like(g), np.zeros_like(g)
        for e, m, r, t, c, b in zip(pick, mean_z, res_z, truth, levels, which):
            z = m + widen(r, gains=gains, texture=texture, state=state_gain(c, nodes, g), antithetic=cfg.antithetic)
            _add_bin_moments(var, err, _log10_as_sampled(fd, fd.cidx[e], z, project, coarse), t, b, pairs)
        ratio = _bin_ratio(var, err)
        g = np.clip(g / np.maximum(ratio, 1e-12), *FINAL_BAND_LIMITS)
    return nodes, g, ratio


def _add_bin_moments(var, err, log, truth, bins, pairs):
    """Add one day's per-bin spread and error to ``var`` and ``err`` (n,), in place: the
    pixel-weighted calibrated variance of members ``log`` (members, H, W) and the squared
    error of their mean against ``truth`` (H, W; NaN unknown), over the pixels in each bin
    of ``bins`` (H, W)."""
    from ..metrics.ensemble import calibrated_variance
    ok = np.isfinite(truth)
    mean = log.mean(0)
    for q in range(len(var)):
        sel = ok & (bins == q)
        if sel.any():
            var[q] += sel.sum() * calibrated_variance(log[:, sel], pairs=pairs)
            err[q] += np.sum((mean[sel] - truth[sel]) ** 2)


def _bin_ratio(var, err):
    """Per-bin spread/skill from pooled moments; 1 in a bin without pixels."""
    return np.where(err > 0, np.sqrt(var / np.maximum(err, 1e-300)), 1.0)


def _validation_rollouts(model, fd, val_set, config, members, project, coarse_days, device, blocks_n, kind="ddpm"):
    """Strict rollouts as ``sample`` runs them over the ``blocks_n`` longest validation blocks:
    every member rolls forward from the block's true lag window with its own history, widened
    as it ships. Per day: (coarse index, means (members, H, W), widened residuals (members, H,
    W), truth (H, W) log10, the coarse field on the fine grid (H, W) as sampling sees it)."""
    from ..sampling.day import downscale_day
    from ..sampling.downscalers import Season
    from ..sampling.rollout import Rollout
    cfg = dataclasses.replace(calibration_sampler(config, members, kind), calibrate=True, mode="strict")
    days = np.unique(val_set.days)
    blocks = np.split(days, np.flatnonzero(np.diff(days) > 1) + 1)
    blocks = sorted(blocks, key=len, reverse=True)[:blocks_n]
    record = []

    class Recorder:  # the shipped DDPM, its per-member means kept beside each day
        needs_lags = True

        def season(self, s):
            return Season(model, config, fd)

        def day(self, ctx):
            m, res = downscale_day(model, ctx.inputs, kind="ddpm", T=config.diffusion.T,
                                   prediction=config.diffusion.prediction, seed=config.train.seed,
                                   day_key=ctx.day_key, cfg=cfg, members=ctx.members, device=device,
                                   parts=True)
            z = m + res
            record.append((ctx.c, m, z - m, fd.logy_at(fd.index_of(ctx.day)), ctx.inputs.coarse[0]))
            return fd.to_physical(z, ctx.c)

    for block in blocks:
        Rollout(store=fd.store, days=fd.times[block], cfg=cfg, coarse_days=coarse_days,
                finish=project).run(Recorder())
    return record, cfg


def _rollout_factor(model, fd, val_set, config, members, project, coarse_days, pairs, device, kind="ddpm") -> dict:
    """Refine a widening by strict rollouts over validation blocks
    (``train.calibration_rollouts``, :func:`_validation_rollouts`): one factor f on each day's
    widened spread, picked by the fair CRPS (log10, projected). Members that roll out carry
    their own histories' divergence, which days with true lags do not show."""
    from ..sampling.spread import widen_parts
    record, cfg = _validation_rollouts(model, fd, val_set, config, members, project, coarse_days, device,
                                       config.train.calibration_rollouts, kind)
    widened = [(c, m, widen_parts(r, None, antithetic=cfg.antithetic), t) for c, m, r, t, _ in record]
    scores, ratios = _scan_factors(fd, widened, project, coarse_days.values if project is not None else None,
                                   pairs)
    k = int(np.argmin(scores))
    return {"rollout_factor": float(INFLATIONS[k]), "rollout_days": len(record),
            "rollout_crps_fair": scores, "rollout_spread_skill": ratios,
            "rollout_spread_skill_at_1": ratios[RAW]}


def _rollout_state(model, fd, val_set, config, members, project, coarse_days, pairs, device, cal,
                   kind="ddpm") -> dict:
    """Refit the coarse-state gains' shape on strict rollouts over validation blocks
    (``train.state_rollouts``, :func:`_validation_rollouts`), where the members' own
    histories make the error grow most on high coarse days: ``cal``'s state gains times
    :func:`rollout_state_factors`."""
    record, cfg = _validation_rollouts(model, fd, val_set, config, members, project, coarse_days, device,
                                       config.train.state_rollouts, kind)
    f, ratio = rollout_state_factors(fd, record, cal["state_nodes"], cfg, project,
                                     coarse_days.values if project is not None else None, pairs)
    gains = np.clip(np.asarray(cal["state_gains"]) * f, *FINAL_BAND_LIMITS)
    return {"state_gains": gains.tolist(), "state_rollout_factors": f.tolist(),
            "state_rollout_spread_skill": ratio.tolist(), "state_rollout_days": len(record)}


def rollout_state_factors(fd, record, nodes, cfg, project, coarse, pairs, iterations=FINAL_BAND_ITERATIONS):
    """Per-node factors (n,) on the widened spread of rolled-out days ``record`` (as
    :func:`_validation_rollouts` returns them) that bring each coarse-state bin's
    spread/skill (log10, projected) to one common value: fixed-point iterations f_q <- f_q ·
    error_q / spread_q, then one factor so the pooled spread is what it was at f = 1 (the
    shape moves, the total stays: the level is the band gains'). Returns (factors, the
    per-bin spread/skill at f = 1)."""
    from ..sampling.spread import state_bin, state_gain, widen_parts
    days = [(c, m, widen_parts(r, None, antithetic=cfg.antithetic), t, cf, state_bin(cf, nodes))
            for c, m, r, t, cf in record]

    def per_bin(f):
        var, err = np.zeros(len(nodes)), np.zeros(len(nodes))
        for c, m, (base, spread), t, cf, b in days:
            log = _log10_as_sampled(fd, c, m + base + state_gain(cf, nodes, f) * spread, project, coarse)
            _add_bin_moments(var, err, log, t, b, pairs)
        return var, err

    f = np.ones(len(nodes))
    var0, err0 = per_bin(f)
    var, err = var0, err0
    for _ in range(iterations):
        f = f / _bin_ratio(var, err)
        var, err = per_bin(f)
    f = f * np.sqrt(var0.sum() / max(var.sum(), 1e-300))
    return f, _bin_ratio(var0, err0)


def _calibration_draws(model, fds, pick, cfg, config, members, pairs, device):
    """The shipped sampler's unwidened members on the calibration days, per field of ``fds``
    (one, or a joint model's species in channel order): [(U-Net means, residuals (members, H,
    W), truths in log10, per-band gains matching spread to error)], one tuple per field."""
    from ..metrics.ensemble import calibrated_variance
    from ..sampling.day import downscale_day
    from ..sampling.spread import band_split
    out = [([], [], [], 0.0, 0.0) for _ in fds]
    for e in pick:
        means, res = downscale_day(model, day_inputs(fds, e), kind="ddpm", cfg=cfg, T=config.diffusion.T,
                                   prediction=config.diffusion.prediction, members=members,
                                   seed=config.train.seed, day_key=int(e), device=device, parts=True)
        if len(fds) == 1:
            means, res = means[:, None], res[:, None]
        for k, (fd, (mean_z, res_z, truth, spread_b, err_b)) in enumerate(zip(fds, out)):
            z = means[:, k] + res[:, k]
            m = means[0, k]  # true lags: every member shares the day's mean
            mean_z.append(m)
            res_z.append(z - m)
            truth.append(fd.logy_at(e))
            bands = band_split(z)                                   # (bands, members, H, W)
            miss = band_split(z.mean(0) - fd.target_at(e))          # (bands, H, W)
            spread_b = spread_b + np.array([calibrated_variance(b, pairs=pairs) for b in bands])
            err_b = err_b + np.array([np.mean(b ** 2) for b in miss])
            out[k] = (mean_z, res_z, truth, spread_b, err_b)
    return [(m, r, t, np.sqrt(err / np.maximum(spread, 1e-12))) for m, r, t, spread, err in out]


def day_inputs(fds, e):
    """Fine day ``e``'s inputs with its true lag window: of one field (``fds`` of one), or of
    a joint model's species (coarse (K, H, W), lags (1, K·t_lag, H, W); the covariates are the
    species' shared ones)."""
    from ..sampling.day import DayInputs
    t = fds[0].t_lag
    return DayInputs(np.concatenate([fd.coarse_on_fine(e) for fd in fds]), fds[0].covariates(e),
                     np.concatenate([fd.y[e - t:e] for fd in fds])[None])


def _log10_as_sampled(fd, c, z, project, coarse):
    """Members ``z`` (members, H, W) in the model's space -> log10 as `sample` writes them:
    the anchor undone for coarse day ``c``, then projected when ``project`` is given."""
    log = fd.anchor.inverse(z, fd.mu_at(c), fd.season)
    if project is not None:
        log = np.log10(np.maximum(project(10.0 ** log, coarse[c], fd.season), 1e-6))
    return log


def _scan_factors(fd, days, project, coarse, pairs):
    """:func:`~fastds.sampling.spread.scan_factors` for days in the model's space, projected
    as sampled."""
    return scan_factors(days, lambda c, z: _log10_as_sampled(fd, c, z, project, coarse), pairs=pairs)


def calibration_sampler(config: Config, members=CALIBRATION_MEMBERS, kind="ddpm"):
    """The sampler settings spread calibration samples with: the run's own (what ``sample``
    uses by default; a distilled student's grid for ``kind="distill"``), one day at a time
    with true lags, α = 1."""
    cfg = dataclasses.replace(config.sample, members=members, calibrate=False, mode="lenient",
                              cuda_graphs=False, segments=1, spread_scale=1.0)
    return distill_settings(cfg, config) if kind == "distill" else cfg


def recalibrate(run, *, season=None, model="ddpm", device="cpu", sample: SampleConfig | None = None) -> dict:
    """Re-run :func:`calibrate_spread` on a trained run's DDPM, or its distilled student
    (``model="distill"``, with the student's own sampler), for each season or ``season``, with
    the run's saved config and without retraining: {season: calibration}. ``sample``: the
    sample settings to fit the widening for instead of the run's saved ``[sample]`` (e.g.
    other steps or spacing); once every season is refitted they are saved as the run's, so
    ``sample`` then uses them by default."""
    if model not in ("ddpm", "distill"):
        raise ValueError(f"recalibrate: model={model!r}: only a diffusion model is widened "
                         "('ddpm' or 'distill')")
    run = Path(run)
    path = run_store(run, "recalibrate")  # an error naming run.json when run is no run folder
    config = config_from_toml((run / "config.toml").read_text())
    if sample is not None:
        config = dataclasses.replace(config, sample=sample)
    store = open_store(path, variable=run_variable(run))
    out = {}
    for s in _seasons(store, config, season):
        best = season_dir(run, s) / f"{model}.best.pt"
        if not best.exists():
            raise FileNotFoundError(f"recalibrate: {best} is missing: run `fastds train --model {model}` first")
        trained = trained_covariates(config, best)  # "auto": the set the model was fitted on
        train_set, val_set = training_sets(store, s, trained)
        out[s] = calibrate_spread(best, train_set, val_set, trained, device, kind=model)
    if sample is not None:
        write_run_config(run, config)
    return out


def _loss_for(kind, config: Config, oof=None):
    """``kind``'s training loss ``(model, batch, generator) -> scalar``. ``oof``: an
    :class:`~fastds.training.oof.OOFMeans` giving the CorrDiff DDPM each item's
    out-of-fold mean instead of the run's U-Net's."""
    diffusion = Diffusion(config.diffusion.T, config.diffusion.prediction, config.diffusion.schedule)
    beta = config.train.vae_beta
    if config.train.unet_loss not in ("l1", "l2"):
        raise ValueError(f"train.unet_loss must be 'l1' or 'l2', got {config.train.unet_loss!r}")
    point_loss = F.l1_loss if config.train.unet_loss == "l1" else F.mse_loss

    def conditioning(m, b):
        if "cond" in b:  # precomputed by `frozen` (validation batches)
            return b["cond"]
        return m.cond(b["coarse"], b["covariates"], b["lags"], b.get("drop"))

    def corrdiff_mean(m, b, cond):
        if "mean" in b:
            return b["mean"]
        if oof is not None and m.regression is not None:
            return oof(m, b)
        if m.regression is not None and m.shares_conditioning():
            return m.regression_mean_of(cond)  # the same numbers; the lags' transfer features once
        return m.regression_mean(b["coarse"], b["covariates"], b["lags"], b.get("drop"))

    def ddpm(m, b, gen):
        cond = conditioning(m, b)
        target = b["target"]
        mean = corrdiff_mean(m, b, cond)
        if mean is not None:  # CorrDiff: diffuse the scaled residual of the regression
            target = (target - mean) / m.regression_scale
        return diffusion.loss(m, target, cond, generator=gen)

    def unet(m, b, gen):
        return point_loss(m(None, None, conditioning(m, b)), b["target"])

    def vae(m, b, gen):
        recon, mu, logvar = m.net(b["target"], conditioning(m, b))
        kl = -0.5 * torch.mean(1 + logvar - mu ** 2 - logvar.exp())
        return F.mse_loss(recon, b["target"]) + beta * kl

    @torch.no_grad()
    def frozen(m, b):
        """Batch ``b`` with what its loss computes from frozen weights alone added: the
        conditioning (when the transfer encoder is frozen: it is the only module in it) and
        the DDPM's CorrDiff mean (the frozen regression; not out-of-fold means, whose fold
        depends on the item). For batches that recur unchanged (validation)."""
        if m.transfer is not None and any(p.requires_grad for p in m.transfer.parameters()):
            return b
        b = dict(b, cond=conditioning(m, b))
        if kind == "ddpm" and oof is None and m.regression is not None:
            b["mean"] = corrdiff_mean(m, b, b["cond"])
        return b

    for fn in (ddpm, unet, vae):
        fn.frozen = frozen
    return {"ddpm": ddpm, "unet": unet, "vae": vae}[kind]


def training_sets(store, season, config: Config):
    """(training, validation) FinePatches of one season, as Stage C builds them."""
    d, tc = config.data, config.train
    train_set = FinePatches(store, season=season, split="train", tile=d.tile, stride=d.train_stride,
                            random_offsets=d.random_offsets, seed=tc.seed,
                            lag_noise=tc.lag_noise, pushforward=tc.pushforward,
                            cond_dropout=tc.cond_dropout, **fine_kwargs(config))
    # validation items see the same lag treatment (pushforward share, dropout) as
    # training ones, with their own seed, so the loss and the residual scale measure it
    val_set = FinePatches(store, season=season, split="val", tile=d.tile, stride=d.train_stride,
                          anchor=train_set.anchor, seed=tc.seed + 1, pushforward=tc.pushforward,
                          cond_dropout=tc.cond_dropout, **fine_kwargs(config))
    return train_set, val_set


def _select_for(kind, config: Config, train_set, val_set, device):
    """How ``fit`` picks the best checkpoint: None (the validation loss), or, with
    ``train.select = "rollout"``, for a deterministic model, minus the R² of strict rollouts
    over the validation blocks. The DDPM's rollout skill is its mean's (the U-Net, selected
    this way), so it keeps the loss."""
    if config.train.select not in ("loss", "rollout"):
        raise ValueError(f"train.select must be 'loss' or 'rollout', got {config.train.select!r}")
    if config.train.select != "rollout" or kind in ("ddpm", "distill"):
        return None

    def rollout_select(m, fd=train_set, val_days=val_set.days):  # lower is better
        return -rollout_score(m, fd, val_days, config, device)
    return rollout_select


def _oof_means(config: Config, run, season, train_set, val_set, fit_as, device):
    """The K fold U-Nets of ``train.oof_folds`` (checkpoints ``unet-fold{k}``, resumable),
    fitted and selected as the run's U-Net is, each without its fold's training days."""
    if config.train.mean != "unet":
        raise ValueError("train.oof_folds needs train.mean='unet' (out-of-fold U-Net means)")
    select = _select_for("unet", config, train_set, val_set, device)

    def fit_fold(k, net, subset):
        ckpt, _ = fit_as(f"unet-fold{k}", net, _loss_for("unet", config), select, train_set=subset)
        return ckpt.with_suffix(".best.pt")

    def load_best(net, path):
        net.load_state_dict(checkpoint_weights(load_checkpoint(path)))
        net.to(device)

    return fit_fold_means(train_set, config.train.oof_folds, fit_fold,
                          lambda: model_for("unet", config, run, season), load_best)


def _finished(ckpt) -> bool:
    """Whether the fit whose last checkpoint is ``ckpt`` ran to its end."""
    return Path(ckpt).exists() and bool(load_checkpoint(ckpt).get("loop", {}).get("done"))


def nothing_left(ckpt, calibrates: bool) -> bool:
    """Whether a resumed fit has nothing left to do: its last checkpoint ``ckpt`` ran to its
    end and, where a spread widening is fitted after it (``calibrates``), its best checkpoint
    holds the calibration. Checked before any training set or mean is built."""
    return _finished(ckpt) and (not calibrates or load_checkpoint(
        Path(ckpt).with_suffix(".best.pt")).get("calibration") is not None)


def default_chain(config: Config) -> list[str]:
    """The models ``fastds train`` trains with no ``--model``, in order: what the default
    sampler (``model="ddpm"``) needs, i.e. the U-Net first when the DDPM diffuses its residual
    (``train.mean="unet"``, CorrDiff), then the DDPM."""
    return ["unet", "ddpm"] if config.train.mean == "unet" else ["ddpm"]


def prepared_sets(run, store, season, config: Config, device="cpu", model="ddpm"):
    """(training, validation) FinePatches of one season as ``train`` fits on them: with the
    run's U-Net predictions in pushforward lag windows (``train.pushforward_source="unet"``)
    and the lag noise sized from the errors those windows carry (``train.lag_noise_scale``).
    A season without training days is an error; one without validation days a warning
    naming the fallbacks."""
    d, tc = config.data, config.train
    train_set, val_set = training_sets(store, season, config)
    if len(train_set) == 0:
        raise ValueError(f"train: season {season} has no fine training day with a full "
                         f"{d.t_lag}-day lag window in {store.path}")
    if len(val_set) == 0:
        warn_caller(f"train: season {season} of {store.path} has no validation day with a full "
                    f"{d.t_lag}-day lag window free of test days; falling back to: the last "
                    "epoch as the best checkpoint, the residual scale from training "
                    "patches, and no spread calibration (α = 1)")
    if tc.pushforward > 0 and tc.pushforward_source == "unet":
        if model == "unet":
            raise ValueError("train: train.pushforward_source='unet' uses the run's trained U-Net, "
                             "so it applies to ddpm/vae; train the U-Net with 'anchor'")
        _pushforward_alternative(run, season, (train_set, val_set), config, device)
    elif tc.pushforward_source not in ("anchor", "unet"):
        raise ValueError(f"train.pushforward_source must be 'anchor' or 'unet', "
                         f"got {tc.pushforward_source!r}")
    if tc.lag_noise_scale < 0:
        raise ValueError(f"train.lag_noise_scale must be >= 0, got {tc.lag_noise_scale}")
    if tc.lag_noise_scale > 0:
        # sized from the errors a rollout will feed back (after set_alternative, so the
        # U-Net's when it is the pushforward source)
        train_set.lag_noise = tc.lag_noise_scale * train_set.prediction_error_sd()
    return train_set, val_set


def train(*, data, run, config: Config, model="ddpm", season=None, resume=False, progress=True,
          device="cpu", on_step=None) -> list[Path]:
    """Stage C: train the conditional DDPM (or a baseline: ``model="unet"`` / ``"vae"``) on
    fine patches of each season, with the frozen Stage-A encoder's features as conditioning
    (unless ``config.train.transfer`` is false). Returns the best-checkpoint paths. The run's
    saved config becomes this one: ``sample`` then uses the settings the spread calibration
    sampled with."""
    run = Path(run)
    # the species the run was pretrained on, unless the config names one
    trained_on = run_variable(run)
    if trained_on and config.data.variable and config.data.variable != trained_on:
        raise ValueError(f"train: run {run} was pretrained on {trained_on}, not data.variable="
                         f"{config.data.variable}; use another run folder for another species")
    store = open_store(data, variable=config.data.variable or trained_on)
    if (run / "run.json").exists():
        write_run_meta(run, store, config)
    out = []
    # what calibrate_spread is run on after the fit: a CorrDiff DDPM or its student
    calibrates = config.train.calibrate_spread and model in ("ddpm", "distill") and config.train.mean == "unet"
    base = config
    for s in _seasons(store, base, season):
        if resume and nothing_left(season_dir(run, s) / f"{model}.pt", calibrates):
            out.append(season_dir(run, s) / f"{model}.best.pt")  # trained (and calibrated): nothing to rebuild
            continue
        # data.covariates = "auto" decided for this season's model (its checkpoint keeps the set;
        # a resumed fit goes on with the set it started with)
        started = season_dir(run, s) / f"{model}.pt"
        config = (trained_covariates(base, started) if resume and started.exists()
                  else season_config(base, kind=model, store=store, season=s, run=run))
        if progress and config.data.covariates != base.data.covariates:
            print(f"train {model} season {s}: data.covariates = auto -> {config.data.covariates!r}", file=sys.stderr)
        d = config.data
        tc = config.train
        train_set, val_set = prepared_sets(run, store, s, config, device, model)
        lag_noise = train_set.lag_noise

        def fit_as(kind, net, loss_fn, select=None, s=s, train_set=train_set, val_set=val_set,
                   lag_noise=lag_noise):
            ckpt = season_dir(run, s) / f"{kind}.pt"
            bf16 = train_bf16(tc, device)
            return ckpt, fit(
                net, loss_fn, train_set, val_set,
                settings=_settings(config.train, epoch_subset=d.max_train_patches, bf16=bf16,
                                   **_model_settings(kind, tc)),
                ckpt_path=ckpt,
                extra_state={"kind": kind, "season": s, "config": to_toml(config),
                             "norm_x": store.norm_x.to_dict(), "norm_y": store.norm_y.to_dict(),
                             "anchor": train_set.anchor.to_dict() if train_set.anchor else None,
                             "lag_noise": float(lag_noise)},
                resume=resume, progress=progress, device=device, on_step=on_step,
                desc=f"train {kind} season {s}" + (" (bf16)" if bf16 else ""), select=select)

        net, loss_fn = _network_and_loss(model, config, run, s, train_set, val_set, device, fit_round=fit_as)
        if model == "ddpm" and net.regression is not None and tc.oof_folds and not (
                resume and _finished(season_dir(run, s) / "ddpm.pt")):  # a finished DDPM needs no fold nets
            loss_fn = _loss_for(model, config, _oof_means(config, run, s, train_set, val_set, fit_as, device))
        ckpt, done = fit_as(model, net, loss_fn, _select_for(model, config, train_set, val_set, device))
        best = ckpt.with_suffix(".best.pt")
        # a resumed run that had finished keeps its calibration (recalibrate() refits one)
        calibrated = done.get("already_done") and load_checkpoint(best).get("calibration") is not None
        if net.regression is not None and config.train.calibrate_spread and not calibrated:
            calibrate_spread(best, train_set, val_set, config, device, kind=model)
        out.append(ckpt.with_suffix(".best.pt"))
    return out
