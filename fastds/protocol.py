"""The locked evaluation protocol (``fastds benchmark``): the only source of skill claims.

Several twins from the project's generator (different seeds and parameterisations, one of
them the plume twin: a heavy-tailed, heteroscedastic, moving sub-cell signal), trained with
several seeds; per twin and seed, strict rollouts from several start dates spread over the
seasons (cold-started: the lag window begins as the anchor μ and a burn-in is discarded),
every model sampled on the same days and scored there with the proper scores of
:mod:`fastds.metrics.proper`. Paired differences between models (per day, pooled over
rollouts and seeds, per twin) get moving-block bootstrap intervals (``arch``), so the days'
autocorrelation is kept (see :func:`block_bootstrap_ci` for their measured coverage).

Everything is cached under ``out``: twins, stores and trained runs (``cache/``), each
rollout's scores (``scores/*.csv``, written atomically as it finishes) and, while a rollout
runs, its finished days (``cache/TWIN/samples/*.nc.parts/``, removed once it is scored): an
interrupted run resumes where it stopped, inside a rollout too (a 570-day reconstruction
killed on day 400 samples its last 170 days and nothing before). ``results.json`` and
``results.md`` are rewritten at the end.

Two tiers ship as TOML (``fastds/configs/protocol_quick.toml``, ``protocol_full.toml``):
quick for day-to-day checks (one twin, two starts, one seed, under 20 minutes on 2 cores),
full before any claim (hours). A design choice is kept only if the full tier says so.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import atomic_path
from .data.regions import season_of

__all__ = ["ProtocolConfig", "TwinCase", "load_protocol", "tier_part", "run_protocol", "block_bootstrap_ci",
           "paired_differences", "pair_tiers", "pair_machines", "write_pairing"]

ORIENT = {  # +1: higher is better; -1: lower is better; 0: a ratio whose target is 1
    "crps_fair": -1, "energy_p1": -1, "energy_p4": -1, "energy_p16": -1, "energy_cell": -1,
    "variogram_p1": -1, "variogram_p4": -1, "variogram_p16": -1, "variogram_cell": -1,
    "twcrps_q90": -1, "twcrps_q99": -1, "brier_q90": -1, "brier_q99": -1, "fss_q90": 1,
    "fss_q99": 1, "fss_ens_q90": 1, "fss_ens_q99": 1, "rmse_mean": -1, "mae_mean": -1, "r2_mean": 1, "ralsd": -1,
}
HEADLINE = ("crps_fair", "energy_p4", "variogram_p4", "twcrps_q90", "r2_mean", "rmse_mean",
            "mae_mean", "bias_mean", "spread_skill", "ralsd")


@dataclass(frozen=True)
class TwinCase:
    """A twin: a name and the :class:`~fastds.data.synthetic.TwinSpec` fields it changes."""
    name: str
    spec: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ProtocolConfig:
    tier: str = "quick"
    twins: tuple = (TwinCase("smooth"),)
    seeds: tuple = (0,)                  # training seeds
    seasons: tuple = (3,)                # seasons trained (every start must fall in them)
    starts: tuple = ("2007-07-01", "2008-06-20")
    rollout_days: int = 30
    reconstruction: tuple = ()           # (start, days): one long cold-started strict run, or ()
    burn_in: int = 10                    # cold-start days run and discarded before each start
    members: int = 8
    models: tuple = ("ddpm", "unet", "unet+iid", "unet+grf", "unet+resample", "interp", "clim",
                     "anchor")
    preset: str = "tiny"
    overrides: tuple = ()                # config overrides, "section.key=value"
    block: int = 7                       # moving-block length, days
    reps: int = 2000                     # bootstrap replicates
    reference: str = "ddpm"              # paired differences: reference minus each other model
    cross_models: tuple = ("ddpm", "unet", "clim")  # species twins: models whose species are
                                         # scored together (correlation bias, summed total)
    # named variants: a model with sample-setting overrides, e.g. {"ddpm-raw": {"model":
    # "ddpm", "calibrate": False}}; list their names in ``models`` like any model
    variants: dict = field(default_factory=dict)


def load_protocol(path_or_name="quick") -> ProtocolConfig:
    """A protocol config from a TOML file, or a shipped tier by name (``quick``, ``full``)."""
    from .config import tomllib
    path = Path(path_or_name)
    if not path.is_file():  # a folder named like a tier (e.g. `--out full`) is not a tier file
        path = Path(__file__).parent / "configs" / f"protocol_{path_or_name}.toml"
    if not path.exists():
        raise FileNotFoundError(f"protocol: no file {path_or_name} and no shipped tier of that name "
                                "(quick, full)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:  # the parser's message has the line but not the file
        raise ValueError(f"protocol {path}: not valid TOML: {e} (a name with '+' as a table key "
                         "needs quotes: [variants.\"unet+grf-wide\"])") from e
    names = {f.name for f in dataclasses.fields(ProtocolConfig)}
    bad = sorted(set(raw) - names - {"twin"})
    from .config import SampleConfig
    fields = {f.name for f in dataclasses.fields(SampleConfig)} | {"model", "species_noise"}
    for vname, v in raw.get("variants", {}).items():
        unknown = sorted(set(v) - fields)
        if unknown:
            raise ValueError(f"protocol {path}: variant {vname!r} sets {', '.join(unknown)}, which "
                             "are not sample settings")
    if bad:
        raise ValueError(f"protocol {path}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(names))}")
    twins = tuple(TwinCase(t.pop("name"), t) for t in (dict(t) for t in raw.pop("twin", [])))
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    cfg = ProtocolConfig(**kw, **({"twins": twins} if twins else {}))
    check_seasons(cfg, path)
    return cfg


def tier_part(cfg: ProtocolConfig, *, twins=(), seeds=()) -> ProtocolConfig:
    """``cfg`` restricted to the twins named in ``twins`` and the training seeds in ``seeds``
    (empty: all of them), in the tier's order. A part of a long tier runs on its own (one part
    at a time per ``out`` folder): it trains and scores into the whole tier's cache, so a
    later run of the whole tier reuses every rollout the part scored;
    its ``results`` files cover the part only. Unknown names or seeds are an error naming the
    tier's."""
    known = [t.name for t in cfg.twins]
    bad = [n for n in twins if n not in known] + [str(s) for s in seeds if int(s) not in cfg.seeds]
    if bad:
        raise ValueError(f"protocol {cfg.tier}: no twin or seed {', '.join(bad)} in this tier "
                         f"(twins: {', '.join(known)}; seeds: {', '.join(map(str, cfg.seeds))})")
    return dataclasses.replace(
        cfg, twins=tuple(t for t in cfg.twins if not twins or t.name in twins),
        seeds=tuple(s for s in cfg.seeds if not seeds or s in {int(x) for x in seeds}))


