"""``sample``: a trained run and a date range -> a fine-grid daily record (METHOD.md §4-§6).

A request is resolved (the run's saved sample settings, then overrides), checked, and run
as one :class:`~fastds.sampling.rollout.Rollout` (days forward, lag windows, resume, the
NetCDF) of one downscaler (:mod:`fastds.sampling.downscalers`: a trained network, a null
ensemble or a baseline), every model projected alike; or, with workers or time segments,
cut into units that each run the same (:mod:`fastds.sampling.distributed`). One day of one
network in model space is :func:`~fastds.sampling.day.downscale_day`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .._warn import warn_caller
from ..config import SampleConfig
from ..data.regions import season_of
from ..data.store import Store, open_store
from ..models.norm import KERNEL_BACKENDS
from ..runs import (distill_settings, joint_species, load_trained, run_config, run_store, run_variable,
                    sample_settings, species_names)
from .day import (CALIBRATE_TO, LATENT_STREAM_STRIDE, DayInputs, check_geometry, downscale_day,
                  fit_to_domain, inflate_residuals, member_draws, resolve_compile, spread_widening)
from .downscalers import Anchor, Clim, Interp, JointNetwork, Network, Null, interp_field
from .fusion import FUSIONS
from .nulls import NULL_FIT_MEMBERS, NULL_SPREADS, NULL_STATS_VERSION, NULLS, NullStats, fit_null_stats
from .output import is_zarr, open_output, write_output
from .rollout import Rollout

__all__ = ["sample", "sample_species", "downscale_day", "DayInputs", "interpolate_coarse", "MODELS", "member_draws",
           "inflate_residuals", "spread_widening", "clear_worker_state"]

MODES = ("strict", "lenient")
LAG_HISTORIES = ("member", "mean")


def interpolate_coarse(store: Store, days, *, method="bilinear") -> xr.DataArray:
    """The interpolation baseline: the coarse field on the fine grid, (time, lat, lon), physical."""
    it = Interp(store, method=method)  # the rollout's `interp`, whole period at once
    days = pd.DatetimeIndex(days)
    idx = store.times_c.get_indexer(days)
    if (idx < 0).any():
        raise KeyError(f"no coarse data for {days[idx < 0][0]:%Y-%m-%d}")
    vals = interp_field(store.coarse.values[idx], it.iy, it.ix)
    return xr.DataArray(vals, dims=("time", "lat", "lon"),
                        coords={"time": days, "lat": store.ds["lat"].values, "lon": store.ds["lon"].values},
                        name=store.variable)


def _projection(store: Store, coarse=None):
    """The coarse-consistency projection fitted on the store's training days; ``coarse``:
    the store's whole coarse cube if the caller has it read already."""
    from .consistency import fit_projection
    coarse = store.coarse.values if coarse is None else coarse
    coarse = coarse[store.times_c.get_indexer(store.times)]  # the fine days' coarse
    return fit_projection(store.fine.values, coarse, store.times,
                          store.ds["split"].values == 0, lat=store.ds["lat"].values,
                          lon=store.ds["lon"].values, lat_c=store.ds["lat_c"].values,
                          lon_c=store.ds["lon_c"].values)


class _CoarseDays:
    """The store's coarse days (physical, (h, w)) by date, read from the store once: the
    store is lazy, and reading its whole coarse cube for every sampled day would cost a
    full decompress per day on a 25-year record."""

    def __init__(self, store: Store):
        self.store, self._values = store, None

    @property
    def values(self):
        """The whole cube (time_c, h, w), read at the first use."""
        if self._values is None:
            self._values = self.store.coarse.values
        return self._values

    def __getitem__(self, day):
        return self.values[self.store.times_c.get_loc(day)]


# the models whose members spread around a mean (what sample.spread_scale scales)
ENSEMBLE_MODELS = ("ddpm", "distill", "joint") + NULLS
SPECIES_NOISE = ("shared", "independent", "coupled")
# independent species: seed offset by the species' position, the latent streams' stride
SPECIES_SEED_STRIDE = LATENT_STREAM_STRIDE


