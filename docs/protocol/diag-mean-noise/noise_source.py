"""Where the DDPM ensemble mean's noise arises: lenient sampling (every member reads the true
lags: no trajectory divergence) against strict (each member its own history), the same days and
16 members, DDPM and unet+iid; then the DDPM lenient without the coarse-cell projection
(sample.consistency off). Rough twin, training seed 0, fine-record days (a measurement of
sampling noise, which needs no truth; no skill is scored). Output: noise_source.txt.
Usage: python noise_source.py RUN_DIR, RUN_DIR a full-tier run: OUT/cache/rough/run-seed0"""
import sys

import pandas as pd
from _common import mean_noise, sample_log10

run = sys.argv[1]
days = pd.date_range("2006-03-20", periods=6)
cases = [(m, mode, {}) for m in ("ddpm", "unet+iid") for mode in ("lenient", "strict")]
for model, mode, settings in cases + [("ddpm", "lenient", {"consistency": False})]:
    x = sample_log10(run, days, model, mode=mode, **settings)
    label = " ".join([model, mode] + [f"{k} {v}" for k, v in settings.items()])
    print(label, "mean noise", mean_noise(x), "member var", x.var(1).mean(), flush=True)