def periods(cfg: ProtocolConfig) -> list:
    """The tier's scored runs, (first kept day, days) each: every start's rollout, then the
    reconstruction if there is one."""
    runs = [(pd.Timestamp(a), int(cfg.rollout_days)) for a in cfg.starts]
    if cfg.reconstruction:
        runs.append((pd.Timestamp(cfg.reconstruction[0]), int(cfg.reconstruction[1])))
    return runs


def check_seasons(cfg: ProtocolConfig, path="(in memory)") -> None:
    """Refuse, before anything is trained, a start whose rollout (its burn-in included) has
    days in a season the tier does not train: sampling them needs that season's models."""
    from .data.regions import season_of
    for start, length in periods(cfg):
        first = start - pd.Timedelta(days=cfg.burn_in)
        days = pd.date_range(first, start + pd.Timedelta(days=length - 1))
        out = sorted(set(season_of(days.month).tolist()) - set(cfg.seasons))
        if out:
            raise ValueError(f"protocol {path}: the rollout from {start:%Y-%m-%d} (burn-in from "
                             f"{first:%Y-%m-%d}, {length} days) has days in season(s) {out}, which "
                             f"seasons = {list(cfg.seasons)} does not train; move the start or add the season")


# ----------------------------------------------------------------------------- statistics
def block_bootstrap_ci(diffs, groups=None, *, block=7, reps=2000, size=0.95, seed=0):
    """Mean of paired daily differences (n,) with a moving-block bootstrap interval (``arch``).

    ``groups`` (n,) labels the rollouts; their days are put one rollout after another and
    blocks of ``block`` days are drawn from that series. A moving-block bootstrap
    under-estimates the variance of a mean by O(block / n): drawn within each 30-day rollout
    alone, a 95 % interval covered a known mean 73-84 % of the time in simulation (AR(1), ρ
    0.3-0.6); over the concatenation (a block crossing a boundary joins two independent
    stretches, which only drops a little dependence), 86-88 % with 3 rollouts and 91 % with 8
    (``tests/test_protocol.py`` checks it). Returns (mean, low, high)."""
    from arch.bootstrap import MovingBlockBootstrap
    d = np.asarray(diffs, float)
    if groups is not None:
        order = np.argsort(pd.factorize(np.asarray(groups))[0], kind="stable")
        d = d[order]
    bs = MovingBlockBootstrap(min(block, len(d)), d, seed=int(seed))
    boots = np.array([data[0][0].mean() for data in bs.bootstrap(reps)])
    lo, hi = np.quantile(boots, [(1 - size) / 2, 1 - (1 - size) / 2])
    return float(d.mean()), float(lo), float(hi)


