"""A synthetic twin of a region's MERRA-2 / G5NR record, written in the native formats.

The fine "truth" is dust-like: log-normal marginals (log10 AOD Gaussian), a seasonal cycle
peaking in summer, less dust over high terrain, and structures advected by a slowly varying
wind that persist for days (AR(1) in Fourier space). The coarse field is the exact area mean,
over each MERRA-2 cell, of a *related but not identical* fine field (the truth times an
independent small-scale perturbation), like a reanalysis versus a nature run. The truth is
kept for the whole coarse period, so out-of-record skill can be measured on the twin.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .._io import atomic_path
from .readers import _NC_LOCK, FILL_VALUE, GRIDS
from .regions import Region, parse_region

__all__ = ["TwinSpec", "make_twin", "write_twin", "coarse_stream", "TWIN_REGION", "DEFAULT_SPECIES"]

TWIN_REGION = Region("twin", 24.0, 28.0, 44.0, 49.0)


@dataclass(frozen=True)
class TwinSpec:
    """What to synthesise. Dates are inclusive ISO strings."""
    region: Region = TWIN_REGION
    coarse_start: str = "2004-01-01"
    coarse_end: str = "2008-12-31"
    fine_start: str = "2005-05-16"
    fine_end: str = "2007-05-15"
    seed: int = 0
    variable: str = "DUEXTTAU"
    rho: float = 0.8            # day-to-day persistence of the latent field
    log_mean: float = -1.1      # mean log10 AOD
    log_sd: float = 0.3         # sd of log10 AOD anomalies
    seasonal_amp: float = 0.25  # log10 amplitude of the seasonal cycle
    terrain_effect: float = 0.4  # log10 drop from lowest to highest terrain
    coarse_noise: float = 0.08  # log10 sd of the fine perturbation behind the coarse field
    # Dust plumes (0 sources: none, the smooth twin): fixed sources that emit on random days
    # (more often in summer), plumes the wind advects and that decay, added in physical units:
    # a heavy right tail, moving sub-cell structure, and residual variance that grows with
    # the coarse state and with the season.
    plumes: int = 0
    plume_rate: float = 0.25      # chance a source emits on a day, at the seasonal mean
    plume_strength: float = 0.3   # median emitted peak AOD; lognormal with sd 0.8 in ln
    plume_lifetime: float = 3.0   # e-folding lifetime, days
    plume_width: float = 2.5      # Gaussian sd of a fresh plume, fine pixels
    # Several species (empty: one, ``variable``): correlated fields sharing the wind and a
    # common transport pattern, each with its own sources, lifetime and level (see
    # `SPECIES_TWIN`); ``total`` names their sum, written as one more variable ("" for none).
    species: tuple = ()
    total: str = ""

    @property
    def variables(self) -> tuple:
        """The variables the twin writes: ``variable``, or the species and their total."""
        if not self.species:
            return (self.variable,)
        return tuple(self.species) + ((self.total,) if self.total else ())


# Per species (by position in ``TwinSpec.species``): mean log10 AOD, day-to-day persistence
# of its own pattern (a lifetime: sea salt is short-lived, sulfate long), the weight of the
# shared transport pattern, and where its sources sit (fractions of the padded grid).
SPECIES_TWIN = (
    dict(log_mean=-1.1, rho=0.8, shared=0.75, source=(0.3, 0.25), peak=190, terrain=1.0),  # dust
    dict(log_mean=-1.5, rho=0.55, shared=0.6, source=(0.75, 0.2), peak=20, terrain=0.2),   # sea salt
    dict(log_mean=-1.3, rho=0.92, shared=0.7, source=(0.5, 0.7), peak=200, terrain=0.5),   # sulfate
    dict(log_mean=-2.2, rho=0.7, shared=0.65, source=(0.35, 0.6), peak=250, terrain=0.5),  # black carbon
    dict(log_mean=-1.8, rho=0.75, shared=0.65, source=(0.6, 0.45), peak=230, terrain=0.5),  # organic carbon
)
DEFAULT_SPECIES = ("DUEXTTAU", "SSEXTTAU", "SUEXTTAU", "BCEXTTAU", "OCEXTTAU")


def _axis(lo, hi, step, origin, pad):
    """Lattice points origin + k*step with lo - pad < p < hi + pad."""
    k0 = int(np.floor((lo - pad - origin) / step)) + 1
    k1 = int(np.ceil((hi + pad - origin) / step)) - 1
    pts = origin + step * np.arange(k0, k1 + 1)
    return pts[(pts > lo - pad - 1e-9) & (pts < hi + pad + 1e-9)]


def _grids(region: Region):
    c, f = GRIDS["coarse"], GRIDS["fine"]
    clat = _axis(region.lat_min, region.lat_max, c.dlat, c.lat0, c.dlat / 2)
    clon = _axis(region.lon_min, region.lon_max, c.dlon, c.lon0, c.dlon / 2)
    # Fine pixels of the coarse cells: [centre - d/2, centre + d/2) on each axis.
    ext_lat = np.arange(clat[0] - c.dlat / 2, clat[-1] + c.dlat / 2 - 1e-9, f.dlat)
    ext_lon = np.arange(clon[0] - c.dlon / 2, clon[-1] + c.dlon / 2 - 1e-9, f.dlon)
    flat = ext_lat[(ext_lat > region.lat_min - 1e-9) & (ext_lat < region.lat_max + 1e-9)]
    flon = ext_lon[(ext_lon > region.lon_min - 1e-9) & (ext_lon < region.lon_max + 1e-9)]
    return clat, clon, ext_lat, ext_lon, flat, flon


def _spectral_filter(shape, scale_px, rng_shape_seed=None):
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    k = np.sqrt(ky ** 2 + kx ** 2)
    filt = (1.0 + (k * scale_px) ** 2) ** -1.5  # smooth, Matern-like spectrum
    filt[0, 0] = 0.0
    return filt, ky, kx


def _smooth_noise(rng, shape, filt):
    white = rng.standard_normal(shape)
    field = np.fft.irfft2(np.fft.rfft2(white) * filt, s=shape)
    return field / field.std()


def _noise_spectrum(rng, filt, shape):
    """Spectrum of a unit-variance smooth Gaussian field, drawn directly in Fourier space
    (saves the forward FFT of white noise). By Parseval, irfft2 of Z*filt with complex
    unit-variance Z has variance ~ 4*sum(filt^2)/(H*W)^2: each rfft bin stands for a
    conjugate pair, and Re/Im each carry unit variance)."""
    z = rng.standard_normal(filt.shape) + 1j * rng.standard_normal(filt.shape)
    norm = np.sqrt(4.0 * (filt ** 2).sum()) / (shape[0] * shape[1])
    return z * (filt / norm)


class _Plumes:
    """The plume field (physical AOD) on the padded grid, advanced one day at a time: advected
    by the day's wind (bilinear shift, so it stays non-negative), decayed, and fed by the
    sources that emit that day. Its own generator: a twin without plumes is unchanged."""

    def __init__(self, spec: TwinSpec, shape, doy):
        self.rng = np.random.default_rng(spec.seed + 101)
        self.spec, self.shape, self.doy = spec, shape, doy
        self.src = np.stack([self.rng.uniform(0.15, 0.85, spec.plumes) * shape[0],
                             self.rng.uniform(0.1, 0.6, spec.plumes) * shape[1]], axis=1)
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        w2 = 2 * spec.plume_width ** 2
        self.blobs = [np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / w2) for y, x in self.src]
        self.field = np.zeros(shape)

    def step(self, i, wind):
        from scipy.ndimage import shift
        s = self.spec
        self.field = shift(self.field, (wind[0], wind[1]), order=1, mode="constant", cval=0.0)
        self.field *= np.exp(-1.0 / s.plume_lifetime)
        season = 1.0 + 0.8 * np.cos(2 * np.pi * (self.doy[i] - 190) / 365.25)  # peaks in July
        emit = self.rng.random(s.plumes) < s.plume_rate * season
        amp = s.plume_strength * np.exp(0.8 * self.rng.standard_normal(s.plumes))
        for k in np.flatnonzero(emit):
            self.field += amp[k] * self.blobs[k]
        return self.field


def make_twin(spec: TwinSpec = TwinSpec()) -> xr.Dataset:
    """Synthesise the twin in memory.

    Returns
    -------
    xarray.Dataset with
      ``coarse`` (time, lat_c, lon_c): daily coarse field over the coarse period,
      ``fine_truth`` (time, lat, lon): daily fine truth over the same period,
      ``elevation`` (lat, lon) in metres,
    and attrs ``fine_start``/``fine_end`` (the fine record) and the spec.
    """
    region = parse_region(spec.region)
    rng = np.random.default_rng(spec.seed)
    clat, clon, ext_lat, ext_lon, flat, flon = _grids(region)
    times = pd.date_range(spec.coarse_start, spec.coarse_end, freq="D")
    pad = 24
    shape = (ext_lat.size + 2 * pad, ext_lon.size + 2 * pad)
    filt, ky, kx = _spectral_filter(shape, scale_px=10.0)
    filt_fine, _, _ = _spectral_filter(shape, scale_px=2.5)

    # Terrain: a smooth field with a ridge, 0..2500 m.
    terrain = _smooth_noise(np.random.default_rng(spec.seed + 1), shape, _spectral_filter(shape, 18.0)[0])
    yy = np.linspace(-1, 1, shape[0])[:, None]
    terrain = terrain + 1.5 * np.exp(-((np.linspace(-1, 1, shape[1])[None, :] - 0.4 * yy) ** 2) / 0.08)
    terrain = 2500.0 * (terrain - terrain.min()) / (terrain.max() - terrain.min())
    terrain_norm = terrain / 2500.0

    doy = times.day_of_year.values
    seasonal = spec.seasonal_amp * np.cos(2 * np.pi * (doy - 190) / 365.25)
    # Wind (pixels per day): a seasonal westerly plus a persistent random part.
    wind = np.zeros((len(times), 2))
    w = np.zeros(2)
    for i in range(len(times)):
        w = 0.85 * w + 0.5 * rng.standard_normal(2)
        wind[i] = w + np.array([0.3, 1.2 + 0.6 * np.cos(2 * np.pi * doy[i] / 365.25)])

    plume = _Plumes(spec, shape, doy) if spec.plumes > 0 else None
    grids = (clat, clon, ext_lat, ext_lon, flat, flon)
    sl = (slice(pad, pad + ext_lat.size), slice(pad, pad + ext_lon.size))
    if spec.species:
        fine_ext, coarse = _species_days(spec, rng, shape, sl, times, wind, terrain_norm, plume)
        return _twin_dataset(spec, region, grids, times, fine_ext, coarse, terrain[sl])
    spec_z = np.fft.rfft2(_smooth_noise(rng, shape, filt))
    innov = np.sqrt(1 - spec.rho ** 2)
    fine_ext = np.empty((len(times), ext_lat.size, ext_lon.size), np.float32)
    alt_ext = np.empty_like(fine_ext)
    for i in range(len(times)):
        shift = np.exp(-2j * np.pi * (ky * wind[i, 0] + kx * wind[i, 1]))
        spec_z = spec.rho * shift * spec_z + innov * _noise_spectrum(rng, filt, shape)
        z = np.fft.irfft2(spec_z, s=shape)[sl]
        logv = (spec.log_mean + seasonal[i] - spec.terrain_effect * (terrain_norm[sl] - 0.3)
                + spec.log_sd * z)
        pert = spec.coarse_noise * np.fft.irfft2(_noise_spectrum(rng, filt_fine, shape), s=shape)[sl]
        fine_ext[i] = 10.0 ** logv
        alt_ext[i] = 10.0 ** (logv + pert)
        if plume is not None:
            c = plume.step(i, wind[i])[sl]
            fine_ext[i] += c
            alt_ext[i] += c

    return _twin_dataset(spec, region, grids, times, fine_ext, _cell_means(alt_ext, clat.size, clon.size),
                         terrain[sl])


def _cell_means(ext, n_lat, n_lon):
    """Area means (..., n_lat, n_lon) over each MERRA-2 cell of an extended fine field."""
    ny, nx = 8, 10  # fine pixels per MERRA-2 cell (0.5/0.0625, 0.625/0.0625)
    return ext.reshape(ext.shape[:-2] + (n_lat, ny, n_lon, nx)).mean(axis=(-3, -1))


def _twin_dataset(spec, region, grids, times, fine_ext, coarse, terrain_ext):
    """The twin's Dataset from the extended fine field (…, time, ext_lat, ext_lon) and the
    coarse cell means; a leading species axis becomes the ``species`` dim."""
    clat, clon, ext_lat, ext_lon, flat, flon = grids
    iy = np.searchsorted(np.round(ext_lat, 6), np.round(flat, 6))
    ix = np.searchsorted(np.round(ext_lon, 6), np.round(flon, 6))
    fine = fine_ext[..., iy, :][..., ix]
    elev = terrain_ext[iy][:, ix].astype(np.float32)
    lead = ("species",) if spec.species else ()
    coords = {"time": times, "lat": flat, "lon": flon, "lat_c": clat, "lon_c": clon}
    if spec.species:
        coords["species"] = list(spec.variables)
    return xr.Dataset(
        {
            "coarse": (lead + ("time", "lat_c", "lon_c"), coarse.astype(np.float32), {"units": "1"}),
            "fine_truth": (lead + ("time", "lat", "lon"), fine, {"units": "1"}),
            "elevation": (("lat", "lon"), elev, {"units": "m"}),
        },
        coords=coords,
        attrs={"fine_start": spec.fine_start, "fine_end": spec.fine_end, "seed": spec.seed,
               "variable": spec.variable, "region": ",".join(map(str, region.as_tuple()))},
    )


def _species_days(spec, rng, shape, sl, times, wind, terrain_norm, plume):
    """Several correlated species, day by day: each log10 field mixes a shared transport
    pattern (``spec.rho``) with its own (the species' ``rho``: its lifetime), both advected by
    the one wind, plus its own sources, level, seasonal peak and terrain response; plumes
    (if any) are dust's. The total (if asked) is the species' sum, on both grids.

    Returns the extended fine fields (S, time, ey, ex) float32 and the coarse cell means
    (S, time, n_lat, n_lon) float64, S counting the total."""
    filt, ky, kx = _spectral_filter(shape, scale_px=10.0)
    filt_fine = _spectral_filter(shape, scale_px=2.5)[0]
    n, doy = len(spec.species), times.day_of_year.values
    par = [SPECIES_TWIN[k % len(SPECIES_TWIN)] for k in range(n)]
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    sources = [0.4 * np.exp(-((yy - p["source"][0] * shape[0]) ** 2 + (xx - p["source"][1] * shape[1]) ** 2)
                            / (2 * (0.12 * shape[0]) ** 2)) for p in par]
    own_rng = [np.random.default_rng((spec.seed, 1000 + k)) for k in range(n)]
    shared = np.fft.rfft2(_smooth_noise(rng, shape, filt))
    own = [np.fft.rfft2(_smooth_noise(g, shape, filt)) for g in own_rng]
    ey, ex = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
    fine = np.empty((len(spec.variables), len(times), ey, ex), np.float32)
    coarse = np.empty((len(spec.variables), len(times), ey // 8, ex // 10))
    for i in range(len(times)):
        adv = np.exp(-2j * np.pi * (ky * wind[i, 0] + kx * wind[i, 1]))
        shared = spec.rho * adv * shared + np.sqrt(1 - spec.rho ** 2) * _noise_spectrum(rng, filt, shape)
        zs = np.fft.irfft2(shared, s=shape)[sl]
        for k, p in enumerate(par):
            own[k] = p["rho"] * adv * own[k] + np.sqrt(1 - p["rho"] ** 2) * _noise_spectrum(own_rng[k], filt, shape)
            z = p["shared"] * zs + np.sqrt(1 - p["shared"] ** 2) * np.fft.irfft2(own[k], s=shape)[sl]
            logv = (p["log_mean"] + spec.seasonal_amp * np.cos(2 * np.pi * (doy[i] - p["peak"]) / 365.25)
                    - p["terrain"] * spec.terrain_effect * (terrain_norm[sl] - 0.3) + sources[k][sl]
                    + spec.log_sd * z)
            pert = spec.coarse_noise * np.fft.irfft2(_noise_spectrum(own_rng[k], filt_fine, shape), s=shape)[sl]
            f, alt = 10.0 ** logv, 10.0 ** (logv + pert)
            if plume is not None and k == 0:
                c = plume.step(i, wind[i])[sl]
                f, alt = f + c, alt + c
            fine[k, i] = f
            coarse[k, i] = _cell_means(alt, ey // 8, ex // 10)
        if spec.total:
            fine[n, i] = fine[:n, i].sum(axis=0)
            coarse[n, i] = coarse[:n, i].sum(axis=0)
    return fine, coarse


def coarse_stream(year: int) -> int:
    """MERRA-2 file stream number for a year (100, 200, 300, 400)."""
    return 100 if year <= 1991 else 200 if year <= 2000 else 300 if year <= 2010 else 400


def _write_nc(path, fields: dict, times, lat, lon, *, time_units, lat_descending, lon_360,
              fill_mask=None):
    """One native-format file holding ``fields`` (name -> (time, lat, lon) array)."""
    import netCDF4
    lat_w = lat[::-1] if lat_descending else lat
    lon_w = np.where(lon < 0, lon + 360.0, lon) if lon_360 else lon
    order = np.argsort(lon_w, kind="stable")
    lon_w = lon_w[order]
    if fill_mask is not None:
        fill_mask = fill_mask[..., order][:, ::-1] if lat_descending else fill_mask[..., order]
    stored = {}
    for variable, data in fields.items():
        data = (data[:, ::-1] if lat_descending else data)[..., order]
        values = np.where(np.isfinite(data), data, FILL_VALUE).astype(np.float32)
        stored[variable] = values if fill_mask is None else np.where(fill_mask, np.float32(FILL_VALUE), values)
    with atomic_path(path) as tmp, _NC_LOCK:  # the readers' lock: HDF5 is not thread-safe
        with netCDF4.Dataset(str(tmp), "w", format="NETCDF4") as nc:
            nc.createDimension("time", None)
            nc.createDimension("lat", lat_w.size)
            nc.createDimension("lon", lon_w.size)
            t = nc.createVariable("time", "i4", ("time",))
            t.units = time_units
            t[:] = times
            v = nc.createVariable("lat", "f8", ("lat",))
            v.units = "degrees_north"
            v[:] = lat_w
            v = nc.createVariable("lon", "f8", ("lon",))
            v.units = "degrees_east"
            v[:] = lon_w
            for variable, values in stored.items():
                var = nc.createVariable(variable, "f4", ("time", "lat", "lon"), fill_value=np.float32(FILL_VALUE))
                var.missing_value = np.float32(FILL_VALUE)
                var.units = "1"
                var.long_name = f"{variable} (fastds synthetic twin)"
                var.set_auto_maskandscale(False)
                var[:] = values


def write_twin(out_dir, spec: TwinSpec = TwinSpec(), *, twin: xr.Dataset | None = None,
               native_days: int | None = 3, cubes: bool = True, lat_descending=False,
               lon_360=False, fill_fraction=0.0) -> dict:
    """Write the twin to ``out_dir``; returns a dict of what was written.

    Layout::

        coarse/MERRA2_{stream}.tavg1_2d_aer_Nx.YYYYMMDD.nc4   24 hourly means a day
        fine/c1440_NR.inst30mn_2d_aer1_Nx.YYYYMMDD_HHMMz.nc4  48 instants a day
        coarse_daily.nc, fine_daily.nc                        merged daily cubes
        fine_truth.nc                                         truth over the whole period
        elevation.nc                                          elevation (lat, lon), metres

    Every file holds each of ``spec.variables`` (one, or the species and their total).
    ``native_days``: how many days (from the fine record's start) to write as native files;
    None writes all (48 files a fine day: large). The hourly values are the daily value times
    ``1 + 0.3 sin(...)`` whose mean over the day is exactly 1, so readers recover the daily
    means. ``fill_fraction`` replaces that share of hourly values with the fill value.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    twin = make_twin(spec) if twin is None else twin
    names = spec.variables

    def by_name(name, day=None):
        """(name, the twin's coarse and fine truth of that variable) on ``day`` or all days."""
        sub = twin.sel(species=name) if "species" in twin.dims else twin
        return sub if day is None else sub.sel(time=day)

    written = {"dir": out}
    rng = np.random.default_rng(spec.seed + 7)
    if native_days is None or native_days > 0:
        days = pd.date_range(spec.fine_start, spec.fine_end, freq="D")
        days = days if native_days is None else days[:native_days]
        cdir, fdir = out / "coarse", out / "fine"
        cdir.mkdir(exist_ok=True)
        fdir.mkdir(exist_ok=True)
        hours = np.arange(24)
        hourly = (1.0 + 0.3 * np.sin(2 * np.pi * (hours + 0.5) / 24))[:, None, None]
        half = np.arange(48)
        halfhourly = 1.0 + 0.3 * np.sin(2 * np.pi * half / 48)
        for day in days:
            c = {v: by_name(v, day)["coarse"].values[None] * hourly for v in names}
            mask = rng.random(c[names[0]].shape) < fill_fraction if fill_fraction else None
            name = f"MERRA2_{coarse_stream(day.year)}.tavg1_2d_aer_Nx.{day:%Y%m%d}.nc4"
            _write_nc(cdir / name, c, hours * 60 + 30, twin["lat_c"].values, twin["lon_c"].values,
                      time_units=f"minutes since {day:%Y-%m-%d} 00:00:00",
                      lat_descending=lat_descending, lon_360=lon_360, fill_mask=mask)
            f = {v: by_name(v, day)["fine_truth"].values for v in names}
            for k in range(48):
                hhmm = f"{k // 2:02d}{30 * (k % 2):02d}"
                _write_nc(fdir / f"c1440_NR.inst30mn_2d_aer1_Nx.{day:%Y%m%d}_{hhmm}z.nc4",
                          {v: (a * halfhourly[k])[None] for v, a in f.items()}, np.array([0]), twin["lat"].values,
                          twin["lon"].values,
                          time_units=f"minutes since {day:%Y-%m-%d} {k // 2:02d}:{30 * (k % 2):02d}:00",
                          lat_descending=lat_descending, lon_360=lon_360)
        written.update(coarse_native=cdir, fine_native=fdir, native_days=len(days))
    if cubes:
        enc = {v: {"_FillValue": np.float32(FILL_VALUE), "dtype": "float32"} for v in names}

        def cube(field, rename=None):
            return xr.Dataset({v: by_name(v)[field].drop_vars("species", errors="ignore").rename(rename or {})
                               for v in names})

        coarse = cube("coarse", {"lat_c": "lat", "lon_c": "lon"})
        truth = cube("fine_truth")
        for name, ds in (("coarse_daily.nc", coarse),
                         ("fine_daily.nc", truth.sel(time=slice(spec.fine_start, spec.fine_end))),
                         ("fine_truth.nc", truth)):
            with atomic_path(out / name) as tmp:
                ds.to_netcdf(tmp, encoding=enc, engine="netcdf4")
            written[name.split(".")[0]] = out / name
        with atomic_path(out / "elevation.nc") as tmp:
            twin["elevation"].to_dataset(name="elevation").to_netcdf(tmp, engine="netcdf4")
        written["elevation"] = out / "elevation.nc"
    return written
