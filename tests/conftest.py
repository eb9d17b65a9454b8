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
# Where Triton kernels run: CPU tensors through the interpreter, or CUDA tensors compiled
# (FASTDS_TEST_GPU=1). Tests that launch kernels put their tensors here.
TRITON_DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
requires_triton_run = pytest.mark.skipif(
    not _backend.HAS_TRITON or (TRITON_DEVICE == "cuda" and not torch.cuda.is_available()),
    reason="triton cannot launch kernels here (not installed, or TRITON_INTERPRET=0 without a CUDA device)")
requires_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def run_aot(script: str) -> str:
    """Run an ahead-of-time Triton compile script in a fresh interpreter (compiled mode, not the
    interpreter this test session set up) and return its stdout; fails on a non-zero exit."""
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    print(res.stdout, res.stderr[-3000:])
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def copied_run(trained_run, dest, *, drop=()):
    """A copy of ``trained_run`` at ``dest`` (returned) without the files of any season that
    match a glob in ``drop`` (``"ddpm*"``: a run whose DDPM is to be fitted again)."""
    shutil.copytree(trained_run, dest)
    for pattern in drop:
        for f in dest.glob(f"season*/{pattern}"):
            f.unlink()
    return dest


requires_cupy_gpu = pytest.mark.skipif(
    not _backend.CUPY_CUDA, reason="cupy has no CUDA device (cupy.cuda.is_available() is False)")


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------- shared pipeline
# One small twin, one store and one tiny trained run for every test that needs trained
# models (about a minute on 2 cores, built once per session).
TEST_OVERRIDES = ("data.seasons=[3]", "data.t_lag=6", "data.max_train_patches=512",
                  "pretrain.widths=[8, 16, 16]", "pretrain.epochs=3",
                  "train.widths=[16, 32, 32]", "train.epochs=4", "train.ddpm_epoch_factor=1",
                  "train.batch=32")


@pytest.fixture(scope="session")
def twin_spec():
    from fastds.data.synthetic import TwinSpec
    return TwinSpec(coarse_start="2005-01-01", coarse_end="2005-12-31",
                    fine_start="2005-05-16", fine_end="2005-08-24", seed=11)


@pytest.fixture(scope="session")
def twin_files(tmp_path_factory, twin_spec):
    from fastds.data.synthetic import write_twin
    out = tmp_path_factory.mktemp("twin")
    write_twin(out, twin_spec, native_days=0)
    return out


@pytest.fixture(scope="session")
def store_path(twin_files, twin_spec):
    from fastds.data.store import prepare
    box = ",".join(map(str, twin_spec.region.as_tuple()))
    return prepare(coarse=twin_files / "coarse_daily.nc", fine=twin_files / "fine_daily.nc",
                   elevation=twin_files / "elevation.nc", region=box,
                   out=twin_files.parent / "store.zarr")


@pytest.fixture(scope="session")
def tiny_config():
    from fastds.config import load_config
    return load_config("tiny", overrides=TEST_OVERRIDES)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, store_path, tiny_config):
    from fastds.training.stages import pretrain, train
    run = tmp_path_factory.mktemp("run")
    pretrain(data=store_path, run=run, config=tiny_config, progress=False)
    # the U-Net first: the default DDPM diffuses its residual (train.mean = "unet")
    train(data=store_path, run=run, config=tiny_config, model="unet", progress=False)
    train(data=store_path, run=run, config=tiny_config, model="ddpm", progress=False)
    return run