def paired_differences(scores: pd.DataFrame, *, reference, block=7, reps=2000) -> pd.DataFrame:
    """Per metric and model: mean(reference − model) over the shared days with its 95 %
    moving-block interval, and whether the reference is better (interval beyond 0 in the
    metric's good direction). ``scores``: one row per (twin, seed, start, day, model).

    The bootstrap's unit is the day: training seeds rolled out over the same days share
    those days' weather, so their differences are averaged per (twin, start, day) first
    (bootstrapping seeds as if independent rollouts would narrow the interval by up to
    sqrt(seeds)); ``days`` counts the distinct days. A metric that some seed's rows lack
    altogether (scores written before it existed) is left out, not pooled from the rest."""
    key = ["twin", "seed", "start", "time"]
    ref = scores[scores.model == reference].set_index(key)
    rows = []
    for model in sorted(set(scores.model) - {reference}):
        other = scores[scores.model == model].set_index(key)
        both = ref.index.intersection(other.index)
        for metric in ORIENT:
            if metric not in ref or metric not in other:
                continue
            a, b = ref.loc[both, metric].astype(float), other.loc[both, metric].astype(float)
            if not (a.notna().groupby(level="seed").any().all() and b.notna().groupby(level="seed").any().all()):
                continue  # a seed scored before this metric existed: pooled, it would be the others' figure alone
            d = a - b
            d = d[np.isfinite(d)].groupby(level=["twin", "start", "time"]).mean()
            if len(d) < 2:
                continue
            groups = (d.index.get_level_values("twin").astype(str) + "/"
                      + d.index.get_level_values("start").astype(str)).to_numpy()
            mean, lo, hi = block_bootstrap_ci(d.to_numpy(float), groups, block=block, reps=reps)
            sign = ORIENT[metric]
            better = (sign < 0 and hi < 0) or (sign > 0 and lo > 0)
            worse = (sign < 0 and lo > 0) or (sign > 0 and hi < 0)
            rows.append({"metric": metric, "model": model, "days": len(d), "diff": mean,
                         "low": lo, "high": hi,
                         "verdict": f"{reference} better" if better else (f"{reference} worse" if worse else "tie")})
    return pd.DataFrame(rows)


EVERY_MODEL = "all"  # pair_tiers' model (and `--pair OUT:all`): every model a folder scored, by its own name


def _kept_scores(entries, *, twin=None, seeds=(), seasons=(), leads=None, starts=()):
    """The score rows each of ``entries`` (``(out, model, label)``) keeps under :func:`pair_tiers`'
    filters: ``(out, model, label, rows)`` per entry, ``rows`` empty where none is kept. A folder
    named by several entries is read once."""
    read = {}
    for out, model, label in entries:
        if out not in read:
            files = sorted((Path(out) / "scores").glob("*.csv"))
            read[out] = pd.concat([pd.read_csv(f) for f in files], ignore_index=True) if files else pd.DataFrame(
                columns=["twin", "seed", "start", "model", "time"])
        rows = read[out]
        keep = (rows.model == model) if model != EVERY_MODEL else np.ones(len(rows), bool)
        keep &= (rows.twin == twin) if twin else True
        keep &= rows.seed.isin([int(s) for s in seeds]) if seeds else True
        if seasons:  # by each day's own month: a rollout may cross a season's edge
            keep &= np.isin(season_of(pd.to_datetime(rows.time).dt.month), [int(s) for s in seasons])
        if leads:
            keep &= _lead(rows).between(*leads)
        if starts:
            keep &= _start_date(rows).isin(pd.to_datetime(list(starts)))
        yield out, model, label, rows[keep]


def pair_tiers(entries, *, reference, twin=None, seeds=(), seasons=(), leads=None, starts=(), block=7,
               reps=2000):
    """Pair models scored by different protocol runs on the same days, e.g. a run trained with
    a new setting against the shipped one: ``entries`` are ``(out, model, label)`` triples,
    a protocol ``--out`` folder, a model (or variant) it scored and the name it takes here
    (model ``"all"``: every model the folder scored, each under its own name; its label unused;
    a label given by entries of several folders pools their days, e.g. rollouts and a reconstruction);
    ``reference`` is one of the labels; ``twin`` keeps that twin only, ``seeds`` (ints) those
    training seeds only (e.g. one seed at a time, to see how the seeds agree), ``seasons``
    (1 = DJF ... 4 = SON) the days of those seasons only, by each day's own month; ``leads``
    ``(first, last)`` the days that lie that many days into their rollout only (1 = its first
    day; a long reconstruction's late days show drift its early ones hide); ``starts``
    ("YYYY-MM-DD") the rollouts that start on those dates only (seeds pooled on the rollouts
    they all scored, when one seed has not scored every start yet). Returns ``(means,
    paired)``: the headline scores per label (mean over days) and :func:`paired_differences`
    of ``reference`` against every other label over the days they share."""
    frames = []
    for out, model, label, rows in _kept_scores(entries, twin=twin, seeds=seeds, seasons=seasons, leads=leads,
                                                starts=starts):
        if not len(rows):
            raise FileNotFoundError(f"pair: {Path(out) / 'scores'} holds no scores of "
                                    + ("any model" if model == EVERY_MODEL else f"model {model!r}")
                                    + (f" on twin {twin!r}" if twin else "")
                                    + (f" for seed {', '.join(map(str, seeds))}" if seeds else "")
                                    + (f" in season {', '.join(map(str, seasons))}" if seasons else "")
                                    + (f" at leads {leads[0]}-{leads[1]} days" if leads else "")
                                    + (f" in rollouts from {', '.join(map(str, starts))}" if starts else "")
                                    + "; run `fastds benchmark` there first")
        frames.append(rows if model == EVERY_MODEL else rows.assign(model=label))
    scores = pd.concat(frames, ignore_index=True)
    if reference not in set(scores.model):
        raise ValueError(f"pair: reference {reference!r} is none of the labels {sorted(set(scores.model))}")
    extra = [c for c in scores if c.startswith(("spectrum_ratio", "spread_error"))]
    means = scores.groupby("model")[[c for c in HEADLINE if c in scores] + extra].mean().T
    return means, paired_differences(scores, reference=reference, block=block, reps=reps)


