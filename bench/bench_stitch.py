"""Halo-and-Hann stitching: fastds backends vs the best vectorised torch peer, loops, MONAI.

Same work for every provider: one (H, W) image from the same float32 patches, on 2 threads
(``OMP_NUM_THREADS=2``, torch's threads too). Providers: ``plan`` (``StitchPlan.stitch``:
band scatter, plan built once), ``stitch`` (the one-call form, same kernel plus input
checks), ``gather`` (the per-pixel OpenMP gather it replaced), ``blend_cut`` (fused stitch +
cut), ``torch_index_add`` (the peer: kept pixels' flat indices and weights precomputed once,
like a plan, then one gather, a multiply and ``index_add_`` per call), ``ref``,
``numpy_loop`` and ``monai`` (loops; Area-1 geometry only, they take seconds beyond).

Bandwidth counts the bytes the kernel really moves: the 64-byte cache lines of each patch's
kept rows (halo rows and columns it never reads are not counted), the weight sums read and
the image written. ``memcpy`` is a torch copy of that many bytes (half read, half written) on
the same 2 threads, so "of memcpy bandwidth" compares equal traffic at equal thread count.
A copy streams contiguous lines; the stitch must read 8 of every patch's 16 rows (the kept
rows), scattered 1 KB apart. ``read_kept`` is the floor of that access alone: torch reading
the interior patches' kept rows (``patches[:, 4:12, 4:12]``, summed per patch: every kept
line read, nothing written but one float a patch) on the same threads; "of read_kept" is its
time over the provider's, so 1.0 means a stitch as fast as merely reading its inputs.
Geometries: Area 1 (357 x 432), a grid 4x larger (714 x 864), and 16x larger (1428 x 1728:
its patches, 630 MB, are well beyond this machine's 480 MB L3), at the paper's tile 16,
halo 4, stride 2; and tile 128 / stride 112 on Area 1 (1 MB, inside L2).
"""
import sys

import numpy as np
import pytest
import torch

import fastds
from fastds.stitch import stitch_ref

CONFIGS = {
    "paper_16_4_2": dict(tile=16, halo=4, stride=2, shape=(357, 432)),
    "paper_4x_grid": dict(tile=16, halo=4, stride=2, shape=(714, 864)),
    "paper_16x_grid": dict(tile=16, halo=4, stride=2, shape=(1428, 1728)),
    "large_128_8_112": dict(tile=128, halo=8, stride=112, shape=(357, 432)),
}
LOOPS = ("ref", "numpy_loop", "monai")


def _setup(cfg):
    H, W = cfg["shape"]
    starts = fastds.plan_patches((H, W), cfg["tile"], cfg["halo"], cfg["stride"])
    rng = np.random.default_rng(0)
    patches = rng.random((len(starts), cfg["tile"], cfg["tile"]), dtype=np.float32)
    return starts, patches


