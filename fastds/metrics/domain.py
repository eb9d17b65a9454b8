"""Domain similarity (METHOD.md §3): Wasserstein distance between normalised X and Y."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..data.regions import season_name, season_of

__all__ = ["wasserstein_by_day", "summarize_wasserstein"]


def wasserstein_by_day(x_norm, y_norm, times) -> pd.Series:
    """Per-day 1-D Wasserstein distance (scipy) between the normalised coarse and fine values.

    x_norm (time, h, w), y_norm (time, H, W) for the same days ``times``; NaN ignored.
    """
    from scipy.stats import wasserstein_distance
    out = []
    for a, b in zip(np.asarray(x_norm), np.asarray(y_norm)):
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        out.append(wasserstein_distance(a, b) if a.size and b.size else np.nan)
    return pd.Series(out, index=pd.DatetimeIndex(times, name="time"), name="wasserstein")


def summarize_wasserstein(series: pd.Series, area="area") -> pd.DataFrame:
    s = season_of(series.index.month)
    return pd.DataFrame([{"area": area, "season": season_name(k), "days": int((s == k).sum()),
                          "wasserstein_mean": series[s == k].mean(),
                          "wasserstein_sd": series[s == k].std(ddof=1)} for k in sorted(set(s))])