def _case_stem(label: str) -> str:
    """A case's name in its score and machine file names: its label, ``TWIN``, or a species
    twin's ``TWIN:VAR`` written ``TWIN-VAR``."""
    return label.replace(":", "-")


def _machine_file(sdir, case, seed) -> Path:
    """Where :func:`record_machine` keeps the machines of case ``case`` (a twin, or
    ``TWIN-VAR``), seed ``seed``, beside its scores in ``sdir``."""
    return Path(sdir) / f"{case}_s{seed}_machine.json"


def pair_machines(entries, *, twin=None, seeds=(), seasons=(), leads=None, starts=()) -> dict:
    """The machines that made the scores :func:`pair_tiers` pairs, read from the records
    :func:`record_machine` keeps beside them: ``{(out, case, seed): [record, ...]}`` for each
    folder of ``entries`` and each case (a twin, or ``TWIN-VAR`` for a species twin's
    ``TWIN:VAR``) and seed of the rows :func:`pair_tiers` keeps under the same filters (so a
    case whose days the filters all drop is not listed); ``[]`` where a case has no record."""
    found = {}
    for out, _, _, rows in _kept_scores(entries, twin=twin, seeds=seeds, seasons=seasons, leads=leads,
                                        starts=starts):
        for case, seed in dict.fromkeys(zip(rows.twin.astype(str).map(_case_stem), rows.seed.astype(int))):
            if (out, case, seed) not in found:
                path = _machine_file(Path(out) / "scores", case, seed)
                found[(out, case, seed)] = json.loads(path.read_text()) if path.exists() else []
    return found


def _machine_name(r) -> str:
    """One machine record in words (keys a record lacks shown as ?)."""
    g = lambda k: r.get(k, "?")  # noqa: E731
    return (f"{g('cpu')}, train {g('train_precision')}, sample {g('sample_precision')}, "
            f"torch {g('torch')}, fastds {g('fastds')}")


def _machines_markdown(machines) -> str:
    """:func:`pair_machines`' records as a Markdown section: a row per case, then what the
    pairing mixes (machines of several kinds, a case that mixes them, cases with no record)."""
    kinds = []
    for records in machines.values():
        kinds += [r for r in records if r not in kinds]
    lines = ["Made on (each case's `CASE_sSEED_machine.json` beside its scores):", "",
             "| folder | case | seed | machines |", "|---|---|---|---|"]
    for (out, case, seed), records in machines.items():
        lines.append(f"| {Path(out).name} | {case} | {seed} | "
                     + ("; ".join(map(_machine_name, records)) if records else "not recorded") + " |")
    mixed = [f"{case} seed {seed} ({Path(out).name})" for (out, case, seed), r in machines.items() if len(r) > 1]
    unknown = sum(not r for r in machines.values())
    lines.append("")
    if len(kinds) > 1:
        lines.append(f"These scores come from machines of {len(kinds)} kinds: a difference between models scored "
                     "on different machines holds the machines' difference too (even `interp` differs in the "
                     "seventh digit across CPU kinds).")
    if mixed:
        lines.append(f"Cases whose rollouts mix machines: {', '.join(mixed)}.")
    if unknown:
        lines.append(f"{unknown} of {len(machines)} cases have no machine record (scored before runs kept them, "
                     "or the file is gone): their machines are not known from the files.")
    if len(kinds) == 1 and not mixed and not unknown:
        lines.append("Every case was scored on machines of one kind.")
    return "\n".join(lines).rstrip() + "\n"


def _start_label(start, length) -> str:
    """A rollout's ``start`` column, "YYYY-MM-DD+Nd" (its first day and length; :func:`_lead` reads it)."""
    return f"{pd.Timestamp(start):%Y-%m-%d}+{length}d"


def _start_date(rows) -> pd.Series:
    """Each score row's rollout start date (its ``start`` column: :func:`_start_label`)."""
    return pd.to_datetime(rows.start.str.split("+").str[0])


def _lead(rows) -> pd.Series:
    """Each score row's day of its rollout, 1 on the start date."""
    return (pd.to_datetime(rows.time) - _start_date(rows)).dt.days + 1


def write_pairing(means, paired, path, *, title, machines=None):
    """:func:`pair_tiers`'s tables as Markdown at ``path`` (atomic), with the machines that
    made the scores (:func:`pair_machines`) after them when given."""
    text = "\n".join([f"# {title}", "", "Mean over days:", "",
                      _markdown(means.rename_axis("metric"), "{:.5f}"), "",
                      "Paired differences (reference − model), mean and 95 % moving-block interval:", "",
                      _paired_markdown(paired, 6), ""])
    if machines:
        text += "\n" + _machines_markdown(machines)
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)
    return text