def sample_species(*, runs, start, end, out=None, noise="coupled", total=None, **kwargs) -> xr.Dataset:
    """Several species at once: each of ``runs`` (one per species of a multi-species store,
    each trained on its own: see ``data.variable``) sampled by :func:`sample` over the same
    days with the same settings, then merged into one Dataset with one data variable per
    species ``VAR(time[, member], lat, lon)``, each with its own CF attributes.

    With ``out``, each species is written to ``OUT.species/`` first (resumable as any
    output; a finished species is not sampled again), then ``out`` is written atomically
    and the folder removed. ``kwargs``: what :func:`sample` takes (``cfg``, ``model``,
    ``members=...``, ...); ``cfg`` None uses each run's own saved settings.

    ``noise``: the species' separate models draw latents correlated as the species' U-Net
    residuals are on validation days (``"coupled"``, the default: a Gaussian copula on the
    latents, see :func:`species_latent_mix`), from one seed (``"shared"``: member k of every
    species starts from the same noise) or each from its own (``"independent"``: the seed
    offset by the species' position). The separate models stay separate; one model of every
    species is a joint run (:func:`~fastds.training.joint.train_joint`, sampled by
    :func:`sample` with ``model="joint"``). On the species protocol tier
    (reported days and a development start) only ``coupled`` keeps the inter-species
    correlation within 0.1 of the truth's (−0.05 / −0.04; shared +0.29, independent −0.25)
    and the summed species calibrated (spread/skill 1.00 / 0.97).

    ``total``: a variable of the store the species must add up to (e.g. ``"TOTEXTTAU"``):
    each day and member, every species is scaled by the one smooth factor that projects
    their sum onto the total's coarse cells (:func:`~fastds.sampling.consistency.to_total`),
    and the sum is written too, as ``total``. Without it each species keeps its own
    projection and nothing ties them."""
    runs = [Path(r) for r in runs]
    if noise == "coupled" and kwargs.get("model", "ddpm") not in ("ddpm", "distill"):
        noise = "shared"  # only a diffusion sampler draws x_T: nothing to couple (and no residual fit)
    latents = species_latents(noise, runs, _days_of(start, end), data=kwargs.get("data"),
                              device=kwargs.get("device", "cpu"), what="sample_species: noise")
    names = species_names(runs, "sample_species")
    parts = Path(out).with_name(Path(out).name + ".species") if out is not None else None
    done = []
    for k, (run, name) in enumerate(zip(runs, names)):
        sub = parts / (f"{name}.zarr" if is_zarr(out) else f"{name}.nc") if parts is not None else None
        if sub is not None and sub.exists() and (not is_zarr(sub) or _complete(sub)):
            done.append(open_output(sub))
            continue
        settings = dict(kwargs)
        if noise != "shared":
            cfg = sample_settings(run, settings.pop("cfg", None),
                                  **{f: settings.pop(f) for f in list(settings) if f in _SAMPLE_FIELDS})
            settings["cfg"] = latents(k, cfg)
        done.append(sample(run=run, start=start, end=end, out=sub, **settings))
    merged = xr.merge([d[[n]] for d, n in zip(done, names)], combine_attrs="drop_conflicts")
    merged.attrs["species"] = ",".join(names)
    if total is not None:
        merged = _sum_to_total(merged, names, total, runs, kwargs.get("data"))
    if out is None:
        return merged
    write_output(merged, out)
    import shutil
    shutil.rmtree(parts, ignore_errors=True)
    return open_output(out)


_SAMPLE_FIELDS = {f.name for f in dataclasses.fields(SampleConfig)}


def _days_of(start, end):
    return pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq="D")


def species_latents(noise, runs, days, *, data=None, device="cpu", what="species noise"):
    """How species k of ``runs`` draws its latents under ``noise`` (see :func:`sample_species`):
    a function ``(k, cfg) -> cfg``. ``independent`` offsets the seed by the species' position;
    ``coupled`` sets ``latent_mix`` from :func:`species_latent_mix`, fitted on first use (with
    that call's settings) and kept for the other species; ``shared`` changes nothing."""
    if noise not in SPECIES_NOISE:
        raise ValueError(f"{what} must be one of {', '.join(SPECIES_NOISE)}, got {noise!r}")
    mix = []

    def apply(k, cfg: SampleConfig) -> SampleConfig:
        if noise == "independent":
            return dataclasses.replace(cfg, seed=cfg.seed + SPECIES_SEED_STRIDE * k)
        if noise == "coupled":
            if not mix:
                mix.extend(species_latent_mix(runs, cfg, days, data=data, device=device))
            return dataclasses.replace(cfg, latent_mix=mix[k])
        return cfg
    return apply


