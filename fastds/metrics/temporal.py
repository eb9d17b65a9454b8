"""Temporal statistics: ACF/PACF of the region-mean series and lag-k image curves."""
from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["acf_pacf", "lag_curves"]


def acf_pacf(field: xr.DataArray, *, nlags=30, space="log10"):
    """ACF and PACF (statsmodels) of the region-mean daily series of ``field`` (time, lat, lon).

    Returns (acf (nlags+1,), pacf (nlags+1,)); nlags is capped at len(series)//2 - 1.
    """
    from statsmodels.tsa.stattools import acf, pacf
    v = field.values.astype(float)
    if space == "log10":
        v = np.log10(np.maximum(v, 1e-6))
    series = np.nanmean(v.reshape(v.shape[0], -1), axis=1)
    n = min(nlags, len(series) // 2 - 1)
    if n < 1:
        raise ValueError(f"acf_pacf: {len(series)} days are too few for lags")
    return acf(series, nlags=n, fft=True), pacf(series, nlags=n, method="ywadjusted")


def lag_curves(field: xr.DataArray, *, kmax=10, space="log10"):
    """Image-wise RMSE and squared Pearson R² between day t and day t-k, averaged over t, for
    k = 1..kmax: a physically consistent model reproduces the truth's curves.

    field (time, lat, lon), consecutive days. Returns dict k (kmax,), rmse (kmax,), r2 (kmax,).
    """
    v = field.transpose("time", ...).values.astype(float)
    if space == "log10":
        v = np.log10(np.maximum(v, 1e-6))
    v = v.reshape(v.shape[0], -1)
    ks = np.arange(1, min(kmax, v.shape[0] - 1) + 1)
    rmse, r2 = [], []
    for k in ks:
        a, b = v[k:], v[:-k]
        ok = np.isfinite(a) & np.isfinite(b)
        rm, rr = [], []
        for i in range(a.shape[0]):
            x, y = a[i][ok[i]], b[i][ok[i]]
            rm.append(np.sqrt(np.mean((x - y) ** 2)))
            rr.append(np.corrcoef(x, y)[0, 1] ** 2 if x.std() > 0 and y.std() > 0 else np.nan)
        rmse.append(np.mean(rm))
        r2.append(np.nanmean(rr))
    return {"k": ks, "rmse": np.array(rmse), "r2": np.array(r2)}
