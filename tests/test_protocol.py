"""The evaluation protocol's code on a toy size (its tiers run outside CI), and the coverage
of its bootstrap intervals."""
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TEST_OVERRIDES
from fastds.protocol import (ProtocolConfig, TwinCase, block_bootstrap_ci, load_protocol,
                             paired_differences, run_protocol)


def test_block_bootstrap_covers_a_known_difference_near_its_nominal_rate():
    """AR(1) daily differences (ρ 0.6) around a known mean, in 8 rollouts of 30 days (a twin
    of the full tier has 24): the 95 % moving-block interval covers the mean close to 95 % of
    the time (measured 0.91; an i.i.d. bootstrap ignores the autocorrelation and covers
    about 0.6 here)."""
    rng = np.random.default_rng(0)
    hits, n = 0, 150
    groups = np.repeat(np.arange(8), 30)
    for i in range(n):
        e = np.zeros(240)
        for g in range(8):
            x = rng.normal()
            for t in range(30):
                x = 0.6 * x + 0.8 * rng.normal()
                e[g * 30 + t] = x
        _, lo, hi = block_bootstrap_ci(0.3 + e, groups, block=7, reps=300, seed=i)
        hits += lo <= 0.3 <= hi
    assert 0.86 <= hits / n <= 0.99, hits / n


def test_shipped_tiers_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()  # a folder named like a tier (`--out full`) is not the tier
    q, f = load_protocol("quick"), load_protocol("full")
    assert len(q.twins) == 1 and len(q.starts) == 2 and len(q.seeds) == 1
    assert len(f.twins) >= 3 and any("plumes" in t.spec for t in f.twins)
    assert len(f.starts) >= 8 and len(f.seeds) >= 3 and f.reconstruction
    # the full tier scores what ships, unwidened too, against every null and baseline
    assert {"ddpm", "ddpm-raw", "unet", "unet+iid", "unet+grf", "unet+resample", "interp", "clim",
            "anchor"} <= set(f.models)
    with pytest.raises(FileNotFoundError, match="no shipped tier"):
        load_protocol("nope")


def test_a_part_of_a_tier_keeps_the_named_twins_and_seeds_in_the_tiers_order(tmp_path, capsys):
    from fastds.cli import main
    from fastds.protocol import tier_part
    f = load_protocol("full")
    part = tier_part(f, twins=["plume", "smooth"], seeds=[2, 0])
    assert [t.name for t in part.twins] == ["smooth", "plume"] and part.seeds == (0, 2)
    assert dataclasses.replace(part, twins=f.twins, seeds=f.seeds) == f  # nothing else changes
    assert tier_part(f) == f
    with pytest.raises(ValueError, match=r"no twin or seed dusty, 5 in this tier "
                                         r"\(twins: smooth, rough, plume; seeds: 0, 1, 2\)"):
        tier_part(f, twins=["dusty", "plume"], seeds=[5])
    assert main(["benchmark", "--tier", "full", "--twin", "dusty", "--out", str(tmp_path)]) == 2
    assert "no twin or seed dusty" in capsys.readouterr().err
    assert main(["benchmark", "--pair", f"{tmp_path}:ddpm:a", "--reference", "a", "--twin", "plume",
                 "--twin", "smooth"]) == 2
    assert "keeps one --twin" in capsys.readouterr().err


