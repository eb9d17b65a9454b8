"""``fastds demo``: the whole method on the built-in twin, end to end, on a CPU in minutes.

synthesise -> prepare -> pretrain (Stage A) -> train DDPM, U-Net, VAE (Stage C) -> sample
held-out days inside the fine record (lenient) and a strict rollout beyond it -> evaluate
against the twin's truth (which exists everywhere) -> table and report.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .config import Config
from .data.regions import season_of
from .data.store import open_store, prepare
from .data.synthetic import TwinSpec, write_twin
from .report import evaluate, format_table
from .sampling.pipeline import sample
from .training.stages import default_chain, pretrain, train

__all__ = ["run_demo"]


def _contiguous(days):
    """Split sorted days into runs of consecutive days: [(first, last), ...]."""
    days = pd.DatetimeIndex(days)
    if len(days) == 0:
        return []
    breaks = np.flatnonzero(np.diff(days.values).astype("timedelta64[D]").astype(int) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(days) - 1]])
    return [(days[a], days[b]) for a, b in zip(starts, ends)]


def _sample_days(run, days, cfg, kind, device, progress):
    """One model on the given days (lenient), sampled run by run of consecutive days."""
    parts = [sample(run=run, start=a, end=b, cfg=cfg, model=kind, device=device,
                    progress=progress)["DUEXTTAU"] for a, b in _contiguous(days)]
    return xr.concat(parts, "time").sel(time=pd.DatetimeIndex(days))


def variogram_distance(metrics) -> dict:
    """Mean |Δγ| between each model's semivariogram (one member) and the truth's."""
    tv = np.array(metrics["truth"]["variogram"]["gamma"])
    return {k: float(np.nanmean(np.abs(np.array(v["variogram"]["gamma"]) - tv)))
            for k, v in metrics["models"].items()}


def _ensemble_lines(metrics) -> str:
    rows = ["| model | members | CRPS (log10) | spread/skill | one member's sd / truth's |",
            "|---|---|---|---|---|"]
    for name, e in metrics["models"].items():
        if "ensemble" in e:
            en = e["ensemble"]
            rows.append(f"| {name} | {en['members']} | {en['crps_mean']:.3f} | "
                        f"{en['spread_skill']:.2f} | {en['sd_ratio_member']:.2f} |")
    return "\n".join(rows) + "\n"


def _seam_lines(rolls, truth, cfg) -> dict:
    """Seam statistic (metrics.seam_statistic) of each rollout's member 0 and of the truth
    on the same days, for the patch geometry the learned models were sampled with."""
    from .metrics import seam_statistic
    from .sampling.day import fit_to_domain
    from .stitch import plan_patches
    first = next(iter(rolls.values()))
    H, W = first.sizes["lat"], first.sizes["lon"]
    cfg = fit_to_domain(cfg, (H, W))
    tile, halo = cfg.tile, cfg.halo
    starts = plan_patches((H, W), tile, halo, cfg.stride)
    out = {}
    for name, da in rolls.items():
        one = da.isel(member=0) if "member" in da.dims else da
        out[name] = seam_statistic(one.values, starts, tile=tile, halo=halo)[2]
    out["truth"] = seam_statistic(truth.sel(time=first.time).values, starts, tile=tile, halo=halo)[2]
    return out


def run_demo(*, out="fastds-demo", config: Config, quick=False, seasons=(2,), device="cpu",
             progress=True, echo=print, test_days=12, rollout_days=30, members=16) -> dict:
    """Run the demo into ``out``; returns the metrics dict (also written to ``out``).

    Every model (DDPM ensemble of ``members``, U-Net, VAE, ``interp``, ``clim``) is scored
    on the same days: ``test_days`` held-out days with true lags (lenient), then a strict
    rollout of ``rollout_days`` beyond the fine record, with per-lead tables.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec, config, (test_days, rollout_days, members) = _demo_setup(
        config, quick, seasons, (test_days, rollout_days, members))
    run, twin_dir, store_path = _demo_train(out, spec, config, seasons, device, progress, echo)
    st = open_store(store_path)
    in_season = season_of(st.times.month)
    ok = (st.ds["split"].values == 2) & pd.Index(in_season).isin(seasons) & (st.times >= st.times[config.data.t_lag])
    held_out = st.times[ok][:test_days]
    record_end = st.times[-1]
    start = record_end + pd.Timedelta(days=1)
    end = start + pd.Timedelta(days=rollout_days - 1)
    echo(f"[5/6] sampling {len(held_out)} held-out days (lenient) and a {rollout_days}-day strict "
         f"rollout beyond the fine record, for ddpm ({members} members), unet, vae, interp, clim")
    cfg = config.sample
    preds, rolls = {}, {}
    for kind in ("ddpm", "unet", "vae", "interp", "clim"):
        m = members if kind == "ddpm" else 1
        own = dataclasses.replace(cfg, spread_scale=cfg.spread_scale if kind == "ddpm" else 1.0)  # ensembles only
        preds[kind] = _sample_days(run, held_out, dataclasses.replace(own, mode="lenient", members=m),
                                   kind, device, False)
        rolls[kind] = sample(run=run, start=start, end=end, out=out / f"rollout_{kind}.nc",
                             cfg=dataclasses.replace(own, mode="strict", members=m), model=kind,
                             device=device, progress=progress)["DUEXTTAU"]
    echo("[6/6] evaluating against the twin's truth, every model on the same days")
    truth = xr.open_dataset(twin_dir / "fine_truth.nc")["DUEXTTAU"].load()
    coarse = xr.open_dataset(twin_dir / "coarse_daily.nc")["DUEXTTAU"].load()
    metrics = evaluate(preds, truth, out=out / "report", coarse=coarse, area="twin",
                       map_days=[held_out[0]])
    roll_metrics = evaluate(rolls, truth, out=out / "report-rollout", coarse=coarse, area="twin",
                            map_days=[end], record_end=record_end)
    dist = {"held_out": variogram_distance(metrics), "rollout": variogram_distance(roll_metrics)}
    md = _demo_text(out, metrics, roll_metrics, dist, _seam_lines(rolls, truth, cfg), rollout_days,
                    record_end)
    (out / "table.md").write_text(md)
    echo("")
    echo(md)
    echo(f"Report: {out / 'report'} (maps, semivariograms, ACF/PACF, lag curves, spectra, Wasserstein, "
         f"rank histograms); rollout: {out / 'report-rollout'} (per-lead R²/RMSE/sd in leads.png)")
    return {"held_out": metrics, "rollout": roll_metrics, "variogram_distance": dist}


