"""Typed, frozen configuration, read from TOML at the edges (CLI, run folders).

``load_config(preset="tiny", path=None, overrides=("train.lr=1e-3",))`` resolves a preset
shipped in ``fastds/configs/``, then a user TOML, then ``--set`` overrides, and checks every
key against the dataclasses below (an unknown key is an error naming it). Library code never
reads this module's objects globally: stages take the dataclass they need as an argument.
"""
from __future__ import annotations

import dataclasses
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["DataConfig", "PretrainConfig", "DiffusionConfig", "TrainConfig", "SampleConfig",
           "Config", "load_config", "config_from_toml", "to_toml", "PRESETS"]

PRESETS = ("tiny", "paper")


@dataclass(frozen=True)
class DataConfig:
    t_lag: int = 40               # lag days in (Stage A and the transfer encoder)
    tile: int = 16                # training patch size
    train_stride: int = 8
    align: str = "store"          # coarse -> fine: "store" (what prepare chose), "nearest"
                                  # (reference code), "bilinear" or "conservative"
    covariates: str = "auto"      # "bounded" (sin/cos day of year, clamped year), "paper", "events"
                                  # (bounded + coarse gradient and day-to-day change), "sources"
                                  # (bounded + the anchor's static maps from the training days:
                                  # mean fine-scale residual and residual sd per pixel) or "auto":
                                  # a season's CorrDiff DDPM reads the maps (its U-Net mean stays
                                  # bounded) where the anchor's map is mostly signal (fixed
                                  # sources), every other model "bounded" (runs.season_config)
    random_offsets: bool = True   # jitter training patch starts (every cell phase is seen)
    split_block: int = 14         # prepare: contiguous split blocks in days (1: reference)
    seasons: tuple = (1, 2, 3, 4)
    max_train_patches: int = 0    # 0: all; else a seeded subset per epoch (CPU demos)
    variable: str = ""            # the store's species to train on ("": its only one)


@dataclass(frozen=True)
class PretrainConfig:
    widths: tuple = (64, 128, 256)
    attention: bool = True        # attention at the lowest level
    lr: float = 5e-4
    weight_decay: float = 0.0
    batch: int = 32
    epochs: int = 20
    plateau_factor: float = 0.1
    plateau_patience: int = 3
    early_stop: int = 6
    grad_clip: float = 0.0
    max_steps: int = 0            # 0: no cap
    seed: int = 0


@dataclass(frozen=True)
class DiffusionConfig:
    T: int = 1000                 # paper 1000; reference code 2000
    prediction: str = "v"         # "v", "epsilon", or "sample" (x0: the reference code)
    schedule: str = "squaredcos_cap_v2"


