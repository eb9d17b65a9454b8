"""Scale-out (issue 12): units of time segments x members, dask.distributed or in process,
bit-identical with one segment, resumable, and parallel-in-time segments with burn-in."""
import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from fastds.config import SampleConfig
from fastds.sampling.distributed import plan_units, sample_distributed
from fastds.sampling.pipeline import sample

# independent members: one unit each (antithetic pairs travel together: see the pair test)
FAST = SampleConfig(sampler="ddim", steps=4, tile=16, halo=4, stride=8, batch=256, mode="strict",
                    fusion="final", antithetic=False)
START, END = "2005-08-25", "2005-08-30"  # beyond the fine record (ends 2005-08-24)


def test_plan_units_segments_members_and_burn_in():
    u = plan_units("2007-01-01", "2007-12-31", segments=4, burn_in=10, members=3)
    assert len(u) == 12
    firsts = sorted({x.first for x in u})
    assert firsts[0] == pd.Timestamp("2007-01-01") and len(firsts) == 4
    lasts = sorted({x.last for x in u})
    assert lasts[-1] == pd.Timestamp("2007-12-31")
    for a, b in zip(lasts[:-1], firsts[1:]):
        assert b - a == pd.Timedelta(days=1)  # no gap, no overlap in kept days
    for x in u:
        assert x.cold == (x.segment > 0)
        assert x.run_start == (x.first - pd.Timedelta(days=10) if x.cold else x.first)
    shared = plan_units("2007-01-01", "2007-01-31", segments=2, members=3, split_members=False)
    assert [(x.member0, x.members) for x in shared] == [(0, 3), (0, 3)]
    paired = plan_units("2007-01-01", "2007-01-31", members=5, pairs=True)
    assert [(x.member0, x.members) for x in paired] == [(0, 2), (2, 2), (4, 1)]
    with pytest.raises(ValueError, match="segments must be"):
        plan_units("2007-01-01", "2007-01-03", segments=5)
    with pytest.raises(ValueError, match="burn_in"):
        plan_units("2007-01-01", "2007-01-31", segments=2, burn_in=-1)


@pytest.fixture(scope="module")
def sequential(trained_run, tmp_path_factory):
    cfg = dataclasses.replace(FAST, members=2)
    out = tmp_path_factory.mktemp("seq") / "seq.nc"
    return sample(run=trained_run, start=START, end=END, out=out, cfg=cfg, model="ddpm",
                  progress=False)["DUEXTTAU"]


def test_one_segment_in_process_units_equal_the_sequential_run(trained_run, sequential, tmp_path):
    """Members cut into units (each its own history and seeds) give the ensemble bit for bit."""
    cfg = dataclasses.replace(FAST, members=2)
    ds = sample_distributed(unit_sampler=sample, run=trained_run, start=START, end=END, out=tmp_path / "u.nc", cfg=cfg,
                            model="ddpm", progress=False)["DUEXTTAU"]
    np.testing.assert_array_equal(ds.values, sequential.values)
    assert list(ds.member.values) == [0, 1]
    assert not (tmp_path / "u.nc.units").exists()  # pieces removed once assembled
    on_disk = xr.open_dataset(tmp_path / "u.nc")["DUEXTTAU"].values
    np.testing.assert_array_equal(on_disk, sequential.values)


def test_antithetic_pairs_as_units_equal_the_sequential_run(trained_run, tmp_path):
    """With antithetic members each unit holds one pair (partners are widened around their
    pair mean together); the assembled ensemble is the sequential one bit for bit."""
    cfg = dataclasses.replace(FAST, members=4, antithetic=True)
    seq = sample(run=trained_run, start=START, end=END, cfg=cfg, model="ddpm", progress=False)["DUEXTTAU"]
    ds = sample_distributed(unit_sampler=sample, run=trained_run, start=START, end=END, out=tmp_path / "p.nc", cfg=cfg,
                            model="ddpm", progress=False)["DUEXTTAU"]
    assert list(ds.member.values) == [0, 1, 2, 3]
    np.testing.assert_array_equal(ds.values, seq.values)


def _in_threads(n, fn):
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_equality_matrix_in_process_and_workers_by_threads(trained_run, tmp_path):
    """{in-process, 1 worker, 2 workers} x {1, 2} threads: one ensemble, bit for bit."""
    pytest.importorskip("distributed")
    import torch
    cfg = dataclasses.replace(FAST, members=2)
    threads = torch.get_num_threads()
    got = {}
    for t in (1, 2):
        got["in-process", t] = _in_threads(t, lambda: sample(
            run=trained_run, start=START, end=END, cfg=cfg, model="ddpm", progress=False)["DUEXTTAU"].values)
        for n in (1, 2):
            got[f"{n} workers", t] = sample_distributed(
                unit_sampler=sample, run=trained_run, start=START, end=END, out=tmp_path / f"w{n}t{t}.nc",
                cfg=cfg, model="ddpm", progress=False, workers=n, threads=t)["DUEXTTAU"].values
    assert torch.get_num_threads() == threads  # this process's threads are not touched
    first = got["in-process", 1]
    for key, values in got.items():
        np.testing.assert_array_equal(values, first, err_msg=str(key))


