"""``sample``: a trained run and a date range -> a fine-grid daily record (METHOD.md §4-§6).

Per day: plan patches once, compute the conditioning (next-day coarse, covariates, frozen
transfer features of the lag window) once per patch, run the sampler on batches of patches
(the conditioning is reused by every step and every member that shares the lag window),
stitch with Halo-and-Hann weights, undo the normalisation. Days run forward in time; in
``strict`` mode every predicted day enters the lag window of the next, in ``lenient`` mode
true fine days are used where the record has them. Each finished day is written atomically
to ``OUT.parts/``; a re-run skips the days found there (resume), and the final NetCDF is
assembled atomically at the end.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from .._io import atomic_path
from ..config import SampleConfig
from ..data.regions import season_of
from ..data.store import Store, open_store
from ..data.transforms import align_index, upsample
from ..models.norm import KERNEL_BACKENDS
from ..runs import fine_days, load_trained, run_config, sample_settings
from ..models.blocks import set_kernel_backend
from ..stitch import StitchPlan, plan_patches, stitch
from .fusion import FUSIONS, PatchFusedModel
from .. import _backend
from .graphs import GraphCache, StaticSampler
from .nulls import NULLS, NullStats, draw_null, fit_null_stats, null_rng
from .samplers import make_plan, run_plan
from .spread import widen

__all__ = ["sample", "downscale_day", "DayInputs", "interpolate_coarse", "MODELS"]

MODES = ("strict", "lenient")
LAG_HISTORIES = ("member", "mean")
PRECISIONS = ("fp32", "bf16")
# captured StaticSamplers per model and batch shape (CUDA only), bounded and evicted LRU
_GRAPHS = GraphCache(max_entries=4)


@dataclass
class DayInputs:
    """Normalised inputs of one day on the fine grid: coarse (1, H, W), covariates (C, H, W),
    lags (members or 1, t_lag, H, W)."""
    coarse: np.ndarray
    covariates: np.ndarray
    lags: np.ndarray


def _drop(cfg, n, device):
    """The conditioning-dropout flag of n patches: all set for the coarse-only fallback."""
    return None if cfg.lag_conditioning else torch.ones(n, dtype=torch.bool, device=device)


def _patchify(a, starts, tile):
    """(C, H, W) -> (N, C, tile, tile) views gathered for the starts (N, 2)."""
    return np.stack([a[:, y:y + tile, x:x + tile] for y, x in starts])


@torch.no_grad()
def downscale_day(model, inputs: DayInputs, *, kind="ddpm", cfg: SampleConfig = SampleConfig(),
                  T=1000, prediction="sample", members=1, seed=0, day_key=0,
                  cache_conditioning=True, device="cpu", backend="auto", progress=None, member0=0):
    """One day, all members: the model-space field (members, H, W) (min-max or standardised
    residual, as the model was trained).

    ``cfg.fusion`` "step" samples one image-space trajectory per member, blending the patch
    outputs at every step (on a GPU, one CUDA graph per geometry holds the whole step); "final" samples patches on their
    own and stitches the finished samples. A DDPM with a regression mean (CorrDiff) returns
    ``mean + scale · sample``. Latents are drawn per member from ``torch.Generator`` seeded by
    (seed, member, day_key), so a day's result does not depend on which other days were
    sampled before it; ``member0`` numbers the members from there (a worker sampling members
    k.. of an ensemble draws what the whole ensemble would). ``cache_conditioning=False`` recomputes the transfer features at every
    sampler step (the reference code's recipe, kept for benchmarks).
    """
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"sample.precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    # bf16 autocast covers the network calls only: run_plan and the fusion cast each output
    # back to the fp32 state, so updates, noise and stitching are unchanged
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                        enabled=cfg.precision == "bf16"):
        return _downscale(model, inputs, kind=kind, cfg=cfg, T=T, prediction=prediction,
                          members=members, seed=seed, day_key=day_key,
                          cache_conditioning=cache_conditioning, device=device, backend=backend,
                          progress=progress, with_mean=True, member0=member0)


def _downscale(model, inputs: DayInputs, *, kind, cfg, T, prediction, members, seed, day_key,
               cache_conditioning, device, backend, progress, with_mean, member0=0):
    H, W = inputs.coarse.shape[-2:]
    tile = min(cfg.tile, H, W)
    halo = min(cfg.halo, (tile - 1) // 2)
    stride = min(cfg.stride, tile - 2 * halo)
    starts = plan_patches((H, W), tile, halo, stride)
    plan = (make_plan(cfg.sampler, T=T, steps=cfg.steps, prediction=prediction, eta=cfg.eta,
                      spacing=cfg.spacing) if kind == "ddpm" else None)
    base = np.concatenate([inputs.coarse, inputs.covariates], 0)
    base_p = torch.from_numpy(_patchify(base, starts, tile)).to(device)
    out = np.empty((members, H, W), np.float32)
    shared_lags = inputs.lags.shape[0] == 1
    # CUDA graphs (one per batch shape) when on a GPU with Triton; the eager loop otherwise.
    use_graphs = (kind == "ddpm" and cfg.cuda_graphs and torch.device(device).type == "cuda"
                  and _backend.why_unavailable("triton") is None)
    graphs = _GRAPHS if use_graphs else None
    gens, signs = member_draws(seed, day_key, member0, members, antithetic=cfg.antithetic,
                               device=device)
    plans = [plan if s > 0 or plan is None else plan.mirrored() for s in signs]
    if with_mean and kind == "ddpm" and getattr(model, "regression", None) is not None:
        # CorrDiff: the sample is the scaled residual of a regression mean; stitching is
        # linear, so mean and residual are stitched apart and added. The residual pass runs
        # the same model (so captured graphs stay keyed to it), without the mean.
        res = _downscale(model, inputs, kind=kind, cfg=cfg, T=T, prediction=prediction,
                         members=members, seed=seed, day_key=day_key,
                         cache_conditioning=cache_conditioning, device=device, backend=backend,
                         progress=progress, with_mean=False, member0=member0)
        scale = float(model.regression_scale)
        alpha, gains = spread_widening(model, cfg)
        res = widen(res, alpha, gains=gains, member0=member0, antithetic=cfg.antithetic)
        for k in range(members):
            if k == 0 or not shared_lags:
                mean = _stitched_mean(model, inputs, base_p, starts, tile, halo, (H, W), cfg,
                                      0 if shared_lags else k, device)
            res[k] = mean + scale * res[k]
        return res
    if kind == "ddpm" and cfg.fusion == "step":
        return _downscale_fused(model, inputs, base_p, starts, (H, W), tile, halo, plans, gens,
                                signs, cfg=cfg, cache_conditioning=cache_conditioning, device=device,
                                backend=backend, progress=progress, graphs=graphs)
    x_T = [s * torch.randn((len(starts), 1, tile, tile), generator=g, device=device)
           for g, s in zip(gens, signs)]
    pieces = [[] for _ in range(members)]
    for i in range(0, len(starts), cfg.batch):
        sl = slice(i, i + cfg.batch)
        coarse, cov = base_p[sl, :1], base_p[sl, 1:]
        lags = cond = None
        for k, gen in enumerate(gens):
            if lags is None or not shared_lags:
                lags = torch.from_numpy(_patchify(inputs.lags[0 if shared_lags else k], starts[sl], tile)).to(device)
                # the conditioning, transfer features included, once per patch: every sampler
                # step and every member that shares the lag window reuse it
                cond = (model.cond(coarse, cov, lags, _drop(cfg, len(lags), device))
                        if kind != "ddpm" or cache_conditioning else None)
            if kind == "vae":
                z = signs[k] * torch.randn(model.net.latent_shape(cond), generator=gen, device=device)
                pieces[k].append(model.net.generate(cond, z))
            elif kind == "unet":
                pieces[k].append(model(None, None, cond))
            elif cache_conditioning and graphs is not None:
                key = (tuple(x_T[k][sl].shape), tuple(cond.shape), cfg.sampler, cfg.steps, cfg.eta, cfg.clip,
                       cfg.precision, signs[k])
                static = graphs.get(model, key, lambda: StaticSampler(model, plans[k], x_T[k][sl], cond,
                                                                      clip=cfg.clip or None))
                # one 64-bit seed per trajectory; the kernel counts steps and elements itself
                seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.long, generator=gen,
                                     device=device)
                pieces[k].append(static(x_T[k][sl], cond, seed))
            elif cache_conditioning:
                pieces[k].append(run_plan(model, x_T[k][sl], plans[k], cond=cond, generator=gen,
                                          clip=cfg.clip or None, backend=backend))
            else:
                def recompute(x, t, _c, coarse=coarse, cov=cov, lags=lags):
                    return model(x, t, model.cond(coarse, cov, lags, _drop(cfg, len(lags), device)))
                pieces[k].append(run_plan(recompute, x_T[k][sl], plans[k], cond=None, generator=gen,
                                          clip=cfg.clip or None, backend=backend))
        if progress is not None:
            progress.update(members * min(cfg.batch, len(starts) - i))
    for k in range(members):
        # stitched where the patches are (the CUDA kernel on a GPU): only the image comes back
        patches = torch.cat(pieces[k])[:, 0].float()
        out[k] = stitch(patches, starts, (H, W), halo=halo).cpu().numpy()
    return out


def inflate_residuals(r, alpha, *, member0=0, antithetic=False):
    """Widen an ensemble's residuals (members, ...) by one inflation α: see
    :func:`fastds.sampling.spread.widen` (antithetic pairs keep their pair mean)."""
    return widen(r, alpha, member0=member0, antithetic=antithetic)


def spread_widening(model, cfg: SampleConfig):
    """(α, band gains or None) a CorrDiff DDPM's residual is widened by when sampling with
    ``cfg``: nothing without ``cfg.calibrate``; the per-band gains saved by the calibration
    when ``cfg.calibrate_bands`` and the model has them; else its one inflation α."""
    if not cfg.calibrate or not hasattr(model, "regression_inflation"):
        return 1.0, None
    bands = getattr(model, "regression_bands", None)
    if cfg.calibrate_bands and bands is not None and bands.numel() > 0:
        return 1.0, bands.detach().cpu().double().numpy()
    return float(model.regression_inflation), None


def member_draws(seed, day_key, member0, members, *, antithetic=False, device="cpu"):
    """Each member's latent generator and sign: ([torch.Generator], [±1.0]).

    A member's draws depend only on (seed, its member number, day_key), never on which
    members or days are sampled beside it. With ``antithetic`` the members come in pairs
    (0, 1), (2, 3), ...: both share the pair's generator and the odd one negates every draw
    (x_T and, through :meth:`StepPlan.mirrored`, each step's noise). Member 0 draws the
    same either way.
    """
    gens, signs = [], []
    for k in range(members):
        m = int(member0) + k
        draw, sign = (m // 2, -1.0 if m % 2 else 1.0) if antithetic else (m, 1.0)
        gens.append(torch.Generator(device=device).manual_seed(
            int(seed) * 1_000_003 + draw * 10_007 + int(day_key)))
        signs.append(sign)
    return gens, signs


def _stitched_mean(model, inputs, base_p, starts, tile, halo, shape, cfg, member, device):
    """The regression mean of one lag set, stitched like the samples: (H, W) numpy."""
    lags = inputs.lags[member]
    parts = []
    for i in range(0, len(starts), cfg.batch):
        sl = slice(i, i + cfg.batch)
        lag_p = torch.from_numpy(_patchify(lags, starts[sl], tile)).to(device)
        parts.append(model.regression_mean(base_p[sl, :1], base_p[sl, 1:], lag_p,
                                           _drop(cfg, len(lag_p), device)))
    return stitch(torch.cat(parts)[:, 0].float(), starts, shape, halo=halo).cpu().numpy()


def _downscale_fused(model, inputs, base_p, starts, shape, tile, halo, plans, gens, signs, *, cfg,
                     cache_conditioning, device, backend, progress, graphs=None):
    """``fusion="step"``: one image-space trajectory per member (see sampling/fusion.py).
    x_T is drawn on the image from the member's generator, so a one-patch geometry gives the
    unfused sampler's result."""
    H, W = shape
    splan = StitchPlan(starts, shape, tile=tile, halo=halo)
    shared_lags = inputs.lags.shape[0] == 1
    out = np.empty((len(gens), H, W), np.float32)
    cond = None
    for k, gen in enumerate(gens):
        if cond is None or not shared_lags:
            lags = torch.from_numpy(_patchify(inputs.lags[0 if shared_lags else k], starts, tile)).to(device)

            def cond_of(sl, lags=lags):
                return model.cond(base_p[sl, :1], base_p[sl, 1:], lags[sl],
                                  _drop(cfg, len(lags[sl]), device))
            # the conditioning once per patch (every step and member that shares the lags
            # reuse it), or, for the reference recipe, recomputed at every step
            cond = (torch.cat([cond_of(slice(i, i + cfg.batch)) for i in range(0, len(starts), cfg.batch)])
                    if cache_conditioning else cond_of)
        x_T = signs[k] * torch.randn((1, 1, H, W), generator=gen, device=device)
        if graphs is not None and cache_conditioning:
            # the whole step (every patch batch, the blend, the fused update) in one graph per
            # geometry; the day's conditioning is copied into its static buffer
            key = ("step", np.ascontiguousarray(starts).tobytes(), shape, tuple(cond.shape), cfg.sampler, cfg.steps,
                   cfg.eta, cfg.clip, cfg.precision, signs[k], cfg.batch)
            static = graphs.get(model, key, lambda: StaticSampler(
                model, plans[k], x_T, cond, clip=cfg.clip or None,
                wrap=lambda net: PatchFusedModel(net, splan, None, batch=cfg.batch)))
            seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.long, generator=gen,
                                 device=device)
            x0 = static(x_T, cond, seed)
        else:
            fused = PatchFusedModel(model, splan, cond, batch=cfg.batch)
            x0 = run_plan(fused, x_T, plans[k], generator=gen, clip=cfg.clip or None, backend=backend)
        out[k] = x0[0, 0].float().cpu().numpy()
        if progress is not None:
            progress.update(len(starts))
    return out


def _interp_field(coarse, iy, ix):
    """Physical coarse fields (..., h, w) -> the fine grid, interpolated in log10 like the
    models see them; physical, float32."""
    return (10.0 ** upsample(np.log10(np.maximum(coarse, 1e-6)), iy, ix)).astype(np.float32)


def interpolate_coarse(store: Store, days, *, method="bilinear") -> xr.DataArray:
    """The interpolation baseline: the coarse field on the fine grid, (time, lat, lon), physical."""
    iy = align_index(store.ds["lat_c"].values, store.ds["lat"].values, method=method)
    ix = align_index(store.ds["lon_c"].values, store.ds["lon"].values, method=method)
    days = pd.DatetimeIndex(days)
    idx = store.times_c.get_indexer(days)
    if (idx < 0).any():
        raise KeyError(f"no coarse data for {days[idx < 0][0]:%Y-%m-%d}")
    vals = _interp_field(store.coarse.values[idx], iy, ix)
    return xr.DataArray(vals, dims=("time", "lat", "lon"),
                        coords={"time": days, "lat": store.ds["lat"].values, "lon": store.ds["lon"].values},
                        name=store.variable)


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _write_part(parts: Path, day, values, signature):
    parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(parts / f"{day:%Y%m%d}.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, values)
    sig = parts / "signature.json"
    if not sig.exists():
        with atomic_path(sig) as tmp:
            tmp.write_text(json.dumps(signature))


def _dataset(values, days, store, members, attrs, member0=0):
    """values (time, member, lat, lon), numpy or dask -> the CF Dataset."""
    da = xr.DataArray(values, dims=("time", "member", "lat", "lon"),
                      coords={"time": pd.DatetimeIndex(days), "member": member0 + np.arange(members),
                              "lat": store.ds["lat"].values, "lon": store.ds["lon"].values})
    if members == 1 and member0 == 0:
        da = da.isel(member=0, drop=True)
    da.attrs = {"units": "1", "long_name": f"{store.variable} downscaled by fastds",
                "standard_name": "atmosphere_optical_thickness_due_to_dust_ambient_aerosol_particles"
                if store.variable == "DUEXTTAU" else store.variable}
    if attrs.get("antithetic") and "member" in da.dims:
        da.attrs["antithetic"] = 1  # members in ± pairs: evaluate scores them as such
    ds = da.to_dataset(name=store.variable)
    ds["lat"].attrs = {"units": "degrees_north", "standard_name": "latitude"}
    ds["lon"].attrs = {"units": "degrees_east", "standard_name": "longitude"}
    ds.attrs = {"Conventions": "CF-1.8", "title": "fastds generative downscaling", **attrs}
    return ds


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


def _baseline(model, run, store, days, members, attrs, member0, out, coarse_days, project=None):
    """``interp`` / ``clim`` / ``anchor`` for ``days``: each day is computed on its own (they need no
    history), so with ``out`` the file is written day by day and the period is never in
    memory; the returned Dataset then reads ``out`` lazily."""
    iy = align_index(store.ds["lat_c"].values, store.ds["lat"].values, method="bilinear")
    ix = align_index(store.ds["lon_c"].values, store.ds["lon"].values, method="bilinear")
    fds = {}
    if model == "clim":
        rc = run_config(run)
        # the classical baseline: plain per-season pixel means, whatever the run's anchor
        conf = dataclasses.replace(rc, train=dataclasses.replace(rc.train, target="residual",
                                                                 anchor="clim"))

    if model == "anchor":
        conf = run_config(run)

    def one(day):
        if model == "interp":
            v = _interp_field(coarse_days[day], iy, ix)
        elif model == "anchor":
            s = int(season_of(day.month))
            if s not in fds:
                fds[s] = fine_days(store, conf, s)
            v = (10.0 ** fds[s].stand_in_log(store.times_c.get_loc(day))).astype(np.float32)
        else:
            s = int(season_of(day.month))
            if s not in fds:
                fds[s] = fine_days(store, conf, s)
            v = fds[s].to_physical(np.zeros(fds[s].shape, np.float32), store.times_c.get_loc(day))
        if project is not None:
            v = project(v, coarse_days[day], int(season_of(day.month))).astype(np.float32)
        return np.repeat(v[None], members, 0)

    if out is None:
        return _dataset(np.stack([one(d) for d in days]), days, store, members, attrs, member0)
    import dask
    import dask.array as dsa
    shape = (members,) + _fine_shape(store)
    stack = dsa.stack([dsa.from_delayed(dask.delayed(one)(d), shape, np.float32) for d in days])
    with atomic_path(out) as tmp, dask.config.set(scheduler="synchronous"):
        _dataset(stack, days, store, members, attrs, member0).to_netcdf(tmp)
    return xr.open_dataset(out)


BASELINES = ("interp", "clim", "anchor")
MODELS = ("ddpm", "unet", "vae") + NULLS + BASELINES


def sample(*, run, start, end, out=None, cfg: SampleConfig | None = None, model="ddpm",
           data=None, device="cpu", backend="auto", cache_conditioning=True, progress=True,
           workers=None, scheduler=None, member0=0, cold_start=False, **settings) -> xr.Dataset:
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
    model : ``"ddpm"``, ``"unet"``, ``"vae"`` (trained in the run); a null ensemble built on
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

    Returns
    -------
    xarray.Dataset with ``VAR(time[, member], lat, lon)`` in physical units, CF attributes.
    The ``member`` dim is kept when ``cfg.members > 1``. With ``out`` it is ``out`` opened
    lazily (a rollout holds only its lag window in memory, so its RSS does not grow with its
    length); without, the days in memory.
    """
    from tqdm.auto import tqdm


    run = Path(run)
    cfg = sample_settings(run, cfg, **settings)
    if workers is not None or scheduler is not None or cfg.segments > 1:
        from .distributed import sample_distributed
        # each unit runs this function in-process (passed in: distributed imports no pipeline)
        return sample_distributed(run=run, start=start, end=end, out=out, cfg=cfg, model=model,
                                  data=data, device=device, workers=workers, scheduler=scheduler,
                                  progress=progress, unit_sampler=sample)
    if model not in MODELS:
        raise ValueError(f"sample: model must be one of {', '.join(MODELS)}, got {model!r}")
    if cfg.mode not in MODES:
        raise ValueError(f"sample: mode must be 'strict' or 'lenient', got {cfg.mode!r}")
    if cfg.members < 1:
        raise ValueError(f"sample: members must be >= 1, got {cfg.members}")
    if cfg.kernels not in KERNEL_BACKENDS:
        raise ValueError(f"sample: sample.kernels must be one of {', '.join(KERNEL_BACKENDS)}, "
                         f"got {cfg.kernels!r}")
    if cfg.lag_history not in LAG_HISTORIES:
        raise ValueError(f"sample: sample.lag_history must be one of {', '.join(LAG_HISTORIES)}, "
                         f"got {cfg.lag_history!r}")
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"sample: sample.fusion must be one of {', '.join(FUSIONS)}, got {cfg.fusion!r}")
    meta_path = run / "run.json"
    if data is None:
        if not meta_path.exists():
            raise FileNotFoundError(f"sample: {meta_path} is missing; is {run} a fastds run folder?")
        data = json.loads(meta_path.read_text())["store"]
    store = open_store(data)
    days = pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq="D")
    if len(days) == 0:
        raise ValueError(f"sample: end {end} is before start {start}")
    missing = days[store.times_c.get_indexer(days) < 0]
    if len(missing):
        raise ValueError(f"sample: no coarse data for {len(missing)} day(s), e.g. {missing[0]:%Y-%m-%d} "
                         f"(coarse record {store.times_c[0]:%Y-%m-%d}..{store.times_c[-1]:%Y-%m-%d})")
    members = cfg.members
    attrs = {"run": str(run), "model": model, "sampler": cfg.sampler, "steps": cfg.steps,
             "mode": cfg.mode, "members": members, "member0": int(member0),
             "cold_start": int(cold_start), "tile": cfg.tile, "halo": cfg.halo,
             "stride": cfg.stride, "seed": cfg.seed, "consistency": int(cfg.consistency),
             "fusion": cfg.fusion, "lag_history": cfg.lag_history, "precision": cfg.precision,
             "calibrate": int(cfg.calibrate), "lag_conditioning": int(cfg.lag_conditioning),
             "project_baselines": int(cfg.project_baselines), "spacing": cfg.spacing,
             "antithetic": int(cfg.antithetic)}
    coarse_days = _CoarseDays(store)
    # every model gets the same projection (or none); sample.project_baselines=false keeps the
    # baselines as a user would compute them by hand
    project = (_projection(store, coarse_days.values)
               if cfg.consistency and (model not in BASELINES or cfg.project_baselines) else None)

    def finish(values, day, s):
        if project is not None:
            values = project(values, coarse_days[day], s)
        return values

    if model in BASELINES:
        return _baseline(model, run, store, days, members, attrs, member0, out, coarse_days, project)
    net = "unet" if model in NULLS else model  # a null ensemble is the U-Net plus its noise
    nulls = {}

    out = Path(out) if out is not None else None
    parts = _parts_dir(out) if out is not None else None
    signature = dict(attrs)
    if parts is not None and (parts / "signature.json").exists():
        old = json.loads((parts / "signature.json").read_text())
        if old != signature:
            raise ValueError(f"sample: {parts} holds days from a different request ({old}); "
                             "remove it or use another --out")
    # Predicted days (physical, (members, H, W)). With ``out`` every day goes to its part file
    # as it finishes and only the lag window's worth stays in memory, so a long rollout's RSS
    # does not grow with its length; without ``out`` the whole result is held anyway.
    history = _History(parts)
    models, datasets, configs = {}, {}, {}
    fine_set = set(store.times)
    results = []
    bar = tqdm(total=len(days), desc=f"sample {model} {cfg.sampler}", disable=not progress, unit="day")
    for day in days:
        if day in history:
            results.append(None if parts is not None else history[day])
            bar.update(1)
            continue
        s = int(season_of(day.month))
        if s not in models:
            models[s], configs[s] = load_trained(run, s, net, use_ema=cfg.use_ema, device=device)
            set_kernel_backend(models[s], cfg.kernels)
            if cfg.compile:
                models[s].compile_for_sampling()
            datasets[s] = fine_days(store, configs[s], s, anchor=models[s].anchor)
        mdl, conf, fd = models[s], configs[s], datasets[s]
        if not cfg.lag_conditioning and conf.train.cond_dropout <= 0:
            raise ValueError(f"sample: sample.lag_conditioning=false asks for the coarse-only fallback, "
                             f"but the season-{s} {model} was trained with train.cond_dropout=0; "
                             "retrain with train.cond_dropout > 0")
        t_lag = conf.data.t_lag
        lag_days = pd.date_range(day - pd.Timedelta(days=t_lag), periods=t_lag, freq="D")
        lags = np.empty((members, t_lag) + fd.shape, np.float32)
        shared = True
        for j, ld in enumerate(lag_days):
            use_pred = ld in history and (cfg.mode == "strict" or ld not in fine_set)
            if use_pred and cfg.lag_history == "mean" and members > 1:
                # one shared history: the ensemble mean (log space) of the day
                lags[:, j] = store.norm_y.forward_log(np.log10(np.maximum(history[ld], 1e-6)).mean(0), s)
            elif use_pred:
                lags[:, j] = store.norm_y.forward(history[ld], s)
                shared = shared and members == 1
            elif ld in fine_set:
                lags[:, j] = fd.y[fd.index_of(ld)]
            elif cold_start and ld < day and store.times_c.get_indexer([ld])[0] >= 0:
                lags[:, j] = store.norm_y.forward_log(fd.stand_in_log(store.times_c.get_loc(ld)), s)
            else:
                raise ValueError(
                    f"sample: {day:%Y-%m-%d} needs {ld:%Y-%m-%d} in its {t_lag}-day lag window, which "
                    f"is neither in the fine record ({store.times[0]:%Y-%m-%d}..{store.times[-1]:%Y-%m-%d}) "
                    f"nor predicted yet; start the rollout no later than "
                    f"{store.times[-1] + pd.Timedelta(days=1):%Y-%m-%d}")
        c = store.times_c.get_loc(day)
        inputs = DayInputs(fd.coarse_at(c), fd.covariates_at(day), lags[:1] if shared else lags)
        day_key = (day - pd.Timestamp("2000-01-01")).days
        z = downscale_day(mdl, inputs, kind=net, cfg=cfg, T=conf.diffusion.T,
                          prediction=conf.diffusion.prediction, members=members, seed=cfg.seed,
                          day_key=day_key, cache_conditioning=cache_conditioning, device=device,
                          backend=backend, member0=member0)
        values = fd.to_physical(z, c)
        if model in NULLS:
            if s not in nulls:
                nulls[s] = null_stats(run, store, s, cfg, data=data, device=device)
            values = _add_null(values, model, nulls[s], cfg.seed, member0, day_key)
        values = finish(values, day, s)
        if parts is not None:
            _write_part(parts, day, values, signature)
            history.keep(day, values, since=day - pd.Timedelta(days=max(k.data.t_lag for k in configs.values())))
            results.append(None)
        else:
            history.keep(day, values)
            results.append(values)
        bar.update(1)
    bar.close()
    if out is None:
        return _dataset(np.stack(results), days, store, members, attrs, member0)
    # the file is written day by day from the parts (dask, one day per chunk): the whole
    # period is never in memory; the returned Dataset reads it lazily
    import dask
    import dask.array as dsa
    shape = (members,) + _fine_shape(store)
    stack = dsa.stack([dsa.from_delayed(dask.delayed(np.load)(parts / f"{d:%Y%m%d}.npy"), shape, np.float32)
                       for d in days])
    with atomic_path(out) as tmp, dask.config.set(scheduler="synchronous"):
        _dataset(stack, days, store, members, attrs, member0).to_netcdf(tmp)
    for f in parts.glob("*"):
        f.unlink()
    parts.rmdir()
    return xr.open_dataset(out)


def _add_null(values, kind, stats: NullStats, seed, member0, day_key):
    """U-Net days (members, H, W), physical -> the null ensemble's: in log10, the validation
    bias removed and one residual field drawn per member."""
    logs = np.log10(np.maximum(values, 1e-6)) - stats.bias
    for k in range(len(logs)):
        logs[k] += draw_null(kind, stats, logs.shape[1:], null_rng(seed, member0 + k, day_key, kind))
    return (10.0 ** logs).astype(np.float32)


def null_stats(run, store: Store, season, cfg: SampleConfig, *, data=None, device="cpu") -> NullStats:
    """The null ensembles' statistics for one season: U-Net residuals on the store's
    validation days of that season, with true lags and the sampler's projection setting.
    Fitted once and cached in ``run/nulls/``. Where the season has no validation day whose lag
    window lies in the fine record, its training days stand in, with a warning."""
    import warnings
    path = Path(run) / "nulls" / f"season{season}_c{int(cfg.consistency)}_t{cfg.tile}_s{cfg.stride}.npz"
    if path.exists():
        return NullStats.load(path)
    _, conf = load_trained(run, season, "unet", device=device)
    times, split = store.times, store.ds["split"].values
    ok = (season_of(times.month) == season) & (times - pd.Timedelta(days=conf.data.t_lag) >= times[0])
    days = times[ok & (split == 1)]
    if len(days) == 0:
        days = times[ok & (split == 0)][-28:]
        warnings.warn(f"null ensembles: season {season} has no validation day in the fine record; "
                      f"their noise statistics come from {len(days)} training days, where the U-Net's "
                      "error is smaller than on new days", stacklevel=2)
    if len(days) == 0:
        raise ValueError(f"null ensembles: season {season} has no fine day to fit their noise on")
    lenient = dataclasses.replace(cfg, mode="lenient", members=1, segments=1)
    res = []
    for block in np.split(days, np.flatnonzero(np.diff(days.values).astype("timedelta64[D]").astype(int) > 1) + 1):
        pred = sample(run=run, start=block[0], end=block[-1], cfg=lenient, model="unet", data=data,
                      device=device, progress=False)[store.variable].values
        truth = store.fine.sel(time=block).values
        res.append(np.log10(np.maximum(truth, 1e-6)) - np.log10(np.maximum(pred, 1e-6)))
    stats = fit_null_stats(np.concatenate(res))
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


def _fine_shape(store: Store):
    return store.ds["lat"].size, store.ds["lon"].size


class _History:
    """Predicted days of a rollout, by day: those kept in memory, and those on disk as part
    files (a resumed run's, or ones dropped from memory), loaded back when a lag window asks."""

    def __init__(self, parts: Path | None):
        self.parts = parts
        self.mem: dict[pd.Timestamp, np.ndarray] = {}
        self.on_disk = ({pd.Timestamp(f.stem) for f in parts.glob("*.npy")}
                        if parts is not None and parts.exists() else set())

    def __contains__(self, day):
        return day in self.mem or day in self.on_disk

    def __getitem__(self, day):
        if day not in self.mem:
            self.mem[day] = np.load(self.parts / f"{day:%Y%m%d}.npy")
        return self.mem[day]

    def keep(self, day, values, since=None):
        """Hold ``values`` for ``day``; with ``since``, forget (from memory only) days before it."""
        self.mem[day] = values
        if since is not None:
            self.on_disk.add(day)
            for d in [d for d in self.mem if d < since]:
                del self.mem[d]
