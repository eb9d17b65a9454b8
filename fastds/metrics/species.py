"""Cross-species skill: do the downscaled species co-vary as the true ones do?

Inter-species correlation maps are per-pixel Pearson correlations over time of log10 fields
(``xarray.corr``); a prediction's map is the mean over its members of each member's map (a
member is one realisation of the joint field, so its species should co-vary like the truth's;
the ensemble mean would co-vary more, being smoother). The bias of a pair is the map of the
prediction minus the truth's, averaged over pixels.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["species_correlation", "correlation_bias"]


def _log(da: xr.DataArray) -> xr.DataArray:
    return np.log10(np.maximum(da, 1e-6))


def species_correlation(fields: dict, *, dim="time") -> xr.DataArray:
    """Per-pixel correlation over ``dim`` of every pair of species, log10.

    fields : {species: DataArray (time[, member], lat, lon)} in physical units, on the same
        days and grid; with a ``member`` dim the map is the mean of the members' maps.
    Returns ``(pair, lat, lon)``, pairs named ``"A~B"`` in the order of ``fields``.
    """
    names = list(fields)
    if len(names) < 2:
        raise ValueError(f"species_correlation: needs at least two species, got {names}")
    logs = {k: _log(v) for k, v in fields.items()}
    maps = []
    for a, b in itertools.combinations(names, 2):
        r = xr.corr(logs[a], logs[b], dim=dim)
        maps.append(r.mean("member") if "member" in r.dims else r)
    return xr.concat(maps, dim=pd.Index([f"{a}~{b}" for a, b in itertools.combinations(names, 2)],
                                        name="pair"))


def correlation_bias(pred: dict, truth: dict, *, dim="time") -> pd.DataFrame:
    """Per species pair: the truth's and the prediction's pixel-mean correlation, and the bias
    (prediction − truth, pixel mean) with its pixel-mean absolute value. ``pred`` and ``truth``
    map species to DataArrays as :func:`species_correlation` takes them (same species, days
    and grid)."""
    if list(pred) != list(truth):
        raise ValueError(f"correlation_bias: species differ: {list(pred)} vs {list(truth)}")
    rp, rt = species_correlation(pred, dim=dim), species_correlation(truth, dim=dim)
    d = rp - rt
    return pd.DataFrame({"pair": rp["pair"].values,
                         "corr_truth": rt.mean(("lat", "lon")).values,
                         "corr_pred": rp.mean(("lat", "lon")).values,
                         "bias": d.mean(("lat", "lon")).values,
                         "abs_bias": np.abs(d).mean(("lat", "lon")).values})
