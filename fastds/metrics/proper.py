"""Proper scores of ensembles, computed by verification libraries, not re-derived here.

``scoringrules`` (Zamo & Naveau's fair CRPS, the energy and variogram scores, the
threshold-weighted CRPS, the Brier score) and ``scores`` (the fractions skill score) do the
scoring; this module only chooses the fields they score: log10 AOD, pooled to 1, 4 and 16
pixels and to the coarse cell, and the exceedance thresholds. ``day_scores_ensemble`` gives
every score of one day; ``power_spectrum_ratio`` and ``spread_error_by_bin`` are the two
diagnostics the libraries do not have (one FFT each, on the project's own radial spectrum).

Every array argument states its shape: ensembles are (M, H, W) (members first), truths
(H, W); "fair" estimators are unbiased for the ensemble's distribution (Ferro 2014), so
scores of ensembles of different sizes compare.
"""
from __future__ import annotations

import numpy as np

__all__ = ["pool", "pool_cells", "fair_crps", "energy_score", "variogram_score", "tw_crps",
           "brier", "fss", "fss_ensemble", "power_spectrum_ratio", "ralsd", "spread_error_by_bin",
           "independent_sets", "day_scores_ensemble", "VARIOGRAM_PIXELS"]

VARIOGRAM_PIXELS = 800  # the variogram score is O(M·D²): unpooled fields use this many pixels