@dataclass(frozen=True)
class TrainConfig:
    widths: tuple = (64, 128, 256)
    attention: bool = True
    transfer: bool = True         # False: the transfer-free ablation
    target: str = "residual"      # "residual" (standardised residual around the clim anchor,
                                  # linear output) or "absolute" (min-max, sigmoid: the paper)
    anchor: str = "shrunk"        # the residual map of μ: "shrunk" (pixel means pulled to the
                                  # region's by their reliability) or "clim" (plain pixel means)
    lag_channels: int = 0         # last k fine days as direct channels (0: transfer features only)
    lag_noise: float = 0.0        # sd (min-max units) of noise added to training lag windows
    lag_noise_scale: float = 0.0  # > 0: the noise sd is this times the sd of the one-day
                                  # prediction errors (the pushforward source's; μ for "anchor")
                                  # over the training days; overrides lag_noise
    pushforward: float = 0.75     # share of training items whose last L lag days (L uniform in
                                  # 1..t_lag) are predictions, as at lead L of a strict rollout
    pushforward_source: str = "anchor"  # those predictions: "anchor" (μ, no model) or "unet"
                                  # (the run's U-Net, one step; for ddpm/vae)
    cond_dropout: float = 0.0     # share of items trained without lag information (coarse-only
                                  # fallback; sample.lag_conditioning=false uses it)
    select: str = "rollout"       # best checkpoint by "loss" (validation loss) or "rollout"
                                  # (R² of a strict rollout over each validation block; U-Net/VAE,
                                  # the DDPM keeps the loss)
    mean: str = "unet"            # DDPM residual around: "unet" (CorrDiff: the run's trained U-Net,
                                  # so train --model unet first) or "clim" (the anchor alone)
    mean_covariates: str = ""     # CorrDiff DDPM: the covariate set of its U-Net mean ("": the
                                  # DDPM's own, data.covariates); a set whose channels lead the
                                  # DDPM's, e.g. "bounded" under data.covariates = "sources":
                                  # the maps condition the residual only, the mean stays the
                                  # run's bounded U-Net
    unet_loss: str = "l2"         # the U-Net's (and so the DDPM's regression mean's) loss:
                                  # "l2" (CorrDiff's regression: a mean, what R² and RMSE
                                  # reward) or "l1" (the paper's baseline: a median)
    oof_folds: int = 0            # CorrDiff DDPM: > 1 diffuses out-of-fold residuals: K extra
                                  # U-Nets, each fitted without one fold of the training days
                                  # (blocks of 14 days dealt in turn), give each training day a
                                  # mean that never saw it, so the residual learnt is the size a
                                  # sample meets on new days (0: the run's U-Net, in-sample).
                                  # Off: on the development days 2 folds raised raw spread/skill
                                  # 0.78 -> 0.80 and bettered energy, variogram and twCRPS a
                                  # little (fair CRPS tied) but were worse on Brier and FSS > q90
    joint_epochs: int = 0         # the joint species model's epochs (fastds train --model joint);
                                  # 0: K times the DDPM's (epochs x ddpm_epoch_factor), the
                                  # training the K species' separate DDPMs get together
    calibrate_spread: bool = True  # CorrDiff DDPM: after training, fit the spread widening (one
                                  # α and per-band gains) by the fair CRPS on validation days
    calibration_rollouts: int = 0  # > 0: then refine it by the fair CRPS of strict rollouts over
                                  # this many validation blocks (members with their own
                                  # histories, as sample runs them). Off: on the protocol's
                                  # development days (plume twin, 2 blocks) it tied on CRPS and
                                  # energy and moved rollout spread/skill from 1.13 to 1.18
    state_rollouts: int = 0       # > 0: the coarse-state spread gains' shape (sample.calibrate_state)
                                  # refit on strict rollouts over this many validation blocks,
                                  # where members' own histories add error on high coarse days
                                  # (the pooled spread kept: the band gains set the level)
    distill_steps: int = 1        # train --model distill: the student's network evaluations per
                                  # sample (DDIM, trailing spacing, deterministic), trained to end
                                  # where the run's DDPM sampler ends from the same latents
    distill_epochs: int = 0       # the student's epochs (0: train.epochs); per round, progressive
    distill_method: str = "trajectory"  # "trajectory": the student learns the run's sampler's
                                  # sample from the same latents (one training); "progressive"
                                  # (Salimans & Ho 2022): rounds that each halve a DDIM grid,
                                  # from distill_teacher_steps down to distill_steps
    distill_teacher_steps: int = 8  # progressive: the DDPM's DDIM steps the first round halves
                                  # (distill_steps x a power of 2)
    lr: float = 1e-4
    weight_decay: float = 1e-4    # AdamW, trainable parameters only (Eq. 3)
    batch: int = 64
    epochs: int = 100
    ddpm_epoch_factor: int = 1    # the DDPM trains epochs x this: a denoising loss over all
                                  # noise levels converges long after a regression's
    grad_clip: float = 0.5
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    early_stop: int = 10
    ema: float = 0.999            # 0 disables
    precision: str = "auto"       # Stage C's forward and backward passes: "fp32", "bf16" (autocast;
                                  # weights, optimizer, EMA and the validation loss stay fp32) or
                                  # "auto" (bf16 where the device has it natively: AVX512-BF16/AMX
                                  # CPUs, bf16 GPUs; else fp32). Protocol (plume twin, 3 seeds):
                                  # bf16-trained U-Net and DDPM tie the fp32-trained ones on every
                                  # headline score; the tiny step 1.75x faster on 2 cores
    bf16: bool = False            # older runs' switch: true trains in bf16 whatever precision says
    max_steps: int = 0
    checkpoint_every: int = 0     # steps; 0: at epoch ends only
    vae_latent: int = 4
    vae_beta: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "ddpm"         # "ddpm", "ddim", "dpmpp"
    steps: int = 200
    spacing: str = "leading"      # timesteps: "leading" (t = k·T/n, the paper's), "trailing"
                                  # (from t = T-1: few steps keep the noise's variance), "linspace"
                                  # (from t = T-1 down to t = 0), or by
                                  # noise level from σ = 80: "karras" (EDM, ρ = 7), "logsnr"
                                  # (uniform log-SNR, DPM-Solver's own) or "karras-linear"
                                  # (karras while t >= T/2, then even in t down to 0)
    tile: int = 16
    halo: int = 4
    stride: int = 2
    mean_stride: int = 0          # CorrDiff: the regression mean's patch stride (0: ``stride``);
                                  # tile - 2*halo tiles the image with the kept regions once
    mean_halo: int = -1           # the mean's halo (-1: ``halo``); 0 with mean_stride = 2·stride
                                  # puts the mean's patches on the residual's, sharing its conditioning
    batch: int = 1024             # patches per denoiser call
    members: int = 1
    mode: str = "strict"          # "strict" or "lenient"
    clip: float = 0.0             # 0: no clipping of x0 (reference code)
    eta: float = 0.0              # DDIM
    use_ema: bool = True
    cuda_graphs: bool = True      # used only on CUDA
    kernels: str = "auto"         # attention + GroupNorm/SiLU: "auto" (Triton on CUDA), "torch", "triton", "ref"
    consistency: bool = True      # project each model's day so coarse-cell means match the
                                  # coarse field
    project_baselines: bool = True  # the baselines (interp, clim, anchor) too, so every model is
                                    # compared projected; false: the plain hand-made baselines
    fusion: str = "step"          # "step" (blend patch outputs every step: one field) or "final"
                                  # (stitch finished patch samples: the paper)
    lag_history: str = "member"   # strict rollouts with members: each member's lags are its own
                                  # days ("member") or all share the ensemble mean's ("mean")
    lag_conditioning: bool = True  # false: the coarse-only fallback (needs train.cond_dropout > 0)
    precision: str = "auto"       # network calls in "fp32", "bf16" (autocast; the sampler's
                                  # state, updates and stitching stay fp32) or "auto": bf16 where
                                  # the device has it natively (AVX512-BF16/AMX, bf16 GPUs), else
                                  # fp32 (protocol: bf16 within 0.01 % of fp32 on every score)
    compile: bool | str = "auto"  # torch.compile the networks for sampling (inductor), one batch
                                  # shape each (partial batches padded): ~40-60 s once for two
                                  # tiny networks on 2 cores, then 1.2-1.4x a day; "auto":
                                  # where the job is long enough to pay that back
                                  # (fastds.sampling.day.compile_pays: a few Area-1 ensemble
                                  # days, never the demo's); true / false: always / never
    calibrate: bool = True        # CorrDiff DDPM: scale the residual by the inflation saved with
                                  # the model (train.calibrate_spread: the CRPS-best calibrated one)
    calibrate_bands: bool = True  # with calibrate: one gain per spatial band (saved by the same
                                  # calibration) instead of one α for every scale
    calibrate_to: str = "bands"   # the band gains: "bands" (each band's validation spread/skill 1
                                  # in log10 after the projection: the truth's texture, energy
                                  # and Brier better on the development days), or the model-space
                                  # gains times one factor: "spread" (validation spread/skill 1;
                                  # mid-scale power 1.7x the truth's) or "crps" (the fair-CRPS best)
    calibrate_texture: bool = True  # with calibrate_to "bands": the grid-scale texture gain saved by
                                  # the calibration (the members' power at 2-3 px wavelengths, which
                                  # the Gaussian bands cannot reach alone, matched to the truth's)
    calibrate_state: bool = False  # with the texture gain: the coarse-state spread gain saved by the
                                  # calibration (a gain per pixel, linear in the day's coarse field
                                  # between its quintile bins' medians, each bin fitted to
                                  # validation spread/skill 1; train.state_rollouts refits its shape
                                  # on rollouts). Off: mixed on the protocol (round 33: variogram
                                  # at 1 px better; energy, FSS or R² worse on one set of days)
    segments: int = 1             # parallel-in-time: split the period into this many segments,
                                  # each after the first started cold (μ lags) and burnt in
    burn_in: int = 14             # days each cold segment runs before its first kept day
    spread_scale: float = 1.0     # every ensemble's spread times this (a DDPM's or student's
                                  # calibrated widening, a null's noise): 1 as calibrated; below 1
                                  # sharper members (scores such as the variogram's reward them),
                                  # e.g. to compare models at equal spread/skill
    null_spread: str = "validation"  # a null ensemble's noise: the sd (spectrum, bank) of the
                                  # U-Net's errors on validation days with true lags
                                  # ("validation"), or that times one factor per season picked
                                  # by the fair CRPS of strict rollouts over the validation
                                  # blocks ("rollouts": errors that compound in a rollout, which
                                  # true lags do not show; fitted once, cached in the run)
    antithetic: bool = True       # members in ± pairs (the odd member negates every latent and
                                  # noise draw of the even one): a lower-variance ensemble mean
    seed: int = 0
    latent_mix: tuple = ()        # x_T = sum_j w_j z_j, z_j drawn from the member's generator of
                                  # seed + 7919 j ((): z_0 alone). Species sampled by separate
                                  # runs get correlated latents this way (sample_species "coupled")
    channel_mix: tuple = ()       # a joint model's latent channels: x_T[k] = sum_j M[k, j] z_j over
                                  # its K channels' own draws, M row-major K x K (() : independent)