# ----------------------------------------------------------------------------- the runs
def _twin_store(case: TwinCase, cache: Path, config):
    from .data.store import prepare
    from .data.synthetic import TwinSpec, write_twin
    # one twin per case, shared by its training seeds (TOML lists become the spec's tuples)
    spec = TwinSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in case.spec.items()})
    tdir = cache / case.name
    if not (tdir / "twin" / "fine_truth.nc").exists():
        write_twin(tdir / "twin", spec, native_days=0)
    store = prepare(coarse=tdir / "twin/coarse_daily.nc", fine=tdir / "twin/fine_daily.nc",
                    elevation=tdir / "twin/elevation.nc", block=config.data.split_block,
                    region=",".join(map(str, spec.region.as_tuple())), out=tdir / "store.zarr",
                    variables=spec.variables)
    return spec, store, tdir


def machine_record(config, device="cpu") -> dict:
    """What decides a part's numbers besides its seed and the code: this machine's CPU model,
    the arithmetic Stage C trains and the sampler runs in here (``precision = "auto"`` is bf16
    only where the CPU has it natively), and torch's and fastds' versions. A rerun on a machine
    whose record differs is another replicate of the seed, not a check of the first (even
    ``interp``'s scores differ in the seventh digit across CPU kinds)."""
    import torch

    from . import __version__, _backend
    from .training.stages import train_bf16
    return {"cpu": _backend.cpu_model(), "train_precision": "bf16" if train_bf16(config.train, device) else "fp32",
            "sample_precision": _backend.resolve_precision(config.sample.precision, device),
            "torch": torch.__version__, "fastds": __version__}


def record_machine(path: Path, record: dict, echo=print) -> list:
    """Add ``record`` to the machines listed in ``path`` (JSON, atomic) unless it is there;
    a case whose scores now come from machines of two kinds is said so through ``echo``.
    Returns the list."""
    seen = json.loads(Path(path).read_text()) if Path(path).exists() else []
    if record in seen:
        return seen
    if seen:
        echo(f"protocol: {Path(path).name}: this case's scores were begun on {seen[-1]} and now continue on "
             f"{record}; its rollouts mix machines, whose numbers differ")
    seen = seen + [record]
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps(seen, indent=1))
    return seen


def _trained(store, run: Path, config, progress, distill=False):
    """Stage A, the U-Net and the DDPM of a run (cached), and its distilled student when a
    model of the protocol samples one."""
    from .training.stages import pretrain, train
    pretrain(data=store, run=run, config=config, resume=True, progress=progress)
    for kind in ("unet", "ddpm") + (("distill",) if distill else ()):
        train(data=store, run=run, config=config, model=kind, resume=True, progress=progress)


def _score_rollout(pred, truth_log, thresholds, cells, by):
    """Per-day proper scores of a rollout: pred (time, member, lat, lon) physical, the truth's
    log10 on those days, the exceedance thresholds, the coarse cells and the log10 coarse
    field on the fine grid (for spread/error by quintile) -> one row per day."""
    from .metrics.ensemble import antithetic_pairs
    from .metrics.proper import day_scores_ensemble
    # antithetic members are scored as pairs (their fair scores on the even and the odd set)
    pairs = antithetic_pairs(pred)
    rows = []
    for i, day in enumerate(pd.DatetimeIndex(pred.time.values)):
        ens = np.log10(np.maximum(pred.isel(time=i).values, 1e-6))  # (member, lat, lon)
        rows.append({"time": day, **day_scores_ensemble(ens, truth_log.sel(time=day).values,
                                                        thresholds=thresholds, cells=cells,
                                                        by=by.sel(time=day).values, pairs=pairs)})
    return pd.DataFrame(rows)


@dataclass
class _Case:
    """One twin, seed and variable of the protocol: where its files are and how it is named
    in the scores (``label``: the twin's name, ``name:VARIABLE`` for a species twin)."""
    cfg: ProtocolConfig
    name: str
    spec: object
    variable: str
    seed: int
    tdir: Path
    sdir: Path

    @property
    def species(self) -> bool:
        return bool(self.spec.species)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.variable}" if self.species else self.name

    @property
    def run(self) -> Path:
        return self.tdir / (f"run-seed{self.seed}-{self.variable}" if self.species else f"run-seed{self.seed}")

    @property
    def _stem(self) -> str:
        return _case_stem(self.label)

    def score_path(self, start, length, model) -> Path:
        return self.sdir / f"{self._stem}_s{self.seed}_{start:%Y%m%d}_{length}d_{model}.csv"

    @property
    def machine_path(self) -> Path:
        """The machines that made this case's scores (:func:`record_machine`), beside them."""
        return _machine_file(self.sdir, self._stem, self.seed)

    def pred_path(self, start, length, model, variable=None) -> Path:
        """Where a species twin keeps a rollout's fields for the cross-species scores."""
        return self.tdir / "preds" / f"s{self.seed}_{start:%Y%m%d}_{length}d_{variable or self.variable}_{model}.nc"

    def sample_path(self, start, length, model) -> Path:
        """Where a rollout's sampled fields go while it runs (burn-in included): its finished
        days are kept beside it (``.parts/``), so an interrupted rollout resumes on the day it
        stopped; removed once the rollout is scored."""
        return self.tdir / "samples" / f"s{self.seed}_{start:%Y%m%d}_{length}d_{self.variable}_{model}.nc"

    @property
    def joint_run(self) -> Path:
        """A species twin's joint model (``model = "joint"``), over the species' runs."""
        return self.tdir / f"run-seed{self.seed}-joint"

    def periods(self):
        return periods(self.cfg)


