"""Scale-out of a long strict reconstruction on dask.distributed (slow; run with `make bench`).

A year (2007) of the twin region, strict rollout, U-Net (the deterministic mean; a DDPM
day costs ~40x more, the scaling is the same), cut into ``SEGMENTS`` parallel-in-time
segments with a burn-in, on a LocalCluster of 1 and of 2 single-threaded workers. Reports
days per hour for each and their ratio; then kills a worker in the middle of a 2-worker run
and checks that the run still completes, resumed, with the same result. Memory: each
worker's peak RSS is read back from the workers and recorded in ``extra_info``.
"""
import dataclasses
import os
import threading
import time

import numpy as np
import pandas as pd
import pytest

from fastds.config import load_config
from fastds.data.store import prepare
from fastds.data.synthetic import TwinSpec, write_twin
from fastds.sampling.pipeline import sample
from fastds.training.stages import pretrain, train

SEGMENTS = 4
START, END = "2007-01-01", "2007-12-31"


@pytest.fixture(scope="module")
def run_all_seasons(tmp_path_factory):
    """A tiny run trained briefly for every season (throughput, not skill, is measured)."""
    out = tmp_path_factory.mktemp("scaleout")
    spec = TwinSpec(coarse_start="2005-06-01", coarse_end="2007-12-31",
                    fine_start="2005-10-01", fine_end="2006-12-31")
    write_twin(out / "twin", spec, native_days=0)
    store = prepare(coarse=out / "twin/coarse_daily.nc", fine=out / "twin/fine_daily.nc",
                    elevation=out / "twin/elevation.nc", region="24,28,44,49", out=out / "s.zarr")
    cfg = load_config("tiny", overrides=["pretrain.epochs=1", "train.epochs=1",
                                         "data.max_train_patches=512"])
    pretrain(data=store, run=out / "run", config=cfg, progress=False)
    train(data=store, run=out / "run", config=cfg, model="unet", progress=False)
    return out, cfg


def _peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_year_on_workers(benchmark, record, run_all_seasons, workers):
    out, cfg = run_all_seasons
    c = dataclasses.replace(cfg.sample, mode="strict", segments=SEGMENTS, burn_in=7)
    benchmark.group = f"1-year strict reconstruction, U-Net, {SEGMENTS} segments, dask workers"
    path = out / f"year_w{workers}.nc"

    def fn():
        if path.exists():
            path.unlink()
        return sample(run=out / "run", start=START, end=END, out=path, cfg=c, model="unet",
                      progress=False, workers=workers)
    ds = benchmark.pedantic(fn, rounds=1, iterations=1)
    assert ds.sizes["time"] == 365
    record(benchmark, benchmark.group, f"workers_{workers}", items=365, unit="days")
    if benchmark.stats:
        benchmark.extra_info["days_per_hour"] = 365 * 3600 / benchmark.stats.stats.median


@pytest.mark.slow
def test_killed_worker_resumes(run_all_seasons):
    from dask.distributed import Client, LocalCluster
    out, cfg = run_all_seasons
    c = dataclasses.replace(cfg.sample, mode="strict", segments=SEGMENTS, burn_in=7)
    want = sample(run=out / "run", start=START, end=END, out=out / "ref.nc", cfg=c, model="unet",
                  progress=False, workers=2)["DUEXTTAU"].values
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    result = {}

    def go():
        result["ds"] = sample(run=out / "run", start=START, end=END, out=out / "killed.nc", cfg=c,
                              model="unet", progress=False, scheduler=cluster.scheduler_address)
    th = threading.Thread(target=go)
    th.start()
    parts = out / "killed.nc.units"
    t0 = time.time()
    while not any(parts.glob("*.parts/*.npy")) and time.time() - t0 < 300:
        time.sleep(0.2)
    victim = next(iter(client.scheduler_info()["workers"]))
    try:  # the nanny restarts it and dask re-runs its unit, which resumes from its parts
        client.run(lambda: os._exit(1), workers=[victim])
    except Exception:  # noqa: BLE001 - the worker dies mid-call, so the call itself fails
        pass
    th.join(600)
    rss = client.run(_peak_rss_mb)
    client.close()
    cluster.close()
    assert "ds" in result, "the run did not complete after a worker was killed"
    np.testing.assert_array_equal(result["ds"]["DUEXTTAU"].values, want)
    print("peak RSS per worker (MB):", rss)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "ddpm"])
def test_fixed_cost_per_unit(benchmark, run_all_seasons, tmp_path, model):
    """Fixed seconds per distributed unit (everything but sampling its days) against an
    in-process request's start-up: a fresh ``sample`` of one day (load the run, the fine
    days, fit the projection) and a worker's second unit (``worker=True``: that state kept
    from its first unit), each minus the time spent inside the downscaler's days. Target:
    the unit's fixed cost at most 0.2 of the start-up."""
    import fastds.sampling.downscalers as D
    import fastds.sampling.pipeline as P
    from fastds.sampling.distributed import Unit, _run_unit
    out, cfg = run_all_seasons
    if model == "ddpm":
        train(data=out / "s.zarr", run=out / "run", config=cfg, model="ddpm", season=1, resume=True,
              progress=False)
    inside = []
    real = D.Network.day

    def timed(self, ctx):
        t = time.perf_counter()
        try:
            return real(self, ctx)
        finally:
            inside.append(time.perf_counter() - t)
    D.Network.day = timed
    c = dataclasses.replace(cfg.sample, mode="strict", members=2)
    day = "2007-01-10"
    try:
        P.clear_worker_state()
        t0 = time.perf_counter()
        sample(run=out / "run", start=day, end=day, cfg=c, model=model, progress=False, cold_start=True)
        startup = time.perf_counter() - t0 - sum(inside)
        inside.clear()
        kw = dict(sample=sample, run=str(out / "run"), folder=str(tmp_path), cfg=c, model=model,
                  data=None, device="cpu", threads=None)
        one = pd.Timestamp(day)
        _run_unit(Unit(0, one, one, one, 0, 1, True), **kw)   # the worker's first unit
        inside.clear()
        t0 = time.perf_counter()
        _run_unit(Unit(0, one, one, one, 1, 1, True), **kw)   # its second: the state is kept
        unit = time.perf_counter() - t0 - sum(inside)
    finally:
        D.Network.day = real
        P.clear_worker_state()
    benchmark.group = f"fixed cost per distributed unit, {model}"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"startup_s": startup, "unit_fixed_s": unit, "ratio": unit / startup})
    print(f"{model}: in-process start-up {startup:.2f} s, a worker's unit {unit:.3f} s "
          f"(ratio {unit / startup:.3f}; target <= 0.2)")
