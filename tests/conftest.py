import os

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. at import time of
# fastds.kernels: set it before anything imports them, unless a GPU run asked otherwise.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("FASTDS_TEST_GPU") else "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastds import _backend  # noqa: E402

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
requires_triton = pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")
requires_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
requires_cupy_gpu = pytest.mark.skipif(
    not _backend.CUPY_CUDA, reason="cupy has no CUDA device (cupy.cuda.is_available() is False)")


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(1234)
