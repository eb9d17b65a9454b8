"""A downscaler per model: one small object per kind, all with the same method.

``day(ctx) -> (members, H, W)``: one day's fields in physical units for the members asked.
``season(s)`` loads what a season needs once (a trained network with its config and fine
days, or a baseline's statistics); ``needs_lags`` says whether the rollout must assemble the
day's lag window (:class:`~fastds.sampling.rollout.Rollout`). Kinds:

- :class:`Network`: a trained ``unet``, ``vae`` or ``ddpm`` (CorrDiff included) through
  :func:`~fastds.sampling.day.downscale_day`, which composes precision, fusion, graphs and
  spread calibration around the network;
- :class:`JointNetwork`: a joint model of several species, every species of a day at once
  ((members, K, H, W));
- :class:`Null`: a null ensemble, the U-Net's days plus noise with the statistics of its
  validation errors (:mod:`fastds.sampling.nulls`);
- :class:`Interp`, :class:`Clim`, :class:`Anchor`: the baselines that need no training.

The coarse-cell projection is applied by the rollout after any of them, alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import SampleConfig
from ..data.store import Store
from ..data.transforms import align_index, upsample
from ..models.blocks import set_kernel_backend
from ..runs import distill_settings, fine_days, joint_species, load_trained, run_config
from .day import DayInputs, downscale_day, member_draw
from .nulls import NullStats, draw_null, null_rng

__all__ = ["Season", "DayContext", "Network", "JointNetwork", "Null", "Interp", "Clim", "Anchor", "interp_field"]


@dataclass
class Season:
    """What one season needs, loaded once: the network (None for a baseline), the config it
    was trained with, and its whole-day inputs."""
    model: object
    config: object
    fd: object

    @property
    def t_lag(self):
        return self.config.data.t_lag


@dataclass
class DayContext:
    """One day as a downscaler sees it: the date, its season's state, its coarse index, the
    key its draws are seeded with, the members asked and the normalised inputs (None for a
    model that needs no lag window)."""
    day: pd.Timestamp
    state: Season | None
    c: int
    day_key: int
    members: int
    member0: int
    inputs: DayInputs | None = None
    coarse_days: object = None         # date -> physical coarse field (h, w), read on demand

    @property
    def coarse(self) -> np.ndarray:
        """The day's physical coarse field (h, w)."""
        return self.coarse_days[self.day]


class Network:
    """A trained network of the run (``unet``, ``vae``, ``ddpm``, or ``distill``: the DDPM's
    few-step student)."""
    needs_lags = True

    def __init__(self, kind, *, run, store: Store, cfg: SampleConfig, device="cpu", backend="auto",
                 cache_conditioning=True):
        self.kind, self.run, self.store, self.cfg = kind, run, store, cfg
        self.device, self.backend, self.cache_conditioning = device, backend, cache_conditioning
        self.seasons: dict[int, Season] = {}

    def season(self, s) -> Season:
        if s not in self.seasons:
            model, conf = load_trained(self.run, s, self.kind, use_ema=self.cfg.use_ema, device=self.device)
            set_kernel_backend(model, self.cfg.kernels)  # sample.compile: downscale_day's twin
            if not self.cfg.lag_conditioning and conf.train.cond_dropout <= 0:
                raise ValueError(f"sample: sample.lag_conditioning=false asks for the coarse-only "
                                 f"fallback, but the season-{s} {self.kind} was trained with "
                                 "train.cond_dropout=0; retrain with train.cond_dropout > 0")
            self.seasons[s] = Season(model, conf, self._fine_days(model, conf, s))
        return self.seasons[s]

    def _fine_days(self, model, conf, s):
        """The whole-day inputs the season's model was trained on."""
        return fine_days(self.store, conf, s, anchor=model.anchor)

    def day(self, ctx: DayContext) -> np.ndarray:
        st = ctx.state
        # a distilled student is a DDPM network run on the few-step grid it was trained for
        kind, cfg = self.kind, self.cfg
        if kind == "distill":
            kind, cfg = "ddpm", distill_settings(cfg, st.config)
        z = downscale_day(st.model, ctx.inputs, kind=kind, cfg=cfg, T=st.config.diffusion.T,
                          prediction=st.config.diffusion.prediction, members=ctx.members,
                          seed=self.cfg.seed, day_key=ctx.day_key,
                          cache_conditioning=self.cache_conditioning, device=self.device,
                          backend=self.backend, member0=ctx.member0)
        return st.fd.to_physical(z, ctx.c)


class JointNetwork(Network):
    """A joint model of several species (``fastds train --model joint``): ``stores`` are its
    species' views of the store, in channel order; a day is (members, K, H, W) physical, each
    species through its own anchor and normalisation. Its season's ``fd`` is one FineDays per
    species."""

    def __init__(self, *, run, stores, cfg: SampleConfig, device="cpu", backend="auto", cache_conditioning=True):
        super().__init__("joint", run=run, store=stores[0], cfg=cfg, device=device, backend=backend,
                         cache_conditioning=cache_conditioning)
        self.stores = list(stores)

    def _fine_days(self, model, conf, s):
        """One FineDays per species, each as its own run was trained."""
        return [fine_days(st, run_config(r), s, anchor=a)
                for st, r, a in zip(self.stores, joint_species(self.run), model.anchors)]

    def day(self, ctx: DayContext) -> np.ndarray:
        st = ctx.state
        z = downscale_day(st.model, ctx.inputs, kind="ddpm", cfg=self.cfg, T=st.config.diffusion.T,
                          prediction=st.config.diffusion.prediction, members=ctx.members,
                          seed=self.cfg.seed, day_key=ctx.day_key,
                          cache_conditioning=self.cache_conditioning, device=self.device,
                          backend=self.backend, member0=ctx.member0)
        return np.stack([fd.to_physical(z[:, k], ctx.c) for k, fd in enumerate(st.fd)], 1)