def test_a_scheduler_started_from_another_folder(trained_run, tmp_path):
    """Workers whose working folder is elsewhere find the run, the store and the units
    (paths go to them absolute), given a relative run path here."""
    pytest.importorskip("distributed")
    import os
    import subprocess
    import sys
    import time
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = 20000 + os.getpid() % 20000
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", str(port),
                               "--dashboard-address", ":0", "--no-show"], cwd=elsewhere, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(3)
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                       f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--no-dashboard"],
                                      cwd=elsewhere, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        from dask.distributed import Client
        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
        here = os.getcwd()
        os.chdir(trained_run.parent)
        try:
            cfg = dataclasses.replace(FAST, members=2)
            ds = sample(run=trained_run.name, start=START, end=END, out=tmp_path / "x.nc", cfg=cfg,
                        model="ddpm", progress=False, scheduler=f"tcp://127.0.0.1:{port}")["DUEXTTAU"]
        finally:
            os.chdir(here)
        want = sample(run=trained_run, start=START, end=END, cfg=cfg, model="ddpm", progress=False)["DUEXTTAU"]
        np.testing.assert_array_equal(ds.values, want.values)
    finally:
        for p in procs[::-1]:
            p.terminate()
            p.wait(timeout=30)


def test_units_keep_their_worker_state(trained_run, tmp_path, monkeypatch):
    """A worker loads the run once: its second unit reuses the networks, fine days and
    projection of the first (no reload), and gives what a fresh process would."""
    import fastds.sampling.pipeline as P
    from fastds.sampling.distributed import Unit, _run_unit
    P.clear_worker_state()
    loads = []
    real = P.downscaler_for
    monkeypatch.setattr(P, "downscaler_for", lambda *a, **k: loads.append(1) or real(*a, **k))
    cfg = dataclasses.replace(FAST, members=2)
    kw = dict(sample=sample, run=str(trained_run), folder=str(tmp_path), cfg=cfg, model="ddpm",
              data=None, device="cpu", threads=None)
    units = [Unit(0, pd.Timestamp(START), pd.Timestamp(END), pd.Timestamp(START), m, 1, False) for m in (0, 1)]
    paths = [_run_unit(u, **kw) for u in units]
    assert len(loads) == 1 and len(P._WORKER_STATE) >= 3
    P.clear_worker_state()
    (tmp_path / "b").mkdir()
    again = _run_unit(units[1], **{**kw, "folder": str(tmp_path / "b")})
    np.testing.assert_array_equal(xr.open_dataset(paths[1])["DUEXTTAU"].values,
                                  xr.open_dataset(again)["DUEXTTAU"].values)
    P.clear_worker_state()


def test_units_resume_after_an_interruption(trained_run, sequential, tmp_path, monkeypatch):
    """A run killed half way (here: the 8th sampled day raises) leaves finished units and
    the finished days of the unit it was in; a re-run completes it and the assembled
    ensemble is the uninterrupted one."""
    import fastds.sampling.downscalers as P
    cfg = dataclasses.replace(FAST, members=2)
    out = tmp_path / "r.nc"
    real, calls = P.downscale_day, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(P, "downscale_day", dying)
    with pytest.raises(KeyboardInterrupt):
        sample_distributed(unit_sampler=sample, run=trained_run, start=START, end=END, out=out, cfg=cfg, model="ddpm",
                           progress=False)
    folder = tmp_path / "r.nc.units"
    assert (folder / "seg000_m000.nc").exists()                    # unit 0 finished
    assert len(list((folder / "seg000_m001.nc.parts").glob("*.npy"))) == 1  # unit 1: one day
    monkeypatch.setattr(P, "downscale_day", real)
    calls.clear()
    ds = sample_distributed(unit_sampler=sample, run=trained_run, start=START, end=END, out=out, cfg=cfg, model="ddpm",
                            progress=False)["DUEXTTAU"]
    np.testing.assert_array_equal(ds.values, sequential.values)


def test_parallel_in_time_segments(trained_run, sequential, tmp_path):
    """Segment 0 is the sequential rollout's beginning; a later segment starts cold (μ lags)
    and keeps only its days after the burn-in."""
    cfg = dataclasses.replace(FAST, members=2, segments=2, burn_in=2)
    ds = sample(run=trained_run, start=START, end=END, out=tmp_path / "s.nc", cfg=cfg, model="ddpm",
                progress=False)["DUEXTTAU"]
    assert list(pd.DatetimeIndex(ds.time.values)) == list(pd.date_range(START, END))
    np.testing.assert_array_equal(ds.values[:3], sequential.values[:3])
    assert np.isfinite(ds.values).all() and (ds.values > 0).all()
    assert not np.array_equal(ds.values[3:], sequential.values[3:])
    # a cold start is refused outside a segment: a rollout that skips days still raises
    with pytest.raises(ValueError, match="lag window"):
        sample(run=trained_run, start="2005-08-31", end="2005-08-31", cfg=FAST, model="ddpm",
               progress=False)
    with pytest.raises(ValueError, match="need --out"):
        sample(run=trained_run, start=START, end=END, cfg=cfg, model="ddpm", progress=False)
    shutil.rmtree(tmp_path, ignore_errors=True)
