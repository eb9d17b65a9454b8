"""Ensemble scores for predictions with a ``member`` dim."""
from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["crps", "spread_skill", "calibrated_variance", "rank_histogram", "antithetic_pairs"]


def _arrays(pred: xr.DataArray, truth: xr.DataArray, space):
    pred, truth = xr.align(pred, truth, join="inner", exclude=["member"])
    p = pred.transpose("time", "member", ...).values.astype(float)
    t = truth.transpose("time", ...).values.astype(float)
    if space == "log10":
        p, t = np.log10(np.maximum(p, 1e-6)), np.log10(np.maximum(t, 1e-6))
    return p.reshape(p.shape[0], p.shape[1], -1), t.reshape(t.shape[0], -1)


def pairable(members: int) -> bool:
    """The one rule for scoring members as antithetic pairs: an even number, at least 4 (the
    even and the odd members then each hold two or more independent ones)."""
    return members >= 4 and members % 2 == 0


def check_pairs(members: int, what: str) -> None:
    """A ValueError naming ``what`` unless ``members`` members can be scored as pairs."""
    if not pairable(members):
        raise ValueError(f"{what}: pairs=True needs an even number of members >= 4, got {members}")


def antithetic_pairs(pred: xr.DataArray) -> bool:
    """Whether an output's members are scored as antithetic pairs: it carries the sample's
    ``antithetic`` flag and a number of members that is :func:`pairable` (member, ...)."""
    return bool(pred.attrs.get("antithetic", 0)) and pairable(pred.sizes.get("member", 1))


def crps(pred, truth, *, space="log10", pairs=False):
    """Mean CRPS per day of an ensemble (time, member, lat, lon) against truth (time, lat, lon):
    E|X - y| - E|X - X'|/2 with the empirical ensemble distribution. Returns (time,).

    ``pairs``: members (0, 1), (2, 3), ... are antithetic pairs (``sample.antithetic``); their
    within-pair distances are left out of E|X - X'| (the pairs' negative correlation widens
    them), which is estimated from the independent cross-pair distances and scaled as the
    empirical estimator scales it ((M-1)/M), so the score means what it means for M
    independent members."""
    p, t = _arrays(pred, truth, space)
    M = p.shape[1]
    term1 = np.abs(p - t[:, None]).mean(1)
    s = np.sort(p, axis=1)
    i = np.arange(1, M + 1)[None, :, None]
    total = (2 * (2 * i - M - 1) * s).sum(1)  # sum over ordered pairs of |x_i - x_j|
    if not pairs:
        return np.nanmean(term1 - total / (M * M) / 2, axis=1)
    check_pairs(M, "crps")
    within = 2 * np.abs(p[:, 0::2] - p[:, 1::2]).sum(1)
    cross = (total - within) / (M * (M - 2))
    return np.nanmean(term1 - (M - 1) / M * cross / 2, axis=1)


def spread_skill(pred, truth, *, space="log10", pairs=False):
    """Spread/skill ratio: the RMSE a calibrated ensemble's mean would have, over the RMSE of
    the ensemble mean (1 for a calibrated ensemble).

    Independent members (``pairs=False``): sqrt((M+1)/M · mean ensemble variance).
    Antithetic pairs (``pairs=True``; members (0, 1), (2, 3), ... negatively correlated, see
    ``sample.antithetic``): the members' variance σ² comes from within the even and within the
    odd members (each set independent), and the mean's own sampling error from the K = M/2
    pair means (independent): sqrt(σ² + var(pair means)/K). With independent members the two
    agree in expectation; with pairs, the (M+1)/M form would credit the pairs' negative
    correlation to calibration (it overstates the spread by about sqrt(1 + 1/(M-1)))."""
    p, t = _arrays(pred, truth, space)
    skill = np.sqrt(np.nanmean((p.mean(1) - t) ** 2))
    return np.sqrt(calibrated_variance(p, pairs=pairs, axis=1)) / skill


def calibrated_variance(p, *, pairs=False, axis=0):
    """The squared error a calibrated ensemble's mean would have, averaged over everything
    but the member ``axis`` of ``p`` (numpy): (M+1)/M · mean variance for independent members;
    for antithetic pairs (see :func:`spread_skill`) the within-set variance plus the pair
    means' variance over K = M/2."""
    p = np.moveaxis(np.asarray(p), axis, 0)
    M = p.shape[0]
    if not pairs:
        return (M + 1) / M * np.nanmean(p.var(0, ddof=1))
    check_pairs(M, "spread_skill")
    var = 0.5 * (p[0::2].var(0, ddof=1) + p[1::2].var(0, ddof=1))
    pm = 0.5 * (p[0::2] + p[1::2])
    return np.nanmean(var) + np.nanmean(pm.var(0, ddof=1)) / (M // 2)


def rank_histogram(pred, truth, *, space="log10"):
    """Counts (M+1,) of the truth's rank among the members (ties broken at random)."""
    p, t = _arrays(pred, truth, space)
    rng = np.random.default_rng(0)
    below = (p < t[:, None]).sum(1)
    ties = (p == t[:, None]).sum(1)
    rank = below + np.floor(rng.random(below.shape) * (ties + 1)).astype(int)
    return np.bincount(rank.ravel(), minlength=p.shape[1] + 1)