def _references(case: _Case, variable, days):
    """What a rollout of ``variable`` on ``days`` is scored against: the truth's log10, its
    90th/99th percentiles over the days, the coarse cells and the log10 coarse on the fine grid."""
    import xarray as xr

    from .data.transforms import align_index
    truth = xr.open_dataset(case.tdir / "twin/fine_truth.nc")[variable]
    coarse = xr.open_dataset(case.tdir / "twin/coarse_daily.nc")[variable]
    lat, lon = truth.lat.values, truth.lon.values
    cells = (align_index(coarse.lat.values, lat, method="nearest"),
             align_index(coarse.lon.values, lon, method="nearest"))
    truth_log = np.log10(np.maximum(truth.sel(time=days), 1e-6)).load()
    thresholds = {"q90": float(np.quantile(truth_log.values, 0.9)),
                  "q99": float(np.quantile(truth_log.values, 0.99))}
    by = np.log10(np.maximum(coarse.sel(time=days), 1e-6)).isel(
        lat=xr.DataArray(cells[0], dims="lat"), lon=xr.DataArray(cells[1], dims="lon"))
    return truth_log, thresholds, cells, by.assign_coords(lat=lat, lon=lon)


def _labelled(frame, case: _Case, start, length, model, label=None):
    frame.insert(0, "model", model)
    frame.insert(0, "start", _start_label(start, length))
    frame.insert(0, "seed", case.seed)
    frame.insert(0, "twin", label or case.label)
    return frame


def _rollouts(case: _Case, config, progress, echo) -> list:
    """Every model's strict rollouts of one case, scored (cached per rollout and model); a
    species twin also keeps the fields of ``cfg.cross_models`` for the cross-species scores.
    A kept field whose scores are missing (an interrupted run, or scores removed to re-score
    with changed scoring code) is scored again without sampling it again."""
    import xarray as xr
    cfg, frames = case.cfg, []
    for start, length in case.periods():
        days = pd.date_range(start, periods=length, freq="D")
        refs = None
        for name in cfg.models:
            if _model_of(cfg, name) == "joint" and not _is_species(case):
                continue  # the joint model generates the species, not the total
            path = case.score_path(start, length, name)
            keep = case.pred_path(start, length, name) if case.species and name in cfg.cross_models else None
            if path.exists() and (keep is None or keep.exists()):
                frames.append(pd.read_csv(path, parse_dates=["time"]))
                continue
            sampled = case.sample_path(start, length, name)
            if keep is not None and keep.exists():
                pred = xr.open_dataarray(keep).load()
            else:
                pred = _sample_rollout(case, config, name, start, days, progress, out=sampled)
                if keep is not None:
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(keep) as tmp:
                        pred.to_netcdf(tmp)
            refs = refs or _references(case, case.variable, days)
            frame = _labelled(_score_rollout(pred, *refs), case, start, length, name)
            frame["members"] = pred.sizes["member"]
            with atomic_path(path) as tmp:
                frame.to_csv(tmp, index=False)
            sampled.unlink(missing_ok=True)  # scored: its scores are the cache from now on
            frames.append(frame)
            echo(f"protocol: {case.label} seed {case.seed} start {start:%Y-%m-%d} {name}: "
                 f"CRPS {frame.crps_fair.mean():.4f}, R² {frame.r2_mean.mean():.3f}")
    return frames


def _model_of(cfg, name) -> str:
    return cfg.variants.get(name, {}).get("model", name)


def _is_species(case: _Case) -> bool:
    return case.species and case.variable in case.spec.species


def _sample_rollout(case: _Case, config, name, start, days, progress, out=None):
    """One model's (or variant's) cold-started strict rollout over ``days``: (time, member,
    lat, lon), in memory. An ensemble has ``cfg.members`` members unless its variant sets
    ``members``. The joint model samples every species at once: the other species' fields
    are kept for their own cases (which then score them without sampling).

    ``out``: the NetCDF :func:`~fastds.sampling.pipeline.sample` writes, its finished days
    kept beside it as they come (a re-run resumes on the first day missing); one found
    complete (a run killed after sampling, before scoring) is read, not sampled again."""
    from .sampling.output import open_output
    from .sampling.pipeline import sample
    from .sampling.rollout import parts_of
    cfg = case.cfg
    settings = dict(cfg.variants.get(name, {}))
    model = settings.pop("model", name)
    if out is not None and out.exists() and not parts_of(out).exists():
        return _rollout_field(open_output(out), case, name, model, days)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    noise = settings.pop("species_noise", "shared")
    latents = _species_latents(case, noise, days) if model != "joint" else (lambda c: c)
    ensemble = model in ("ddpm", "distill", "joint") or model.startswith("unet+")
    kw = {"mode": "strict", "members": cfg.members if ensemble else 1, "burn_in": cfg.burn_in,
          "seed": case.seed, **settings}
    if model == "joint" and noise == "coupled":  # its channels' latents coupled as the species' residuals
        from .sampling.pipeline import joint_channel_mix
        kw["channel_mix"] = joint_channel_mix(case.joint_run, dataclasses.replace(config.sample, **kw), days)
    elif model == "joint" and noise != "shared":
        raise ValueError(f"protocol: variant {name}: the joint model's species_noise is 'shared' "
                         f"(independent channels) or 'coupled', not {noise!r}")
    ds = sample(run=case.joint_run if model == "joint" else case.run,
                start=start - pd.Timedelta(days=cfg.burn_in), end=days[-1],
                cfg=latents(dataclasses.replace(config.sample, **kw)), model=model,
                progress=progress, cold_start=True, out=out)
    return _rollout_field(ds, case, name, model, days)