def species_latent_mix(runs, cfg: SampleConfig, days, *, data=None, device="cpu") -> list[tuple]:
    """Latent weights that correlate separate species' samplers as their residuals correlate.

    The species' U-Net residual fields on the store's validation days (the null ensembles'
    bank, :func:`null_stats`, for the seasons of ``days``; the same days for every species of
    one store) give the inter-species correlation matrix C (pooled over days and pixels);
    species k then draws x_T = Σ_j L[k, j] z_j with L the Cholesky factor of C and z_j the
    latent streams of ``sample.latent_mix``, so cov(x_T of k, x_T of l) = C[k, l] and each
    keeps unit variance. Returns one weight tuple per run, in order."""
    seasons = sorted(set(season_of(pd.DatetimeIndex(days).month).tolist()))
    banks = []
    for run in runs:
        variable = run_variable(run)
        path = data or run_store(run, "species_latent_mix")
        store = open_store(path, variable=variable)
        plain = dataclasses.replace(cfg, latent_mix=())
        banks.append(np.concatenate([null_stats(run, store, s, plain, data=data, device=device).bank.ravel()
                                     for s in seasons]))
    if len({b.size for b in banks}) > 1:
        raise ValueError("species_latent_mix: the runs' validation residuals differ in size; are the runs "
                         "of one store?")
    C = np.corrcoef(np.stack(banks))
    L = np.linalg.cholesky(C + 1e-9 * np.eye(len(C)))  # jitter: species that co-vary perfectly
    L /= np.linalg.norm(L, axis=1, keepdims=True)       # unit-variance latents (the jitter's 1e-9 off)
    return [tuple(float(w) for w in row[:k + 1]) for k, row in enumerate(L)]


def joint_channel_mix(run, cfg: SampleConfig, days, *, data=None, device="cpu") -> tuple:
    """``sample.channel_mix`` for a joint run: its channels' latents correlated as its
    species' U-Net residuals are on validation days (the Cholesky factor of
    :func:`species_latent_mix`, row-major K x K), the coupling separate species' runs get."""
    rows = species_latent_mix(joint_species(run), cfg, days, data=data, device=device)
    K = len(rows)
    return tuple(float(r[j]) if j < len(r) else 0.0 for r in rows for j in range(K))


def _sum_to_total(merged, names, total, runs, data) -> xr.Dataset:
    """``merged``'s species scaled day by day to sum to ``total``'s coarse constraint (lazy,
    one day a task), with the sum added as ``total``."""
    from .consistency import to_total
    if total in names:
        raise ValueError(f"sample_species: total={total} is also one of the runs' species; the total is "
                         "their sum, not a run")
    stores = {str(data)} if data is not None else {run_store(r, "sample_species") for r in runs}
    if len(stores) > 1:
        raise ValueError(f"sample_species: the runs come from different stores ({', '.join(sorted(stores))}); "
                         "total= needs one store holding the species and their total")
    store = open_store(stores.pop(), variable=total)
    proj, coarse_days = _projection(store), _CoarseDays(store)
    days = pd.DatetimeIndex(merged.time.values)
    coarse = xr.DataArray(np.stack([coarse_days[d] for d in days]), dims=("time", "lat_c", "lon_c"))
    season = xr.DataArray(season_of(days.month), dims="time")
    stacked = xr.concat([merged[v] for v in names], pd.Index(list(names), name="species"))
    core = [d for d in stacked.dims if d != "time"]
    fixed = xr.apply_ufunc(lambda v, c, s: to_total(v, c, int(s), proj), stacked, coarse, season,
                           input_core_dims=[core, ["lat_c", "lon_c"], []], output_core_dims=[core],
                           vectorize=True, dask="parallelized", output_dtypes=[np.float32])
    out = merged.copy()
    dims = merged[names[0]].dims
    for v in names:
        out[v] = fixed.sel(species=v, drop=True).transpose(*dims).assign_attrs(merged[v].attrs)
    attrs = store.attrs  # the total's units, long name and CF standard name
    attrs["long_name"] += f", the sum of the downscaled {', '.join(names)}"
    out[total] = fixed.sum("species").transpose(*dims).astype(np.float32).assign_attrs(attrs)
    out.attrs["total"] = total
    return out


def _complete(zarr_out) -> bool:
    return bool(xr.open_zarr(zarr_out, consolidated=False).attrs.get("complete"))


BASELINES = ("interp", "clim", "anchor")
MODELS = ("ddpm", "distill", "unet", "vae", "joint") + NULLS + BASELINES


