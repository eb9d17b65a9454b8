"""Build fastds: the CPU extension ``fastds._C`` always, the CUDA one when it can.

Environment switches (pytorch_scatter's convention):

- ``FASTDS_FORCE_CUDA=1``: build ``fastds._C_cuda`` even if the probe below says no; a
  failure is then an error.
- ``FASTDS_SKIP_CUDA_BUILD=1``: never build it.
- ``FASTDS_CUDA_ARCHS="80;90"``: the SM architectures to compile for (default ``80;90``,
  plus PTX for the newest so later GPUs can JIT it).
- ``FASTDS_NVCC``: the nvcc to use (default: ``$CUDA_HOME/bin/nvcc`` or ``nvcc`` on PATH).

A missing nvcc or toolkit only warns: the package works without the CUDA extension.
"""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# Sources that runtime compilers (CuPy's NVRTC) need: shipped inside the package.
RUNTIME_SOURCES = ["stitch.h", "stitch_cuda.cu", "step.h"]


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    explicit = os.environ.get("FASTDS_NVCC")
    if explicit:
        return explicit
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc):
    real = Path(os.path.realpath(nvcc))
    candidates = [real.parent.parent, Path("/usr/local/cuda")]
    try:  # wrappers such as /usr/local/bin/nvcc exec the real one: ask it where it lives
        text = Path(nvcc).read_text(errors="ignore")[:500]
        for token in text.split():
            if token.endswith("/bin/nvcc"):
                candidates.insert(0, Path(token).parent.parent)
    except OSError:
        pass
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def _cuda_plan():
    """Return (nvcc, cuda_home) if the CUDA extension should be built, else None."""
    if _flag("FASTDS_SKIP_CUDA_BUILD"):
        return None
    force = _flag("FASTDS_FORCE_CUDA")
    nvcc = _find_nvcc()
    home = _cuda_home(nvcc) if nvcc else None
    if nvcc and home and (home / "lib64" / "libcudart_static.a").exists():
        return nvcc, home
    msg = (
        "fastds: nvcc or the CUDA toolkit (cuda_runtime.h, libcudart_static.a) was not found; "
        "building without the CUDA extension (the 'cuda' stitch backend will be unavailable). "
        "Set CUDA_HOME or FASTDS_NVCC to build it."
    )
    if force:
        raise RuntimeError(msg.replace("building without", "FASTDS_FORCE_CUDA=1 but cannot build"))
    warnings.warn(msg)
    return None


def _gencode_flags():
    archs = os.environ.get("FASTDS_CUDA_ARCHS", "80;90")
    flags = []
    parts = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    for arch in parts:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = max(parts, key=int)
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


class BuildExt(build_ext):
    """Compile ``.cu`` sources with nvcc, then link them like any other object."""

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            nvcc, home = ext.cuda_plan
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            objdir = Path(self.build_temp) / "cuda"
            objdir.mkdir(parents=True, exist_ok=True)
            for src in cu:
                obj = objdir / (Path(src).stem + ".o")
                cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17",
                       "-Xcompiler", "-fPIC", f"-I{CSRC}", *_gencode_flags()]
                print(" ".join(cmd))
                try:
                    subprocess.check_call(cmd)
                except (OSError, subprocess.CalledProcessError) as err:
                    if _flag("FASTDS_FORCE_CUDA"):
                        raise
                    warnings.warn(f"fastds: nvcc failed ({err}); skipping the CUDA extension")
                    return
                ext.extra_objects.append(str(obj))
        try:
            super().build_extension(ext)
        except Exception as err:  # the CUDA extension is optional, the CPU one is not
            if ext.name == "fastds._C_cuda" and not _flag("FASTDS_FORCE_CUDA"):
                warnings.warn(f"fastds: could not link the CUDA extension ({err}); skipping it")
                return
            raise


class BuildPy(build_py):
    """Ship the CUDA sources that CuPy compiles at run time inside the package."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fastds" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for name in RUNTIME_SOURCES:
            shutil.copy2(CSRC / name, target / name)


cpu_ext = Pybind11Extension(
    "fastds._C",
    sources=[str(CSRC / f) for f in ("bindings.cpp", "stitch_cpu.cpp", "stitch_band.cpp", "step_cpu.cpp")],
    include_dirs=[str(CSRC)],
    # no errno from sqrt and no FP-exception flags to preserve (fastds never reads them): the
    # in-kernel normal draws (csrc/step.h) then vectorise; no arithmetic result changes
    extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
    extra_link_args=["-fopenmp"],
    cxx_std=17,
)
ext_modules = [cpu_ext]

plan = _cuda_plan()
if plan is not None:
    nvcc, home = plan
    cuda_ext = Pybind11Extension(
        "fastds._C_cuda",
        sources=[str(CSRC / "cuda_bindings.cpp"), str(CSRC / "stitch_cuda_launch.cu")],
        include_dirs=[str(CSRC), str(home / "include")],
        library_dirs=[str(home / "lib64")],
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O3"],
        cxx_std=17,
    )
    cuda_ext.cuda_plan = plan
    ext_modules.append(cuda_ext)

def _version():
    import re
    text = (ROOT / "fastds" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


setup(
    name="fastds",
    version=_version(),
    description="Generative downscaling of gridded satellite and reanalysis data, with compiled hot paths",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "fastds", "fastds.data", "fastds.models", "fastds.diffusion", "fastds.sampling",
        "fastds.training", "fastds.metrics", "fastds.kernels",
    ],
    package_dir={"fastds": "fastds", "fastds.kernels": "kernels"},
    package_data={"fastds": ["configs/*.toml", "_csrc/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
    # every module fastds imports at run time; torch is pinned by the user (CPU or CUDA build)
    install_requires=[
        "torch>=2.3", "numpy>=1.24", "scipy", "xarray", "pandas", "netCDF4", "h5netcdf",
        "zarr", "dask", "distributed", "statsmodels", "matplotlib", "tqdm", "numba",
        "scoringrules", "scores", "arch",
        "tomli>=1.1; python_version < '3.11'",
    ],
    extras_require={
        "gpu": ["triton", "cupy-cuda13x"],
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "triton", "zarr", "properscoring"],
        "peers": ["diffusers", "monai"],
    },
    entry_points={"console_scripts": ["fastds=fastds.cli:main"]},
    zip_safe=False,
)
