import subprocess
import sys

import pytest
import xarray as xr

from fastds.cli import main

from conftest import TEST_OVERRIDES


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _sets():
    return [a for o in TEST_OVERRIDES for a in ("--set", o)]


def test_dry_run_prints_resolved_config(capsys):
    code, out, _ = run(capsys, "train", "--data", "x", "--run", "y", "--dry-run", "--set", "train.lr=0.01",
                       "--set", "sample.sampler=dpmpp")
    assert code == 0 and "lr = 0.01" in out and 'sampler = "dpmpp"' in out and 'preset = "tiny"' in out


def test_sample_dry_run_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    """`fastds sample --dry-run` prints the run's settings; on a folder without a run.json it
    says so, as the real call does, instead of printing the dataclass defaults."""
    code, out, err = run(capsys, "sample", "--run", str(tmp_path), "--dry-run", "--start", "2001-01-01",
                         "--end", "2001-01-02", "--out", str(tmp_path / "o.nc"))
    assert code != 0 and out == "" and f"{tmp_path / 'run.json'} is missing" in err


def test_train_without_model_trains_the_default_chain(capsys, monkeypatch):
    """`fastds train` alone trains what the default sampler needs, in order; --model one."""
    import fastds.training.stages as S
    calls = []
    monkeypatch.setattr(S, "train", lambda **kw: calls.append(kw["model"]) or [])
    assert run(capsys, "train", "--data", "x", "--run", "y", "--quiet")[0] == 0
    assert calls == ["unet", "ddpm"]
    calls.clear()
    assert run(capsys, "train", "--data", "x", "--run", "y", "--quiet", "--set", "train.mean=clim")[0] == 0
    assert calls == ["ddpm"]
    calls.clear()
    assert run(capsys, "train", "--data", "x", "--run", "y", "--model", "vae", "--quiet")[0] == 0
    assert calls == ["vae"]


def test_sample_settings_resolve_from_the_run(tmp_path):
    """API and CLI share one resolution: the run's saved [sample], then overrides."""
    from fastds.config import load_config, to_toml
    from fastds.runs import sample_settings
    (tmp_path / "config.toml").write_text(to_toml(load_config("tiny", overrides=["sample.steps=7"])))
    assert sample_settings(tmp_path).steps == 7 and sample_settings(tmp_path).tile == 32
    assert sample_settings(tmp_path, members=3).members == 3
    with pytest.raises(TypeError, match="unknown setting.*stepz"):
        sample_settings(tmp_path, stepz=3)