def sample(*, run, start, end, out=None, cfg: SampleConfig | None = None, model="ddpm",
           data=None, device="cpu", backend="auto", cache_conditioning=True, progress=True,
           workers=None, scheduler=None, member0=0, cold_start=False, worker=False,
           **settings) -> xr.Dataset:
    """Downscale every day from ``start`` to ``end`` (inclusive) with a trained run.

    Parameters
    ----------
    run : run folder (pretrain + train done for the seasons of these days).
    start, end : dates; days run forward. The lag window of ``start`` must be available: true
        fine days from the store, or days already predicted in ``out``'s parts.
    out : NetCDF path, or None to only return the Dataset (no resume without it).
    cfg : a :class:`~fastds.config.SampleConfig` (sampler, steps, tile/halo/stride, batch,
        members, mode ``strict``/``lenient``, clip, eta, kernels, fusion, consistency,
        spacing, seed, ...). None (the default): the settings saved with the run, exactly
        what ``fastds sample --run`` uses (:func:`fastds.runs.sample_settings`).
    **settings : SampleConfig fields overriding ``cfg`` (or the run's), e.g. ``members=16``.
    model : ``"ddpm"``, ``"unet"``, ``"vae"`` (trained in the run; ``"joint"``: a joint run's species, one
        variable each, :func:`~fastds.training.joint.train_joint`); a null ensemble built on
        the trained U-Net (``"unet+iid"``, ``"unet+grf"``, ``"unet+resample"``: see
        :mod:`fastds.sampling.nulls`); or a baseline that needs no training: ``"interp"``
        (bilinear interpolation of log10 coarse), ``"clim"`` (interpolation plus the fine
        record's mean fine-scale residual per season, fitted on the store's training days with
        the run's alignment) or ``"anchor"`` (the run's anchor μ, the residual models' centre).
    data : store path (default: the one recorded in the run).
    workers, scheduler : run the work on ``dask.distributed`` (see
        :func:`fastds.sampling.distributed.sample_distributed`): ``workers=N`` starts a local
        cluster of N single-threaded workers, ``scheduler`` names an existing one. With neither,
        and ``cfg.segments == 1``, everything runs in this process, day after day.
    member0 : number of the first member (a unit of a distributed run samples members
        ``member0..`` of the whole ensemble, with their own seeds).
    cold_start : lag days that are neither in the fine record nor predicted take a model-free
        stand-in (the anchor μ) instead of raising: how a time segment of a parallel-in-time
        rollout starts (its first ``cfg.burn_in`` days are then discarded by the caller).
    worker : this call is one unit of a distributed run: the store is read without dask and
        the loaded state (networks, fine days, projection) is kept in this process for its
        next unit (:func:`clear_worker_state` drops it).

    Returns
    -------
    xarray.Dataset with ``VAR(time[, member], lat, lon)`` in physical units, CF attributes.
    The ``member`` dim is kept when ``cfg.members > 1``. With ``out`` it is ``out`` opened
    lazily (a rollout holds only its lag window in memory, so its RSS does not grow with its
    length); without, the days in memory.
    """
    run = Path(run)
    cfg = sample_settings(run, cfg, **settings)
    if model == "joint":
        return _sample_joint(run=run, start=start, end=end, out=out, cfg=cfg, data=data, device=device,
                             backend=backend, cache_conditioning=cache_conditioning, progress=progress, member0=member0,
                             cold_start=cold_start, units=(workers, scheduler, cfg.segments > 1 or worker))
    data = str(Path(data if data is not None else run_store(run)).resolve())
    variable = run_variable(run)
    if workers is not None or scheduler is not None or cfg.segments > 1:
        from .distributed import sample_distributed
        # fitted once here, so a small domain warns once; units run this (passed in: no import cycle)
        cfg = _fitted(cfg, open_store(data, variable=variable))
        return sample_distributed(run=run, start=start, end=end, out=out, cfg=cfg, model=model, data=data,
                                  device=device, workers=workers, scheduler=scheduler, progress=progress,
                                  unit_sampler=sample)
    _check(cfg, model)
    keep = _kept if worker else (lambda key, build: build())
    store = keep(("store", data, variable), lambda: open_store(data, dask=not worker, variable=variable))
    days = _days(store, start, end)
    cfg = _compiled_for(_fitted(cfg, store), store, run=run, model=model, days=len(days), device=device)
    attrs = _attrs(cfg, run=run, model=model, member0=member0, cold_start=cold_start)
    coarse_days = keep(("coarse", data, variable), lambda: _CoarseDays(store))
    # every model gets the same projection (or none); sample.project_baselines=false keeps the
    # baselines as a user would compute them by hand
    project = (keep(("projection", data, variable), lambda: _projection(store, coarse_days.values))
               if cfg.consistency and (model not in BASELINES or cfg.project_baselines) else None)
    # a downscaler does not depend on the member count or the segments of a request
    key = ("downscaler", model, str(run.resolve()), data, str(device), backend, cache_conditioning,
           dataclasses.replace(cfg, members=1, segments=1))
    downscaler = keep(key, lambda: downscaler_for(model, run=run, store=store, cfg=cfg, data=data, device=device,
                                                  backend=backend, cache_conditioning=cache_conditioning))
    rollout = Rollout(store=store, days=days, cfg=cfg, member0=member0, cold_start=cold_start,
                      out=out, attrs=attrs, finish=project, coarse_days=coarse_days,
                      progress=progress, desc=f"sample {model} {cfg.sampler}")
    return rollout.run(downscaler)


