"""Where the DDPM's ensemble-mean R^2 gap comes from: finite-ensemble noise in the pair means,
or its conditional mean itself. A diagnostic on development days (2004, before the fine record;
no tier reports these twins' 2004 days), not a design choice. R^2 and MSE of the ensemble mean
as ``metrics.proper.day_scores_ensemble`` defines r2_mean; the rollouts sampled as
``protocol._sample_rollout`` samples one.
Usage: python mean_noise.py CACHE_TWIN_DIR OUT.csv START [START...], CACHE_TWIN_DIR a full-tier
twin's cache (`fastds benchmark --tier full --out OUT --twin T --seed 0`: OUT/cache/T); here the
rough and smooth twins, starts 2004-03-01, 2004-07-01, 2004-10-15."""
import sys

import numpy as np
import pandas as pd
from _common import mean_noise, pair_means, sample_log10, truth_log10

tdir, out, starts = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for s in starts:
    days = pd.date_range(s, periods=30)
    preds = {m: sample_log10(f"{tdir}/run-seed0", days, m, members=1 if m == "unet" else 16)
             for m in ("ddpm", "unet", "unet+iid")}
    t = truth_log10(tdir, days)
    for i, day in enumerate(days):
        row = {"start": s, "time": day}
        for model, x in preds.items():
            m = x[i].mean(0)
            row[f"r2_{model}"] = np.corrcoef(m.ravel(), t[i].ravel())[0, 1] ** 2
            row[f"mse_{model}"] = ((m - t[i]) ** 2).mean()
            if model != "unet":
                noise = mean_noise(x[i])
                row[f"meannoise_{model}"] = noise
                row[f"mse_inf_{model}"] = row[f"mse_{model}"] - noise  # infinite-ensemble estimate
                # R^2 of the ensemble mean with half the pairs: how R^2 moves with ensemble size
                pm = pair_means(x[i])
                mh = pm[: pm.shape[0] // 2].mean(0)
                row[f"r2_half_{model}"] = np.corrcoef(mh.ravel(), t[i].ravel())[0, 1] ** 2
        rows.append(row)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(s, "done", flush=True)
df = pd.DataFrame(rows)
print(df.drop(columns=["start", "time"]).mean().to_string())