def test_a_tier_file_that_is_not_toml_is_named(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text('tier = "mine"\n[variants.unet+grf-wide]\nmodel = "unet+grf"\n')
    with pytest.raises(ValueError, match=r"mine\.toml: not valid TOML.*needs quotes"):
        load_protocol(bad)
    bad.write_text('tier = "mine"\n[variants."unet+grf-wide"]\nmodel = "unet+grf"\nspread_scale = 1.1\n')
    assert load_protocol(bad).variants["unet+grf-wide"] == {"model": "unet+grf", "spread_scale": 1.1}


def test_a_start_whose_burn_in_leaves_the_trained_seasons_is_refused_before_training(tmp_path):
    """A rollout (its burn-in included) with days outside ``seasons`` is refused when the
    tier loads and when it runs, naming the start and the season, before anything trains."""
    text = 'tier = "w"\nseasons = [1]\nburn_in = 10\nrollout_days = 30\nstarts = ["{}"]\n'
    f = tmp_path / "w.toml"
    f.write_text(text.format("2007-12-15"))
    assert load_protocol(f).starts == ("2007-12-15",)
    f.write_text(text.format("2007-12-10"))  # burn-in from 2007-11-30: autumn
    with pytest.raises(ValueError, match=r"w\.toml: the rollout from 2007-12-10 .*season\(s\) \[4\]"):
        load_protocol(f)
    f.write_text(text.format("2008-02-10"))  # runs into March
    with pytest.raises(ValueError, match=r"season\(s\) \[2\]"):
        load_protocol(f)
    with pytest.raises(ValueError, match=r"reconstruction|2007-06-01"):
        run_protocol(ProtocolConfig(seasons=(3,), starts=(), reconstruction=("2007-06-01", 200)), out=tmp_path)
    assert not (tmp_path / "cache").exists()


def test_protocol_runs_resumes_and_reports_on_a_toy_size(tmp_path):
    twin = TwinCase("toy", {"coarse_start": "2005-01-01", "coarse_end": "2005-12-31",
                            "fine_start": "2005-05-16", "fine_end": "2005-08-24", "seed": 11,
                            "plumes": 4})
    cfg = ProtocolConfig(tier="toy", twins=(twin,), seeds=(0,), seasons=(3,), starts=("2005-08-27",),
                         rollout_days=3, burn_in=2, members=2,
                         models=("ddpm", "ddpm-m4", "unet", "unet+iid", "interp"), overrides=TEST_OVERRIDES,
                         reps=100, variants={"ddpm-m4": {"model": "ddpm", "members": 4}})
    res = run_protocol(cfg, out=tmp_path, echo=lambda *a: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["tier"] == "toy" and res["days"] == 3
    models = {r["model"] for r in saved["summary"]}
    assert models == {"ddpm", "ddpm-m4", "unet", "unet+iid", "interp"}
    pairs = saved["paired"]["toy"]
    assert {p["model"] for p in pairs} == {"ddpm-m4", "unet", "unet+iid", "interp"}
    # a variant may set its own ensemble size; the scores record each rollout's
    members = {m: set(pd.read_csv(next((tmp_path / "scores").glob(f"*_{m}.csv"))).members)
               for m in ("ddpm", "ddpm-m4", "unet", "interp")}
    assert members == {"ddpm": {2}, "ddpm-m4": {4}, "unet": {1}, "interp": {1}}
    assert all(p["low"] <= p["diff"] <= p["high"] for p in pairs)
    assert "Paired differences ddpm" in (tmp_path / "results.md").read_text()
    # resume: every rollout's scores are cached, so a second run samples nothing
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "scores").glob("*.csv")}
    run_protocol(cfg, out=tmp_path, echo=lambda *a: None)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "scores").glob("*.csv")} == stamps
    # beside the scores, the machine kind that made them, once for a resume on the same kind
    machines = json.loads((tmp_path / "scores" / "toy_s0_machine.json").read_text())
    assert len(machines) == 1 and machines[0]["sample_precision"] in ("fp32", "bf16")
    assert machines[0]["torch"] and machines[0]["fastds"] and machines[0]["cpu"]


class _Killed(Exception):
    pass


def test_an_interrupted_rollout_resumes_on_the_day_it_stopped(tmp_path, monkeypatch):
    """A rollout's finished days are kept while it runs: killed on a day, the re-run samples
    only the days after it, and the scores equal an uninterrupted run's (and an in-memory
    run's: keeping days changes no number); the sampled fields go once scored."""
    from fastds import protocol
    from fastds.sampling import rollout
    twin = TwinCase("toy", {"coarse_start": "2005-01-01", "coarse_end": "2005-12-31",
                            "fine_start": "2005-05-16", "fine_end": "2005-08-24", "seed": 11})
    cfg = ProtocolConfig(tier="toy", twins=(twin,), seeds=(0,), seasons=(3,), starts=("2005-08-27",),
                         rollout_days=3, burn_in=2, members=2, models=("ddpm", "interp"),
                         overrides=TEST_OVERRIDES, reps=100)
    quiet = dict(out=tmp_path, echo=lambda *a: None)
    run_protocol(cfg, **quiet)
    score = next((tmp_path / "scores").glob("*_ddpm.csv"))
    want = pd.read_csv(score)
    kept = lambda: sorted(tmp_path.glob("cache/**/samples/*"))  # noqa: E731
    assert kept() == []

    real_sample, real_write = protocol._sample_rollout, rollout._write_part
    score.unlink()
    monkeypatch.setattr(protocol, "_sample_rollout", lambda *a, out=None, **k: real_sample(*a, **k))
    run_protocol(cfg, **quiet)
    pd.testing.assert_frame_equal(pd.read_csv(score), want)
    monkeypatch.setattr(protocol, "_sample_rollout", real_sample)

    written = []

    def write(parts, day, values, signature, die_after=None):
        if die_after is not None and len(written) == die_after:
            raise _Killed(day)
        written.append(day)
        real_write(parts, day, values, signature)
    score.unlink()
    monkeypatch.setattr(rollout, "_write_part", lambda *a: write(*a, die_after=3))
    with pytest.raises(_Killed):
        run_protocol(cfg, **quiet)
    days = pd.date_range("2005-08-25", periods=5, freq="D")  # 2 burn-in days, then the 3 scored
    assert written == list(days[:3])
    assert len(list(tmp_path.glob("cache/**/samples/*.parts/*.npy"))) == 3
    written.clear()
    monkeypatch.setattr(rollout, "_write_part", write)
    run_protocol(cfg, **quiet)
    assert written == list(days[3:])
    pd.testing.assert_frame_equal(pd.read_csv(score), want)
    assert kept() == []

    # killed after sampling, before its scores were written: the fields are read, not sampled
    score.unlink()
    real_score = protocol._score_rollout

    def die(*a):
        raise _Killed("scoring")
    monkeypatch.setattr(protocol, "_score_rollout", die)
    with pytest.raises(_Killed):
        run_protocol(cfg, **quiet)
    assert [p.suffix for p in kept()] == [".nc"]
    monkeypatch.setattr(protocol, "_score_rollout", real_score)
    written.clear()
    run_protocol(cfg, **quiet)
    assert written == []
    pd.testing.assert_frame_equal(pd.read_csv(score), want)
    assert kept() == []


