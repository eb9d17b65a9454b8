"""The ``fastds`` command: the only place that parses arguments and prints.

Subcommands: synth, prepare, pretrain, train, sample, evaluate, demo. Every one takes
``--config FILE.toml``, ``--preset tiny|paper``, ``--set section.key=value`` (repeatable) and
``--dry-run`` (print the resolved config and stop). Errors are one line on stderr and exit
code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _common(p):
    p.add_argument("--config", help="TOML file with [data], [pretrain], [diffusion], [train], [sample]")
    p.add_argument("--preset", default=None, choices=["tiny", "paper"],
                   help="base settings (default: the config file's, else tiny)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _parser():
    ap = argparse.ArgumentParser(prog="fastds", description="Generative downscaling of gridded "
                                 "satellite and reanalysis data (MERRA-2 -> G5NR-like).")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd")

    p = sub.add_parser("doctor", help="what was built and what can run here, with the reason "
                       "for each missing piece")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("synth", help="write a synthetic twin region in the native NASA formats")
    _common(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--region", default=None,
                   help="area0, area1 or LAT_MIN,LAT_MAX,LON_MIN,LON_MAX (default: a small box)")
    p.add_argument("--coarse-start", default="2004-01-01")
    p.add_argument("--coarse-end", default="2008-12-31")
    p.add_argument("--fine-start", default="2005-05-16")
    p.add_argument("--fine-end", default="2007-05-15")
    p.add_argument("--native-days", type=int, default=3, help="days written as native files (-1: all)")
    p.add_argument("--seed", type=int, default=0)
    _data_commands(sub)
    _training_commands(sub)
    _sampling_commands(sub)
    _evaluation_commands(sub)
    return ap


def _data_commands(sub):
    p = sub.add_parser("prepare", help="raw files -> one cached store per region")
    _common(p)
    p.add_argument("--coarse", required=True, help="MERRA-2 files: folder, glob, or merged cube")
    p.add_argument("--fine", required=True, help="G5NR files: folder, glob, or merged cube")
    p.add_argument("--elevation", help="NetCDF with elevation (lat, lon)")
    p.add_argument("--region", required=True, help="area0, area1 or LAT_MIN,LAT_MAX,LON_MIN,LON_MAX")
    p.add_argument("--out", required=True, help="store folder (e.g. area1.zarr)")
    p.add_argument("--variable", default="DUEXTTAU", help="the species to prepare (default DUEXTTAU)")
    p.add_argument("--variables", default=None, metavar="A,B,...",
                   help="several species at once, e.g. DUEXTTAU,SSEXTTAU,SUEXTTAU (each normalised "
                        "on its own; every input file must hold them all)")
    p.add_argument("--allow-gaps", action="store_true", help="keep missing days as NaN instead of failing")
    p.add_argument("--workers", type=int, default=0,
                   help="read days in this many processes (0: threads; global native files want several)")


def _training_commands(sub):
    p = sub.add_parser("pretrain", help="Stage A: temporal U-Net on the coarse record")
    _common(p)
    p.add_argument("--data", required=True, help="store from `fastds prepare`")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--season", type=int, choices=[1, 2, 3, 4], help="one season (default: data.seasons)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--variable", default=None,
                   help="the species to train on, in a store of several (sets data.variable)")

    p = sub.add_parser("train", help="Stage C: conditional DDPM (or a baseline)")
    _common(p)
    p.add_argument("--data", help="store from `fastds prepare` (required but for --model joint)")
    # --run-dir: torchrun rejects a bare "--run" anywhere on its command line (it abbreviates
    # its own --run-path), so multi-process training spells it out
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder (after pretrain); spell it --run-dir under torchrun")
    p.add_argument("--model", default=None, choices=["ddpm", "unet", "vae", "distill", "joint"],
                   help="one model (default: what the default sampler needs: the U-Net, then "
                        "the DDPM around it); distill: a few-step student of the trained DDPM "
                        "(train.distill_steps network evaluations); joint: one model of several "
                        "species as channels of one field, over their runs' U-Nets (--species-run)")
    p.add_argument("--species-run", dest="species_runs", action="append", default=[],
                   help="with --model joint: a species' run folder (its Stage A and U-Net trained), "
                        "once per species, in channel order; --run is then the joint run's folder")
    p.add_argument("--season", type=int, choices=[1, 2, 3, 4])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--recalibrate", action="store_true",
                   help="refit the trained DDPM's (or --model distill's) spread widening with the "
                        "run's saved settings, without retraining (a run calibrated before "
                        "sample.calibrate_to='bands' existed gains its post-projection band gains)")
    p.add_argument("--variable", default=None,
                   help="the species, in a store of several (default: the run's; sets data.variable)")


def _sampling_commands(sub):
    p = sub.add_parser("sample", help="downscale a date range (rollout beyond the fine record)")
    _common(p)
    p.add_argument("--run", "--run-dir", dest="runs", required=True, action="append",
                   help="run folder; repeat it with one run per species (a store of several species) "
                        "to write one output holding every species")
    p.add_argument("--species-noise", choices=["shared", "independent", "coupled"], default="coupled",
                   help="with one run per species: latents correlated as the species' validation "
                        "residuals are (coupled, the default), the same latents for member k of every "
                        "species (shared), or each species its own (independent)")
    p.add_argument("--species-total", default=None, metavar="VARIABLE",
                   help="with one run per species: scale them to add up to this variable of the store "
                        "(e.g. TOTEXTTAU) and write their sum too")
    p.add_argument("--start", required=True)
    p.add_argument("--end", required=True)
    p.add_argument("--out", required=True,
                   help="output NetCDF, or Zarr (*.zarr: written day by day, readable while running); "
                        "resumes if interrupted")
    p.add_argument("--members", type=int, default=None)
    p.add_argument("--mode", choices=["strict", "lenient"], default=None)
    p.add_argument("--model", default="ddpm",
                   choices=["ddpm", "distill", "unet", "vae", "joint", "unet+iid", "unet+grf", "unet+resample",
                            "interp", "clim", "anchor"],
                   help="a trained model (joint: a joint run's species, one variable each); a null "
                        "ensemble on the trained U-Net (unet+iid, "
                        "unet+grf, unet+resample: its validation bias removed, plus noise of its "
                        "validation error; --set sample.null_spread=rollouts fits the noise's scale on "
                        "strict validation rollouts); or a baseline that needs no training: interp "
                        "(interpolated coarse), clim (interp + mean fine-scale residual), anchor "
                        "(the run's anchor mu)")
    p.add_argument("--data", help="store (default: the run's)")
    p.add_argument("--workers", type=int, default=None,
                   help="run on a local dask.distributed cluster of N single-threaded workers "
                        "(units: time segments x members; resumable)")
    p.add_argument("--scheduler", default=None,
                   help="address of an existing dask.distributed scheduler (e.g. tcp://host:8786)")


def _evaluation_commands(sub):
    p = sub.add_parser("evaluate", help="skill, variograms, ACF/PACF, lag curves, spectra, report")
    _common(p)
    p.add_argument("--pred", required=True, action="append", metavar="[NAME=]FILE.nc",
                   help="predictions (repeatable, optionally named: ddpm=pred.nc)")
    p.add_argument("--truth", required=True, help="truth NetCDF or a store")
    p.add_argument("--coarse", help="coarse NetCDF for maps and the Wasserstein analysis")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--area", default="area")
    p.add_argument("--variable", default="DUEXTTAU")

    p = sub.add_parser("benchmark", help="the locked evaluation protocol: twins x seeds x "
                                         "rollouts, every model on the same days, proper scores, "
                                         "bootstrap intervals (resumable)")
    p.add_argument("--tier", default="quick",
                   help="quick (one twin, two rollouts, under 20 min), full (hours), or a TOML path")
    p.add_argument("--out", default="fastds-benchmark", help="results and cache folder")
    p.add_argument("--pair", action="append", default=[], metavar="OUT:MODEL:LABEL",
                   help="instead of running a tier, pair models that earlier runs scored on the "
                        "same days (a protocol --out folder, a model it scored, its label here; "
                        "OUT:all for every model OUT scored, by its own name; repeat); writes --out "
                        "if it ends in .md, else --out/paired.md")
    p.add_argument("--reference", help="with --pair: the label the others are paired against")
    p.add_argument("--twin", action="append", default=[],
                   help="run only this twin of the tier (repeat for several; a part of a long tier, "
                        "cached as the whole tier's); with --pair: keep this twin only (once)")
    p.add_argument("--seed", action="append", default=[], type=int,
                   help="run only this training seed of the tier (repeat for several); with --pair: "
                        "keep these seeds only (default: pool every seed that scored the same days)")
    p.add_argument("--season", action="append", default=[], type=int, choices=[1, 2, 3, 4],
                   help="with --pair: keep the days of this season only (1=DJF .. 4=SON, by each "
                        "day's month; repeat for several)")
    p.add_argument("--lead", metavar="FIRST:LAST",
                   help="with --pair: keep the days FIRST..LAST of each rollout only (1 = its start day)")
    p.add_argument("--start", action="append", default=[], metavar="YYYY-MM-DD",
                   help="with --pair: keep the rollouts that start on this date only (repeat for several; "
                        "e.g. the rollouts a seed still missing some has scored)")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("demo", help="the whole method on a synthetic twin, end to end")
    _common(p)
    p.add_argument("--out", default="fastds-demo", help="report folder (default ./fastds-demo)")
    p.add_argument("--quick", action="store_true", help="a reduced demo (tests, smoke runs)")
    p.add_argument("--seasons", default="2", help="comma-separated seasons to train (default 2 = MAM)")
    p.add_argument("--species", action="store_true",
                   help="the multivariate run: three correlated species and their total, one model each, "
                        "scored per species, together and summed (default out: fastds-demo-species)")


def _config(args):
    """The resolved config: ``fastds sample`` starts from the run's saved config (its sample
    settings are the run's, as ``fastds.sample`` without ``cfg`` uses them), every other
    command from the preset; then ``--config`` and ``--set``."""
    from .config import load_config
    if args.cmd == "sample" and not args.preset:
        from .runs import run_config, run_store
        for r in args.runs:  # a folder that is not a run is refused here, --dry-run included
            run_store(r, "sample")
        return load_config(None, args.config, args.set, base=run_config(args.runs[0]))
    if args.cmd == "train" and args.model == "joint" and not args.preset and args.species_runs:
        from .runs import run_config  # the species runs' settings, then --config and --set
        return load_config(None, args.config, args.set, base=run_config(args.species_runs[0]))
    cfg = load_config(args.preset or ("tiny" if not args.config else None), args.config, args.set)
    if getattr(args, "variable", None) and args.cmd in ("pretrain", "train"):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, variable=args.variable))
    return cfg


def _benchmark(args) -> int:
    from .data.regions import season_name
    from .protocol import EVERY_MODEL, load_protocol, pair_machines, pair_tiers, run_protocol, tier_part, write_pairing
    if args.pair:
        entries = [(e[:-len(EVERY_MODEL) - 1], EVERY_MODEL, EVERY_MODEL) if e.endswith(f":{EVERY_MODEL}")
                   else tuple(e.rsplit(":", 2)) for e in args.pair]
        bad = [e for e, t in zip(args.pair, entries) if len(t) != 3 or not all(t)
               or (t[1] == EVERY_MODEL) != (t[2] == EVERY_MODEL)]
        if bad or not args.reference:
            raise ValueError(f"benchmark --pair takes OUT:MODEL:LABEL or OUT:{EVERY_MODEL} (every model "
                             f"OUT scored, by its own name), got {bad}" if bad
                             else "benchmark --pair needs --reference LABEL")
        if len(args.twin) > 1:
            raise ValueError("benchmark --pair keeps one --twin (or all)")
        leads = _leads(args.lead)
        means, paired = pair_tiers(entries, reference=args.reference, twin=args.twin[0] if args.twin else None,
                                   seeds=args.seed, seasons=args.season, leads=leads, starts=args.start)
        # --out names a Markdown file, or a folder (the default's) that gets paired.md
        out = Path(args.out) if args.out.endswith(".md") else Path(args.out) / "paired.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        only = [f"seed {', '.join(map(str, args.seed))}"] if args.seed else []
        only += [", ".join(season_name(s) for s in args.season)] if args.season else []
        only += [f"days {leads[0]}–{leads[1]} of each rollout"] if leads else []
        only += [f"rollouts from {', '.join(args.start)}"] if args.start else []
        machines = pair_machines(entries, twin=args.twin[0] if args.twin else None, seeds=args.seed,
                                 seasons=args.season, leads=leads, starts=args.start)
        print(write_pairing(means, paired, out, title=f"{args.reference} paired against "
                            + ", ".join(sorted(set(paired.model))) + (f" ({'; '.join(only)})" if only else ""),
                            machines=machines), end="")
        return 0
    if args.season or args.lead or args.start:
        raise ValueError("benchmark --season, --lead and --start select days to pair (with --pair); a tier trains and "
                         "scores the seasons its file names")
    cfg = tier_part(load_protocol(args.tier), twins=args.twin, seeds=args.seed)
    run_protocol(cfg, out=args.out, progress=not args.quiet, echo=print)
    print((Path(args.out) / "results.md").read_text(), end="")
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _leads(text):
    """``--lead FIRST:LAST`` as (first, last) days of a rollout, or None."""
    if text is None:
        return None
    try:
        first, last = (int(v) for v in text.split(":"))
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise ValueError(f"benchmark --lead takes FIRST:LAST days of a rollout, 1 <= FIRST <= LAST, got {text!r}")
    return first, last


def _recalibrate_sample(args):
    """``fastds train --recalibrate``'s sample settings: the run's saved ``[sample]`` with the
    ``--set sample.KEY=VALUE`` overrides (None without any); a refit changes no other setting."""
    if args.config or args.preset:
        raise ValueError("fastds train --recalibrate: --config and --preset are not used; the run's saved "
                         "settings are, with --set sample.KEY=VALUE for the sampler to fit the widening for")
    other = [s for s in args.set if not s.strip().startswith("sample.")]
    if other:
        raise ValueError(f"fastds train --recalibrate: --set {other[0]} is not a sample setting; a refit of "
                         "the widening changes only [sample] settings (others need retraining)")
    if not args.set:
        return None
    from .config import load_config
    from .runs import run_config, run_store
    run_store(args.run, "recalibrate")  # an error naming run.json when --run is no run folder
    return load_config(None, None, args.set, base=run_config(args.run)).sample


def _train(args, cfg, progress) -> None:
    """``fastds train``: refit a run's widening (--recalibrate), one joint model of several
    species (--model joint), or the models the default sampler needs (or --model's)."""
    if args.recalibrate:
        from .training.stages import recalibrate
        for season, cal in recalibrate(args.run, season=args.season, model=args.model or "ddpm",
                                       device=args.device, sample=_recalibrate_sample(args)).items():
            if cal is None:
                print(f"season {season}: no validation days to calibrate on; widening unchanged")
                continue
            gains = " ".join(f"{g:.2f}" for g in cal["final_band_gains"])
            texture = f"; grid-scale texture gain {cal['texture_gain']:.2f}" if "texture_gain" in cal else ""
            state = (f"; coarse-state gains {' '.join(f'{g:.2f}' for g in cal['state_gains'])}"
                     if "state_gains" in cal else "")
            print(f"season {season}: raw spread/skill {cal['raw_spread_skill']:.2f}; band gains after "
                  f"the projection {gains}{texture}{state}")
    elif args.model == "joint":
        from .training.joint import train_joint
        for p in train_joint(runs=args.species_runs, run=args.run, config=cfg, season=args.season,
                             resume=args.resume, progress=progress, device=args.device):
            print(f"joint checkpoint: {p}")
    else:
        from .training.stages import default_chain, train
        if not args.data:
            raise ValueError("--data is required (the store from `fastds prepare`)")
        if args.species_runs:
            raise ValueError("--species-run is for --model joint")
        for kind in [args.model] if args.model else default_chain(cfg):
            for p in train(data=args.data, run=args.run, config=cfg, model=kind, season=args.season,
                           resume=args.resume, progress=progress, device=args.device):
                print(f"{kind} checkpoint: {p}")


def _run(args) -> int:
    from .config import to_toml
    cfg = _config(args)
    if args.dry_run:
        print(to_toml(cfg), end="")
        return 0
    progress = not args.quiet
    if args.cmd == "synth":
        from .data.regions import parse_region
        from .data.synthetic import TWIN_REGION, TwinSpec, write_twin
        spec = TwinSpec(region=parse_region(args.region) if args.region else TWIN_REGION,
                        coarse_start=args.coarse_start, coarse_end=args.coarse_end,
                        fine_start=args.fine_start, fine_end=args.fine_end, seed=args.seed)
        w = write_twin(args.out, spec, native_days=None if args.native_days < 0 else args.native_days)
        print(f"twin written to {w['dir']}: native files for {w.get('native_days', 0)} day(s), cubes "
              "coarse_daily.nc fine_daily.nc fine_truth.nc elevation.nc")
    elif args.cmd == "prepare":
        from .data.store import prepare
        align = {} if cfg.data.align == "store" else {"align": cfg.data.align}
        out = prepare(coarse=args.coarse, fine=args.fine, out=args.out, region=args.region,
                      elevation=args.elevation, variable=args.variable, variables=args.variables,
                      block=cfg.data.split_block,
                      allow_gaps=args.allow_gaps, workers=args.workers, progress=progress, **align)
        print(f"store ready: {out}")
    elif args.cmd == "pretrain":
        from .training.stages import pretrain
        for p in pretrain(data=args.data, run=args.out, config=cfg, season=args.season,
                          resume=args.resume, progress=progress, device=args.device):
            print(f"stage A checkpoint: {p}")
    elif args.cmd == "train":
        _train(args, cfg, progress)
    elif args.cmd == "sample":
        from .sampling.pipeline import sample
        sc = cfg.sample
        members = sc.members if args.members is None else args.members  # 0 is refused, not replaced
        sc = dataclasses.replace(sc, members=members, mode=args.mode or sc.mode)
        kw = dict(start=args.start, end=args.end, out=args.out, cfg=sc, model=args.model, data=args.data,
                  device=args.device, progress=progress, workers=args.workers, scheduler=args.scheduler)
        if len(args.runs) > 1:
            from .sampling.pipeline import sample_species
            ds = sample_species(runs=args.runs, noise=args.species_noise, total=args.species_total, **kw)
        else:
            ds = sample(run=args.runs[0], **kw)
        print(f"wrote {args.out}: {dict(ds.sizes)}")
    elif args.cmd == "evaluate":
        from .report import evaluate, format_table
        preds = {}
        for item in args.pred:
            name, _, path = item.rpartition("=")
            preds[name or Path(path).stem] = path
        m = evaluate(preds, args.truth, out=args.out, coarse=args.coarse, area=args.area,
                     variable=args.variable)
        import pandas as pd
        print(format_table(pd.DataFrame(m["table"])), end="")
        print(f"report written to {args.out}")
    elif args.cmd == "demo":
        from . import demo
        seasons = tuple(int(s) for s in args.seasons.split(","))
        if args.species:
            demo.run_species_demo(out=args.out if args.out != "fastds-demo" else "fastds-demo-species",
                                  config=cfg, quick=args.quick, seasons=seasons, device=args.device,
                                  progress=progress, echo=print, species=demo.DEMO_SPECIES)
        else:
            demo.run_demo(out=args.out, config=cfg, quick=args.quick, seasons=seasons, device=args.device,
                          progress=progress, echo=print)
    return 0


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.version:
        from . import __version__
        print(f"fastds {__version__}")
        return 0
    if args.cmd == "doctor":
        from . import __version__, _backend
        print(f"fastds {__version__} ({Path(__file__).resolve().parent})")
        for name, ok, detail in _backend.report():
            print(f"  {'ok ' if ok else 'no '} {name:32s} {detail}")
        return 0
    if not args.cmd:
        ap.print_help()
        return 2
    t0 = time.time()
    try:
        # the protocol takes no run config; its errors get the same one line as the others'
        code = _benchmark(args) if args.cmd == "benchmark" else _run(args)
        loop = sys.modules.get("fastds.training.loop")  # loaded only by commands that train
        if loop is not None:
            loop.shutdown_distributed()
    except KeyboardInterrupt:
        print("fastds: interrupted (completed work is kept; re-run to resume)", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line; the traceback only on request
        if getattr(args, "debug", False):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fastds {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    if not getattr(args, "dry_run", False) and not args.quiet and args.cmd not in ("synth",):
        print(f"fastds {args.cmd}: done in {time.time() - t0:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
