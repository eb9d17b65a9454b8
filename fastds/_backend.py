"""Capability probes, made once and lazily, and the one place backend errors are written.

``HAS_CUDA_EXT``, ``HAS_TRITON``, ``HAS_CUPY`` and ``CUDA`` are module attributes computed on
first access (PEP 562), so ``import fastds`` never imports triton or cupy.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

__all__ = ["BackendUnavailable", "capabilities", "report", "require", "needs_grad",
           "triton_inference", "csrc_dir", "cpu_ext", "cuda_ext", "bf16_native", "resolve_precision",
           "cpu_model"]


class BackendUnavailable(RuntimeError):
    """A backend was asked for explicitly and cannot run here; the message says why."""


@functools.lru_cache(maxsize=None)
def _import(name):
    try:
        return importlib.import_module(name), None
    except Exception as err:  # ImportError, or a broken binary (OSError, RuntimeError)
        return None, f"{type(err).__name__}: {err}"


def _extension(name, remedy):
    mod, err = _import(name)
    if mod is None:
        raise BackendUnavailable(f"the extension {name} is not available ({err}); {remedy}")
    return mod


def cpu_ext():
    return _extension("fastds._C", "reinstall with `pip install -e .` from the repository so "
                      "setup.py builds it")


def cuda_ext():
    return _extension("fastds._C_cuda", "install the CUDA toolkit (nvcc) and reinstall, or set "
                      "FASTDS_FORCE_CUDA=1 to see why the build failed")


@functools.lru_cache(maxsize=None)
def _cuda_available():
    torch, _ = _import("torch")
    return bool(torch is not None and torch.cuda.is_available())


@functools.lru_cache(maxsize=None)
def _cuda_ext_probe():
    """None when the CUDA extension's kernels can run here, else why not: a driver older than
    the runtime it was built with, or no image for this GPU's architecture, shows up here
    (the extension asks the driver) rather than at the first launch."""
    mod, err = _import("fastds._C_cuda")
    if mod is None:
        return f"fastds._C_cuda does not import ({err})"
    why = mod.probe() if hasattr(mod, "probe") else ""
    return why or None


@functools.lru_cache(maxsize=None)
def _cupy_available():
    cupy, _ = _import("cupy")
    if cupy is None:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


_PROBES = {
    "HAS_CPU_EXT": lambda: _import("fastds._C")[0] is not None,
    "HAS_CUDA_EXT": lambda: _import("fastds._C_cuda")[0] is not None,
    "HAS_TRITON": lambda: _import("triton")[0] is not None,
    "HAS_CUPY": lambda: _import("cupy")[0] is not None,
    "CUDA": _cuda_available,
    "CUPY_CUDA": _cupy_available,
}


def __getattr__(name):
    if name in _PROBES:
        return _PROBES[name]()
    raise AttributeError(name)


def capabilities() -> dict:
    """All probes as a dict, e.g. for ``fastds --version`` and bug reports."""
    return {name: bool(probe()) for name, probe in _PROBES.items()}


_HOW = {
    "cpu": lambda: None if _PROBES["HAS_CPU_EXT"]() else (
        "fastds._C is not built (" + str(_import("fastds._C")[1]) + "); run `pip install -e .`"),
    "cpu-gather": lambda: _HOW["cpu"](),
    "cuda": lambda: (
        "fastds._C_cuda is not built (install the CUDA toolkit and reinstall)"
        if not _PROBES["HAS_CUDA_EXT"]() else
        "torch.cuda.is_available() is False (no CUDA device or driver)"
        if not _cuda_available() else _cuda_ext_probe()),
    "cupy": lambda: (
        "cupy is not installed (`pip install cupy-cuda13x`)" if not _PROBES["HAS_CUPY"]() else
        "cupy.cuda.is_available() is False (no CUDA device or driver)"
        if not _cupy_available() else None),
    "triton": lambda: (
        "triton is not installed (`pip install triton`)" if not _PROBES["HAS_TRITON"]() else
        None if _cuda_available() or _interpreting() else
        "no CUDA device for triton (set TRITON_INTERPRET=1 before importing to run on CPU)"),
}


def report() -> list[tuple[str, bool, str]]:
    """What was built and what can run here, as (name, ok, detail) rows for ``fastds doctor``:
    each missing piece comes with the reason and what to do."""
    import os
    rows = []
    for name, module in (("C++ extension (fastds._C)", "fastds._C"),
                         ("CUDA extension (fastds._C_cuda)", "fastds._C_cuda")):
        mod, err = _import(module)
        rows.append((name, mod is not None, getattr(mod, "__file__", "") if mod else err))
    torch, err = _import("torch")
    if torch is None:
        rows.append(("torch", False, err))
    else:
        cuda = _cuda_available()
        devs = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ""
        rows.append(("torch", True, f"{torch.__version__}, {torch.get_num_threads()} threads, "
                                    f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"))
        rows.append(("CUDA devices", cuda, devs or "torch.cuda.is_available() is False (no CUDA "
                                                   "device or driver, or a CPU build of torch)"))
    for label, key in (("triton", "triton"), ("cupy", "cupy")):
        mod, _ = _import(key)
        why = why_unavailable(key)
        detail = (f"{getattr(mod, '__version__', '?')}" + (f"; cannot run: {why}" if why else "")
                  if mod is not None else why)
        rows.append((label, mod is not None and why is None, detail))
    for dev in ("cpu", "cuda"):
        why = bf16_native(dev)
        rows.append((f"native bf16 ({dev})", why is None, "precision=auto samples and trains in bf16" if why is None
                     else f"{why}: precision=auto samples and trains in fp32"))
    for cap, runs in (("stitch backends", [b for b in ("cpu", "cuda", "cupy") if why_unavailable(b) is None]),
                      ("sampler-step backends", ["torch"] + [b for b in ("cpu", "cuda", "triton")
                                                               if why_unavailable(b) is None])):
        rows.append((cap, True, ", ".join(["ref"] + runs) if cap.startswith("stitch") else ", ".join(runs)))
    return rows


@functools.lru_cache(maxsize=None)
def _cpuinfo(path="/proc/cpuinfo") -> dict:
    """The first processor's ``key: value`` fields of ``path`` ({} where unreadable); read
    once a process, for the CPU flags and the model name alike."""
    fields = {}
    try:
        with open(path) as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor's block ends at its blank line
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_flags() -> set:
    return set(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    """This CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows of it."""
    import platform
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def bf16_native(device_type: str) -> str | None:
    """None when ``device_type`` ("cpu" or "cuda") runs bf16 matrix products in hardware,
    else why not: on a CPU without AVX512-BF16 or AMX oneDNN emulates bf16 (slower than
    fp32), and a GPU before Ampere has no bf16 tensor cores."""
    if device_type == "cuda":
        import torch
        if not _cuda_available():
            return "no CUDA device"
        return None if torch.cuda.is_bf16_supported(including_emulation=False) else \
            f"{torch.cuda.get_device_name()} has no native bf16"
    if device_type != "cpu":
        return f"no bf16 probe for device type {device_type!r}"
    flags = _cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return None
    return "this CPU has neither AVX512-BF16 nor AMX-BF16 (or /proc/cpuinfo is unreadable)"


@functools.lru_cache(maxsize=None)
def compile_unavailable(device_type: str) -> str | None:
    """None when ``torch.compile`` (inductor) compiles and runs a small function on
    ``device_type`` here, else why not (no C++ compiler for inductor's CPU code, no Triton
    for its GPU code, ...): ``sample.compile = "auto"`` then samples eager. Compiles once a
    process (seconds), only when a job asks."""
    import torch
    if device_type == "cuda" and not _cuda_available():
        return "no CUDA device"
    try:
        x = torch.linspace(-1.0, 1.0, 64, device=device_type)
        got = torch.compile(lambda t: torch.nn.functional.silu(t) * 2.0 + 1.0, dynamic=False)(x)
        if not torch.allclose(got, torch.nn.functional.silu(x) * 2.0 + 1.0, atol=1e-6):
            return "torch.compile returned other numbers than eager on a probe"
    except Exception as e:  # any failure of the toolchain means: do not compile
        return f"torch.compile failed on a probe: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 where the device has it natively (bf16_native)


def resolve_precision(precision: str, device, *, setting="sample.precision") -> str:
    """``"auto"`` -> ``"bf16"`` where :func:`bf16_native` says the device has it, else
    ``"fp32"``; ``"fp32"``/``"bf16"`` stay as asked; anything else is refused, naming
    ``setting``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{setting} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    import torch
    return "bf16" if bf16_native(torch.device(device).type) is None else "fp32"


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str) -> str | None:
    """None if ``backend`` can run here, else a sentence saying what is missing."""
    if backend not in _HOW:
        return None
    return _HOW[backend]()


def needs_grad(*tensors) -> bool:
    """True when autograd would record an op on ``tensors`` (forward-only kernels refuse)."""
    import torch
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def triton_inference(*tensors) -> bool:
    """True when "auto" should pick a forward-only Triton kernel for ``tensors``: they are on
    a CUDA device, nothing needs their gradient, and triton can launch there."""
    return (tensors[0].device.type == "cuda" and not needs_grad(*tensors)
            and why_unavailable("triton") is None)


def require(backend: str, *, op: str, choices) -> None:
    """Raise BackendUnavailable/ValueError unless ``backend`` is one of ``choices`` and runs here."""
    if backend not in choices:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {', '.join(choices)}")
    reason = why_unavailable(backend)
    if reason:
        raise BackendUnavailable(f"{op}: backend {backend!r} is unavailable: {reason}")


def csrc_dir() -> Path:
    """Folder holding the CUDA sources compiled at run time (installed copy, else the repo's)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):
        if (cand / "stitch.h").exists():
            return cand
    raise BackendUnavailable("fastds CUDA sources (stitch.h) not found in the installation")