def test_record_machine_lists_each_kind_once_and_says_when_a_case_mixes_them(tmp_path):
    from fastds.protocol import record_machine
    path, said = tmp_path / "scores" / "plume_s0_machine.json", []
    path.parent.mkdir()
    here = {"cpu": "AMD EPYC", "train_precision": "fp32", "sample_precision": "fp32", "torch": "2.13.0",
            "fastds": "0.2.0"}
    assert record_machine(path, here, said.append) == [here] and said == []
    assert record_machine(path, dict(here), said.append) == [here] and said == []  # a resume, same kind
    xeon = dict(here, cpu="Intel Xeon", train_precision="bf16", sample_precision="bf16")
    assert record_machine(path, xeon, said.append) == [here, xeon]
    assert len(said) == 1 and "plume_s0_machine.json" in said[0] and "mix machines" in said[0]
    assert json.loads(path.read_text()) == [here, xeon]


def test_paired_differences_verdicts():
    rows = []
    rng = np.random.default_rng(3)
    for day in range(40):
        for model, crps in (("ddpm", 0.10), ("null", 0.20), ("same", 0.10)):
            rows.append({"twin": "t", "seed": 0, "start": "s", "time": day, "model": model,
                         "crps_fair": crps + 0.01 * rng.normal(), "r2_mean": 0.5})
    d = paired_differences(pd.DataFrame(rows), reference="ddpm", reps=200).set_index(["metric", "model"])
    assert d.loc[("crps_fair", "null"), "verdict"] == "ddpm better"
    assert d.loc[("crps_fair", "same"), "verdict"] == "tie"


def test_seeds_on_the_same_days_are_one_day_each_in_the_interval():
    """Three training seeds scored on the same days whose differences agree carry no more
    information than one seed: the interval is the one-seed interval, not sqrt(3) narrower;
    where the seeds differ, the day's difference is their mean."""
    rng = np.random.default_rng(5)
    diff = 0.01 + 0.02 * rng.normal(size=60)
    rows = []
    for seed in range(3):
        for day in range(60):
            start = "a" if day < 30 else "b"
            for model, v in (("ddpm", 0.1 + diff[day]), ("null", 0.1)):
                rows.append({"twin": "t", "seed": seed, "start": start, "time": day % 30, "model": model,
                             "crps_fair": v + (0.003 * seed if model == "ddpm" else 0.0)})
    df = pd.DataFrame(rows)
    one = paired_differences(df[df.seed == 1], reference="ddpm", reps=500).set_index("metric").loc["crps_fair"]
    three = paired_differences(df, reference="ddpm", reps=500).set_index("metric").loc["crps_fair"]
    assert three["days"] == one["days"] == 60
    np.testing.assert_allclose([three["diff"], three["low"], three["high"]],
                               [one["diff"], one["low"], one["high"]], rtol=1e-9, atol=1e-12)


def test_a_metric_some_seeds_lack_is_left_out_of_the_pooled_pairing():
    """Seed 1's scores were written before ``fss_ens_q90`` existed (read back from CSV, the
    column is empty for its rows): pooled with seed 0 the metric is left out, not reported
    from seed 0 alone; seed 0 by itself keeps it, and a day that is NaN for a scored metric
    (no exceedance) only drops that day."""
    rng = np.random.default_rng(2)
    rows = []
    for seed in (0, 1):
        for day in range(20):
            for model, v in (("ddpm", 0.6), ("null", 0.5)):
                row = {"twin": "t", "seed": seed, "start": "a", "time": day, "model": model,
                       "fss_q90": v + 0.01 * rng.normal()}
                if seed == 0:
                    row["fss_ens_q90"] = np.nan if day == 3 else v + 0.01 * rng.normal()
                rows.append(row)
    df = pd.DataFrame(rows)
    pooled = paired_differences(df, reference="ddpm", reps=100)
    assert set(pooled.metric) == {"fss_q90"}
    alone = paired_differences(df[df.seed == 0], reference="ddpm", reps=100).set_index("metric")
    assert alone.loc["fss_ens_q90", "days"] == 19 and alone.loc["fss_ens_q90", "verdict"] == "ddpm better"