class Null:
    """A null ensemble (``unet+iid``, ``unet+grf``, ``unet+resample``): the U-Net's days, in
    log10 with its validation bias removed, plus one residual field per member drawn with the
    statistics ``stats_for(season)`` returns (fitted once per season), times ``scale``
    (``sample.spread_scale``) and ``factor_for(season)`` (``sample.null_spread="rollouts"``:
    the factor fitted on validation rollouts; None: 1). With ``sample.antithetic`` the members
    come in pairs as the DDPM's do (the odd member adds the negated field of its pair), so
    both ensembles' means average their noise alike."""
    needs_lags = True

    def __init__(self, kind, unet: Network, stats_for, scale=1.0, factor_for=None):
        self.kind, self.unet, self.stats_for, self.scale = kind, unet, stats_for, float(scale)
        self.factor_for = factor_for
        self.stats: dict[int, NullStats] = {}
        self.factors: dict[int, float] = {}

    def season(self, s) -> Season:
        return self.unet.season(s)

    def parts(self, ctx: DayContext):
        """The day in log10 before its noise: the debiased U-Net (members, H, W) and the
        members' signed, unscaled draws (members, H, W)."""
        values = self.unet.day(ctx)
        s = ctx.state.fd.season
        if s not in self.stats:
            self.stats[s] = self.stats_for(s)
        stats = self.stats[s]
        logs = np.log10(np.maximum(values, 1e-6)) - stats.bias
        noise = np.empty(logs.shape)  # float64: added to the float32 logs as before the split
        for k in range(len(logs)):
            draw, sign = member_draw(ctx.member0 + k, antithetic=self.unet.cfg.antithetic)
            noise[k] = sign * draw_null(self.kind, stats, logs.shape[1:],
                                        null_rng(self.unet.cfg.seed, draw, ctx.day_key, self.kind))
        return logs, noise

    def day(self, ctx: DayContext) -> np.ndarray:
        logs, noise = self.parts(ctx)
        s = ctx.state.fd.season
        if s not in self.factors:
            self.factors[s] = 1.0 if self.factor_for is None else float(self.factor_for(s))
        logs += (self.scale * self.factors[s]) * noise
        return (10.0 ** logs).astype(np.float32)


def interp_field(coarse, iy, ix):
    """Physical coarse fields (..., h, w) -> the fine grid, interpolated in log10 like the
    models see them; physical, float32."""
    return (10.0 ** upsample(np.log10(np.maximum(coarse, 1e-6)), iy, ix)).astype(np.float32)


class Interp:
    """Interpolation of log10 coarse (bilinear unless ``method`` names another alignment)."""
    needs_lags = False

    def __init__(self, store: Store, method="bilinear"):
        self.iy = align_index(store.ds["lat_c"].values, store.ds["lat"].values, method=method)
        self.ix = align_index(store.ds["lon_c"].values, store.ds["lon"].values, method=method)

    def season(self, s):
        return None

    def day(self, ctx: DayContext) -> np.ndarray:
        return np.repeat(interp_field(ctx.coarse, self.iy, self.ix)[None], ctx.members, 0)


class _FineDaysBaseline:
    needs_lags = False

    def __init__(self, store: Store, config):
        self.store, self.config, self.seasons = store, config, {}

    def season(self, s) -> Season:
        if s not in self.seasons:
            self.seasons[s] = Season(None, self.config, fine_days(self.store, self.config, s))
        return self.seasons[s]


class Clim(_FineDaysBaseline):
    """Interpolation plus the fine record's mean fine-scale residual per season and pixel,
    fitted on the store's training days with the run's alignment: the classical baseline,
    plain per-season pixel means whatever the run's anchor."""

    def __init__(self, store: Store, run):
        rc = run_config(run)
        super().__init__(store, dataclasses.replace(
            rc, train=dataclasses.replace(rc.train, target="residual", anchor="clim")))

    def day(self, ctx: DayContext) -> np.ndarray:
        fd = ctx.state.fd
        v = fd.to_physical(np.zeros(fd.shape, np.float32), ctx.c)
        return np.repeat(v[None], ctx.members, 0)


class Anchor(_FineDaysBaseline):
    """The run's anchor μ, the residual models' centre."""

    def __init__(self, store: Store, run):
        super().__init__(store, run_config(run))

    def day(self, ctx: DayContext) -> np.ndarray:
        v = (10.0 ** ctx.state.fd.stand_in_log(ctx.c)).astype(np.float32)
        return np.repeat(v[None], ctx.members, 0)
