"""fastds: generative downscaling of gridded satellite and reanalysis data.

Public API (everything else is internal and may change):

- ``plan_patches``, ``stitch``, ``StitchPlan``: patch planning and Halo-and-Hann stitching
  (``StitchPlan``: a geometry built once, with ``stitch``, ``cut`` and ``blend_cut``)
- ``open_coarse``, ``open_fine``: NASA files or merged cubes -> daily DataArray (time, lat, lon)
- ``prepare``: raw files -> a cached store per region
- ``pretrain``, ``train``: Stage A and Stage C (DDPM or a baseline)
- ``train_joint``: one model of several species as the channels of one field, over their
  runs' U-Nets (sampled by ``sample(run=..., model="joint")``)
- ``sample``: a trained run and dates -> fine-grid Dataset (rollout, ensembles)
- ``sample_species``: one run per species of a multi-species store -> one Dataset, a data
  variable per species
- ``evaluate``: predictions vs truth -> table, metrics JSON, plots
- ``run_protocol``, ``load_protocol``: the locked evaluation protocol (``fastds benchmark``):
  twins x seeds x rollouts, every model (null ensembles included) on the same days, proper
  scores, block-bootstrap intervals of paired differences
- ``load_config``: typed configuration from presets, TOML and overrides

Heavy modules (xarray, torch models, triton, cupy) load on first use, not on import.
"""
import importlib

from ._backend import BackendUnavailable, capabilities
from .stitch import StitchPlan, plan_patches, stitch

__version__ = "0.2.0"

__all__ = ["BackendUnavailable", "capabilities", "plan_patches", "stitch", "StitchPlan", "open_coarse",
           "open_fine", "prepare", "pretrain", "train", "train_joint", "sample", "sample_species", "evaluate", "load_config",
           "run_protocol", "load_protocol", "__version__"]

_LAZY = {
    "open_coarse": ("fastds.data.readers", "open_coarse"),
    "open_fine": ("fastds.data.readers", "open_fine"),
    "prepare": ("fastds.data.store", "prepare"),
    "pretrain": ("fastds.training.stages", "pretrain"),
    "train": ("fastds.training.stages", "train"),
    "train_joint": ("fastds.training.joint", "train_joint"),
    "sample": ("fastds.sampling.pipeline", "sample"),
    "sample_species": ("fastds.sampling.pipeline", "sample_species"),
    "evaluate": ("fastds.report", "evaluate"),
    "load_config": ("fastds.config", "load_config"),
    "run_protocol": ("fastds.protocol", "run_protocol"),
    "load_protocol": ("fastds.protocol", "load_protocol"),
}


_SUBPACKAGES = ("data", "models", "diffusion", "sampling", "training", "metrics", "kernels")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"fastds.{name}")
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fastds' has no attribute {name!r}")