def test_species_protocol_scores_each_species_and_the_species_together(tmp_path, monkeypatch):
    """A twin of two species and their total: one run per variable, each scored under
    ``twin:VARIABLE``; the cross-species correlation bias per model; the species' sum scored
    as ``NAME-sum`` of the total beside the total-only model; the joint model of the species,
    sampled once for both; and a resume samples nothing."""
    twin = TwinCase("sp", {"coarse_start": "2005-01-01", "coarse_end": "2005-12-31",
                           "fine_start": "2005-05-16", "fine_end": "2005-08-24", "seed": 5,
                           "species": ["DUEXTTAU", "SSEXTTAU"], "total": "TOTEXTTAU"})
    cfg = ProtocolConfig(tier="toy", twins=(twin,), seeds=(0,), seasons=(3,), starts=("2005-08-27",),
                         rollout_days=3, burn_in=2, members=2, models=("ddpm", "ddpm-coupled", "joint", "clim"),
                         cross_models=("ddpm", "ddpm-coupled", "joint", "clim"), overrides=TEST_OVERRIDES,
                         reps=100, variants={"ddpm-coupled": {"model": "ddpm", "species_noise": "coupled"}})
    import fastds.sampling.pipeline as pipeline
    calls, real = [], pipeline.sample
    monkeypatch.setattr(pipeline, "sample", lambda **k: calls.append(k["model"]) or real(**k))
    run_protocol(cfg, out=tmp_path, echo=lambda *a: None)
    monkeypatch.setattr(pipeline, "sample", real)
    assert calls.count("joint") == 1  # both species from one joint rollout
    saved = json.loads((tmp_path / "results.json").read_text())
    groups = {(r["twin"], r["model"]) for r in saved["summary"]}
    models = {"ddpm", "ddpm-coupled", "joint", "clim"}
    assert groups == {(f"sp:{v}", m) for v in ("DUEXTTAU", "SSEXTTAU", "TOTEXTTAU") for m in models
                      if (v, m) != ("TOTEXTTAU", "joint")} | {("sp:TOTEXTTAU", f"{m}-sum") for m in models}
    assert {p["model"] for p in saved["paired"]["sp:TOTEXTTAU"]} == \
        {"ddpm-coupled", "clim", "ddpm-sum", "ddpm-coupled-sum", "joint-sum", "clim-sum"}
    pairs = saved["species_correlation"]
    assert {(r["model"], r["pair"]) for r in pairs} == {(m, "DUEXTTAU~SSEXTTAU") for m in models}
    # the coupled variant: the first species as the shared default, the second on its own latents
    du = {r["model"]: r["crps_fair"] for r in saved["summary"] if r["twin"] == "sp:DUEXTTAU"}
    ss = {r["model"]: r["crps_fair"] for r in saved["summary"] if r["twin"] == "sp:SSEXTTAU"}
    assert du["ddpm-coupled"] == du["ddpm"] and ss["ddpm-coupled"] != ss["ddpm"]
    assert all(-1 <= r["corr_truth"] <= 1 and -2 <= r["bias"] <= 2 for r in pairs)
    assert "## Cross-species" in (tmp_path / "results.md").read_text()
    for v in ("DUEXTTAU", "SSEXTTAU", "TOTEXTTAU"):
        assert (tmp_path / f"cache/sp/run-seed0-{v}/run.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "scores").glob("*.csv")}
    run_protocol(cfg, out=tmp_path, echo=lambda *a: None)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "scores").glob("*.csv")} == stamps
    # scores removed (e.g. to re-score after a change to the scoring code) are made again
    # from the kept fields, without sampling anything
    score = next((tmp_path / "scores").glob("sp-SSEXTTAU_*_ddpm-coupled.csv"))
    before = pd.read_csv(score)
    score.unlink()

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")
    monkeypatch.setattr(pipeline, "sample", no_sampling)
    run_protocol(cfg, out=tmp_path, echo=lambda *a: None)
    pd.testing.assert_frame_equal(pd.read_csv(score), before)


def _scores(out, twin, seed, model, days, **columns):
    """One rollout's score file as the protocol writes it (``out/scores``), its rows ``days``
    (a species twin's ``TWIN:VAR`` rows go to a file named ``TWIN-VAR``)."""
    start = days[0]
    (out / "scores").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"twin": twin, "seed": seed, "start": f"{start:%Y-%m-%d}+{len(days)}d", "model": model,
                  "time": days, **columns}).to_csv(
        out / "scores" / f"{twin.replace(':', '-')}_s{seed}_{start:%Y%m%d}_{len(days)}d_{model}.csv", index=False)


