"""Triton kernels (installed as ``fastds.kernels``). Importing a submodule imports triton;
set ``TRITON_INTERPRET=1`` before that to run the kernels on CPU tensors."""
__all__ = ["sampler_step", "attention", "groupnorm"]