def _rollout_field(ds, case: _Case, name, model, days):
    """The case's variable on ``days`` of a sampled Dataset, (time, member, lat, lon), loaded;
    a joint model's other species are kept for their own cases. ``ds`` is closed: the
    file behind it is removed once the rollout is scored."""
    with ds:
        if model == "joint":
            for v in case.spec.species:
                keep = case.pred_path(days[0], len(days), name, v)
                if v != case.variable and not keep.exists():
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(keep) as tmp:
                        ds[v].sel(time=days).transpose("time", "member", "lat", "lon").load().to_netcdf(tmp)
        pred = ds[case.variable].sel(time=days)
        if "member" not in pred.dims:
            pred = pred.expand_dims(member=1, axis=1)
        return pred.transpose("time", "member", "lat", "lon").load()


def _species_latents(case: _Case, noise, days):
    """A function ``cfg -> cfg`` giving a species twin's run its latents under ``noise``, as
    ``sample_species`` does (:func:`~fastds.sampling.pipeline.species_latents`; the coupling
    is fitted only when a rollout is sampled). The total's run is not a species: it keeps
    the shared latents."""
    from .sampling.pipeline import species_latents
    runs = [dataclasses.replace(case, variable=v).run for v in case.spec.species]
    apply = species_latents(noise, runs, days, what="protocol: species_noise")
    if not case.species or case.variable not in case.spec.species:
        return lambda cfg: cfg
    k = case.spec.species.index(case.variable)
    return lambda cfg: apply(k, cfg)


def _cross_species(case: _Case) -> tuple[list, list]:
    """A species twin's cross-species scores, per rollout and model of ``cfg.cross_models``:
    the inter-species correlation bias (:func:`~fastds.metrics.species.correlation_bias`) and,
    where the twin has a total, the summed species' ensemble (member by member) scored as a
    model ``NAME-sum`` of the total, beside the model trained on the total alone."""
    import xarray as xr

    from .metrics.species import correlation_bias
    spec, cfg = case.spec, case.cfg
    truth = xr.open_dataset(case.tdir / "twin/fine_truth.nc")
    frames, rows = [], []
    total = dataclasses.replace(case, variable=spec.total) if spec.total else None
    for start, length in case.periods():
        days = pd.date_range(start, periods=length, freq="D")
        for name in cfg.cross_models:
            preds = {v: xr.open_dataarray(case.pred_path(start, length, name, v)).load() for v in spec.species}
            cb = correlation_bias(preds, {v: truth[v].sel(time=days) for v in spec.species})
            rows.append(cb.assign(twin=case.name, seed=case.seed, start=_start_label(start, length), model=name))
            if total is None:
                continue
            path = total.score_path(start, length, f"{name}-sum")
            if path.exists():
                frames.append(pd.read_csv(path, parse_dates=["time"]))
                continue
            summed = sum(preds[v] for v in spec.species).transpose("time", "member", "lat", "lon")
            frame = _labelled(_score_rollout(summed, *_references(total, spec.total, days)), total,
                              start, length, f"{name}-sum")
            with atomic_path(path) as tmp:
                frame.to_csv(tmp, index=False)
            frames.append(frame)
    return frames, rows


def run_protocol(cfg: ProtocolConfig, *, out, progress=False, echo=print) -> dict:
    """Run (or resume) the protocol into ``out``; returns the results dict (also written to
    ``out/results.json`` and ``out/results.md``). A twin with several species trains one run
    per species (and one on their total) and adds the cross-species scores."""
    from .config import load_config
    check_seasons(cfg)
    out = Path(out)
    cache, sdir = out / "cache", out / "scores"
    sdir.mkdir(parents=True, exist_ok=True)
    frames, cross = [], []
    for twin in cfg.twins:
        for seed in cfg.seeds:
            config = load_config(cfg.preset, overrides=list(cfg.overrides) + [
                f"data.seasons={list(cfg.seasons)}", f"pretrain.seed={seed}", f"train.seed={seed}"])
            spec, store, tdir = _twin_store(twin, cache, config)
            cases = [_Case(cfg, twin.name, spec, v, seed, tdir, sdir) for v in spec.variables]
            configs = [dataclasses.replace(config, data=dataclasses.replace(config.data, variable=c.variable))
                       if c.species else config for c in cases]
            for case, vconfig in zip(cases, configs):  # every run first: coupled species need them all
                echo(f"protocol: {case.label} seed {seed}: training (cached in {case.run})")
                _trained(store, case.run, vconfig, progress,
                         distill=any(_model_of(cfg, m) == "distill" for m in cfg.models))
            if spec.species and any(_model_of(cfg, m) == "joint" for m in cfg.models):
                from .training.joint import train_joint
                echo(f"protocol: {twin.name} seed {seed}: training the joint model (cached in {cases[0].joint_run})")
                train_joint(runs=[c.run for c in cases if _is_species(c)], run=cases[0].joint_run,
                            resume=True, progress=progress)
            for case, vconfig in zip(cases, configs):
                # beside the scores: which machine kind made them (a rerun elsewhere differs)
                record_machine(case.machine_path, machine_record(vconfig), echo)
                frames += _rollouts(case, vconfig, progress, echo)
            if spec.species:
                f, c = _cross_species(_Case(cfg, twin.name, spec, spec.species[0], seed, tdir, sdir))
                frames, cross = frames + f, cross + c
    scores = pd.concat(frames, ignore_index=True)
    return _write_results(cfg, scores, out, pd.concat(cross, ignore_index=True) if cross else None)