@dataclass(frozen=True)
class Config:
    preset: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _coerce(cls, section, key, value):
    f = {f.name: f for f in fields(cls)}.get(key)
    if f is None:
        raise KeyError(f"config: unknown key {section}.{key} (known: "
                       f"{', '.join(x.name for x in fields(cls))})")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config: {section}.{key} must be a list, got {value!r}")
        return tuple(value)
    if f.type == "bool | str" and isinstance(value, bool):  # a switch with "auto"
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"config: {section}.{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and isinstance(value, str):
        return value
    raise TypeError(f"config: {section}.{key} must be {type(default).__name__}, got {value!r}")


def _merge(cfg: Config, tree: dict) -> Config:
    updates = {}
    for section, values in tree.items():
        if section == "preset":
            updates["preset"] = str(values)
            continue
        if section not in {f.name for f in fields(Config)} or not isinstance(values, dict):
            raise KeyError(f"config: unknown section [{section}] (known: data, pretrain, "
                           "diffusion, train, sample)")
        sub = getattr(cfg, section)
        updates[section] = dataclasses.replace(
            sub, **{k: _coerce(type(sub), section, k, v) for k, v in values.items()})
    return dataclasses.replace(cfg, **updates)


def config_from_toml(text: str) -> Config:
    """A Config from TOML text (e.g. the resolved config a checkpoint stores)."""
    return _merge(Config(), tomllib.loads(text))


