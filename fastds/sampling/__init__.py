"""Samplers (pure loops), the fused step dispatcher, CUDA-graph sampling and the pipeline."""
from .samplers import make_plan, run_plan, sample_ddim, sample_ddpm, sample_dpmpp
from .steps import fused_step, fused_step_ref

__all__ = ["sample_ddpm", "sample_ddim", "sample_dpmpp", "run_plan", "make_plan", "fused_step",
           "fused_step_ref"]