class _StackedDays:
    """Several species' coarse days by date, stacked: (K, h, w)."""

    def __init__(self, parts):
        self.parts = parts

    def __getitem__(self, day):
        return np.stack([p[day] for p in self.parts])


def _sample_joint(*, run, start, end, out, cfg, data, device, backend, cache_conditioning, progress,
                  member0, cold_start, units) -> xr.Dataset:
    """:func:`sample` of a joint run (``model="joint"``): every species of a day at once, each
    projected on its own coarse cells; one data variable per species. In this process only
    (``units``: the request's workers, scheduler, and segments-or-worker flag)."""
    if units[0] is not None or units[1] is not None or units[2]:
        raise ValueError("sample: model='joint' runs in one process; workers, scheduler and "
                         "sample.segments > 1 are for single-field models")
    _check(cfg, "joint")
    species = joint_species(run)
    if not species:
        raise ValueError(f"sample: model='joint' needs a joint run (`fastds train --model joint`); "
                         f"{run}/run.json names no species runs")
    data = str(Path(data if data is not None else run_store(run)).resolve())
    stores = [open_store(data, variable=run_variable(r)) for r in species]
    days = _days(stores[0], start, end)
    cfg = _compiled_for(_fitted(cfg, stores[0]), stores[0], run=run, model="joint", days=len(days),
                        device=device)
    coarse = [_CoarseDays(st) for st in stores]
    finish = None
    if cfg.consistency:
        projections = [_projection(st, c.values) for st, c in zip(stores, coarse)]

        def finish(values, coarse_k, s):
            return np.stack([p(values[:, k], coarse_k[k], s) for k, p in enumerate(projections)], 1)
    downscaler = JointNetwork(run=run, stores=stores, cfg=cfg, device=device, backend=backend,
                              cache_conditioning=cache_conditioning)
    rollout = Rollout(store=stores[0], days=days, cfg=cfg, member0=member0, cold_start=cold_start, out=out,
                      attrs=_attrs(cfg, run=run, model="joint", member0=member0, cold_start=cold_start),
                      finish=finish, coarse_days=_StackedDays(coarse), progress=progress,
                      desc=f"sample joint {cfg.sampler}", species=stores)
    return rollout.run(downscaler)


def _fitted(cfg: SampleConfig, store) -> SampleConfig:
    """``cfg``'s patch geometry as it runs on ``store``'s fine grid (shrunk only on a domain
    smaller than the tile), with a warning naming what was asked and what runs: the output's
    attributes then record what ran."""
    shape = (store.ds.sizes["lat"], store.ds.sizes["lon"])
    fitted = fit_to_domain(cfg, shape)
    if fitted != cfg:
        keys = ("tile", "halo", "stride", "mean_halo", "mean_stride")
        warn_caller(f"sample: the domain ({shape[0]}x{shape[1]} fine pixels) is smaller than "
                    f"sample.tile={cfg.tile}; sampling with "
                    + ", ".join(f"{k}={getattr(fitted, k)}" for k in keys if getattr(fitted, k) != getattr(cfg, k))
                    + " (the output's attributes record these)")
    return fitted


def _compiled_for(cfg: SampleConfig, store, *, run, model, days, device) -> SampleConfig:
    """``cfg`` with ``sample.compile`` resolved for this job (``"auto"``: compiled where the
    job's network work pays the compilation back, :func:`~fastds.sampling.day.compile_pays`);
    the baselines have no network to compile."""
    evals = {"ddpm": cfg.steps, "joint": cfg.steps}.get(model, 1)
    if model == "distill":
        evals = distill_settings(cfg, run_config(run)).steps
    shape = (store.ds.sizes["lat"], store.ds.sizes["lon"])
    return dataclasses.replace(cfg, compile=model not in BASELINES and resolve_compile(
        cfg.compile, device=device, shape=shape, cfg=cfg, days=days, members=cfg.members, evals=evals))


