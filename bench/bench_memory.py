"""Memory of a long strict rollout on Area 1 (357 x 432 fine pixels): the process's resident
set size after every sampled day, printed as a curve with its slope. With ``out`` each day is
written to its part file as it finishes and only the lag window's days stay in memory, and the
NetCDF is streamed from the parts, so the RSS must not grow with the number of days; the
counterfactual (every day held, as before) would grow by one day's field per day, printed
beside it. The model is the tiny preset trained for a few steps: memory does not depend on
the weights. The Stage-A epoch's memory is ``bench_data.py::test_epoch_peak_rss``.

The baselines (``interp``, ``clim``) need no history, so with ``out`` they are computed and
written a day at a time: their peak RSS must not depend on the number of days either, where
holding the period (``out=None``) grows by a day's field per day.
"""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    from pathlib import Path
    import numpy as np, pandas as pd, xarray as xr
    from fastds.config import load_config
    from fastds.data.store import prepare
    from fastds.sampling import pipeline as pipe
    from fastds.training.stages import pretrain, train

    out, n_days = Path(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    # Area 1 on the MERRA-2 grid and the G5NR grid, log-normal values
    lat = np.arange(10.5, 38.0, 0.5); lon = -180 + 0.625 * np.arange(344, 381)
    t = pd.date_range("2005-04-01", "2005-09-30")
    v = (10 ** rng.normal(-1, 0.3, (len(t), lat.size, lon.size))).astype("float32")
    xr.Dataset({"DUEXTTAU": (("time", "lat", "lon"), v)}, coords={"time": t, "lat": lat, "lon": lon}).to_netcdf(out / "c.nc")
    flat = np.arange(10.6875, 37.6, 0.0625); flon = np.arange(34.3125, 56.6, 0.0625)
    ft = pd.date_range("2005-06-01", periods=40)
    fv = (10 ** rng.normal(-1, 0.3, (len(ft), flat.size, flon.size))).astype("float32")
    xr.Dataset({"DUEXTTAU": (("time", "lat", "lon"), fv)}, coords={"time": ft, "lat": flat, "lon": flon}).to_netcdf(out / "f.nc")
    del v, fv
    store = prepare(coarse=out / "c.nc", fine=out / "f.nc", region="area1", out=out / "s.zarr")
    cfg = load_config("tiny", overrides=["data.seasons=[3]", "pretrain.max_steps=2", "train.max_steps=2",
                                         "pretrain.epochs=1", "train.epochs=1", "train.select=loss",
                                         "train.pushforward=0", "data.max_train_patches=64"])
    pretrain(data=store, run=out / "run", config=cfg, progress=False)
    train(data=store, run=out / "run", config=cfg, model="unet", progress=False)
    train(data=store, run=out / "run", config=cfg, model="ddpm", progress=False)

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    from fastds.sampling import rollout
    curve = []
    real = rollout._write_part

    def write_and_measure(parts, day, values, signature):
        real(parts, day, values, signature)
        curve.append(rss_mb())

    rollout._write_part = write_and_measure
    start = ft[-1] + pd.Timedelta(days=1)
    c = dataclasses.replace(cfg.sample, steps=4)
    ds = pipe.sample(run=out / "run", start=start, end=start + pd.Timedelta(days=n_days - 1),
                     out=out / "roll.nc", cfg=c, progress=False)
    day_mb = flat.size * flon.size * 4 / 2 ** 20
    x = np.arange(len(curve))
    half = len(curve) // 2
    print(json.dumps({"grid": [int(flat.size), int(flon.size)], "days": len(curve),
                      "rss_mb": [round(r, 1) for r in curve],
                      "slope_mb_per_day": float(np.polyfit(x[half:], curve[half:], 1)[0]),
                      "one_day_field_mb": day_mb, "rss_after_write_mb": rss_mb(),
                      "file_days": int(ds.sizes["time"])}))
""")


@pytest.mark.slow
def test_rollout_rss_does_not_grow(tmp_path):
    """RSS after each day of a 24-day strict rollout of Area 1 (printed). The slope over the
    second half is what a long rollout would add per day."""
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "24"], capture_output=True,
                         text=True, check=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"Area-1 rollout: RSS {stats['rss_mb'][0]:.0f} MB after day 1, {stats['rss_mb'][-1]:.0f} MB "
          f"after day {stats['days']}; slope {stats['slope_mb_per_day']:+.2f} MB/day over the second half, "
          f"where holding every day would add {stats['one_day_field_mb']:.2f} MB/day "
          f"({stats['one_day_field_mb'] * 9132 / 1024:.1f} GB for 2000-2024)")
    (tmp_path / "rss.json").write_text(json.dumps(stats))
    assert stats["file_days"] == stats["days"] == 24


BASELINE_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import numpy as np, pandas as pd, xarray as xr
    from fastds.sampling.pipeline import sample

    out, model, n_days, where = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = out / "s.zarr"
    if not store.exists():
        from fastds.data.store import prepare
        rng = np.random.default_rng(0)
        lat = np.arange(10.5, 38.0, 0.5); lon = -180 + 0.625 * np.arange(344, 381)
        t = pd.date_range("2005-01-01", "2005-12-31")
        v = (10 ** rng.normal(-1, 0.3, (len(t), lat.size, lon.size))).astype("float32")
        xr.Dataset({"DUEXTTAU": (("time", "lat", "lon"), v)},
                   coords={"time": t, "lat": lat, "lon": lon}).to_netcdf(out / "c.nc")
        flat = np.arange(10.6875, 37.6, 0.0625); flon = np.arange(34.3125, 56.6, 0.0625)
        ft = pd.date_range("2005-06-01", periods=30)
        fv = (10 ** rng.normal(-1, 0.3, (len(ft), flat.size, flon.size))).astype("float32")
        xr.Dataset({"DUEXTTAU": (("time", "lat", "lon"), fv)},
                   coords={"time": ft, "lat": flat, "lon": flon}).to_netcdf(out / "f.nc")
        prepare(coarse=out / "c.nc", fine=out / "f.nc", region="area1", out=store, block=7)
        print(json.dumps({"prepared": True}))
        sys.exit(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = pd.Timestamp("2005-06-01")  # JJA, the season of the fine record
    dest = out / f"{model}_{n_days}.nc" if where == "file" else None
    ds = sample(run=out / "run", data=store, start=start, end=start + pd.Timedelta(days=n_days - 1),
                model=model, out=dest, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"days": int(ds.sizes["time"]), "peak_mb": peak, "before_mb": before,
                      "day_mb": ds["DUEXTTAU"].isel(time=0).size * 4 / 2 ** 20}))
""")


