"""Regions (METHOD.md §1) and seasons."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Region", "AREAS", "parse_region", "season_of", "SEASONS", "season_name"]

SEASONS = {1: "DJF", 2: "MAM", 3: "JJA", 4: "SON"}


@dataclass(frozen=True)
class Region:
    """A lat/lon box in degrees; ``lon`` in -180..180, ``lat_min < lat_max``, ``lon_min < lon_max``."""
    name: str
    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float

    def __post_init__(self):
        if not (-90 <= self.lat_min < self.lat_max <= 90):
            raise ValueError(f"region {self.name!r}: need -90 <= lat_min < lat_max <= 90, got "
                             f"{self.lat_min}, {self.lat_max}")
        if not (-180 <= self.lon_min < self.lon_max <= 180):
            raise ValueError(f"region {self.name!r}: need -180 <= lon_min < lon_max <= 180, got "
                             f"{self.lon_min}, {self.lon_max}")

    def overlaps(self, other: "Region") -> bool:
        return (self.lat_min < other.lat_max and other.lat_min < self.lat_max
                and self.lon_min < other.lon_max and other.lon_min < self.lon_max)

    def as_tuple(self):
        return (self.lat_min, self.lat_max, self.lon_min, self.lon_max)


AREAS = {
    # Country outlines' bounding boxes with a 1 % buffer, as in the paper.
    "area0": Region("area0", 29.223, 43.406, 60.308, 80.427),  # Afghanistan + Kyrgyzstan
    "area1": Region("area1", 10.650, 37.643, 34.275, 56.601),  # Iraq, Kuwait, Saudi Arabia, ...
}


def parse_region(spec) -> Region:
    """``"area0"``, ``"area1"``, ``"LAT_MIN,LAT_MAX,LON_MIN,LON_MAX"``, a Region or a 4-tuple."""
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
