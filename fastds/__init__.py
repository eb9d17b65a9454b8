"""fastds: generative downscaling of gridded satellite and reanalysis data.

Public API (everything else is internal and may change)::

    plan_patches, stitch            patch planning and Halo-and-Hann stitching
"""
from ._backend import BackendUnavailable, capabilities
from .stitch import plan_patches, stitch

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "capabilities", "plan_patches", "stitch", "__version__"]