def _demo_setup(config, quick, seasons, sizes):
    """The twin's spec, the config and (test days, rollout days, members): reduced with ``quick``."""
    if quick:
        spec = TwinSpec(coarse_start="2006-09-01", coarse_end="2007-08-31",
                        fine_start="2007-01-15", fine_end="2007-05-15")
        config = dataclasses.replace(
            config,
            data=dataclasses.replace(config.data, max_train_patches=1024, t_lag=6),
            pretrain=dataclasses.replace(config.pretrain, epochs=2, widths=(8, 16, 16)),
            train=dataclasses.replace(config.train, epochs=2, ddpm_epoch_factor=1, widths=(16, 32, 32)))
        sizes = (4, 4, 2)
    else:
        # the fine record ends in April so that the 30-day rollout stays in spring, the
        # season the demo trains (a rollout into June would need a summer model)
        spec = TwinSpec(fine_end="2007-04-30")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, seasons=tuple(seasons)))
    return spec, config, sizes


def _demo_train(out, spec, config, seasons, device, progress, echo):
    """Twin, store, Stage A and Stage C (the default chain, then the VAE): (run, twin, store)."""
    echo(f"[1/6] synthesising a twin region {spec.region.as_tuple()} "
         f"(coarse {spec.coarse_start}..{spec.coarse_end}, fine {spec.fine_start}..{spec.fine_end})")
    twin_dir = out / "twin"
    if not (twin_dir / "fine_truth.nc").exists():
        write_twin(twin_dir, spec, native_days=2)
    echo("[2/6] preparing the store (readers check the native files, then the cubes are used)")
    from .data.readers import open_coarse, open_fine
    open_coarse(twin_dir / "coarse").load(), open_fine(twin_dir / "fine").load()
    align = {} if config.data.align == "store" else {"align": config.data.align}
    store_path = prepare(coarse=twin_dir / "coarse_daily.nc", fine=twin_dir / "fine_daily.nc",
                         elevation=twin_dir / "elevation.nc", block=config.data.split_block,
                         region=",".join(map(str, spec.region.as_tuple())), out=out / "store.zarr",
                         **align)
    run = out / "run"
    echo(f"[3/6] Stage A: pretraining the temporal U-Net on the coarse record, seasons {seasons}")
    pretrain(data=store_path, run=run, config=config, resume=True, progress=progress, device=device)
    # the default chain (the U-Net first: the DDPM diffuses its residual), then the VAE
    for kind in default_chain(config) + ["vae"]:
        echo(f"[4/6] Stage C: training {kind} with the frozen transfer encoder "
             f"({config.train.target} target)")
        train(data=store_path, run=run, config=config, model=kind, resume=True, progress=progress,
              device=device)
    return run, twin_dir, store_path