def test_pair_tiers_pairs_models_scored_by_different_runs_on_the_same_days(tmp_path, capsys):
    """``pair_tiers`` (and ``fastds benchmark --pair``): the same model scored by two protocol
    runs, relabelled, paired on the days they share (twins kept apart); a missing model, a
    reference that is no label and a malformed spec are refused by name."""
    from fastds.cli import main
    from fastds.protocol import pair_tiers
    rng = np.random.default_rng(0)
    days = pd.date_range("2007-07-01", periods=30)
    base = rng.normal(0.12, 0.01, len(days))
    for out, shift in (("new", -0.002), ("old", 0.0)):
        for twin in ("plume", "smooth"):
            for model, extra in (("ddpm", 0.0), ("unet", 0.05)):
                _scores(tmp_path / out, twin, 0, model, days, crps_fair=base + shift + extra + (twin == "smooth"),
                        r2_mean=0.5 - shift)
    entries = [(tmp_path / "new", "ddpm", "ddpm-new"), (tmp_path / "old", "ddpm", "ddpm-old"),
               (tmp_path / "old", "unet", "unet-old")]
    means, paired = pair_tiers(entries, reference="ddpm-new", twin="plume", reps=200)
    assert means.loc["crps_fair", "ddpm-new"] == pytest.approx(base.mean() - 0.002)
    assert means.loc["crps_fair", "unet-old"] == pytest.approx(base.mean() + 0.05)
    d = paired.set_index(["metric", "model"])
    assert d.loc[("crps_fair", "ddpm-old"), "diff"] == pytest.approx(-0.002)
    assert d.loc[("crps_fair", "ddpm-old"), "days"] == 30
    assert d.loc[("crps_fair", "ddpm-old"), "verdict"] == "ddpm-new better"
    assert d.loc[("r2_mean", "ddpm-old"), "verdict"] == "ddpm-new better"
    both, _ = pair_tiers(entries, reference="ddpm-new", reps=200)  # both twins, paired per day and twin
    assert both.loc["crps_fair", "ddpm-new"] == pytest.approx(base.mean() - 0.002 + 0.5)
    with pytest.raises(FileNotFoundError, match="no scores of model 'vae'"):
        pair_tiers([(tmp_path / "old", "vae", "v")], reference="v")
    with pytest.raises(ValueError, match="reference 'x' is none of the labels"):
        pair_tiers(entries, reference="x")
    md = tmp_path / "paired.md"
    args = ["benchmark", "--pair", f"{tmp_path / 'new'}:ddpm:ddpm-new", "--pair", f"{tmp_path / 'old'}:ddpm:ddpm-old",
            "--reference", "ddpm-new", "--twin", "plume", "--out", str(md)]
    assert main(args) == 0
    text = md.read_text()
    assert "| crps_fair | ddpm-old | 30 | -0.002000 |" in text and "ddpm-new better" in text
    assert text in capsys.readouterr().out
    folder = [a if a != str(md) else str(tmp_path / "pairs") for a in args]  # a folder gets paired.md
    assert main(folder) == 0 and (tmp_path / "pairs" / "paired.md").read_text() == text
    capsys.readouterr()
    assert main(["benchmark", "--pair", "only-a-folder", "--reference", "x", "--out", str(md)]) == 2
    assert "OUT:MODEL:LABEL" in capsys.readouterr().err
    assert main([a for a in args if a not in ("--reference", "ddpm-new")]) == 2
    assert "needs --reference" in capsys.readouterr().err
    # two training seeds on the same days: pooled per day by default, one at a time with seeds
    for model, extra in (("ddpm", -0.01), ("unet", 0.05)):
        _scores(tmp_path / "old", "plume", 1, model, days, crps_fair=base + extra)
    seeds = [(tmp_path / "old", "ddpm", "ddpm"), (tmp_path / "old", "unet", "unet")]
    diff = {s: pair_tiers(seeds, reference="ddpm", twin="plume", seeds=s, reps=200)[1]
            .set_index("metric").loc["crps_fair", "diff"] for s in ((0,), (1,), ())}
    assert diff[(0,)] == pytest.approx(-0.05) and diff[(1,)] == pytest.approx(-0.06)
    assert diff[()] == pytest.approx(-0.055)
    with pytest.raises(FileNotFoundError, match="no scores of model 'ddpm' on twin 'plume' for seed 2"):
        pair_tiers(seeds, reference="ddpm", twin="plume", seeds=(2,))
    one = tmp_path / "s1.md"
    assert main(["benchmark", "--pair", f"{tmp_path / 'old'}:ddpm:ddpm", "--pair", f"{tmp_path / 'old'}:unet:unet",
                 "--reference", "ddpm", "--twin", "plume", "--seed", "1", "--out", str(one)]) == 0
    assert "| crps_fair | unet | 30 | -0.060000 |" in one.read_text()
    # days of one season only, by each day's own month (a rollout may cross a season's edge)
    edge = pd.date_range("2007-08-17", periods=30)  # 15 JJA days, 15 SON days
    for model, extra in (("ddpm", np.where(edge.month == 8, -0.01, -0.03)), ("unet", 0.0)):
        _scores(tmp_path / "edge", "plume", 0, model, edge, crps_fair=0.12 + extra)
    edge = [(tmp_path / "edge", "ddpm", "ddpm"), (tmp_path / "edge", "unet", "unet")]
    for season, want in ((3, -0.01), (4, -0.03)):
        d = pair_tiers(edge, reference="ddpm", seasons=(season,), reps=200)[1].set_index("metric")
        assert d.loc["crps_fair", "diff"] == pytest.approx(want) and d.loc["crps_fair", "days"] == 15
    with pytest.raises(FileNotFoundError, match="in season 1"):
        pair_tiers(edge, reference="ddpm", seasons=(1,))
    assert main(["benchmark", "--pair", f"{tmp_path / 'edge'}:ddpm:ddpm", "--pair", f"{tmp_path / 'edge'}:unet:u",
                 "--reference", "ddpm", "--season", "4", "--out", str(one)]) == 0
    assert "| crps_fair | u | 15 | -0.030000 |" in one.read_text() and "(SON)" in one.read_text()
    assert main(["benchmark", "--season", "4", "--out", str(tmp_path / "t")]) == 2
    assert "select days to pair" in capsys.readouterr().err


