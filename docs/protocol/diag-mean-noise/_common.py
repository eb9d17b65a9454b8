"""What this folder's diagnostic scripts share: the config the full tier trains with (every
season, seed 0), one run sampled as log10 AOD, and the noise of an ensemble's mean."""
import dataclasses

import numpy as np
import pandas as pd
import xarray as xr
from fastds.config import load_config
from fastds.sampling.pipeline import sample

CONFIG = load_config("tiny", overrides=["data.seasons=[1, 2, 3, 4]", "pretrain.seed=0", "train.seed=0"])
BURN_IN = 14  # the full tier's


def sample_log10(run, days, model, *, mode="strict", members=16, **settings):
    """``model``'s (time, member, lat, lon) log10 AOD on ``days``, seed 0. A strict run is
    cold-started ``BURN_IN`` days before ``days[0]`` (as ``protocol._sample_rollout`` samples a
    rollout); a lenient one reads the true lags. ``settings``: further ``sample`` settings."""
    kw = dict(mode=mode, members=members, burn_in=BURN_IN, seed=0, **settings)
    strict = mode == "strict"
    ds = sample(run=run, start=days[0] - pd.Timedelta(days=BURN_IN if strict else 0), end=days[-1],
                cfg=dataclasses.replace(CONFIG.sample, **kw), model=model, progress=False, cold_start=strict)
    p = ds[list(ds.data_vars)[0]].sel(time=days)
    if "member" not in p.dims:
        p = p.expand_dims(member=1, axis=1)
    return np.log10(np.maximum(p.transpose("time", "member", "lat", "lon").values, 1e-6))


def truth_log10(twin_dir, days):
    """The twin's (time, lat, lon) fine truth on ``days``, log10; ``twin_dir``: OUT/cache/TWIN."""
    truth = xr.open_dataset(f"{twin_dir}/twin/fine_truth.nc")
    return np.log10(np.maximum(truth[list(truth.data_vars)[0]].sel(time=days).values, 1e-6))


def pair_means(x):
    """The antithetic pairs' means of ``x`` (..., member, lat, lon), pairs adjacent: (..., member/2, lat, lon)."""
    return 0.5 * (x[..., 0::2, :, :] + x[..., 1::2, :, :])


def mean_noise(x):
    """The variance of the ensemble mean from its pairs' scatter, pooled over pixels (and days):
    the pair means' variance / their count; ``x`` (..., member, lat, lon)."""
    pm = pair_means(x)
    return pm.var(-3, ddof=1).mean() / pm.shape[-3]
