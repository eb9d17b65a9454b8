"""Per-day skill and its mean(sd) summary per season x area (METHOD.md §7)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..data.regions import season_name, season_of

__all__ = ["day_scores", "summarize", "SCORES"]

SCORES = ("r2", "r2_nse", "rmse", "mae", "bias")


def _space(da, space):
    if space == "log10":
        return np.log10(np.maximum(da, 1e-6))
    if space == "physical":
        return da
    raise ValueError(f"space must be 'log10' or 'physical', got {space!r}")


def day_scores(pred: xr.DataArray, truth: xr.DataArray, *, space="log10") -> pd.DataFrame:
    """Scores of each day, computed over the pixels valid in both.

    pred, truth : (time, lat, lon), physical units, same grid (with a ``member`` dim the
    members' mean *in the scored space* is scored: in log10, their geometric mean, the point
    forecast a log-space score rewards; the arithmetic mean of lognormal-like members sits
    above it by a spread-dependent amount). Columns: r2 (squared Pearson correlation, the
    paper's), r2_nse (1 - SSE/SST), rmse, mae, bias (pred - truth); ``space`` is ``"log10"``
    (the paper) or ``"physical"``. Index: the days in both inputs.
    """
    pred, truth = xr.align(pred, truth, join="inner")
    if pred.sizes["time"] == 0:
        raise ValueError("day_scores: prediction and truth share no day")
    if "member" in pred.dims:
        p = _space(pred.transpose("time", "member", "lat", "lon").values.astype(np.float64), space).mean(1)
    else:
        p = _space(pred.transpose("time", "lat", "lon").values.astype(np.float64), space)
    t = _space(truth.transpose("time", "lat", "lon").values.astype(np.float64), space)
    rows = []
    for i in range(p.shape[0]):
        ok = np.isfinite(p[i]) & np.isfinite(t[i])
        a, b = p[i][ok], t[i][ok]
        err = a - b
        sst = np.sum((b - b.mean()) ** 2)
        r = np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else np.nan
        rows.append({"r2": r ** 2, "r2_nse": 1 - np.sum(err ** 2) / sst if sst > 0 else np.nan,
                     "rmse": np.sqrt(np.mean(err ** 2)), "mae": np.mean(np.abs(err)), "bias": err.mean()})
    return pd.DataFrame(rows, index=pd.DatetimeIndex(pred.time.values, name="time"))


def summarize(scores: pd.DataFrame, *, area="area", model="model") -> pd.DataFrame:
    """Mean and sd over days per season: rows (model, area, season), columns
    ``{score}_mean``, ``{score}_sd`` and ``days``."""
    seasons = season_of(scores.index.month)
    out = []
    for s in sorted(set(seasons)):
        sub = scores[seasons == s]
        row = {"model": model, "area": area, "season": season_name(s), "days": len(sub)}
        for c in scores.columns:
            row[f"{c}_mean"] = sub[c].mean()
            row[f"{c}_sd"] = sub[c].std(ddof=1) if len(sub) > 1 else 0.0
        out.append(row)
    return pd.DataFrame(out)