def _demo_text(out, metrics, roll_metrics, dist, seams, rollout_days, record_end) -> str:
    """The demo's printed tables (Markdown)."""
    held_md, roll_md = format_table(pd.DataFrame(metrics["table"])), format_table(pd.DataFrame(roll_metrics["table"]))
    lead_md = (out / "report-rollout" / "leads.md").read_text()
    text = ["Held-out days with true lags (lenient): per-day skill, mean (sd), log10 AOD unless noted",
            "", held_md, _ensemble_lines(metrics),
            f"Strict rollout of {rollout_days} days beyond the fine record (ends {record_end:%Y-%m-%d})",
            "", roll_md, _ensemble_lines(roll_metrics), "R² by lead (days after the record):", "", lead_md,
            "Semivariogram distance to the truth, one member (mean |Δγ|, lower is better):", "",
            "| days | " + " | ".join(dist["rollout"]) + " |", "|---" * (1 + len(dist["rollout"])) + "|"]
    for key in ("held_out", "rollout"):
        text.append(f"| {key} | " + " | ".join(f"{v:.4f}" for v in dist[key].values()) + " |")
    text += ["", "Seam statistic of the rollout, one member (gradient energy across kept-region borders "
             "over that elsewhere; 1: no seams):", "", "| " + " | ".join(seams) + " |",
             "|---" * len(seams) + "|", "| " + " | ".join(f"{v:.3f}" for v in seams.values()) + " |"]
    return "\n".join(text) + "\n"


# ----------------------------------------------------------------------------- several species
DEMO_SPECIES = ("DUEXTTAU", "SSEXTTAU", "SUEXTTAU")


