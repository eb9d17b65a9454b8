"""Data layer: readers, regions, transforms, the prepared store, datasets, synthetic twin."""
from .readers import DataError, DataWarning, open_coarse, open_elevation, open_fine
from .regions import AREAS, Region, parse_region
from .store import open_store, prepare

__all__ = ["DataError", "DataWarning", "open_coarse", "open_fine", "open_elevation", "AREAS",
           "Region", "parse_region", "prepare", "open_store"]
