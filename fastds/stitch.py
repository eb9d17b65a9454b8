"""Patch planning and Halo-and-Hann stitching (METHOD.md §5).

``stitch`` is the dispatcher; ``stitch_ref`` is the readable reference every backend is
tested against. Backends: ``ref`` (numpy/torch loop), ``cpu`` (C++/OpenMP band scatter,
``csrc/stitch_band.cpp``), ``cpu-gather`` (the per-pixel OpenMP gather it replaced,
``csrc/stitch_cpu.cpp``, bit-identical, kept for comparison), ``cuda`` (``csrc/stitch_cuda.cu`` through ``fastds._C_cuda``, torch
CUDA tensors), ``cupy`` (the same ``.cu`` source through ``cupy.RawModule``).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _backend

__all__ = ["plan_patches", "stitch", "stitch_ref", "kept_box", "hann_table", "cut", "cut_ref",
           "StitchPlan"]

BACKENDS = ("auto", "ref", "cpu", "cpu-gather", "cuda", "cupy")
BAND = 16  # rows per band of the CPU scatter: S and Z of a band stay in L1/L2


def _positive_int(name, value, *, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return int(value)


def _axis_starts(size, tile, stride):
    count = math.ceil((size - tile) / stride) + 1
    return np.unique(np.minimum(np.arange(count) * stride, size - tile))


def plan_patches(shape, tile, halo, stride) -> np.ndarray:
    """Patch starts covering an image, the last patch on each axis flush with the border.

    Parameters
    ----------
    shape : (H, W)
    tile : int, patch side in pixels (patches are ``tile x tile``)
    halo : int, pixels dropped at inner patch edges when stitching
    stride : int, step between patch starts, at most ``tile - 2*halo`` so the kept
        regions still cover every pixel

    Returns
    -------
    starts : np.ndarray int64 (N, 2) of ``(y0, x0)``, row-major, with
        ``y0 = min(i*stride, H - tile)`` (and the same for x0); every pixel is covered.
    """
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got {shape!r}")
    H, W = (_positive_int(n, v) for n, v in zip(("H", "W"), shape))
    tile = _positive_int("tile", tile)
    halo = _positive_int("halo", halo, allow_zero=True)
    stride = _positive_int("stride", stride)
    if tile > H or tile > W:
        raise ValueError(f"tile={tile} is larger than the image {H}x{W}; use a smaller tile")
    if stride > tile - 2 * halo:
        raise ValueError(
            f"stride={stride} > tile - 2*halo = {tile - 2 * halo}: the kept patch centres would "
            f"leave gaps; use stride <= {max(tile - 2 * halo, 0)} or a smaller halo")
    ys, xs = _axis_starts(H, tile, stride), _axis_starts(W, tile, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.int64)


def kept_box(y0, x0, tile, halo, H, W):
    """The kept region ``(ky0, ky1, kx0, kx1)`` of a patch: halo dropped on inner sides."""
    return (y0 + halo if y0 > 0 else y0, y0 + tile - halo if y0 + tile < H else y0 + tile,
            x0 + halo if x0 > 0 else x0, x0 + tile - halo if x0 + tile < W else x0 + tile)


@functools.lru_cache(maxsize=32)
def hann_table(tile: int) -> np.ndarray:
    """float64 (tile + 1, tile): row M is ``numpy.hanning(M)`` padded with zeros."""
    table = np.zeros((tile + 1, tile))
    for m in range(1, tile + 1):
        table[m, :m] = np.hanning(m)
    table.setflags(write=False)
    return table


def _is_torch(a):
    return type(a).__module__.startswith("torch")


def _is_cupy(a):
    return type(a).__module__.startswith("cupy")


def _check_float(patches, op):
    """The stitch kernels exist for float32 and float64; other dtypes (float16, bfloat16,
    integers) are refused, not converted (cast with ``.float()`` and back)."""
    if _is_torch(patches):
        import torch
        floating = patches.dtype in (torch.float32, torch.float64)
        dtype_name = str(patches.dtype).replace("torch.", "")
    else:
        floating = np.dtype(patches.dtype) in (np.float32, np.float64)
        dtype_name = str(patches.dtype)
    if not floating:
        raise TypeError(f"{op}: patches must be float32 or float64, got {dtype_name}; cast them "
                        "(e.g. patches.float()) and the result back")


def _check_inputs(patches, starts, shape, halo, eps):
    _check_float(patches, "stitch")
    if patches.ndim not in (3, 4):
        raise ValueError(
            f"stitch: patches must be (N, tile, tile) or (N, C, tile, tile), got shape "
            f"{tuple(patches.shape)}")
    tile = int(patches.shape[-1])
    if int(patches.shape[-2]) != tile:
        raise ValueError(f"stitch: patches must be square, got {tuple(patches.shape[-2:])}")
    if len(shape) != 2:
        raise ValueError(f"stitch: shape must be (H, W), got {shape!r}")
    H, W = int(shape[0]), int(shape[1])
    if tile > H or tile > W:
        raise ValueError(f"stitch: tile {tile} does not fit in the image {H}x{W}")
    halo = _positive_int("halo", halo, allow_zero=True)
    if 2 * halo >= tile:
        raise ValueError(f"stitch: halo={halo} leaves nothing of a {tile}-pixel tile (need 2*halo < tile)")
    if not (eps > 0):
        raise ValueError(f"stitch: eps must be > 0, got {eps}")
    starts = np.asarray(starts.cpu() if _is_torch(starts) else
                        (starts.get() if _is_cupy(starts) else starts))
    if starts.ndim != 2 or starts.shape[1] != 2:
        raise ValueError(f"stitch: starts must be (N, 2) of (y0, x0), got shape {starts.shape}")
    if not np.issubdtype(starts.dtype, np.integer):
        raise TypeError(f"stitch: starts must be integers, got {starts.dtype}")
    if starts.shape[0] != patches.shape[0]:
        raise ValueError(
            f"stitch: {patches.shape[0]} patches but {starts.shape[0]} starts; they must match")
    bad = (starts[:, 0] < 0) | (starts[:, 0] > H - tile) | (starts[:, 1] < 0) | (starts[:, 1] > W - tile)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"stitch: patch {i} starts at {tuple(starts[i])}, outside 0..{H - tile} x 0..{W - tile} "
            f"for {tile}-pixel tiles in a {H}x{W} image ({int(bad.sum())} such patches)")
    return starts.astype(np.int64), tile, H, W, halo


def stitch_ref(patches, starts, shape, *, halo=0, eps=1e-6):
    """Reference Halo-and-Hann stitch: a readable loop in numpy or torch (any device).

    Same contract as :func:`stitch`; sums in patch order in the patches' dtype.
    """
    starts, tile, H, W, halo = _check_inputs(patches, starts, shape, halo, eps)
    squeeze = patches.ndim == 3
    if _is_torch(patches):
        import torch
        p = patches.unsqueeze(1) if squeeze else patches
        S = torch.zeros((p.shape[1], H, W), dtype=p.dtype, device=p.device)
        Z = torch.zeros((H, W), dtype=p.dtype, device=p.device)
        as_array = lambda a: torch.as_tensor(a, dtype=p.dtype, device=p.device)  # noqa: E731
        floor = lambda a: torch.clamp(a, min=eps)  # noqa: E731
    else:
        xp = np
        if _is_cupy(patches):
            import cupy as xp
        p = patches[:, None] if squeeze else patches
        S = xp.zeros((p.shape[1], H, W), dtype=p.dtype)
        Z = xp.zeros((H, W), dtype=p.dtype)
        as_array = lambda a: xp.asarray(a, dtype=p.dtype)  # noqa: E731
        floor = lambda a: xp.maximum(a, eps)  # noqa: E731
    for n, (y0, x0) in enumerate(starts.tolist()):
        ky0, ky1, kx0, kx1 = kept_box(y0, x0, tile, halo, H, W)
        w = floor(as_array(np.outer(np.hanning(ky1 - ky0), np.hanning(kx1 - kx0))))
        S[:, ky0:ky1, kx0:kx1] += w * p[n, :, ky0 - y0:ky1 - y0, kx0 - x0:kx1 - x0]
        Z[ky0:ky1, kx0:kx1] += w
    out = S / floor(Z)
    return out[0] if squeeze else out


def _cell_size(starts, tile):
    """Cell of the CSR candidate lists: the typical start spacing (the median, since the
    flush last patch makes one gap short), so a cell meets few patches that miss it."""
    sizes = []
    for axis in (0, 1):
        u = np.unique(starts[:, axis])
        sizes.append(int(np.median(np.diff(u))) if u.size > 1 else tile)
    return max(1, min(min(sizes), tile))


@functools.lru_cache(maxsize=16)
def _plan_cached(key, starts_bytes, n, H, W, tile, halo):
    starts = np.frombuffer(starts_bytes, dtype=np.int64).reshape(n, 2)
    cell = _cell_size(starts, tile)
    boxes, ptr, idx, ncx = _backend.cpu_ext().build_stitch_plan(starts, H, W, tile, halo, cell)
    return boxes, ptr, idx, cell, int(ncx)


def _starts_key(starts):
    """(hash, bytes, n) of the starts, the key of every plan cache. Inference stitches every
    day (and every member) with the same starts, so plans are built once; the bytes are part
    of the key, so a hash collision cannot return a wrong plan."""
    b = np.ascontiguousarray(starts, dtype=np.int64).tobytes()
    return hash(b), b, len(starts)


def _plan(starts, H, W, tile, halo):
    return _plan_cached(*_starts_key(starts), H, W, tile, halo)


@functools.lru_cache(maxsize=16)
def _band_plan_cached(key, starts_bytes, n, H, W, tile, halo):
    boxes = _plan_cached(key, starts_bytes, n, H, W, tile, halo)[0]
    nb, *lists = _backend.cpu_ext().build_band_plan(boxes, H, tile, BAND)
    return (boxes, int(nb), *lists)


def _band_plan(starts, H, W, tile, halo):
    return _band_plan_cached(*_starts_key(starts), H, W, tile, halo)


@functools.lru_cache(maxsize=16)
def _band_weights_cached(key, starts_bytes, n, H, W, tile, halo, eps, dtype):
    """max(Z, eps) of a cached band plan, (H, W) in ``dtype``, built once per geometry, eps
    and dtype (read-only: every call of that geometry shares it): the weight sums every call
    of the band kernel would add again, summed once in the same order (so images keep their
    bits)."""
    boxes, nb, kp, ki, _, _ = _band_plan_cached(key, starts_bytes, n, H, W, tile, halo)
    z = np.empty((H, W), dtype=np.dtype(dtype))
    ext = _backend.cpu_ext()
    fn = ext.stitch_band_weights_f32 if z.dtype == np.float32 else ext.stitch_band_weights_f64
    fn(boxes, tile, BAND, nb, kp, ki, _hann(tile, z.dtype), float(eps), z)
    z.setflags(write=False)
    return z


@functools.lru_cache(maxsize=8)
def _hann(tile, dtype):
    return hann_table(tile).astype(dtype)


def _band_call(arr, band_plan, H, W, eps, zden, cut=None):
    """The band kernel on a C-contiguous (N, C, tile, tile) numpy array: (C, H, W) image,
    and, with ``cut`` (an array shaped like ``arr``), the image's patches written into it.
    ``zden`` (H, W, arr's dtype): the plan's :func:`_band_weights_cached`, so a call sums only S."""
    boxes, nb, kp, ki, fp, fi = band_plan
    out = np.empty((arr.shape[1], H, W), dtype=arr.dtype)
    ext = _backend.cpu_ext()
    fn = ext.stitch_band_f32 if arr.dtype == np.float32 else ext.stitch_band_f64
    fn(arr, boxes, BAND, nb, kp, ki, fp, fi, _hann(arr.shape[-1], arr.dtype), float(eps), out, cut,
       zden)
    return out


def _host_array(p):
    """A CPU patch array (numpy or torch) as the C-contiguous numpy array the kernels take."""
    return p.detach().contiguous().numpy() if _is_torch(p) else np.ascontiguousarray(p)


def _like(out, p):
    """A numpy result back in the kind of the input ``p`` (torch in, torch out; no copy)."""
    if _is_torch(p):
        import torch
        return torch.from_numpy(out)
    return out


def _stitch_cpu(p, starts, H, W, tile, halo, eps):
    arr, key = _host_array(p), _starts_key(starts)
    zden = _band_weights_cached(*key, H, W, tile, halo, float(eps), arr.dtype.str)
    return _like(_band_call(arr, _band_plan_cached(*key, H, W, tile, halo), H, W, eps, zden), p)


def _stitch_cpu_gather(p, starts, H, W, tile, halo, eps):
    arr = _host_array(p)
    boxes, ptr, idx, cell, ncx = _plan(starts, H, W, tile, halo)
    out = np.empty((arr.shape[1], H, W), dtype=arr.dtype)
    fn = _backend.cpu_ext().stitch_f32 if arr.dtype == np.float32 else _backend.cpu_ext().stitch_f64
    fn(arr, boxes, ptr, idx, cell, ncx, _hann(tile, arr.dtype), float(eps), out)
    return _like(out, p)


@functools.lru_cache(maxsize=16)
def _device_plan(key, starts_bytes, n, H, W, tile, halo, device, dtype):
    """The CSR plan and Hann table on ``device``, uploaded once per geometry (pinned host
    memory, so the copy is a true DMA), not on every call."""
    import torch
    boxes, ptr, idx, cell, ncx = _plan_cached(key, starts_bytes, n, H, W, tile, halo)
    up = lambda a: torch.from_numpy(np.ascontiguousarray(a)).pin_memory().to(device, non_blocking=True)  # noqa: E731
    hann = torch.from_numpy(hann_table(tile)).to(dtype).pin_memory().to(device, non_blocking=True)
    return up(boxes), up(ptr), up(idx), cell, ncx, hann


def _stitch_cuda(p, starts, H, W, tile, halo, eps):
    import torch
    dev = p.device
    p = p.contiguous()
    *plan, cell, ncx, hann = _device_plan(*_starts_key(starts), H, W, tile, halo, dev, p.dtype)
    out = torch.empty((p.shape[1], H, W), dtype=p.dtype, device=dev)
    # the launcher switches to the output's device itself (DeviceGuard in the .cu)
    _backend.cuda_ext().stitch(
        32 if p.dtype == torch.float32 else 64, p.data_ptr(), p.shape[1], tile, H, W,
        plan[0].data_ptr(), plan[1].data_ptr(), plan[2].data_ptr(), cell, ncx,
        hann.data_ptr(), float(eps), out.data_ptr(), torch.cuda.current_stream(dev).cuda_stream)
    return out


@functools.lru_cache(maxsize=1)
def _cupy_module():
    import cupy
    src_dir = _backend.csrc_dir()
    code = (src_dir / "stitch_cuda.cu").read_text()
    return cupy.RawModule(code=code, options=("-I" + str(src_dir), "--std=c++17"))


def _stitch_cupy(p, starts, H, W, tile, halo, eps):
    with p.device:  # allocate and launch on the patches' GPU, whatever device is current
        return _stitch_cupy_here(p, starts, H, W, tile, halo, eps)


def _stitch_cupy_here(p, starts, H, W, tile, halo, eps):
    import cupy
    boxes, ptr, idx, cell, ncx = _plan(starts, H, W, tile, halo)
    p = cupy.ascontiguousarray(p)
    out = cupy.empty((p.shape[1], H, W), dtype=p.dtype)
    single = p.dtype == cupy.float32
    kernel = _cupy_module().get_function("fastds_stitch_f32" if single else "fastds_stitch_f64")
    total = out.size
    scalar = np.float32 if single else np.float64
    kernel(((total + 255) // 256,), (256,), (
        p, np.int32(p.shape[1]), np.int32(tile), np.int32(H), np.int32(W),
        cupy.asarray(boxes), cupy.asarray(ptr), cupy.asarray(idx), np.int32(cell), np.int32(ncx),
        cupy.asarray(hann_table(tile), dtype=p.dtype), scalar(eps), out))
    return out


_IMPL = {"cpu": _stitch_cpu, "cpu-gather": _stitch_cpu_gather, "cuda": _stitch_cuda,
         "cupy": _stitch_cupy}


def _auto_backend(patches):
    if _is_cupy(patches):
        return "cupy"
    if _is_torch(patches) and patches.device.type == "cuda":
        return "cuda" if _backend.why_unavailable("cuda") is None else "ref"
    return "cpu" if _backend.why_unavailable("cpu") is None else "ref"


def stitch(patches, starts, shape, *, halo=0, eps=1e-6, backend="auto"):
    """Blend overlapping patches into one image with Halo-and-Hann weights (METHOD.md Eq. 9).

    Parameters
    ----------
    patches : (N, tile, tile) or (N, C, tile, tile), float32 or float64; numpy, torch (CPU or
        CUDA) or CuPy. The result has the same kind, dtype and device.
    starts : (N, 2) integers, ``(y0, x0)`` of each patch, e.g. from :func:`plan_patches`;
        each within ``0..H-tile`` x ``0..W-tile``.
    shape : (H, W) of the output image.
    halo : pixels dropped from each patch side that does not touch the image border
        (a side touches it when ``y0 == 0``, ``y0 + tile == H``, and the same for x).
    eps : floor for the weights and for the normaliser.
    backend : ``"auto"`` (the fastest available for the input's device), ``"ref"``, ``"cpu"``,
        ``"cpu-gather"``, ``"cuda"`` or ``"cupy"``; an unavailable one raises ``BackendUnavailable`` saying why.

    Returns
    -------
    (H, W) or (C, H, W), matching ``patches``: for each pixel ``S / max(Z, eps)`` where, over
    the patches whose kept region ``[ky0, ky1) x [kx0, kx1)`` holds it,
    ``w = max(hanning(ky1 - ky0)[y - ky0] * hanning(kx1 - kx0)[x - kx0], eps)``,
    ``S = sum w * patch`` and ``Z = sum w`` (``hanning`` is ``numpy.hanning``). A pixel that
    no kept region covers is 0. Constant patches give that constant everywhere.
    """
    _backend.require(backend, op="stitch", choices=BACKENDS)
    if backend == "auto":
        backend = _auto_backend(patches)
    if backend == "ref":
        return stitch_ref(patches, starts, shape, halo=halo, eps=eps)
    if backend == "cuda" and not (_is_torch(patches) and patches.device.type == "cuda"):
        raise ValueError("stitch: backend 'cuda' takes torch CUDA tensors; move patches with .cuda()")
    if backend == "cupy" and not _is_cupy(patches):
        raise ValueError("stitch: backend 'cupy' takes CuPy arrays; convert with cupy.asarray")
    if backend in ("cpu", "cpu-gather") and (_is_cupy(patches) or (_is_torch(patches) and patches.device.type != "cpu")):
        raise ValueError(f"stitch: backend {backend!r} takes numpy arrays or CPU torch tensors")
    starts, tile, H, W, halo = _check_inputs(patches, starts, shape, halo, eps)
    squeeze = patches.ndim == 3
    p = patches[:, None] if squeeze else patches
    out = _IMPL[backend](p, starts, H, W, tile, halo, eps)
    return out[0] if squeeze else out


def cut_ref(image, starts, tile):
    """Reference cut: a readable loop. image ([C,] H, W) -> patches (N, [C,] tile, tile)."""
    starts = np.asarray(starts.cpu() if _is_torch(starts) else starts, dtype=np.int64)
    parts = [image[..., y:y + tile, x:x + tile] for y, x in starts.tolist()]
    if _is_torch(image):
        import torch
        return torch.stack(parts)
    xp = np
    if _is_cupy(image):
        import cupy as xp
    return xp.stack(parts)


def _windows(image, tile):
    """A view ``(H-tile+1, W-tile+1, [C,] tile, tile)`` of every tile-sized window of a
    ([C,] H, W) image: no copy and no index array, so gathering N patches needs only the
    (N,) start rows and columns (an (N, tile, tile) int64 index would be 8.4 GB for the
    paper's geometry on a global grid)."""
    if _is_torch(image):
        w = image.unfold(-2, tile, 1).unfold(-2, tile, 1)      # ([C,] H', W', t, t)
        return w.movedim(0, 2) if image.ndim == 3 else w
    if _is_cupy(image):
        from cupy.lib.stride_tricks import as_strided
    else:
        from numpy.lib.stride_tricks import as_strided
    H, W = image.shape[-2:]
    sy, sx = image.strides[-2], image.strides[-1]
    shape, strides = (H - tile + 1, W - tile + 1, tile, tile), (sy, sx, sy, sx)
    if image.ndim == 3:
        shape, strides = shape[:2] + (image.shape[0],) + shape[2:], (sy, sx, image.strides[0], sy, sx)
    return as_strided(image, shape=shape, strides=strides, writeable=False)


def _cut(image, ys, xs, tile):
    """Patches (N, [C,] tile, tile) of ``image`` at rows ``ys`` and columns
    ``xs`` (each (N,) int64, on the image's device for torch)."""
    if image.ndim == 3 and not _is_torch(image):
        # numpy gathers a (tile, tile) block per index far faster than a (C, tile, tile) one
        xp = np if isinstance(image, np.ndarray) else __import__("cupy")
        out = xp.empty((image.shape[0], len(ys), tile, tile), dtype=image.dtype)
        for c in range(image.shape[0]):
            out[c] = _windows(image[c], tile)[ys, xs]
        return out.transpose((1, 0, 2, 3))
    return _windows(image, tile)[ys, xs]


def _starts_on(image, starts):
    """(ys, xs) of ``starts`` where ``image`` lives (torch: its device; CuPy: the GPU)."""
    ys, xs = np.ascontiguousarray(starts[:, 0]), np.ascontiguousarray(starts[:, 1])
    if _is_torch(image):
        import torch
        return (torch.as_tensor(ys, device=image.device), torch.as_tensor(xs, device=image.device))
    if _is_cupy(image):
        import cupy
        return cupy.asarray(ys), cupy.asarray(xs)
    return ys, xs


def cut(image, starts, tile):
    """Patches of ``image`` at ``starts``: ([C,] H, W) -> (N, [C,] tile, tile), one gather.

    Numpy, torch (any device) or CuPy in, the same kind, dtype and device out;
    ``starts`` (N, 2) as for :func:`stitch`, each within ``0..H-tile`` x ``0..W-tile``.
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"cut: image must be (H, W) or (C, H, W), got shape {tuple(image.shape)}")
    H, W = int(image.shape[-2]), int(image.shape[-1])
    tile = _positive_int("tile", tile)
    st = np.asarray(starts.cpu() if _is_torch(starts) else (starts.get() if _is_cupy(starts) else starts))
    if st.ndim != 2 or st.shape[1] != 2 or not np.issubdtype(st.dtype, np.integer):
        raise ValueError(f"cut: starts must be (N, 2) integers, got {st.dtype} {st.shape}")
    if tile > H or tile > W or (st < 0).any() or (st[:, 0] > H - tile).any() or (st[:, 1] > W - tile).any():
        raise ValueError(f"cut: {tile}-pixel patches at these starts do not fit in a {H}x{W} image")
    return _cut(image, *_starts_on(image, st.astype(np.int64)), tile)


class StitchPlan:
    """Everything about a patch geometry that does not depend on the values, built once.

    ``plan = StitchPlan(starts, shape, tile=16, halo=4)`` validates the starts and builds the
    CPU gather plan (CSR lists of patches per cell) once; then, for numpy, torch or CuPy
    arrays:

    - ``plan.stitch(patches)`` -> ``([C,] H, W)``: the same image as
      ``fastds.stitch(patches, starts, shape, halo=halo)``;
    - ``plan.cut(image)`` -> ``(N, [C,] tile, tile)``: the patches of an image at the starts;
    - ``plan.blend_cut(patches)`` -> ``(image, patches_of_image)``: stitch, then cut the
      blended image again (step fusion: overlapping patches agree on one field).

    On the CPU backend the plan holds the band-scatter lists and, per dtype, the weight
    sums max(Z, eps) (geometry only), so a call only checks the patch array's shape and dtype
    (no range checks, no hashing of the starts) and sums only the weighted values, and
    ``blend_cut`` is one fused pass: each band of the image, once normalised, is copied into
    the patches that cover it. Elsewhere ``blend_cut`` is the stitch kernel then one gather.
    """

    def __init__(self, starts, shape, *, tile, halo=0, eps=1e-6, backend="auto"):
        tile = _positive_int("tile", tile)
        if len(shape) != 2:
            raise ValueError(f"StitchPlan: shape must be (H, W), got {shape!r}")
        self.H, self.W = int(shape[0]), int(shape[1])
        dummy = np.empty((len(np.asarray(starts)), tile, tile), np.float32)
        self.starts, self.tile, _, _, self.halo = _check_inputs(dummy, np.asarray(starts),
                                                                (self.H, self.W), halo, eps)
        self.eps = float(eps)
        self.backend = backend
        self._indices = {}  # device -> (ys, xs) of the starts there
        self._band = None
        self._zden = {}  # dtype -> max(Z, eps), built at the first CPU call in that dtype
        if _backend.why_unavailable("cpu") is None:
            self._band = _band_plan(self.starts, self.H, self.W, self.tile, self.halo)

    def _weights(self, dtype):
        key = np.dtype(dtype).str
        if key not in self._zden:
            self._zden[key] = _band_weights_cached(*_starts_key(self.starts), self.H, self.W,
                                                   self.tile, self.halo, self.eps, key)
        return self._zden[key]

    def _cpu_array(self, patches):
        """The C-contiguous numpy view the band kernel takes, or None when this call is not
        the CPU backend's (another device or backend, or no extension)."""
        if self._band is None or self.backend not in ("auto", "cpu") or _is_cupy(patches):
            return None
        if _is_torch(patches) and patches.device.type != "cpu":
            return None
        if not (_is_torch(patches) or isinstance(patches, np.ndarray)):
            return None
        _check_float(patches, "StitchPlan")
        patches = _host_array(patches)
        want = (len(self.starts), self.tile, self.tile)
        if patches.ndim not in (3, 4) or patches.shape[0] != want[0] or patches.shape[-2:] != want[1:]:
            raise ValueError(f"StitchPlan: patches must be (N={want[0]}, [C,] {self.tile}, {self.tile}), "
                             f"got {tuple(patches.shape)}")
        if patches.dtype not in (np.float32, np.float64):
            raise TypeError(f"StitchPlan: patches must be float32 or float64, got {patches.dtype}")
        arr = np.ascontiguousarray(patches)
        return arr[:, None] if arr.ndim == 3 else arr


    def __len__(self):
        return len(self.starts)

    @property
    def shape(self):
        return (self.H, self.W)

    def stitch(self, patches):
        """(N, [C,] tile, tile) -> ([C,] H, W); see :func:`fastds.stitch`."""
        arr = self._cpu_array(patches)
        if arr is not None:
            image = _band_call(arr, self._band, self.H, self.W, self.eps, self._weights(arr.dtype))
            return _like(image[0] if patches.ndim == 3 else image, patches)
        return stitch(patches, self.starts, (self.H, self.W), halo=self.halo, eps=self.eps,
                      backend=self.backend)

    def cut(self, image):
        """([C,] H, W) -> (N, [C,] tile, tile)."""
        if tuple(image.shape[-2:]) != (self.H, self.W):
            raise ValueError(f"StitchPlan.cut: image is {tuple(image.shape[-2:])}, the plan is "
                             f"{(self.H, self.W)}")
        if image.ndim not in (2, 3):
            raise ValueError(f"StitchPlan.cut: image must be (H, W) or (C, H, W), got {tuple(image.shape)}")
        return _cut(image, *self._device_starts(image), self.tile)

    def _device_starts(self, image):
        """The starts' rows and columns where ``image`` lives, uploaded once per device."""
        key = (type(image).__module__.split(".")[0], str(getattr(image, "device", "cpu")))
        if key not in self._indices:
            self._indices[key] = _starts_on(image, self.starts)
        return self._indices[key]

    def blend_cut(self, patches):
        """(N, [C,] tile, tile) -> (([C,] H, W) image, (N, [C,] tile, tile) patches of it)."""
        arr = self._cpu_array(patches)
        if arr is not None:
            cut = np.empty_like(arr)
            image = _band_call(arr, self._band, self.H, self.W, self.eps, self._weights(arr.dtype),
                               cut)
            if patches.ndim == 3:
                image, cut = image[0], cut[:, 0]
            return _like(image, patches), _like(cut, patches)
        image = self.stitch(patches)
        return image, self.cut(image)