def test_pair_tiers_keeps_the_days_of_a_lead_window(tmp_path, capsys):
    """``leads`` (``--lead FIRST:LAST``) keeps the days that lie that far into their own
    rollout, whatever its start (so two rollouts pool by lead); a bad window is refused."""
    from fastds.cli import main
    from fastds.protocol import pair_tiers
    for start in ("2007-07-01", "2008-01-10"):
        days = pd.date_range(start, periods=30)
        late = np.arange(30) >= 10  # the 11th day on: lead 11..30
        for model, extra in (("ddpm", np.where(late, -0.03, -0.01)), ("unet", 0.0)):
            _scores(tmp_path / "r", "plume", 0, model, days, crps_fair=0.12 + extra)
    entries = [(tmp_path / "r", "ddpm", "ddpm"), (tmp_path / "r", "unet", "unet")]
    for leads, want, n in (((1, 10), -0.01, 20), ((11, 30), -0.03, 40), ((10, 11), -0.02, 4)):
        d = pair_tiers(entries, reference="ddpm", leads=leads, reps=200)[1].set_index("metric")
        assert d.loc["crps_fair", "diff"] == pytest.approx(want) and d.loc["crps_fair", "days"] == n
    with pytest.raises(FileNotFoundError, match="at leads 31-40 days"):
        pair_tiers(entries, reference="ddpm", leads=(31, 40))
    md = tmp_path / "lead.md"
    args = ["benchmark", "--pair", f"{tmp_path / 'r'}:ddpm:ddpm", "--pair", f"{tmp_path / 'r'}:unet:unet",
            "--reference", "ddpm", "--out", str(md)]
    assert main(args + ["--lead", "11:30"]) == 0
    text = md.read_text()
    assert "| crps_fair | unet | 40 | -0.030000 |" in text and "days 11–30 of each rollout" in text
    for bad in ("0:5", "9:3", "x", "1:2:3"):
        assert main(args + ["--lead", bad]) == 2
        assert "--lead takes FIRST:LAST" in capsys.readouterr().err
    assert main(["benchmark", "--lead", "1:5", "--out", str(tmp_path / "t")]) == 2
    assert "select days to pair" in capsys.readouterr().err


def test_pair_tiers_keeps_the_rollouts_of_the_starts_named(tmp_path, capsys):
    """``starts`` (``--start YYYY-MM-DD``) keeps the rollouts that start on those dates: two
    seeds pool on the rollouts both scored while the second still misses one."""
    from fastds.cli import main
    from fastds.protocol import pair_tiers
    for seed, starts in ((0, ("2007-07-01", "2008-01-10")), (1, ("2007-07-01",))):
        for start in starts:
            days = pd.date_range(start, periods=30)
            gain = -0.01 if start == "2007-07-01" else -0.05
            for model, extra in (("ddpm", gain - 0.002 * seed), ("unet", 0.0)):
                _scores(tmp_path / "r", "plume", seed, model, days, crps_fair=0.12 + extra)
    entries = [(tmp_path / "r", "ddpm", "ddpm"), (tmp_path / "r", "unet", "unet")]
    d = pair_tiers(entries, reference="ddpm", starts=("2007-07-01",), reps=200)[1].set_index("metric")
    assert d.loc["crps_fair", "diff"] == pytest.approx(-0.011) and d.loc["crps_fair", "days"] == 30
    with pytest.raises(FileNotFoundError, match="in rollouts from 2009-01-01"):
        pair_tiers(entries, reference="ddpm", starts=("2009-01-01",))
    md = tmp_path / "start.md"
    assert main(["benchmark", "--pair", f"{tmp_path / 'r'}:ddpm:ddpm", "--pair", f"{tmp_path / 'r'}:unet:unet",
                 "--reference", "ddpm", "--out", str(md), "--start", "2008-01-10"]) == 0
    assert "| crps_fair | unet | 30 | -0.050000 |" in md.read_text() and "rollouts from 2008-01-10" in md.read_text()
    assert main(["benchmark", "--start", "2008-01-10", "--out", str(tmp_path / "t")]) == 2
    assert "select days to pair" in capsys.readouterr().err


def test_pair_every_model_a_folder_scored(tmp_path, capsys):
    """Model ``"all"`` (``--pair OUT:all``) pairs every model the folder scored under its own
    name: the same table as naming each; a label after it is refused by name."""
    from fastds.cli import main
    from fastds.protocol import pair_tiers
    days = pd.date_range("2007-07-01", periods=30)
    for twin in ("plume", "smooth"):
        for model, extra in (("ddpm", -0.01), ("unet", 0.0), ("unet+iid", -0.004)):
            _scores(tmp_path / "r", twin, 0, model, days, crps_fair=0.12 + extra + (twin == "smooth"))
    named = [(tmp_path / "r", m, m) for m in ("ddpm", "unet", "unet+iid")]
    want = pair_tiers(named, reference="ddpm", twin="smooth", reps=200)
    got = pair_tiers([(tmp_path / "r", "all", "all")], reference="ddpm", twin="smooth", reps=200)
    pd.testing.assert_frame_equal(got[0], want[0])
    pd.testing.assert_frame_equal(got[1], want[1])
    assert set(got[1].model) == {"unet", "unet+iid"}
    with pytest.raises(FileNotFoundError, match="holds no scores of any model on twin 'rough'"):
        pair_tiers([(tmp_path / "r", "all", "all")], reference="ddpm", twin="rough")
    md, every = tmp_path / "all.md", tmp_path / "named.md"
    assert main(["benchmark", "--pair", f"{tmp_path / 'r'}:all", "--reference", "ddpm", "--twin", "smooth",
                 "--out", str(md)]) == 0
    assert main(["benchmark", *sum((["--pair", f"{o}:{m}:{m}"] for o, m, _ in named), []), "--reference", "ddpm",
                 "--twin", "smooth", "--out", str(every)]) == 0
    assert md.read_text() == every.read_text() and "| crps_fair | unet+iid | 30 | -0.006000 |" in md.read_text()
    capsys.readouterr()
    assert main(["benchmark", "--pair", f"{tmp_path / 'r'}:all:everything", "--reference", "ddpm",
                 "--out", str(md)]) == 2
    assert "OUT:all (every model OUT scored" in capsys.readouterr().err


