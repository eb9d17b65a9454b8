"""Where the DDPM's ensemble-mean R^2 gap comes from: finite-ensemble noise in the pair means,
or its conditional mean itself. A diagnostic on development days (2004, before the fine record;
no tier reports these twins' 2004 days), not a design choice. R^2 and MSE of the ensemble mean
as ``metrics.proper.day_scores_ensemble`` defines r2_mean; the rollout sampled as
``protocol._sample_rollout`` samples one.
Usage: python mean_noise.py CACHE_TWIN_DIR OUT.csv START [START...], CACHE_TWIN_DIR a full-tier
twin's cache (`fastds benchmark --tier full --out OUT --twin T --seed 0`: OUT/cache/T); here the
rough and smooth twins, starts 2004-03-01, 2004-07-01, 2004-10-15."""
import dataclasses, sys
import numpy as np, pandas as pd, xarray as xr
from fastds.config import load_config
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
    for model in ("ddpm", "unet", "unet+iid"):
        ens = model != "unet"
        kw = {"mode": "strict", "members": 16 if ens else 1, "burn_in": 14, "seed": 0}
        ds = sample(run=f"{tdir}/run-seed0", start=start - pd.Timedelta(days=14), end=days[-1],
                    cfg=dataclasses.replace(config.sample, **kw), model=model, progress=False, cold_start=True)
        p = ds[var].sel(time=days)
        if "member" not in p.dims:
            p = p.expand_dims(member=1, axis=1)
        preds[model] = np.log10(np.maximum(p.transpose("time", "member", "lat", "lon").values, 1e-6))
    t = np.log10(np.maximum(truth[var].sel(time=days).values, 1e-6))
    for i, day in enumerate(days):
        row = {"start": s, "time": day}
        for model, x in preds.items():
            m = x[i].mean(0)
            row[f"r2_{model}"] = np.corrcoef(m.ravel(), t[i].ravel())[0, 1] ** 2
            row[f"mse_{model}"] = ((m - t[i]) ** 2).mean()
            if model != "unet":
                pm = 0.5 * (x[i][0::2] + x[i][1::2])            # pair means (antithetic pairs)
                npair = pm.shape[0]
                noise = pm.var(0, ddof=1).mean() / npair           # variance of the mean of the pair means
                row[f"meannoise_{model}"] = noise
                row[f"mse_inf_{model}"] = row[f"mse_{model}"] - noise  # infinite-ensemble estimate
                # R^2 of the ensemble mean with half the pairs: how R^2 moves with ensemble size
                mh = pm[: npair // 2].mean(0)
                row[f"r2_half_{model}"] = np.corrcoef(mh.ravel(), t[i].ravel())[0, 1] ** 2
        rows.append(row)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(s, "done", flush=True)
df = pd.DataFrame(rows)
print(df.drop(columns=["start", "time"]).mean().to_string())
