"""The DDPM ensemble mean's noise without the coarse-cell projection (sample.consistency off),
lenient, the days of noise_source.py. Output: the last line of noise_source.txt.
Usage: python noise_projection.py RUN_DIR"""
import dataclasses, sys
import numpy as np, pandas as pd
from fastds.config import load_config
from fastds.sampling.pipeline import sample
config = load_config("tiny", overrides=["data.seasons=[1, 2, 3, 4]", "pretrain.seed=0", "train.seed=0"])
run = sys.argv[1]  # a full-tier run: OUT/cache/rough/run-seed0
days = pd.date_range("2006-03-20", periods=6)
kw = dict(mode="lenient", members=16, seed=0, consistency=False)
ds = sample(run=run, start=days[0], end=days[-1], cfg=dataclasses.replace(config.sample, **kw), model="ddpm",
            progress=False)
v = [x for x in ds.data_vars][0]
x = np.log10(np.maximum(ds[v].transpose("time", "member", "lat", "lon").values, 1e-6))
pm = 0.5 * (x[:, 0::2] + x[:, 1::2])
print("ddpm lenient consistency False mean noise", pm.var(1, ddof=1).mean() / 8, "member var", x.var(1).mean())