@pytest.mark.slow
def test_baseline_rss_does_not_grow(tmp_path):
    """Peak RSS of ``interp`` and ``clim`` over 20 and 90 Area-1 days (one season, so ``clim``
    has its fitted map), written to a file (day by day) and held in memory (the counterfactual),
    each in a fresh process (printed)."""
    def run(*args):
        res = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, str(tmp_path), *map(str, args)],
                             capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    run("interp", 1, "file")  # prepares the store
    rows = {}
    for model in ("interp", "clim"):
        for where in ("file", "memory"):
            short, long = run(model, 20, where), run(model, 90, where)
            assert short["days"] == 20 and long["days"] == 90
            rows[model, where] = (short["peak_mb"], long["peak_mb"], long["day_mb"])
            print(f"{model} to {where}: peak RSS {short['peak_mb']:.0f} MB over 20 days, "
                  f"{long['peak_mb']:.0f} MB over 90 ({(long['peak_mb'] - short['peak_mb']) / 70:+.2f} "
                  f"MB/day; one day's field {long['day_mb']:.2f} MB)")
    (tmp_path / "baseline_rss.json").write_text(json.dumps({f"{m}/{w}": v for (m, w), v in rows.items()}))
    for model in ("interp", "clim"):
        short, long, day_mb = rows[model, "file"]
        # written day by day: 70 more days must not add a quarter of their fields
        assert long - short < 0.25 * 70 * day_mb, (model, short, long)