def _attrs(cfg: SampleConfig, *, run, model, member0, cold_start) -> dict:
    """The output's attributes: the request, also the signature its day files are kept under."""
    if model == "distill":  # a distilled student runs its own few-step grid: the output says which
        cfg = distill_settings(cfg, run_config(run))
    return {"run": str(run), "model": model, "sampler": cfg.sampler, "steps": cfg.steps,
            "mode": cfg.mode, "members": cfg.members, "member0": int(member0),
            "cold_start": int(cold_start), "tile": cfg.tile, "halo": cfg.halo,
            "stride": cfg.stride, "mean_stride": cfg.mean_stride,
            "mean_halo": cfg.mean_halo, "seed": cfg.seed,
            "consistency": int(cfg.consistency), "calibrate_to": cfg.calibrate_to,
            "fusion": cfg.fusion, "lag_history": cfg.lag_history, "precision": cfg.precision,
            "calibrate": int(cfg.calibrate), "calibrate_bands": int(cfg.calibrate_bands),
            "lag_conditioning": int(cfg.lag_conditioning),
            "project_baselines": int(cfg.project_baselines), "spacing": cfg.spacing,
            "antithetic": int(cfg.antithetic),
            **({"spread_scale": float(cfg.spread_scale)} if cfg.spread_scale != 1.0 else {}),
            **({"null_spread": cfg.null_spread} if cfg.null_spread != "validation" else {}),
            **({"latent_mix": json.dumps([round(float(w), 6) for w in cfg.latent_mix])} if cfg.latent_mix else {}),
            **({"channel_mix": json.dumps([round(float(w), 6) for w in cfg.channel_mix])} if cfg.channel_mix else {})}


# a distributed worker's loaded state, kept between the units it runs (this process only)
_WORKER_STATE: dict = {}
_WORKER_STATE_MAX = 8


def _kept(key, build):
    """``build()`` once per ``key`` in this process (a worker's units share it), LRU-bounded."""
    if key in _WORKER_STATE:
        _WORKER_STATE[key] = _WORKER_STATE.pop(key)  # most recently used last
    else:
        while len(_WORKER_STATE) >= _WORKER_STATE_MAX:
            _WORKER_STATE.pop(next(iter(_WORKER_STATE)))
        _WORKER_STATE[key] = build()
    return _WORKER_STATE[key]


def clear_worker_state():
    """Drop the state kept by ``sample(..., worker=True)`` calls in this process."""
    _WORKER_STATE.clear()


def _check(cfg: SampleConfig, model):
    """Settings a request can get wrong, each named in its error."""
    if model not in MODELS:
        raise ValueError(f"sample: model must be one of {', '.join(MODELS)}, got {model!r}")
    if cfg.mode not in MODES:
        raise ValueError(f"sample: mode must be 'strict' or 'lenient', got {cfg.mode!r}")
    if cfg.members < 1:
        raise ValueError(f"sample: members must be >= 1, got {cfg.members}")
    check_geometry(cfg)
    if cfg.kernels not in KERNEL_BACKENDS:
        raise ValueError(f"sample: sample.kernels must be one of {', '.join(KERNEL_BACKENDS)}, "
                         f"got {cfg.kernels!r}")
    if cfg.lag_history not in LAG_HISTORIES:
        raise ValueError(f"sample: sample.lag_history must be one of {', '.join(LAG_HISTORIES)}, "
                         f"got {cfg.lag_history!r}")
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"sample: sample.fusion must be one of {', '.join(FUSIONS)}, got {cfg.fusion!r}")
    if cfg.calibrate_to not in CALIBRATE_TO:
        raise ValueError(f"sample: sample.calibrate_to must be one of {', '.join(CALIBRATE_TO)}, "
                         f"got {cfg.calibrate_to!r}")
    if not (np.isfinite(cfg.spread_scale) and cfg.spread_scale > 0):
        raise ValueError(f"sample: sample.spread_scale must be a positive number, got {cfg.spread_scale!r}")
    if cfg.null_spread not in NULL_SPREADS:
        raise ValueError(f"sample: sample.null_spread must be one of {', '.join(NULL_SPREADS)}, "
                         f"got {cfg.null_spread!r}")