def test_pair_machines_lists_each_case_s_machines_and_says_what_a_pairing_mixes(tmp_path, capsys):
    """``pair_machines`` reads the records ``record_machine`` keeps beside the scores, per
    folder, case and seed of the rows the pairing keeps (twin, seeds, model, seasons, leads and
    starts kept as ``pair_tiers`` keeps them, so a case the filters leave no day of is not
    listed; a species twin's ``TWIN:VAR`` is the case ``TWIN-VAR``); ``--pair`` prints them after
    the tables and says when they mix kinds, a case mixes them, or a case has no record."""
    from fastds.cli import main
    from fastds.protocol import pair_machines, record_machine, write_pairing, pair_tiers
    days = pd.date_range("2007-07-01", periods=20)
    epyc = {"cpu": "AMD EPYC", "train_precision": "fp32", "sample_precision": "fp32", "torch": "2.13.0",
            "fastds": "0.2.0"}
    xeon = dict(epyc, cpu="Intel Xeon", train_precision="bf16", sample_precision="bf16")
    a, b = tmp_path / "a", tmp_path / "b"
    for out, case, seed in ((a, "plume", 0), (a, "plume", 1), (a, "smooth", 0), (b, "plume", 0),
                            (a, "species:SSEXTTAU", 0)):
        for model in ("ddpm", "unet"):
            _scores(out, case, seed, model, days, crps_fair=0.1 + (model == "unet") * 0.01 + 0.001 * np.arange(20))
    autumn = pd.date_range("2007-09-01", periods=20)  # plume seed 2, scored in SON only
    for model in ("ddpm", "unet"):
        _scores(a, "plume", 2, model, autumn, crps_fair=0.1 + (model == "unet") * 0.01 + 0.001 * np.arange(20))
    record_machine(a / "scores" / "plume_s0_machine.json", epyc, lambda _: None)
    for r in (epyc, xeon):
        record_machine(a / "scores" / "plume_s1_machine.json", r, lambda _: None)
    record_machine(a / "scores" / "smooth_s0_machine.json", xeon, lambda _: None)
    got = pair_machines([(a, "all", "all"), (b, "ddpm", "old")], twin="plume")
    assert got == {(a, "plume", 0): [epyc], (a, "plume", 1): [epyc, xeon], (a, "plume", 2): [], (b, "plume", 0): []}
    summer = {(a, "plume", 0): [epyc], (a, "plume", 1): [epyc, xeon], (b, "plume", 0): []}
    for drop in ({"starts": ("2007-07-01",)}, {"seasons": (3,)}):  # seed 2 scored no day of these
        assert pair_machines([(a, "all", "all"), (b, "ddpm", "old")], twin="plume", **drop) == summer
    assert pair_machines([(a, "ddpm", "ddpm")], twin="plume", seasons=(4,)) == {(a, "plume", 2): []}
    assert pair_machines([(a, "ddpm", "ddpm")], twin="plume", leads=(21, 30)) == {}
    assert pair_machines([(a, "ddpm", "ddpm")], twin="smooth") == {(a, "smooth", 0): [xeon]}
    assert pair_machines([(a, "ddpm", "ddpm")], twin="plume", seeds=(0,)) == {(a, "plume", 0): [epyc]}
    assert pair_machines([(a, "unet", "unet")], twin="species:SSEXTTAU") == {(a, "species-SSEXTTAU", 0): []}
    assert len(pair_machines([(a, "all", "all")])) == 5  # every twin
    assert pair_machines([(a, "vae", "vae")], twin="plume") == {}  # a model the folder never scored
    means, paired = pair_tiers([(a, "all", "all")], reference="ddpm", twin="smooth", reps=50)
    one = write_pairing(means, paired, tmp_path / "one.md", title="t", machines={(a, "smooth", 0): [xeon]})
    assert "| a | smooth | 0 | Intel Xeon, train bf16, sample bf16, torch 2.13.0, fastds 0.2.0 |" in one
    assert "Every case was scored on machines of one kind." in one and "kinds" not in one
    assert "Made on" not in write_pairing(means, paired, tmp_path / "none.md", title="t")
    md = tmp_path / "p.md"
    assert main(["benchmark", "--pair", f"{a}:all", "--pair", f"{b}:ddpm:old", "--reference", "ddpm",
                 "--twin", "plume", "--start", "2007-07-01", "--out", str(md)]) == 0
    text = md.read_text()
    assert text == capsys.readouterr().out
    assert text.index("Paired differences") < text.index("Made on")
    assert "| a | plume | 1 | AMD EPYC, train fp32, sample fp32, torch 2.13.0, fastds 0.2.0; Intel Xeon" in text
    assert "| b | plume | 0 | not recorded |" in text and "| a | plume | 2 |" not in text  # --start left it no day
    assert "machines of 2 kinds" in text and "mix machines: plume seed 1 (a)" in text
    assert "1 of 3 cases have no machine record" in text


