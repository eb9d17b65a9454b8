"""``fastds demo``: the whole method on the built-in twin, end to end, on a CPU in minutes.

synthesise -> prepare -> pretrain (Stage A) -> train DDPM, U-Net, VAE (Stage C) -> sample
held-out days inside the fine record (lenient) and a strict rollout beyond it -> evaluate
against the twin's truth (which exists everywhere) -> table and report.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import xarray as xr

from .config import Config
from .data.regions import season_of
from .data.store import open_store, prepare
from .data.synthetic import TwinSpec, write_twin
from .report import evaluate, format_table
from .sampling.pipeline import sample
from .training.stages import pretrain, train

__all__ = ["run_demo"]


def run_demo(*, out="fastds-demo", config: Config, quick=False, seasons=(2,), device="cpu",
             progress=True, echo=print, test_days=12, rollout_days=14) -> dict:
    """Run the demo into ``out``; returns the metrics dict (also written to ``out``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        spec = TwinSpec(coarse_start="2006-09-01", coarse_end="2007-08-31",
                        fine_start="2007-01-15", fine_end="2007-05-15")
        config = dataclasses.replace(
            config,
            data=dataclasses.replace(config.data, max_train_patches=1024, t_lag=6),
            pretrain=dataclasses.replace(config.pretrain, epochs=2, widths=(8, 16, 16)),
            train=dataclasses.replace(config.train, epochs=2, widths=(16, 32, 32)))
        test_days, rollout_days = 4, 4
    else:
        spec = TwinSpec()
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, seasons=tuple(seasons)))
    echo(f"[1/6] synthesising a twin region {spec.region.as_tuple()} "
         f"(coarse {spec.coarse_start}..{spec.coarse_end}, fine {spec.fine_start}..{spec.fine_end})")
    twin_dir = out / "twin"
    if not (twin_dir / "fine_truth.nc").exists():
        write_twin(twin_dir, spec, native_days=2)
    echo("[2/6] preparing the store (readers check the native files, then the cubes are used)")
    from .data.readers import open_coarse, open_fine
    open_coarse(twin_dir / "coarse").load(), open_fine(twin_dir / "fine").load()
    store_path = prepare(coarse=twin_dir / "coarse_daily.nc", fine=twin_dir / "fine_daily.nc",
                         elevation=twin_dir / "elevation.nc",
                         region=",".join(map(str, spec.region.as_tuple())), out=out / "store.zarr")
    run = out / "run"
    echo(f"[3/6] Stage A: pretraining the temporal U-Net on the coarse record, seasons {seasons}")
    pretrain(data=store_path, run=run, config=config, resume=True, progress=progress, device=device)
    for kind in ("ddpm", "unet", "vae"):
        echo(f"[4/6] Stage C: training {kind} with the frozen transfer encoder")
        train(data=store_path, run=run, config=config, model=kind, resume=True, progress=progress,
              device=device)

    st = open_store(store_path)
    in_season = season_of(st.times.month)
    ok = (st.ds["split"].values == 2) & pd.Index(in_season).isin(seasons) & (st.times >= st.times[config.data.t_lag])
    held_out = st.times[ok][:test_days]
    echo(f"[5/6] sampling {len(held_out)} held-out days (lenient) and a {rollout_days}-day strict "
         "rollout beyond the fine record")
    cfg = config.sample
    preds = {}
    for kind in ("ddpm", "unet", "vae"):
        parts = [sample(run=run, start=d, end=d, cfg=dataclasses.replace(cfg, mode="lenient"), model=kind,
                        device=device, progress=False)["DUEXTTAU"] for d in held_out]
        preds[kind] = xr.concat(parts, "time")
    preds["interp"] = sample(run=run, start=held_out[0], end=held_out[-1], model="interp",
                             progress=False)["DUEXTTAU"].sel(time=held_out)
    start = st.times[-1] + pd.Timedelta(days=1)
    end = start + pd.Timedelta(days=rollout_days - 1)
    roll = sample(run=run, start=start, end=end, out=out / "rollout.nc", cfg=dataclasses.replace(cfg, mode="strict"),
                  device=device, progress=progress)
    echo("[6/6] evaluating against the twin's truth")
    truth = xr.open_dataset(twin_dir / "fine_truth.nc")["DUEXTTAU"].load()
    coarse = xr.open_dataset(twin_dir / "coarse_daily.nc")["DUEXTTAU"].load()
    metrics = evaluate(preds, truth, out=out / "report", coarse=coarse, area="twin",
                       map_days=[held_out[0]])
    roll_metrics = evaluate({"ddpm-rollout": roll["DUEXTTAU"]}, truth, out=out / "report-rollout",
                            coarse=coarse, area="twin", map_days=[end])
    table = pd.concat([pd.DataFrame(metrics["table"]), pd.DataFrame(roll_metrics["table"])], ignore_index=True)
    md = format_table(table)
    (out / "table.md").write_text(md)
    echo("\nTable: per-day skill on held-out days (mean (sd)); log10 AOD unless noted\n")
    echo(md)
    vg = {k: v["variogram"]["gamma"] for k, v in metrics["models"].items()}
    tv = metrics["truth"]["variogram"]["gamma"]
    import numpy as np
    dist = {k: float(np.nanmean(np.abs(np.array(g) - np.array(tv)))) for k, g in vg.items()}
    echo("Semivariogram distance to the truth (mean |Δγ|, lower is better): "
         + ", ".join(f"{k} {v:.4f}" for k, v in dist.items()))
    echo(f"Report: {out / 'report'} (maps, semivariograms, ACF/PACF, lag curves, spectra, Wasserstein); "
         f"rollout: {out / 'rollout.nc'} and {out / 'report-rollout'}")
    metrics["variogram_distance"] = dist
    return {"held_out": metrics, "rollout": roll_metrics, "variogram_distance": dist}