def _days(store: Store, start, end) -> pd.DatetimeIndex:
    days = pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq="D")
    if len(days) == 0:
        raise ValueError(f"sample: end {end} is before start {start}")
    missing = days[store.times_c.get_indexer(days) < 0]
    if len(missing):
        raise ValueError(f"sample: no coarse data for {len(missing)} day(s), e.g. {missing[0]:%Y-%m-%d} "
                         f"(coarse record {store.times_c[0]:%Y-%m-%d}..{store.times_c[-1]:%Y-%m-%d})")
    return days


def downscaler_for(model, *, run, store: Store, cfg: SampleConfig, data=None, device="cpu",
                   backend="auto", cache_conditioning=True):
    """The downscaler of ``model`` (see :mod:`fastds.sampling.downscalers`)."""
    if cfg.spread_scale != 1.0 and model not in ENSEMBLE_MODELS:
        raise ValueError(f"sample: sample.spread_scale={cfg.spread_scale} scales an ensemble's spread "
                         f"around its mean; {model} has none (it applies to {', '.join(ENSEMBLE_MODELS)})")
    if cfg.null_spread != "validation" and model not in NULLS:
        raise ValueError(f"sample: sample.null_spread={cfg.null_spread!r} sets a null ensemble's noise; "
                         f"{model} is none (it applies to {', '.join(NULLS)})")
    if model == "interp":
        return Interp(store)
    if model == "clim":
        return Clim(store, run)
    if model == "anchor":
        return Anchor(store, run)
    if model in NULLS:  # the U-Net (which has no spread to scale) plus its noise, scaled
        plain = dataclasses.replace(cfg, spread_scale=1.0, null_spread="validation")
        net = Network("unet", run=run, store=store, cfg=plain, device=device, backend=backend,
                      cache_conditioning=cache_conditioning)
        fitted = None if cfg.null_spread == "validation" else (
            lambda s: null_factor(run, store, s, model, cfg, data=data, device=device)["factor"])
        return Null(model, net, lambda s: null_stats(run, store, s, plain, data=data, device=device),
                    scale=cfg.spread_scale, factor_for=fitted)
    return Network(model, run=run, store=store, cfg=cfg, device=device, backend=backend,
                   cache_conditioning=cache_conditioning)


def null_stats(run, store: Store, season, cfg: SampleConfig, *, data=None, device="cpu") -> NullStats:
    """The null ensembles' statistics for one season: U-Net residuals on the store's
    validation days of that season, with true lags and the sampler's projection setting.
    Fitted once and cached in ``run/nulls/``. Where the season has no validation day whose lag
    window lies in the fine record, its training days stand in, with a warning."""
    path = Path(run) / "nulls" / f"season{season}_{_null_key(cfg, device)}_v{NULL_STATS_VERSION}.npz"
    if path.exists():
        return NullStats.load(path)
    _, conf = load_trained(run, season, "unet", device=device)
    times, split = store.times, store.ds["split"].values
    ok = (season_of(times.month) == season) & (times - pd.Timedelta(days=conf.data.t_lag) >= times[0])
    days = times[ok & (split == 1)]
    if len(days) == 0:
        days = times[ok & (split == 0)][-28:]
        warn_caller(f"null ensembles: season {season} has no validation day in the fine record; "
                    f"their noise statistics come from {len(days)} training days, where the U-Net's "
                    "error is smaller than on new days")
    if len(days) == 0:
        raise ValueError(f"null ensembles: season {season} has no fine day to fit their noise on")
    lenient = dataclasses.replace(cfg, mode="lenient", members=1, segments=1, spread_scale=1.0,
                                  null_spread="validation")
    res = []
    for block in _blocks(days):
        pred = sample(run=run, start=block[0], end=block[-1], cfg=lenient, model="unet", data=data,
                      device=device, progress=False)[store.variable].values
        truth = store.fine.sel(time=block).values
        res.append(np.log10(np.maximum(truth, 1e-6)) - np.log10(np.maximum(pred, 1e-6)))
    stats = fit_null_stats(np.concatenate(res))
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


def _null_key(cfg: SampleConfig, device) -> str:
    """What changes the U-Net's days under a null, for its cached statistics' names: the
    projection, the patch geometry, the lag inputs and the arithmetic."""
    from .. import _backend
    prec = _backend.resolve_precision(cfg.precision, device)
    return (f"c{int(cfg.consistency)}_t{cfg.tile}_h{cfg.halo}_s{cfg.stride}_l{int(cfg.lag_conditioning)}"
            f"_{prec}")


