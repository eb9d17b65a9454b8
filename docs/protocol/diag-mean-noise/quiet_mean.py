"""sample.quiet_mean (round 42, not shipped: apply quiet_mean.patch to aeb97fa to rerun) on
development days (2004, before the fine record; no tier reports these twins' 2004 days): the
shipped DDPM with and without the pair means' band-wise James-Stein shrinkage, the rollouts of
mean_noise.py (strict, cold-started, 16 members, seed 0), scored per day: R^2 and MSE of the
ensemble mean, fair CRPS, the pairs' calibrated variance (spread/skill) and the log bias.
Run on the rough twin from 2004-03-01 (quiet-rough.csv); stopped there, see measurements.md.
Usage: python quiet_mean.py CACHE_TWIN_DIR OUT.csv START [START...]"""
import sys

import numpy as np
import pandas as pd
from _common import sample_log10, truth_log10
from fastds.metrics.ensemble import calibrated_variance
from fastds.metrics.proper import fair_crps

tdir, out, starts = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for s in starts:
    days = pd.date_range(s, periods=30)
    preds = {name: sample_log10(f"{tdir}/run-seed0", days, "ddpm", quiet_mean=quiet)
             for name, quiet in (("ddpm", False), ("quiet", True))}
    t = truth_log10(tdir, days)
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
