"""Regions (METHOD.md §1) and seasons."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Region", "AREAS", "parse_region", "season_of", "SEASONS", "season_name", "wrap_lon"]

SEASONS = {1: "DJF", 2: "MAM", 3: "JJA", 4: "SON"}


@dataclass(frozen=True)
class Region:
    """A lat/lon box in degrees; ``lon`` in -180..180, ``lat_min < lat_max``.

    ``lon_min > lon_max`` is a box that crosses the antimeridian (e.g. ``170, -170`` spans
    20 degrees around 180). Data read for such a box keep ascending longitudes past 180
    (170..190), so grids stay regular and every later stage needs no special case."""
    name: str
    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float

    def __post_init__(self):
        if not (-90 <= self.lat_min < self.lat_max <= 90):
            raise ValueError(f"region {self.name!r}: need -90 <= lat_min < lat_max <= 90, got "
                             f"{self.lat_min}, {self.lat_max}")
        if not (-180 <= self.lon_min <= 180 and -180 <= self.lon_max <= 180) or self.lon_min == self.lon_max:
            raise ValueError(f"region {self.name!r}: need lon_min != lon_max, both in -180..180 "
                             f"(lon_min > lon_max crosses the antimeridian), got "
                             f"{self.lon_min}, {self.lon_max}")

    @property
    def crosses_antimeridian(self) -> bool:
        return self.lon_min > self.lon_max

    @property
    def lon_span(self) -> tuple[float, float]:
        """(west, east) with east > west: east is past 180 for a box crossing the antimeridian."""
        return (self.lon_min, self.lon_max + 360.0 if self.crosses_antimeridian else self.lon_max)

    def lon_inside(self, lon, pad=0.0) -> np.ndarray:
        """Which longitudes (any convention) lie in the box widened by ``pad`` (edges included)."""
        lon = wrap_lon(lon)
        west = lon > self.lon_min - pad - 1e-9
        east = lon < self.lon_max + pad + 1e-9
        return (west | east) if self.crosses_antimeridian else (west & east)

    def unwrap_lon(self, lon, pad=0.0) -> np.ndarray:
        """Longitudes inside the box as ascending values from ``lon_min`` (past 180 east of
        the antimeridian for a crossing box; -180..180 otherwise)."""
        lon = wrap_lon(lon)
        if not self.crosses_antimeridian:
            return lon
        return np.where(lon < self.lon_min - pad - 1e-9, lon + 360.0, lon)

    def overlaps(self, other: "Region") -> bool:
        (a0, a1), (b0, b1) = self.lon_span, other.lon_span
        lon = any(a0 < b1 + k and b0 + k < a1 for k in (-360.0, 0.0, 360.0))
        return self.lat_min < other.lat_max and other.lat_min < self.lat_max and lon

    def as_tuple(self):
        return (self.lat_min, self.lat_max, self.lon_min, self.lon_max)


def wrap_lon(lon) -> np.ndarray:
    """Longitudes in -180..180 (0..360 and unwrapped values alike)."""
    return ((np.asarray(lon, float) + 180.0) % 360.0) - 180.0


AREAS = {
    # Country outlines' bounding boxes with a 1 % buffer, as in the paper.
    "area0": Region("area0", 29.223, 43.406, 60.308, 80.427),  # Afghanistan + Kyrgyzstan
    "area1": Region("area1", 10.650, 37.643, 34.275, 56.601),  # Iraq, Kuwait, Saudi Arabia, ...
}


def parse_region(spec) -> Region:
    """``"area0"``, ``"area1"``, ``"LAT_MIN,LAT_MAX,LON_MIN,LON_MAX"``, a Region or a 4-tuple
    (``LON_MIN > LON_MAX``: a box across the antimeridian)."""
    if isinstance(spec, Region):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 4:
        return Region("bbox", *map(float, spec))
    if isinstance(spec, str):
        key = spec.strip().lower().replace(" ", "").replace("_", "")
        if key in AREAS:
            return AREAS[key]
        parts = spec.split(",")
        if len(parts) == 4:
            try:
                vals = [float(p) for p in parts]
            except ValueError:
                vals = None
            if vals is not None:
                return Region("bbox", *vals)
    raise ValueError(
        f"region {spec!r} is neither a known area ({', '.join(AREAS)}) nor a box "
        "'LAT_MIN,LAT_MAX,LON_MIN,LON_MAX' in degrees")


def season_of(months) -> np.ndarray:
    """Season index 1=DJF, 2=MAM, 3=JJA, 4=SON for month numbers 1..12 (array-like)."""
    m = np.asarray(months)
    return (m % 12) // 3 + 1


def season_name(season: int) -> str:
    return SEASONS[int(season)]