def _blocks(days: pd.DatetimeIndex) -> list:
    """Runs of consecutive days."""
    return np.split(days, np.flatnonzero(np.diff(days.values).astype("timedelta64[D]").astype(int) > 1) + 1)


def null_factor(run, store: Store, season, kind, cfg: SampleConfig, *, data=None, device="cpu") -> dict:
    """The factor on null ``kind``'s noise (``sample.null_spread = "rollouts"``) for one season.

    The null (its validation statistics, :func:`null_stats`) rolls forward strictly, as
    ``sample`` runs it, over each validation block of the season, from the block's first day
    whose true lag window lies in the fine record and is free of test days, with
    ``NULL_FIT_MEMBERS`` members (seed 0) that carry their own histories; then the factor on
    every member's draw that minimises the fair CRPS (log10, projected as sampled) over those
    days is picked from :data:`~fastds.sampling.spread.INFLATIONS`. The rollouts are run once
    at factor 1 (a history drawn at another factor would diverge a little differently; the
    rollout refinement of the DDPM's widening makes the same approximation).

    Returns {"factor", "factors", "crps_fair", "spread_skill" (per factor), "spread_skill_at_1",
    "days", "blocks", "members"}; cached in ``run/nulls/`` per kind, season and the settings
    that change the U-Net's days. A season with no usable validation day gets factor 1, with a
    warning."""
    from .._io import atomic_path
    from .spread import INFLATIONS, RAW, scan_factors
    path = (Path(run) / "nulls" / f"factor_{kind.replace('+', '-')}_season{season}_{_null_key(cfg, device)}"
            f"_{cfg.lag_history}_a{int(cfg.antithetic)}_v{NULL_STATS_VERSION}.json")
    if path.exists():
        return json.loads(path.read_text())
    _, conf = load_trained(run, season, "unet", device=device)
    times, split = store.times, store.ds["split"].values
    t_lag = conf.data.t_lag

    def usable(d):  # a true lag window, in the fine record and free of test days
        i = times.get_loc(d)
        return i >= t_lag and times[i] - times[i - t_lag] == pd.Timedelta(days=t_lag) and not (split[i - t_lag:i] == 2).any()
    blocks = []
    for block in _blocks(times[(season_of(times.month) == season) & (split == 1)]):
        ok = [usable(d) for d in block]
        if any(ok):
            blocks.append(block[ok.index(True):])
    if not blocks:
        warn_caller(f"sample.null_spread='rollouts': season {season} has no validation day with a true lag "
                    f"window in the fine record; {kind}'s noise keeps its validation statistics (factor 1)")
        return {"factor": 1.0, "days": 0}
    fit = dataclasses.replace(cfg, mode="strict", members=NULL_FIT_MEMBERS, segments=1, spread_scale=1.0,
                              null_spread="validation", seed=0)
    null = downscaler_for(kind, run=run, store=store, cfg=fit, data=data, device=device)
    coarse_days = _CoarseDays(store)
    project = _projection(store, coarse_days.values) if cfg.consistency else None
    record = []

    class Recorder:  # the null at factor 1, its debiased U-Net and its draws kept apart
        needs_lags = True

        def season(self, s):
            return null.season(s)

        def day(self, ctx):
            logs, noise = null.parts(ctx)
            truth = np.log10(np.maximum(store.fine.sel(time=ctx.day).values, 1e-6))
            record.append((ctx.c, logs, (0.0, noise.astype(np.float32)), truth))
            return (10.0 ** (logs + noise)).astype(np.float32)

    for block in blocks:
        Rollout(store=store, days=block, cfg=fit, coarse_days=coarse_days, finish=project).run(Recorder())

    def to_log(c, z):
        if project is None:
            return z
        return np.log10(np.maximum(project(10.0 ** z, coarse_days.values[c], season), 1e-6))
    scores, ratios = scan_factors(record, to_log, pairs=fit.antithetic and NULL_FIT_MEMBERS % 2 == 0)
    out = {"kind": kind, "season": int(season), "factor": float(INFLATIONS[int(np.argmin(scores))]),
           "factors": INFLATIONS.tolist(), "crps_fair": scores, "spread_skill": ratios,
           "spread_skill_at_1": ratios[RAW], "days": len(record), "members": NULL_FIT_MEMBERS,
           "blocks": [[f"{b[0]:%Y-%m-%d}", f"{b[-1]:%Y-%m-%d}"] for b in blocks]}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    return out
