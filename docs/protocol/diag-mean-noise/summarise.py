"""Summary of mean_noise.py's CSVs: each R² and MSE, and the DDPM − U-Net / null differences with
moving-block intervals (the protocol's block_bootstrap_ci). R² at infinitely many members is
extrapolated from 8 and 16 (the mean's noise falls as 1/members): 2·R²(16) − R²(8).
Usage: python summarise.py rough.csv smooth.csv"""
import sys, numpy as np, pandas as pd
from fastds.protocol import block_bootstrap_ci
for f in sys.argv[1:]:
    d = pd.read_csv(f)
    d["r2_inf_ddpm"] = 2 * d.r2_ddpm - d.r2_half_ddpm
    d["r2_inf_iid"] = 2 * d["r2_unet+iid"] - d["r2_half_unet+iid"]
    print(f, len(d), "days")
    print(d[["r2_ddpm", "r2_half_ddpm", "r2_inf_ddpm", "r2_unet", "r2_unet+iid", "r2_inf_iid", "mse_ddpm",
             "mse_inf_ddpm", "meannoise_ddpm", "mse_unet+iid", "meannoise_unet+iid"]].mean().round(5).to_string())
    for a, b in (("r2_ddpm", "r2_unet"), ("r2_inf_ddpm", "r2_unet"), ("r2_ddpm", "r2_unet+iid"),
                 ("r2_inf_ddpm", "r2_inf_iid"), ("mse_ddpm", "mse_unet+iid"), ("mse_inf_ddpm", "mse_inf_unet+iid")):
        x = (d[a] - d[b]).values
        print(f"{a} - {b}: {x.mean():+.5f}", block_bootstrap_ci(x, d.start.values, block=7, reps=4000))
