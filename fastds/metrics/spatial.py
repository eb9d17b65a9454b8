"""Spatial statistics: great-circle semivariogram, radially averaged power spectrum, and the
seam statistic of a stitched field."""
from __future__ import annotations

import numpy as np

__all__ = ["semivariogram", "semivariogram_ref", "power_spectrum", "great_circle_km", "seam_statistic"]

EARTH_KM = 6371.0088


def great_circle_km(lat1, lon1, lat2, lon2):
    """Haversine distance in km; degrees in, broadcasting."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(lon2 - lon1)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def _xcorr(f, g, n):
    """Σ_x f[x] g[x+d] for d = -(W-1)..W-1, batched over rows: (R, W) -> (R, 2W-1)."""
    F = np.fft.rfft(f, n)
    G = np.fft.rfft(g, n)
    c = np.fft.irfft(np.conj(F) * G, n)
    W = f.shape[1]
    return np.concatenate([c[:, n - (W - 1):], c[:, :W]], axis=1)


def semivariogram(field, lat, lon, *, max_km=600.0, bins=24, method="exact", n_pairs=200_000,
                  seed=0):
    """Empirical semivariogram γ(h) = Σ (z_i - z_j)² / (2 N(h)) over pixel pairs by distance.

    field : (lat, lon) array (NaN ignored); lat (H,), lon (W,) degrees, a regular grid.
    method : ``"exact"`` sums over every pair within ``max_km`` (row-pair cross-correlations
    by FFT: O(H·dy_max·W log W) instead of O(n²)); ``"random"`` uses ``n_pairs`` random pairs.
    Returns (centres_km (bins,), gamma (bins,), counts (bins,)); empty bins give NaN.
    """
    z = np.asarray(field, np.float64)
    lat, lon = np.asarray(lat, float), np.asarray(lon, float)
    H, W = z.shape
    edges = np.linspace(0.0, max_km, bins + 1)
    sums, counts = np.zeros(bins), np.zeros(bins)
    if method == "random":
        rng = np.random.default_rng(seed)
        i, j = rng.integers(0, H * W, n_pairs), rng.integers(0, H * W, n_pairs)
        yi, xi, yj, xj = i // W, i % W, j // W, j % W
        d = great_circle_km(lat[yi], lon[xi], lat[yj], lon[xj])
        sq = (z.ravel()[i] - z.ravel()[j]) ** 2
        ok = np.isfinite(sq) & (d > 0) & (d < max_km)
        b = np.digitize(d[ok], edges) - 1
        sums += np.bincount(b, sq[ok], bins)
        counts += np.bincount(b, None, bins)
    elif method == "exact":
        m = np.isfinite(z).astype(np.float64)
        zf = np.where(m > 0, z, 0.0)
        n = int(2 ** np.ceil(np.log2(2 * W)))
        dlat = np.abs(np.diff(lat)).min() if H > 1 else 1.0
        dy_max = min(H - 1, int(np.ceil(max_km / (np.pi / 180 * EARTH_KM * dlat))) + 1)
        dx = np.arange(-(W - 1), W)
        for dy in range(dy_max + 1):
            a, b_ = slice(0, H - dy), slice(dy, H)
            m_a, m_b, z_a, z_b = m[a], m[b_], zf[a], zf[b_]
            cnt = _xcorr(m_a, m_b, n)
            s = _xcorr(m_a * z_a ** 2, m_b, n) + _xcorr(m_a, m_b * z_b ** 2, n) - 2 * _xcorr(z_a, z_b, n)
            keep = dx > 0 if dy == 0 else np.ones_like(dx, bool)  # each unordered pair once
            d = great_circle_km(lat[a][:, None], lon[0], lat[b_][:, None], lon[0] + dx[None] * (lon[1] - lon[0] if W > 1 else 0))
            ok = keep[None] & (d < max_km) & (cnt > 0.5)
            idx = np.digitize(d[ok], edges) - 1
            sums += np.bincount(idx, s[ok], bins)
            counts += np.bincount(idx, np.round(cnt[ok]), bins)
    else:
        raise ValueError(f"method must be 'exact' or 'random', got {method!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        gamma = np.where(counts > 0, sums / (2 * counts), np.nan)
    return 0.5 * (edges[1:] + edges[:-1]), gamma, counts


def semivariogram_ref(field, lat, lon, *, max_km=600.0, bins=24):
    """All pairs, brute force (O(n²) memory): the reference for tests on small grids."""
    z = np.asarray(field, float).ravel()
    LA, LO = np.meshgrid(lat, lon, indexing="ij")
    la, lo = LA.ravel(), LO.ravel()
    i, j = np.triu_indices(z.size, k=1)
    d = great_circle_km(la[i], lo[i], la[j], lo[j])
    sq = (z[i] - z[j]) ** 2
    edges = np.linspace(0, max_km, bins + 1)
    ok = np.isfinite(sq) & (d < max_km)
    b = np.digitize(d[ok], edges) - 1
    sums, counts = np.bincount(b, sq[ok], bins), np.bincount(b, None, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 0.5 * (edges[1:] + edges[:-1]), np.where(counts > 0, sums / (2 * counts), np.nan), counts


def power_spectrum(field, lat, lon):
    """Radially averaged power spectrum of a (lat, lon) field (mean removed, NaN -> mean).

    Returns (k (cycles/km, n,), power (n,)), wavenumbers from the grid spacing in km at the
    region's mean latitude; bins are integer radii of the 2-D FFT index.
    """
    z = np.asarray(field, float)
    z = np.where(np.isfinite(z), z, np.nanmean(z))
    z = z - z.mean()
    H, W = z.shape
    P = np.abs(np.fft.fft2(z)) ** 2 / (H * W)
    dy_km = np.pi / 180 * EARTH_KM * abs(lat[1] - lat[0])
    dx_km = np.pi / 180 * EARTH_KM * abs(lon[1] - lon[0]) * np.cos(np.radians(np.mean(lat)))
    ky = np.fft.fftfreq(H, d=dy_km)[:, None]
    kx = np.fft.fftfreq(W, d=dx_km)[None, :]
    k = np.sqrt(ky ** 2 + kx ** 2)
    dk = max(1 / (H * dy_km), 1 / (W * dx_km))
    r = np.round(k / dk).astype(int)
    nb = min(H, W) // 2
    power = np.bincount(r.ravel(), P.ravel(), r.max() + 1)[1:nb] / np.maximum(np.bincount(r.ravel())[1:nb], 1)
    return np.arange(1, nb) * dk, power


def _seam_lines(starts_1d, size, tile, halo):
    """Grid lines (index i: between pixels i-1 and i) where a kept region begins or ends."""
    lines = set()
    for s in np.unique(starts_1d):
        for b in (s + halo, s + tile - halo):
            if 0 < b < size:
                lines.add(int(b))
    return np.array(sorted(lines), dtype=np.int64)


def seam_statistic(field, starts, *, tile, halo, space="log10"):
    """Gradient energy across the borders of the patches' kept regions over that across
    every other grid line: 1 means no seams, > 1 visible seams, < 1 over-smoothed borders.

    field : (H, W) or (time, H, W), physical units (``space="log10"`` scores log10, like the
    skill tables); starts : (N, 2) patch starts (y0, x0) of the stitching plan; tile, halo :
    its geometry. Returns (seam, interior, ratio) as floats, energies being mean squared
    first differences.
    """
    v = np.asarray(field, np.float64)
    if v.ndim == 2:
        v = v[None]
    if space == "log10":
        v = np.log10(np.maximum(v, 1e-6))
    starts = np.asarray(starts)
    H, W = v.shape[-2:]
    gy = np.nanmean((v[:, 1:, :] - v[:, :-1, :]) ** 2, axis=(0, 2))  # line i+1 between rows i, i+1
    gx = np.nanmean((v[:, :, 1:] - v[:, :, :-1]) ** 2, axis=(0, 1))
    ly, lx = _seam_lines(starts[:, 0], H, tile, halo), _seam_lines(starts[:, 1], W, tile, halo)
    my, mx = np.zeros(H - 1, bool), np.zeros(W - 1, bool)
    my[ly - 1], mx[lx - 1] = True, True
    seam = np.concatenate([gy[my], gx[mx]])
    inner = np.concatenate([gy[~my], gx[~mx]])
    if seam.size == 0 or inner.size == 0:
        raise ValueError("seam_statistic: the plan has no kept-region border inside the image "
                         "(or no line outside one); nothing to compare")
    s, i = float(seam.mean()), float(inner.mean())
    return s, i, s / i