@pytest.mark.parametrize("folders, leads, twin, table", [
    (("full",), None, "smooth", "full-smooth-s0-rollouts"),
    (("full-recon",), None, "smooth", "full-smooth-s0-reconstruction"),
    (("full-recon",), (1, 190), "smooth", "full-smooth-s0-reconstruction-days1-190"),
    (("full-recon",), (191, 380), "smooth", "full-smooth-s0-reconstruction-days191-380"),
    (("full-recon",), (381, 570), "smooth", "full-smooth-s0-reconstruction-days381-570"),
    (("full", "full-recon"), None, "smooth", "full-smooth-s0"),
    (("full-epyc",), None, "plume", "full-epyc-plume-s0-rollouts"),
    (("full-epyc",), None, "plume", "full-epyc-plume-s0-rollouts-5starts"),
    (("full",), None, "rough", "full-rough-s0-rollouts"),
    (("full-recon",), None, "rough", "full-rough-s0-reconstruction"),
    (("full-recon",), (1, 190), "rough", "full-rough-s0-reconstruction-days1-190"),
    (("full-recon",), (191, 380), "rough", "full-rough-s0-reconstruction-days191-380"),
    (("full-recon",), (381, 570), "rough", "full-rough-s0-reconstruction-days381-570"),
    (("full", "full-recon"), None, "rough", "full-rough-s0"),
    (("full",), None, "rough", "full-rough-s1-rollouts"),
    (("full",), None, "rough", "full-rough-s01-rollouts"),
    (("full",), None, "smooth", "full-smooth-s1-rollouts"),
    (("full",), None, "smooth", "full-smooth-s01-rollouts"),
    (("full",), None, "plume", "full-plume-s0-rollouts"),
    (("full",), None, "plume", "full-plume-s2-rollouts"),
    (("full",), None, "plume", "full-plume-s02-rollouts"),
    (("full",), None, "plume", "full-plume-s1-rollouts"),
    (("full",), None, "plume", "full-plume-s01-rollouts"),
    (("full",), None, "plume", "full-plume-s012-rollouts"),
    (("full",), None, "smooth", "full-smooth-s2-rollouts"),
    (("full",), None, "smooth", "full-smooth-s012-rollouts-5starts"),
    (("full",), None, "smooth", "full-smooth-s012-rollouts"),
    (("full",), None, "rough", "full-rough-s2-rollouts"),
    (("full",), None, "rough", "full-rough-s012-rollouts")
] + [(("full-recon-epyc",), leads, twin, f"full-recon-epyc-{twin}-s{seed}-reconstruction"
                                            + (f"-days{leads[0]}-{leads[1]}" if leads else ""))
        for twin, seed in (("plume", 2), ("smooth", 1), ("rough", 1))  # the replicates' reconstructions
        for leads in (None, (1, 190), (191, 380), (381, 570))])
def test_committed_full_tier_tables_rebuild_from_their_scores(tmp_path, folders, leads, twin, table):
    """The full tier's committed tables come from the per-day scores committed beside them
    (``docs/protocol/full/scores`` for the 30-day rollouts, ``full-recon/scores`` for the
    reconstruction, ``full-recon-epyc/scores`` for the replicate reconstructions, plume seed
    2's, smooth seed 1's and rough seed 1's): rebuilt by ``pair_tiers``, the means and every
    paired difference (not the bootstrap intervals, which depend on ``reps``) equal the
    committed table's, so a later
    seed can be pooled with them from a clean clone. The table's name says its seeds (``s01``:
    seeds 0 and 1, their differences averaged per day); a table pooled on some rollouts only
    names their starts in its title (``--start``: "rollouts from 2007-06-01, ...")."""
    from fastds.protocol import pair_tiers, write_pairing
    docs = Path(__file__).resolve().parents[1] / "docs" / "protocol"
    models = load_protocol("full").models
    committed = (docs / f"{table}-paired.md").read_text()
    starts = re.search(r"rollouts from ([-\d, ]+)\)", committed.split("\n# ")[1].splitlines()[0])
    means, paired = pair_tiers([(docs / f, m, m) for f in folders for m in models], reference="ddpm",
                               twin=twin, seeds=tuple(map(int, re.search(r"-s(\d+)", table)[1])),
                               leads=leads, starts=tuple(starts[1].split(", ")) if starts else (), reps=50)
    text = write_pairing(means, paired, tmp_path / "p.md", title="rebuilt")
    assert text.split("Paired differences")[0].split("Mean over days:")[1] in committed
    rows = [r for r in text.splitlines() if r.startswith("| ") and r.count("|") == 7 and "[" in r]
    assert len(rows) == len(paired) > 100
    for r in rows:  # "| metric | model | days | diff |": the interval and verdict follow
        assert "|".join(r.split("|")[:5]) + "|" in committed, r