def pool(field, k: int):
    """Block means of k×k pixels: (..., H, W) -> (..., H//k, W//k) (the remainder rows and
    columns at the far edges are dropped)."""
    if k == 1:
        return field
    H, W = field.shape[-2] // k * k, field.shape[-1] // k * k
    f = field[..., :H, :W]
    return f.reshape(f.shape[:-2] + (H // k, k, W // k, k)).mean(axis=(-3, -1))


def pool_cells(field, iy, ix):
    """Means over coarse cells: (..., H, W) -> (..., n_cells) with ``iy`` (H,) and ``ix``
    (W,) the coarse row and column of every fine row and column."""
    iy, ix = np.asarray(iy), np.asarray(ix)
    ny, nx = int(iy.max()) + 1, int(ix.max()) + 1
    cell = (iy[:, None] * nx + ix[None, :]).ravel()
    counts = np.bincount(cell, minlength=ny * nx)
    keep = counts > 0
    flat = np.asarray(field, float).reshape((-1, cell.size))
    sums = np.stack([np.bincount(cell, weights=row, minlength=ny * nx) for row in flat])
    return (sums[:, keep] / counts[keep]).reshape(field.shape[:-2] + (int(keep.sum()),))


def _estimator(ens, axis):
    """"fair" for ensembles; a single member (a deterministic forecast) has no spread term,
    and its CRPS/energy score is the plain distance the ordinary estimator gives."""
    return "fair" if ens.shape[axis] > 1 else "nrg"


def fair_crps(ens, obs):
    """Fair CRPS per point: ens (M, ...) against obs (...) -> (...); M = 1: the MAE."""
    import scoringrules as sr
    return np.asarray(sr.crps_ensemble(obs, ens, m_axis=0, estimator=_estimator(ens, 0)))


def energy_score(ens, obs):
    """Fair energy score of a multivariate ensemble: ens (M, D), obs (D,) -> float
    (M = 1: the Euclidean distance)."""
    import scoringrules as sr
    return float(sr.es_ensemble(obs, ens, m_axis=-2, v_axis=-1, estimator=_estimator(ens, -2)))


def variogram_score(ens, obs, *, p=0.5):
    """Variogram score of order p (Scheuerer & Hamill 2015), unweighted: ens (M, D),
    obs (D,) -> float."""
    import scoringrules as sr
    return float(sr.vs_ensemble(obs, ens, m_axis=-2, v_axis=-1, p=p))


def tw_crps(ens, obs, threshold):
    """Threshold-weighted CRPS (weight 1{z > threshold}, chaining v(z) = max(z, threshold)),
    fair estimator, per point: ens (M, ...), obs (...) -> (...)."""
    import scoringrules as sr
    return np.asarray(sr.twcrps_ensemble(obs, ens, a=threshold, m_axis=0, estimator=_estimator(ens, 0)))


def brier(ens, obs, threshold):
    """Brier score of the exceedance z > threshold, the ensemble's fraction as probability,
    per point: ens (M, ...), obs (...) -> (...)."""
    import scoringrules as sr
    return np.asarray(sr.brier_score((obs > threshold).astype(float), (ens > threshold).mean(axis=0)))


def fss(field, obs, threshold, window):
    """Fractions skill score of the exceedance ``> threshold`` in ``window``×``window``
    neighbourhoods (``scores``): field, obs (H, W) -> float in [0, 1] (nan when neither
    exceeds anywhere)."""
    import scores.spatial as ss
    return float(ss.fss_2d_single_field(np.asarray(field, float), np.asarray(obs, float),
                                        event_threshold=float(threshold), window_size=(window, window)))


def fss_ensemble(ens, obs, threshold, window):
    """Ensemble fractions skill score (Schwartz et al. 2010): the forecast's fraction in each
    ``window``×``window`` neighbourhood is the members' mean fraction, i.e. the fraction of
    their exceedance probability field, scored by ``scores``' FSS against the truth's event
    field. ens (M, H, W), obs (H, W) -> float in [0, 1] (nan when neither exceeds anywhere);
    M = 1 is :func:`fss`. Unlike the FSS of one member, a textured ensemble pays no double
    penalty for a plume edge the members place differently: their disagreement spreads the
    probability, as it does for the truth's own uncertainty."""
    import scores.spatial as ss
    from scores.utils import left_identity_operator
    prob = (np.asarray(ens, float) > threshold).mean(axis=0)
    event = (np.asarray(obs, float) > threshold).astype(float)
    # both fields are already the events' fractions, so they pass as they are: the identity
    # operator is the one ``scores``' own binary FSS uses (its threshold is then unused)
    return float(ss.fss_2d_single_field(prob, event, event_threshold=0.5, window_size=(window, window),
                                        threshold_operator=left_identity_operator))


def _radial_power(field, nbins):
    """Radially averaged power of a (H, W) field (mean removed, Hann-tapered), on ``nbins``
    equal-width wavenumber bins up to Nyquist (cycles per pixel): (k centres, power)."""
    f = np.asarray(field, float)
    f = (f - f.mean()) * np.outer(np.hanning(f.shape[0]), np.hanning(f.shape[1]))
    p = np.abs(np.fft.fft2(f)) ** 2
    ky, kx = np.fft.fftfreq(f.shape[0])[:, None], np.fft.fftfreq(f.shape[1])[None, :]
    k = np.sqrt(ky ** 2 + kx ** 2)
    edges = np.linspace(0, 0.5, nbins + 1)
    which = np.digitize(k.ravel(), edges) - 1
    ok = (which >= 0) & (which < nbins)
    power = np.bincount(which[ok], weights=p.ravel()[ok], minlength=nbins)
    count = np.bincount(which[ok], minlength=nbins)
    return 0.5 * (edges[1:] + edges[:-1]), power / np.maximum(count, 1)


def power_spectrum_ratio(field, truth, *, cell_px=8, bands=4):
    """Ratio of the field's radially averaged power to the truth's per wavenumber band, over
    the scales finer than the coarse cell (k above 1/``cell_px`` cycles per pixel), split
    into ``bands`` equal-width bands: field, truth (H, W) -> (bands,). 1 is the truth's
    texture; below 1 too smooth, above too rough."""
    k, pf = _radial_power(field, 32)
    _, pt = _radial_power(truth, 32)
    fine = k > 1.0 / cell_px
    groups = np.array_split(np.flatnonzero(fine), bands)
    return np.array([pf[g].sum() / pt[g].sum() for g in groups])


def ralsd(field, truth, *, cell_px=8):
    """Radially averaged log spectral distance (dB) over the scales finer than the coarse
    cell: sqrt(mean_k (10 log10(P_field / P_truth))²). field, truth (H, W) -> float."""
    k, pf = _radial_power(field, 32)
    _, pt = _radial_power(truth, 32)
    fine = (k > 1.0 / cell_px) & (pt > 0) & (pf > 0)
    return float(np.sqrt(np.mean((10 * np.log10(pf[fine] / pt[fine])) ** 2)))


def spread_error_by_bin(ens, obs, by, *, bins=5, pairs=False):
    """Spread-error reliability: pixels binned by the quantiles of ``by`` (e.g. the
    interpolated coarse field), per bin the spread a calibrated ensemble's mean would have
    (:func:`~fastds.metrics.ensemble.calibrated_variance`: (M+1)/M · mean variance, or its
    antithetic-pair form with ``pairs``) over the RMSE of its mean. ens (M, ...), obs and by
    (...) -> (bins,) ratios (1 is reliable; it should hold in every bin, not only on average)."""
    from .ensemble import calibrated_variance
    edges = np.quantile(by, np.linspace(0, 1, bins + 1))
    which = np.clip(np.digitize(by, edges[1:-1]), 0, bins - 1)
    err = (ens.mean(axis=0) - obs) ** 2
    out = np.full(bins, np.nan)
    for b in range(bins):
        m = which == b
        if m.any():
            out[b] = np.sqrt(calibrated_variance(ens[:, m], pairs=pairs)) / np.sqrt(err[m].mean())
    return out


def independent_sets(ens, pairs=False):
    """The ensemble's sets of independent members: [ens] for independent members; for
    antithetic pairs (members (0, 1), (2, 3), ... negatively correlated, ``sample.antithetic``)
    the even and the odd members, each independent. A fair estimator is unbiased on each
    set, not on the pairs together: the pairs' negative correlation widens the members'
    mutual distances and would lower a fair CRPS or energy score by about a twentieth at
    M = 8 (``tests/test_proper_scores.py``). ens (M, ...) -> list of (M', ...)."""
    if not pairs:
        return [ens]
    from .ensemble import check_pairs
    check_pairs(ens.shape[0], "independent_sets")
    return [ens[0::2], ens[1::2]]


def day_scores_ensemble(ens, obs, *, thresholds, cells=None, pools=(1, 4, 16), by=None,
                        cell_px=8, fss_window=5, seed=0, pairs=False):
    """Every proper score of one day, on log10 fields: ens (M, H, W), obs (H, W) -> dict of
    floats. ``thresholds`` {"q90": t, "q99": t} in log10 (the truth's percentiles over the
    evaluated days); ``cells`` (iy (H,), ix (W,)) adds the coarse-cell pooling; ``by`` (H, W)
    adds spread-error by its quintiles (``spread_error_q1..q5``). Unpooled variogram scores
    use a fixed random subset of :data:`VARIOGRAM_PIXELS` pixels (``seed``). ``pairs``: the
    members are antithetic pairs; the fair CRPS, energy score and twCRPS are then the mean of
    their values on the even and on the odd members (:func:`independent_sets`), and the
    spread the pairs' calibrated form (the variogram and Brier scores have no cross-member
    term and score every member either way). ``fss_q90`` is member 0's FSS (one field's
    texture, double penalty included), ``fss_ens_q90`` the ensemble's (:func:`fss_ensemble`)."""
    from .ensemble import calibrated_variance
    ens, obs = np.asarray(ens, float), np.asarray(obs, float)
    sets = independent_sets(ens, pairs)

    def fair(score, *args):  # a fair score, over the independent sets
        return float(np.mean([np.mean(score(e, *args)) for e in sets]))

    out = {"crps_fair": fair(fair_crps, obs)}
    for k in pools:
        o2 = pool(obs, k).ravel()
        out[f"energy_p{k}"] = fair(lambda e: energy_score(pool(e, k).reshape(e.shape[0], -1), o2))
        e2 = pool(ens, k).reshape(ens.shape[0], -1)
        if o2.size > VARIOGRAM_PIXELS:
            pick = np.random.default_rng(seed).choice(o2.size, VARIOGRAM_PIXELS, replace=False)
            e2, o2 = e2[:, pick], o2[pick]
        out[f"variogram_p{k}"] = variogram_score(e2, o2)
    if cells is not None:
        o = pool_cells(obs, *cells)
        out["energy_cell"] = fair(lambda e: energy_score(pool_cells(e, *cells), o))
        out["variogram_cell"] = variogram_score(pool_cells(ens, *cells), o)
    for name, t in thresholds.items():
        out[f"twcrps_{name}"] = fair(tw_crps, obs, t)
        out[f"brier_{name}"] = float(brier(ens, obs, t).mean())
        out[f"fss_{name}"] = fss(ens[0], obs, t, fss_window)  # one member's texture, as a user sees a day
        out[f"fss_ens_{name}"] = fss_ensemble(ens, obs, t, fss_window)
    ratio = power_spectrum_ratio(ens[0], obs, cell_px=cell_px)
    out.update({f"spectrum_ratio_b{i + 1}": float(r) for i, r in enumerate(ratio)})
    out["ralsd"] = ralsd(ens[0], obs, cell_px=cell_px)
    mean = ens.mean(axis=0)
    out["rmse_mean"] = float(np.sqrt(((mean - obs) ** 2).mean()))
    out["mae_mean"] = float(np.abs(mean - obs).mean())
    out["bias_mean"] = float((mean - obs).mean())
    out["r2_mean"] = float(np.corrcoef(mean.ravel(), obs.ravel())[0, 1] ** 2)
    if ens.shape[0] > 1:
        out["spread_skill"] = float(np.sqrt(calibrated_variance(ens, pairs=pairs)) / max(out["rmse_mean"], 1e-12))
        if by is not None:
            for i, r in enumerate(spread_error_by_bin(ens, obs, by, pairs=pairs)):
                out[f"spread_error_q{i + 1}"] = float(r)
    return out
