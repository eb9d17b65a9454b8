"""Halo-and-Hann stitching: fastds backends vs a naive numpy loop vs MONAI-style torch blending.

Bytes that must move: every patch read once plus the output written once (``blend_cut``
also writes every patch again); the `memcpy` provider copies patches + image with one thread
in the same run, so bandwidth ratios to it are machine-independent. Providers: ``plan``
(``StitchPlan.stitch``: band scatter, plan built once), ``stitch`` (the one-call form, same
kernel plus input checks), ``gather`` (the per-pixel OpenMP gather it replaced),
``blend_cut`` (fused stitch + cut), ``ref``, ``numpy_loop``, ``monai``.
"""
import sys

import numpy as np
import pytest
import torch

import fastds
from fastds.stitch import stitch_ref

CONFIGS = {  # Area-1-sized fine grid (432 x 357 pixels at 0.0625 deg)
    "paper_16_4_2": dict(tile=16, halo=4, stride=2),
    "large_128_8_112": dict(tile=128, halo=8, stride=112),
}
H, W = 357, 432


def _setup(cfg):
    starts = fastds.plan_patches((H, W), cfg["tile"], cfg["halo"], cfg["stride"])
    rng = np.random.default_rng(0)
    patches = rng.random((len(starts), cfg["tile"], cfg["tile"]), dtype=np.float32)
    nbytes = patches.nbytes + H * W * 4
    return starts, patches, nbytes


def numpy_loop(patches, starts, tile):
    """What a peer writes first: full-tile Hann weights, S[y:y+t, x:x+t] += w*p."""
    w = np.maximum(np.outer(np.hanning(tile), np.hanning(tile)), 1e-6).astype(np.float32)
    S = np.zeros((H, W), np.float32)
    Z = np.zeros((H, W), np.float32)
    for p, (y, x) in zip(patches, starts):
        S[y:y + tile, x:x + tile] += w * p
        Z[y:y + tile, x:x + tile] += w
    return S / np.maximum(Z, 1e-6)


def monai_style(patches, starts, tile):
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


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("provider", ["memcpy", "ref", "plan", "stitch", "gather", "blend_cut",
                                      "numpy_loop", "monai"])
def test_stitch(benchmark, record, name, provider):
    cfg = CONFIGS[name]
    starts, patches, nbytes = _setup(cfg)
    benchmark.group = f"stitch {name} ({len(starts)} patches)"
    tile, halo = cfg["tile"], cfg["halo"]
    if provider == "memcpy":
        dst = np.empty_like(patches)
        out = np.empty((H, W), np.float32)
        src = np.zeros((H, W), np.float32)

        def fn():
            np.copyto(dst, patches)
            np.copyto(out, src)
    elif provider == "ref":
        fn = lambda: stitch_ref(patches, starts, (H, W), halo=halo)  # noqa: E731
    elif provider in ("plan", "stitch", "gather", "blend_cut"):
        expect = stitch_ref(patches, starts, (H, W), halo=halo)
        plan = fastds.StitchPlan(starts, (H, W), tile=tile, halo=halo)
        gather = fastds.stitch(patches, starts, (H, W), halo=halo, backend="cpu-gather")
        np.testing.assert_allclose(gather, expect, rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(plan.stitch(patches), gather)
        fn = {"plan": lambda: plan.stitch(patches),
              "stitch": lambda: fastds.stitch(patches, starts, (H, W), halo=halo, backend="cpu"),
              "gather": lambda: fastds.stitch(patches, starts, (H, W), halo=halo, backend="cpu-gather"),
              "blend_cut": lambda: plan.blend_cut(patches)}[provider]
        if provider == "blend_cut":
            nbytes += patches.nbytes
    elif provider == "numpy_loop":
        fn = lambda: numpy_loop(patches, starts, tile)  # noqa: E731
    else:
        pytest.importorskip("monai")
        fn = lambda: monai_style(patches, starts, tile)  # noqa: E731
    slow = provider in ("ref", "numpy_loop", "monai") and len(starts) > 1000
    if slow:
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark(fn)
    record(benchmark, benchmark.group, provider, nbytes=nbytes, items=len(starts), unit="patches")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