def bytes_moved(starts, tile, halo, H, W, itemsize=4, line=64):
    """Cache lines of the patches' kept rows read (patches 64-byte aligned, row-major), plus
    the weight sums read and the image written."""
    y0, x0 = starts[:, 0], starts[:, 1]
    ky0 = np.where(y0 > 0, y0 + halo, y0)
    ky1 = np.where(y0 + tile < H, y0 + tile - halo, y0 + tile)
    kx0 = np.where(x0 > 0, x0 + halo, x0)
    kx1 = np.where(x0 + tile < W, x0 + tile - halo, x0 + tile)
    total = 0
    n = np.arange(len(starts))
    for r in range(tile):
        rows = (ky0 - y0 <= r) & (r < ky1 - y0)
        base = ((n * tile + r) * tile) * itemsize
        a = base + (kx0 - x0) * itemsize
        b = base + (kx1 - x0) * itemsize - 1
        total += int(((b // line - a // line + 1) * rows).sum()) * line
    return total + 2 * H * W * itemsize


def numpy_loop(patches, starts, tile, H, W):
    """What a peer writes first: full-tile Hann weights, S[y:y+t, x:x+t] += w*p."""
    w = np.maximum(np.outer(np.hanning(tile), np.hanning(tile)), 1e-6).astype(np.float32)
    S = np.zeros((H, W), np.float32)
    Z = np.zeros((H, W), np.float32)
    for p, (y, x) in zip(patches, starts):
        S[y:y + tile, x:x + tile] += w * p
        Z[y:y + tile, x:x + tile] += w
    return S / np.maximum(Z, 1e-6)


def monai_style(patches, starts, tile, H, W):
    """MONAI's sliding-window aggregation (importance map, torch slice accumulate)."""
    from monai.data.utils import compute_importance_map
    imp = compute_importance_map((tile, tile), mode="gaussian", sigma_scale=0.125)
    p = torch.from_numpy(patches)
    out = torch.zeros((H, W))
    cnt = torch.zeros((H, W))
    for i, (y, x) in enumerate(starts.tolist()):
        out[y:y + tile, x:x + tile] += imp * p[i]
        cnt[y:y + tile, x:x + tile] += imp
    return out / cnt


class TorchIndexAdd:
    """The best vectorised torch form of the same stitch: everything that depends on the
    geometry alone (which patch pixels are kept, where they land, their floored Hann weights,
    max(Z, eps)) is built once, as fastds' plan is; a call is one gather, one multiply, one
    ``index_add_`` and one divide."""

    def __init__(self, starts, tile, halo, H, W, eps=1e-6):
        from fastds.stitch import hann_table
        y0, x0 = starts[:, 0], starts[:, 1]
        ky0 = np.where(y0 > 0, y0 + halo, y0)
        ky1 = np.where(y0 + tile < H, y0 + tile - halo, y0 + tile)
        kx0 = np.where(x0 > 0, x0 + halo, x0)
        kx1 = np.where(x0 + tile < W, x0 + tile - halo, x0 + tile)
        r = np.arange(tile)
        table = hann_table(tile)

        def axis(k0, k1, s0):  # (N, tile) kept mask and Hann factor along one axis
            off = r[None, :] - (k0 - s0)[:, None]
            size = (k1 - k0)[:, None]
            keep = (off >= 0) & (off < size)
            return keep, np.where(keep, table[size, np.clip(off, 0, tile - 1)], 0.0)

        (my, wy), (mx, wx) = axis(ky0, ky1, y0), axis(kx0, kx1, x0)
        keep = my[:, :, None] & mx[:, None, :]
        n = np.arange(len(starts))[:, None, None]
        src = (n * tile + r[None, :, None]) * tile + r[None, None, :]
        dst = (y0[:, None, None] + r[None, :, None]) * W + x0[:, None, None] + r[None, None, :]
        w = np.maximum(wy[:, :, None] * wx[:, None, :], eps)
        self.src = torch.from_numpy(src[keep])
        self.dst = torch.from_numpy(dst[keep])
        self.w = torch.from_numpy(w[keep].astype(np.float32))
        z = torch.zeros(H * W).index_add_(0, self.dst, self.w)
        self.zden = z.clamp_min(eps)
        self.shape = (H, W)

    def __call__(self, patches):
        vals = patches.reshape(-1).index_select(0, self.src).mul_(self.w)
        s = torch.zeros(self.zden.shape).index_add_(0, self.dst, vals)
        return s.div_(self.zden).reshape(self.shape)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "paper_16x_grid" else n
                                  for n in CONFIGS])
@pytest.mark.parametrize("provider", ["memcpy", "read_kept", "ref", "plan", "stitch", "gather", "blend_cut",
                                      "torch_index_add", "numpy_loop", "monai"])
def test_stitch(benchmark, record, name, provider):
    cfg = CONFIGS[name]
    starts, patches = _setup(cfg)
    tile, halo, (H, W) = cfg["tile"], cfg["halo"], cfg["shape"]
    benchmark.group = f"stitch {name} {H}x{W} ({len(starts)} patches)"
    if provider in LOOPS and len(starts) > 40_000:
        pytest.skip("the loops take seconds per call beyond Area 1")

    nbytes = bytes_moved(starts, tile, halo, H, W)
    if provider == "read_kept":
        tp = torch.from_numpy(patches)
        kept = tp[:, halo:tile - halo, halo:tile - halo]
        sums = torch.empty(len(starts))
        fn = lambda: torch.sum(kept, dim=(1, 2), out=sums)  # noqa: E731
    elif provider == "memcpy":
        src = torch.empty(nbytes // 8)  # float32: nbytes/2 read and nbytes/2 written
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731 - torch's copy runs on its 2 threads
    elif provider == "ref":
        fn = lambda: stitch_ref(patches, starts, (H, W), halo=halo)  # noqa: E731
    elif provider in ("plan", "stitch", "gather", "blend_cut", "torch_index_add"):
        expect = stitch_ref(patches, starts, (H, W), halo=halo) if len(starts) < 40_000 else None
        plan = fastds.StitchPlan(starts, (H, W), tile=tile, halo=halo)
        got = plan.stitch(patches)
        if expect is not None:
            np.testing.assert_allclose(got, expect, rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(got, fastds.stitch(patches, starts, (H, W), halo=halo,
                                                         backend="cpu-gather"))
        if provider == "torch_index_add":
            peer, tp = TorchIndexAdd(starts, tile, halo, H, W), torch.from_numpy(patches)
            np.testing.assert_allclose(peer(tp).numpy(), got, rtol=1e-4, atol=1e-5)
            fn = lambda: peer(tp)  # noqa: E731
        else:
            fn = {"plan": lambda: plan.stitch(patches),
                  "stitch": lambda: fastds.stitch(patches, starts, (H, W), halo=halo, backend="cpu"),
                  "gather": lambda: fastds.stitch(patches, starts, (H, W), halo=halo, backend="cpu-gather"),
                  "blend_cut": lambda: plan.blend_cut(patches)}[provider]
        if provider == "blend_cut":
            nbytes += patches.nbytes  # it also writes every patch again
    elif provider == "numpy_loop":
        fn = lambda: numpy_loop(patches, starts, tile, H, W)  # noqa: E731
    else:
        pytest.importorskip("monai")
        fn = lambda: monai_style(patches, starts, tile, H, W)  # noqa: E731
    if provider in LOOPS and len(starts) > 1000:
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark(fn)
    record(benchmark, benchmark.group, provider, nbytes=nbytes, items=len(starts), unit="patches",
           peer=provider == "torch_index_add")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