def run_species_demo(*, out="fastds-demo-species", config: Config, quick=False, seasons=(2,),
                     device="cpu", progress=True, echo=print, species=DEMO_SPECIES,
                     total="TOTEXTTAU", rollout_days=30, members=8) -> dict:
    """``fastds demo --species``: several correlated species of the twin and their total in
    one store; one run per species and one on the total (each the default chain, U-Net then
    DDPM); a strict rollout beyond the fine record for each (the species' DDPMs each sampled on
    its own, i.e. with shared latents, and with coupled ones, ``ddpm-coupled``, what
    ``sample_species`` does by default); scored per species (ensemble
    mean R², fair CRPS, spread/skill against ``clim`` and the U-Net), together (inter-species
    correlation bias of the members' maps) and summed (the species' member-by-member sum of
    the total against the model trained on the total alone). Returns the tables as a dict
    (also written to ``out/species.md`` and ``out/species.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec, config, (_, rollout_days, members) = _demo_setup(config, quick, seasons, (0, rollout_days, members))
    spec = dataclasses.replace(spec, species=tuple(species), total=total)
    echo(f"[1/4] synthesising a twin of {len(species)} species and their total ({', '.join(spec.variables)})")
    twin_dir = out / "twin"
    if not (twin_dir / "fine_truth.nc").exists():
        write_twin(twin_dir, spec, native_days=2)
    store_path = prepare(coarse=twin_dir / "coarse_daily.nc", fine=twin_dir / "fine_daily.nc",
                         elevation=twin_dir / "elevation.nc", block=config.data.split_block,
                         region=",".join(map(str, spec.region.as_tuple())), out=out / "store.zarr",
                         variables=spec.variables)
    st = open_store(store_path)
    start = st.times[-1] + pd.Timedelta(days=1)
    days = pd.date_range(start, periods=rollout_days, freq="D")
    runs = {v: out / f"run-{v}" for v in spec.variables}
    for i, (v, run) in enumerate(runs.items()):
        echo(f"[2/4] {v} ({i + 1}/{len(spec.variables)}): pretraining, then the U-Net and the DDPM")
        vconf = dataclasses.replace(config, data=dataclasses.replace(config.data, variable=v))
        pretrain(data=store_path, run=run, config=vconf, resume=True, progress=progress, device=device)
        for kind in default_chain(vconf):
            train(data=store_path, run=run, config=vconf, model=kind, resume=True, progress=progress, device=device)
    # the species' DDPMs with latents correlated as their validation residuals (the total's
    # run is not a species: its own latents)
    from .sampling.pipeline import species_latent_mix
    mix = dict(zip(spec.species, species_latent_mix([runs[v] for v in spec.species], config.sample, days)))
    rolls = {}
    for v, run in runs.items():
        echo(f"[3/4] {v}: a {rollout_days}-day strict rollout beyond the fine record (ddpm {members} members "
             "with shared and with coupled latents, unet, clim)")
        rolls[v] = {}
        for name, kind, extra in (("ddpm", "ddpm", {}), ("ddpm-coupled", "ddpm", {"latent_mix": mix.get(v, ())}),
                                  ("unet", "unet", {}), ("clim", "clim", {})):
            if name == "ddpm-coupled" and v not in mix:  # the total's run: nothing to couple
                rolls[v][name] = rolls[v]["ddpm"]
                continue
            cfg = dataclasses.replace(config.sample, mode="strict", members=members if kind == "ddpm" else 1, **extra)
            cfg = dataclasses.replace(cfg, spread_scale=cfg.spread_scale if kind == "ddpm" else 1.0)
            rolls[v][name] = sample(run=run, start=days[0], end=days[-1], out=out / f"rollout_{v}_{name}.nc",
                                    cfg=cfg, model=kind, device=device, progress=progress)[v]
    echo("[4/4] scoring each species, the species together, and their sum against the total-only model")
    truth = xr.open_dataset(twin_dir / "fine_truth.nc")
    result = _species_scores(spec, rolls, truth, days)
    md = _species_text(result, spec, rollout_days)
    (out / "species.md").write_text(md)
    import json
    (out / "species.json").write_text(json.dumps(result, indent=1, default=float))
    echo("")
    echo(md)
    return result


def _ensemble_scores(pred, truth) -> dict:
    """Means over days of the ensemble-mean R², the fair CRPS and the spread/skill (log10)."""
    from .metrics.proper import fair_crps
    ens = np.log10(np.maximum(pred.transpose("time", ...).values, 1e-6))
    if ens.ndim == 3:
        ens = ens[:, None]
    obs = np.log10(np.maximum(truth.sel(time=pred.time).values, 1e-6))
    mean = ens.mean(1)
    r2 = 1 - ((mean - obs) ** 2).sum((1, 2)) / ((obs - obs.mean((1, 2), keepdims=True)) ** 2).sum((1, 2))
    m = ens.shape[1]
    spread = np.sqrt(ens.var(1, ddof=1).mean() * (m + 1) / m) if m > 1 else np.nan
    return {"r2": float(r2.mean()), "crps": float(np.mean([fair_crps(ens[i], obs[i]).mean() for i in range(len(obs))])),
            "spread_skill": float(spread / np.sqrt(((mean - obs) ** 2).mean()))}


def _species_scores(spec, rolls, truth, days) -> dict:
    from .metrics.species import correlation_bias
    per = {v: {k: _ensemble_scores(p, truth[v]) for k, p in rolls[v].items()} for v in spec.variables}
    with_member = {v: {k: p if "member" in p.dims else p.expand_dims(member=1, axis=1) for k, p in rolls[v].items()}
                   for v in spec.variables}
    cross = {k: correlation_bias({v: with_member[v][k] for v in spec.species},
                                 {v: truth[v].sel(time=days) for v in spec.species}).to_dict(orient="records")
             for k in ("ddpm", "ddpm-coupled", "unet", "clim")}
    summed = {}
    if spec.total:
        for k in ("ddpm", "ddpm-coupled", "unet", "clim"):
            s = sum(with_member[v][k] for v in spec.species)
            summed[f"{k}-sum"] = _ensemble_scores(s, truth[spec.total])
            summed[k] = per[spec.total][k]
    return {"per_species": per, "correlation": cross, "total": summed}


def _species_text(result, spec, rollout_days) -> str:
    text = [f"Strict rollout of {rollout_days} days beyond the fine record, per species (log10 AOD; "
            "R² of the ensemble mean, fair CRPS, spread/skill; means over days):", "",
            "| species | model | R² | CRPS | spread/skill |", "|---|---|---|---|---|"]
    for v, models in result["per_species"].items():
        text += [f"| {v} | {k} | {s['r2']:.3f} | {s['crps']:.4f} | {s['spread_skill']:.2f} |" for k, s in models.items()]
    text += ["", "Inter-species correlation (per pixel over the rollout, log10; a model's map is the mean of "
             "its members' maps), pixel means:", "",
             "| model | pair | truth | prediction | bias | mean pixelwise abs bias |", "|---|---|---|---|---|---|"]
    for k, rows in result["correlation"].items():
        text += [f"| {k} | {r['pair']} | {r['corr_truth']:.3f} | {r['corr_pred']:.3f} | {r['bias']:+.3f} | "
                 f"{r['abs_bias']:.3f} |" for r in rows]
    if result["total"]:
        text += ["", f"The total ({spec.total}): the species' member-by-member sum (NAME-sum) against the "
                 "model trained on the total alone:", "", "| model | R² | CRPS | spread/skill |", "|---|---|---|---|"]
        text += [f"| {k} | {s['r2']:.3f} | {s['crps']:.4f} | {s['spread_skill']:.2f} |"
                 for k, s in result["total"].items()]
    return "\n".join(text) + "\n"
