"""Where the DDPM ensemble mean's noise arises: lenient sampling (every member reads the true
lags: no trajectory divergence) against strict (each member its own history), the same days and
16 members, DDPM and unet+iid. Rough twin, training seed 0, fine-record days (a measurement of
sampling noise, which needs no truth; no skill is scored). Output: noise_source.txt.
Usage: python noise_source.py RUN_DIR"""
import dataclasses, sys
import numpy as np, pandas as pd
from fastds.config import load_config
from fastds.sampling.pipeline import sample
config = load_config("tiny", overrides=["data.seasons=[1, 2, 3, 4]", "pretrain.seed=0", "train.seed=0"])
run = sys.argv[1]  # a full-tier run: OUT/cache/rough/run-seed0
days = pd.date_range("2006-03-20", periods=6)
for model in ("ddpm", "unet+iid"):
    for mode in ("lenient", "strict"):
        kw = dict(mode=mode, members=16, seed=0, burn_in=14)
        start = days[0] - (pd.Timedelta(days=14) if mode == "strict" else pd.Timedelta(0))
        ds = sample(run=run, start=start, end=days[-1], cfg=dataclasses.replace(config.sample, **kw), model=model,
                    progress=False, cold_start=mode == "strict")
        v = [x for x in ds.data_vars][0]
        x = np.log10(np.maximum(ds[v].sel(time=days).transpose("time", "member", "lat", "lon").values, 1e-6))
        pm = 0.5 * (x[:, 0::2] + x[:, 1::2])
        print(model, mode, "mean noise", pm.var(1, ddof=1).mean() / 8, "member var", x.var(1).mean(), flush=True)