def _parse_override(text: str) -> dict:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"--set expects section.key=value (e.g. train.lr=1e-3), got {text!r}")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words are strings: sample.sampler=ddim
    return {section: {name: value}}


def load_config(preset: str | None = "tiny", path=None, overrides=(), *, base: Config | None = None) -> Config:
    """Resolve preset -> TOML file -> ``section.key=value`` overrides into a :class:`Config`
    (starting from ``base`` instead of the defaults when given, e.g. a run's saved config)."""
    cfg = Config() if base is None else base
    if path is not None:
        p = Path(path)
        try:
            tree = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"config: cannot read {p}: {err}") from None
        preset = tree.get("preset", preset)
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"config: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        text = (Path(__file__).parent / "configs" / f"{preset}.toml").read_text()
        cfg = _merge(cfg, tomllib.loads(text))
        cfg = dataclasses.replace(cfg, preset=preset)
    if path is not None:
        cfg = _merge(cfg, tree)
    for o in overrides or ():
        cfg = _merge(cfg, _parse_override(o))
    return cfg


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (what ``--dry-run`` prints and runs store)."""
    lines = [f"preset = {_toml_value(cfg.preset)}"]
    for f in fields(Config):
        if f.name == "preset":
            continue
        lines.append(f"\n[{f.name}]")
        sub = getattr(cfg, f.name)
        lines += [f"{g.name} = {_toml_value(getattr(sub, g.name))}" for g in fields(sub)]
    return "\n".join(lines) + "\n"