def test_every_subcommand_has_help():
    for cmd in ("synth", "prepare", "pretrain", "train", "sample", "evaluate", "demo"):
        res = subprocess.run([sys.executable, "-m", "fastds.cli", cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "--config" in res.stdout and "--set" in res.stdout


@pytest.mark.slow
def test_pipeline_end_to_end(capsys, tmp_path):
    twin = tmp_path / "twin"
    assert run(capsys, "synth", "--out", str(twin), "--coarse-start", "2005-01-01", "--coarse-end",
               "2005-09-30", "--fine-start", "2005-05-16", "--fine-end", "2005-08-20",
               "--native-days", "2", "--quiet")[0] == 0
    store = tmp_path / "s.zarr"
    code, out, err = run(capsys, "prepare", "--coarse", str(twin / "coarse_daily.nc"), "--fine",
                         str(twin / "fine_daily.nc"), "--elevation", str(twin / "elevation.nc"),
                         "--region", "24,28,44,49", "--out", str(store), "--quiet")
    assert code == 0, err
    runp = tmp_path / "run"
    sets = _sets() + ["--set", "train.epochs=1", "--set", "pretrain.epochs=1"]
    assert run(capsys, "pretrain", "--data", str(store), "--out", str(runp), "--quiet", *sets)[0] == 0
    # no --model: the default chain, the U-Net and then the DDPM around it
    code, out, err = run(capsys, "train", "--data", str(store), "--run", str(runp), "--quiet", *sets)
    assert code == 0, err
    assert out.index("unet checkpoint") < out.index("ddpm checkpoint")
    # the widening refitted without retraining: the same model-space gains, and the ones fitted
    # after the projection that sample.calibrate_to="bands" reads
    from fastds.runs import load_checkpoint
    ck = runp / "season3" / "ddpm.best.pt"
    before = load_checkpoint(ck)["calibration"]
    code, out, err = run(capsys, "train", "--run", str(runp), "--recalibrate", "--quiet")
    assert code == 0, err
    after = load_checkpoint(ck)["calibration"]
    assert "band gains after the projection" in out and after["band_gains"] == before["band_gains"]
    assert after["final_band_gains"] == before["final_band_gains"]
    assert "coarse-state gains " + " ".join(f"{g:.2f}" for g in after["state_gains"]) in out
    pred = tmp_path / "pred.nc"
    code, out, err = run(capsys, "sample", "--run", str(runp), "--start", "2005-08-18", "--end", "2005-08-23",
                         "--out", str(pred), "--members", "2", "--mode", "strict", "--quiet",
                         "--set", "sample.steps=5", "--set", "sample.stride=8")
    assert code == 0, err
    ds = xr.open_dataset(pred)
    assert ds["DUEXTTAU"].dims == ("time", "member", "lat", "lon") and ds.sizes["time"] == 6
    # the API without cfg samples the run's saved settings, exactly as the CLI: bitwise equal
    import numpy as np

    import fastds
    api = fastds.sample(run=runp, start="2005-08-18", end="2005-08-23", members=2, mode="strict",
                        steps=5, stride=8, progress=False)
    np.testing.assert_array_equal(api["DUEXTTAU"].values, ds["DUEXTTAU"].values)
    code, out, err = run(capsys, "evaluate", "--pred", f"ddpm={pred}", "--truth", str(twin / "fine_truth.nc"),
                         "--coarse", str(twin / "coarse_daily.nc"), "--out", str(tmp_path / "rep"), "--quiet")
    assert code == 0, err
    assert "| ddpm |" in out
    for f in ("table.csv", "table.md", "metrics.json", "semivariogram.png", "spectra.png", "acf_pacf.png",
              "lag_curves.png", "wasserstein.png", "rank_histogram_ddpm.png"):
        assert (tmp_path / "rep" / f).exists(), f


@pytest.mark.parametrize("argv,message", [
    (["prepare", "--coarse", "/nonexistent", "--fine", "/nonexistent", "--region", "area1", "--out", "x.zarr"],
     "does not exist"),
    (["prepare", "--coarse", "/tmp", "--fine", "/tmp", "--region", "mars", "--out", "x.zarr"], "neither a known area"),
    (["pretrain", "--data", "/nonexistent.zarr", "--out", "run"], "does not exist; create it with `fastds prepare`"),
    (["sample", "--run", "/nonexistent", "--start", "2005-01-01", "--end", "2005-01-02", "--out", "p.nc"],
     "run.json is missing"),
    (["evaluate", "--pred", "/nonexistent.nc", "--truth", "/nonexistent.nc", "--out", "r"], "does not exist"),
    (["train", "--data", "x", "--run", "y", "--set", "train.nope=1"], "unknown key train.nope"),
    (["train", "--data", "x", "--run", "y", "--set", "train.lr=fast"], "train.lr must be float"),
    (["train", "--data", "x", "--run", "y", "--set", "lr"], "--set expects section.key=value"),
    (["train", "--run", "/nonexistent", "--recalibrate"], "recalibrate: /nonexistent/run.json is missing"),
    (["train", "--run", "/nonexistent", "--recalibrate", "--model", "unet"], "only a diffusion model is widened"),
    (["train", "--run", "/nonexistent", "--recalibrate", "--set", "train.lr=0.1"],
     "--set train.lr=0.1 is not a sample setting"),
    (["train", "--run", "/nonexistent", "--recalibrate", "--preset", "tiny"], "--config and --preset are not used"),
    (["train", "--run", "/nonexistent", "--recalibrate", "--set", "sample.steps=7"],
     "recalibrate: /nonexistent/run.json is missing"),
])
def test_bad_input_exits_nonzero_with_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastds.cli", "pretrain", "--data", str(tmp_path / "no.zarr"),
                          "--out", str(tmp_path / "r"), "--debug"], capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" in res.stderr


@pytest.mark.slow
def test_demo_quick(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"), "--quiet")
    assert code == 0, err
    assert "| ddpm | twin | MAM |" in out and "| interp |" in out and "Semivariogram distance" in out
    for name in ("clim", "unet", "vae", "ddpm-member"):
        assert f"| {name} | twin |" in out, name
    assert "R² by lead" in out and "slope/day" in out and "spread/skill" in out
    for f in ("table.md", "rollout_ddpm.nc", "rollout_clim.nc", "report/table.csv",
              "report/semivariogram.png", "report-rollout/metrics.json", "report-rollout/leads.png",
              "report-rollout/leads.md"):
        assert (tmp_path / "demo" / f).exists(), f
    assert list((tmp_path / "demo" / "report").glob("map_*.png"))


@pytest.mark.slow
def test_demo_species_quick(capsys, tmp_path, monkeypatch):
    """``fastds demo --species``: one store of the species and their total, a run each, scored
    per species, together and summed (two species here, to keep it short)."""
    import json

    import fastds.demo
    monkeypatch.setattr(fastds.demo, "DEMO_SPECIES", ("DUEXTTAU", "SSEXTTAU"))
    code, out, err = run(capsys, "demo", "--species", "--quick", "--out", str(tmp_path / "d"), "--quiet")
    assert code == 0, err
    assert "| SSEXTTAU | ddpm |" in out and "| TOTEXTTAU | clim |" in out
    assert "| ddpm | DUEXTTAU~SSEXTTAU |" in out and "| ddpm-sum |" in out
    res = json.loads((tmp_path / "d" / "species.json").read_text())
    assert set(res["per_species"]) == {"DUEXTTAU", "SSEXTTAU", "TOTEXTTAU"}
    assert set(res["total"]) == {f"{m}{x}" for m in ("ddpm", "ddpm-coupled", "unet", "clim") for x in ("", "-sum")}
    assert "| ddpm-coupled | DUEXTTAU~SSEXTTAU |" in out
    for v in ("DUEXTTAU", "SSEXTTAU", "TOTEXTTAU"):
        assert (tmp_path / "d" / f"run-{v}" / "run.json").exists()
        assert (tmp_path / "d" / f"rollout_{v}_ddpm.nc").exists()


def test_sample_members_zero_is_refused_not_replaced(capsys, monkeypatch, tmp_path):
    """`--members 0` once fell back to the config's member count (``args.members or ...``)."""
    import fastds.sampling.pipeline as P
    seen = []
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text('{"store": "s.zarr"}')  # a run folder, config defaults

    def fake(**kw):
        P._check(kw["cfg"], "ddpm")
        seen.append(kw["cfg"].members)
        return xr.Dataset()

    monkeypatch.setattr(P, "sample", fake)
    base = ("sample", "--run", "r", "--start", "2005-01-01", "--end", "2005-01-01", "--out", "x.nc", "--quiet")
    code, _, err = run(capsys, *base, "--members", "0")
    assert code != 0 and "members must be >= 1, got 0" in err
    assert run(capsys, *base, "--members", "3")[0] == 0 and seen == [3]
    code, _, err = run(capsys, *base, "--set", "sample.stride=100")
    assert code != 0 and "sample.stride=100 must be between 1 and tile - 2*halo" in err