def _markdown(df: pd.DataFrame, fmt="{:.4f}") -> str:
    """A frame as a Markdown table (index included when it is named)."""
    if df.index.name is not None or isinstance(df.index, pd.MultiIndex):
        df = df.reset_index()
    cell = lambda v: fmt.format(v) if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _paired_markdown(d: pd.DataFrame, digits: int) -> str:
    """:func:`paired_differences`'s rows as a Markdown table, the interval in one column."""
    f = f"{{:+.{digits}f}}"
    d = d.assign(interval=[f"[{f.format(a)}, {f.format(b)}]" for a, b in zip(d.low, d.high)])
    return _markdown(d[["metric", "model", "days", "diff", "interval", "verdict"]], f)


def _cross_tables(cross: pd.DataFrame):
    """Cross-species summaries: per twin, model and pair the mean correlations and bias over
    rollouts and seeds; and per twin and model the mean over pairs of |bias| (the target:
    within 0.1) and of the pixelwise |bias|."""
    per_pair = cross.groupby(["twin", "model", "pair"])[["corr_truth", "corr_pred", "bias", "abs_bias"]].mean()
    overall = per_pair.assign(abs_mean_bias=per_pair["bias"].abs()).groupby(["twin", "model"])[
        ["abs_mean_bias", "abs_bias"]].mean().rename(columns={"abs_mean_bias": "mean |bias| over pairs",
                                                              "abs_bias": "mean pixelwise |bias|"})
    return per_pair, overall


def _write_results(cfg, scores, out, cross=None):
    summary = scores.groupby(["twin", "model"])[[c for c in HEADLINE if c in scores]].mean()
    spectrum = scores.groupby(["twin", "model"])[[c for c in scores if c.startswith("spectrum_ratio")]].mean()
    reliability = scores.groupby(["twin", "model"])[[c for c in scores if c.startswith("spread_error")]].mean()
    diffs = {twin: paired_differences(scores[scores.twin == twin], reference=cfg.reference,
                                      block=cfg.block, reps=cfg.reps)
             for twin in sorted(set(scores.twin))}
    results = {"config": dataclasses.asdict(cfg), "days": int(len(scores) // max(1, len(set(scores.model)))),
               "summary": summary.reset_index().to_dict(orient="records"),
               "spectrum_ratio": spectrum.reset_index().to_dict(orient="records"),
               "spread_error_by_coarse_quintile": reliability.reset_index().to_dict(orient="records"),
               "paired": {t: d.to_dict(orient="records") for t, d in diffs.items()}}
    if cross is not None:
        per_pair, overall = _cross_tables(cross)
        results["species_correlation"] = per_pair.reset_index().to_dict(orient="records")
        results["species_correlation_overall"] = overall.reset_index().to_dict(orient="records")
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=str))
    lines = [f"# Protocol results ({cfg.tier} tier)", "",
             f"Twins {', '.join(t.name for t in cfg.twins)}; training seeds {list(cfg.seeds)}; "
             f"{len(cfg.starts)} cold-started strict rollouts of {cfg.rollout_days} days each "
             f"(burn-in {cfg.burn_in}); {cfg.members} members; log10 AOD; scores are means over days.", ""]
    for twin in sorted(set(scores.twin)):
        lines += [f"## {twin}", "", _markdown(summary.loc[twin]), "",
                  "Power-spectrum ratio to the truth per band finer than the coarse cell (one member):",
                  "", _markdown(spectrum.loc[twin], "{:.3f}"), "",
                  "Spread / error by quintile of the coarse field (1: reliable):", "",
                  _markdown(reliability.loc[twin], "{:.3f}"), "",
                  f"Paired differences {cfg.reference} − model, mean and 95 % moving-block interval "
                  f"(block {cfg.block} days):", ""]
        if len(diffs[twin]):
            lines += [_paired_markdown(diffs[twin], 4), ""]
    if cross is not None:
        lines += ["## Cross-species", "", "Inter-species correlation (per pixel over a rollout's days, "
                  "log10; a prediction's map is the mean of its members' maps), prediction − truth:", "",
                  _markdown(overall, "{:.3f}"), "", _markdown(per_pair, "{:+.3f}"), ""]
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return results
