"""sample.quiet_mean (round 42, not shipped: apply quiet_mean.patch to aeb97fa to rerun) on
development days (2004, before the fine record; no tier reports these twins' 2004 days): the
shipped DDPM with and without the pair means' band-wise James-Stein shrinkage, the rollouts of
mean_noise.py (strict, cold-started, 16 members, seed 0), scored per day: R^2 and MSE of the
ensemble mean, fair CRPS, the pairs' calibrated variance (spread/skill) and the log bias.
Run on the rough twin from 2004-03-01 (quiet-rough.csv); stopped there, see measurements.md.
Usage: python quiet_mean.py CACHE_TWIN_DIR OUT.csv START [START...]"""
import dataclasses, sys
import numpy as np, pandas as pd, xarray as xr
from fastds.config import load_config
from fastds.metrics.ensemble import calibrated_variance
from fastds.metrics.proper import fair_crps
from fastds.sampling.pipeline import sample

tdir, out, starts = sys.argv[1], sys.argv[2], sys.argv[3:]
config = load_config("tiny", overrides=["data.seasons=[1, 2, 3, 4]", "pretrain.seed=0", "train.seed=0"])
truth = xr.open_dataset(f"{tdir}/twin/fine_truth.nc")
var = [v for v in truth.data_vars][0]
rows = []
for s in starts:
    start = pd.Timestamp(s)
    days = pd.date_range(start, periods=30)
    preds = {}
    for name, quiet in (("ddpm", False), ("quiet", True)):
        kw = {"mode": "strict", "members": 16, "burn_in": 14, "seed": 0, "quiet_mean": quiet}
        ds = sample(run=f"{tdir}/run-seed0", start=start - pd.Timedelta(days=14), end=days[-1],
                    cfg=dataclasses.replace(config.sample, **kw), model="ddpm", progress=False, cold_start=True)
        p = ds[var].sel(time=days).transpose("time", "member", "lat", "lon").values
        preds[name] = np.log10(np.maximum(p, 1e-6))
    t = np.log10(np.maximum(truth[var].sel(time=days).values, 1e-6))
    for i, day in enumerate(days):
        row = {"start": s, "time": day}
        for name, x in preds.items():
            m = x[i].mean(0)
            row[f"r2_{name}"] = np.corrcoef(m.ravel(), t[i].ravel())[0, 1] ** 2
            row[f"mse_{name}"] = ((m - t[i]) ** 2).mean()
            row[f"crps_{name}"] = float(np.nanmean(fair_crps(x[i], t[i])))
            row[f"var_{name}"] = float(calibrated_variance(x[i], pairs=True))
            row[f"bias_{name}"] = float((m - t[i]).mean())
        rows.append(row)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(s, "done", flush=True)
df = pd.DataFrame(rows)
print(df.drop(columns=["start", "time"]).mean().to_string())
