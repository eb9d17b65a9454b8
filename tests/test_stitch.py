import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastds
from fastds import _backend
from fastds.stitch import stitch_ref

from conftest import requires_cuda, requires_cupy_gpu, requires_nvcc

CASES = [  # (H, W, tile, halo, stride): irregular sizes, none a multiple of the tile
    (357, 432, 16, 4, 8),
    (357, 432, 24, 4, 16),
    (101, 77, 16, 0, 5),
    (130, 203, 64, 4, 37),
    (49, 50, 16, 4, 2),
    (33, 97, 24, 0, 24),
]


def _report(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return f"max abs diff {np.abs(a - b).max():.3g}, mean {np.abs(a - b).mean():.3g}"


@pytest.mark.parametrize("H,W,tile,halo,stride", CASES)
@pytest.mark.parametrize("C", [None, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_matches_ref(H, W, tile, halo, stride, C, dtype, rng):
    starts = fastds.plan_patches((H, W), tile, halo, stride)
    shape = (len(starts), tile, tile) if C is None else (len(starts), C, tile, tile)
    patches = rng.standard_normal(shape).astype(dtype)
    ref = stitch_ref(patches, starts, (H, W), halo=halo)
    out = fastds.stitch(patches, starts, (H, W), halo=halo, backend="cpu")
    print(_report(out, ref))
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


def test_ref_matches_brute_force_definition(rng):
    """The reference itself, against the formula written out pixel by pixel."""
    H, W, tile, halo = 23, 29, 10, 2
    starts = fastds.plan_patches((H, W), tile, halo, 3)
    patches = rng.random((len(starts), tile, tile))
    out = stitch_ref(patches, starts, (H, W), halo=halo)
    for y, x in [(0, 0), (22, 28), (11, 14), (5, 27)]:
        s = z = 0.0
        for n, (y0, x0) in enumerate(starts):
            top = y0 + halo if y0 > 0 else y0
            bot = y0 + tile - halo if y0 + tile < H else y0 + tile
            left = x0 + halo if x0 > 0 else x0
            right = x0 + tile - halo if x0 + tile < W else x0 + tile
            if top <= y < bot and left <= x < right:
                w = max(np.hanning(bot - top)[y - top] * np.hanning(right - left)[x - left], 1e-6)
                s += w * patches[n, y - y0, x - x0]
                z += w
        assert out[y, x] == pytest.approx(s / max(z, 1e-6), rel=1e-12)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("H,W,tile,halo,stride", CASES)
def test_partition_of_unity_and_borders(backend, H, W, tile, halo, stride):
    starts = fastds.plan_patches((H, W), tile, halo, stride)
    patches = np.full((len(starts), tile, tile), 0.37, dtype=np.float64)
    out = fastds.stitch(patches, starts, (H, W), halo=halo, backend=backend)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 0.37, rtol=1e-12)
    assert (out[0] != 0).all() and (out[-1] != 0).all() and (out[:, 0] != 0).all()


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_single_patch_returns_it(backend, rng):
    img = rng.random((1, 2, 40, 40)).astype(np.float32)
    starts = fastds.plan_patches((40, 40), 40, 4, 8)
    assert starts.tolist() == [[0, 0]]
    out = fastds.stitch(img, starts, (40, 40), halo=4, backend=backend)
    np.testing.assert_allclose(out, img[0], rtol=1e-6)


def test_torch_in_torch_out(rng):
    starts = fastds.plan_patches((50, 61), 16, 4, 8)
    p = torch.from_numpy(rng.random((len(starts), 16, 16)).astype(np.float32))
    for backend in ("ref", "cpu", "auto"):
        out = fastds.stitch(p, starts, (50, 61), halo=4, backend=backend)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (50, 61)
    np.testing.assert_allclose(
        fastds.stitch(p, torch.from_numpy(starts), (50, 61), halo=4).numpy(),
        stitch_ref(p.numpy(), starts, (50, 61), halo=4), rtol=2e-5, atol=1e-6)


def test_arbitrary_starts_and_uncovered_pixels(rng):
    """Starts need not come from plan_patches; pixels no patch covers are 0."""
    starts = np.array([[0, 0], [3, 7], [20, 30], [20, 31]])
    p = rng.random((4, 12, 12))
    for backend in ("ref", "cpu"):
        out = fastds.stitch(p, starts, (40, 45), halo=2, backend=backend)
        assert out[39, 0] == 0
    np.testing.assert_allclose(fastds.stitch(p, starts, (40, 45), halo=2, backend="cpu"),
                               stitch_ref(p, starts, (40, 45), halo=2), rtol=1e-12)


def test_plan_patches_contract():
    st = fastds.plan_patches((357, 432), 16, 4, 2)
    assert st.dtype == np.int64 and st.shape[1] == 2
    assert st[:, 0].max() == 357 - 16 and st[:, 1].max() == 432 - 16
    covered = np.zeros((357, 432), bool)
    for y0, x0 in st:
        covered[y0:y0 + 16, x0:x0 + 16] = True
    assert covered.all()
    assert len(st) == len(np.unique(st, axis=0))


@pytest.mark.parametrize("args,match", [
    (((100, 100), 16, 4, 9), "stride=9 > tile - 2\\*halo = 8"),
    (((10, 100), 16, 0, 4), "larger than the image"),
    (((100, 100), 0, 0, 4), "tile must be > 0"),
    (((100, 100), 16, -1, 4), "halo must be >= 0"),
    (((100, 100), 16, 4, 0), "stride must be > 0"),
    (((100,), 16, 4, 4), "shape must be"),
])
def test_plan_patches_errors(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastds.plan_patches(*args)


def test_stitch_errors(rng):
    st = fastds.plan_patches((40, 40), 16, 4, 8)
    p = rng.random((len(st), 16, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="must be \\(N, tile, tile\\)"):
        fastds.stitch(p[0], st, (40, 40))
    with pytest.raises(ValueError, match="patches but"):
        fastds.stitch(p[:-1], st, (40, 40))
    with pytest.raises(TypeError, match="float32 or float64"):
        fastds.stitch(p.astype(np.int32), st, (40, 40))
    with pytest.raises(ValueError, match="outside"):
        fastds.stitch(p, st + 30, (40, 40))
    with pytest.raises(TypeError, match="integers"):
        fastds.stitch(p, st.astype(float), (40, 40))
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fastds.stitch(p, st, (40, 40), backend="gpu")
    with pytest.raises(ValueError, match="halo=8 leaves nothing"):
        fastds.stitch(p, st, (40, 40), halo=8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error message")
def test_unavailable_backend_says_why(rng):
    st = fastds.plan_patches((40, 40), 16, 4, 8)
    p = rng.random((len(st), 16, 16)).astype(np.float32)
    with pytest.raises(fastds.BackendUnavailable, match="backend 'cuda' is unavailable: .*"):
        fastds.stitch(p, st, (40, 40), backend="cuda")
    with pytest.raises(fastds.BackendUnavailable, match="cupy"):
        fastds.stitch(p, st, (40, 40), backend="cupy")


@requires_nvcc
@pytest.mark.parametrize("src", ["stitch_cuda.cu", "stitch_cuda_launch.cu"])
def test_cuda_source_compiles_for_sm90(src, tmp_path):
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    out = tmp_path / (src + ".cubin")
    res = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-std=c++17", "-Xptxas", "-v",
                          f"-I{csrc}", str(csrc / src), "-o", str(out)],
                         capture_output=True, text=True)
    print(res.stderr[-3000:])
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0
    assert "fastds_stitch_f32" in res.stderr or src != "stitch_cuda.cu"
    assert " 0 bytes spill stores" in res.stderr


def test_cupy_gated_without_device():
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.is_available():
        pytest.skip("a CUDA device exists; the GPU test covers cupy")
    assert _backend.why_unavailable("cupy").startswith("cupy.cuda.is_available() is False")


@requires_cuda
@pytest.mark.parametrize("H,W,tile,halo,stride", CASES)
def test_cuda_matches_ref(H, W, tile, halo, stride, rng):
    starts = fastds.plan_patches((H, W), tile, halo, stride)
    p = torch.from_numpy(rng.standard_normal((len(starts), 2, tile, tile)).astype(np.float32))
    out = fastds.stitch(p.cuda(), starts, (H, W), halo=halo, backend="cuda").cpu()
    np.testing.assert_allclose(out.numpy(), stitch_ref(p.numpy(), starts, (H, W), halo=halo),
                               rtol=2e-5, atol=2e-6)


@requires_cupy_gpu
@pytest.mark.parametrize("H,W,tile,halo,stride", CASES)
def test_cupy_matches_ref(H, W, tile, halo, stride, rng):
    import cupy
    starts = fastds.plan_patches((H, W), tile, halo, stride)
    p = rng.standard_normal((len(starts), tile, tile))
    out = fastds.stitch(cupy.asarray(p), starts, (H, W), halo=halo, backend="cupy").get()
    np.testing.assert_allclose(out, stitch_ref(p, starts, (H, W), halo=halo), rtol=1e-12)


def test_import_is_light():
    """import fastds must not pull triton or cupy (lazy heavy imports)."""
    code = "import sys, fastds; print('triton' in sys.modules, 'cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("H,W,tile,halo,stride", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_per_pixel_function_on_cpu(H, W, tile, halo, stride, dtype, rng):
    """stitch_pixel (the function the CUDA kernel runs per thread), compiled into the CPU
    build: equals the reference, and equals the row kernel bit for bit (same sum order)."""
    S = sys.modules["fastds.stitch"]
    ext = _backend.cpu_ext()
    starts = fastds.plan_patches((H, W), tile, halo, stride)
    p = rng.standard_normal((len(starts), 2, tile, tile)).astype(dtype)
    boxes, ptr, idx, cell, ncx = S._plan(starts, H, W, tile, halo)
    out = np.empty((2, H, W), dtype)
    fn = ext.stitch_pixelwise_f32 if dtype == np.float32 else ext.stitch_pixelwise_f64
    fn(p, boxes, ptr, idx, cell, ncx, S.hann_table(tile).astype(dtype), 1e-6, out)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, stitch_ref(p, starts, (H, W), halo=halo), rtol=tol, atol=tol)
    np.testing.assert_array_equal(out, fastds.stitch(p, starts, (H, W), halo=halo, backend="cpu"))


def test_public_api_resolves():
    for name in fastds.__all__:
        assert getattr(fastds, name) is not None, name


@pytest.mark.parametrize("H,W,tile,halo,stride", CASES)
@pytest.mark.parametrize("C", [None, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stitch_plan_matches_stitch_and_cut_ref(H, W, tile, halo, stride, C, dtype, rng):
    from fastds.stitch import StitchPlan, cut, cut_ref
    starts = fastds.plan_patches((H, W), tile, halo, stride)
    extra = rng.integers(0, [H - tile + 1, W - tile + 1], (7, 2))  # arbitrary, off-grid starts
    starts = np.concatenate([starts, extra])
    shape = (len(starts),) + ((C,) if C else ()) + (tile, tile)
    p = rng.standard_normal(shape).astype(dtype)
    plan = StitchPlan(starts, (H, W), tile=tile, halo=halo)
    img = plan.stitch(p)
    np.testing.assert_array_equal(img, fastds.stitch(p, starts, (H, W), halo=halo))  # bit-identical
    image, again = plan.blend_cut(p)
    np.testing.assert_array_equal(image, img)
    np.testing.assert_array_equal(again, cut_ref(img, starts, tile))
    np.testing.assert_array_equal(plan.cut(img), cut(img, starts, tile))
    assert again.shape == p.shape and again.dtype == p.dtype
    t_img, t_again = plan.blend_cut(torch.from_numpy(p))
    assert isinstance(t_again, torch.Tensor)
    np.testing.assert_array_equal(t_again.numpy(), again)
    # blending the patches of a blended image changes nothing: one field, every patch agrees
    np.testing.assert_allclose(plan.stitch(again), img, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-6 if dtype == np.float32 else 1e-12)


def test_stitch_plan_and_cut_errors():
    from fastds.stitch import StitchPlan, cut
    starts = fastds.plan_patches((40, 50), 16, 4, 8)
    with pytest.raises(ValueError, match="outside"):
        StitchPlan(starts + 30, (40, 50), tile=16, halo=4)
    plan = StitchPlan(starts, (40, 50), tile=16, halo=4)
    with pytest.raises(ValueError, match="the plan is"):
        plan.cut(np.zeros((41, 50), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        cut(np.zeros((40, 50)), starts + 30, 16)


@pytest.mark.parametrize("H,W,tile,halo,stride", CASES)
@pytest.mark.parametrize("C", [None, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_band_scatter_is_bit_identical_to_the_gather(H, W, tile, halo, stride, C, dtype, rng):
    """The band-scatter kernel ("cpu") adds the same terms in the same order as the gather
    it replaced ("cpu-gather"), so the images agree bit for bit, off-grid starts included."""
    starts = fastds.plan_patches((H, W), tile, halo, stride)
    starts = np.concatenate([starts, rng.integers(0, [H - tile + 1, W - tile + 1], (5, 2))])
    shape = (len(starts), tile, tile) if C is None else (len(starts), C, tile, tile)
    p = rng.standard_normal(shape).astype(dtype)
    band = fastds.stitch(p, starts, (H, W), halo=halo, backend="cpu")
    gather = fastds.stitch(p, starts, (H, W), halo=halo, backend="cpu-gather")
    np.testing.assert_array_equal(band, gather)


def test_stitch_plan_checks_patches():
    from fastds.stitch import StitchPlan
    starts = fastds.plan_patches((40, 50), 16, 4, 8)
    plan = StitchPlan(starts, (40, 50), tile=16, halo=4)
    with pytest.raises(ValueError, match=r"patches must be \(N=%d" % len(starts)):
        plan.stitch(np.zeros((len(starts) - 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="patches must be"):
        plan.blend_cut(np.zeros((len(starts), 16, 15), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        plan.stitch(np.zeros((len(starts), 16, 16), np.int32))
    # a non-contiguous view is accepted (copied once), the result unchanged
    p = np.random.default_rng(0).random((len(starts), 16, 32)).astype(np.float32)[:, :, ::2]
    np.testing.assert_array_equal(plan.stitch(p), fastds.stitch(np.ascontiguousarray(p), starts, (40, 50), halo=4))


@pytest.mark.parametrize("H,W,tile,halo,stride", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stitch_plan_weight_sums_against_brute_force(H, W, tile, halo, stride, dtype, rng):
    """The plan's precomputed max(Z, eps) (geometry only) against a per-box numpy sum;
    plan.stitch and the one-call stitch (both dividing by it) bit-identical to the gather
    kernel, which sums Z beside S every call; the one-call form builds it once per geometry."""
    from fastds.stitch import StitchPlan, _band_weights_cached, _plan, hann_table
    starts = fastds.plan_patches((H, W), tile, halo, stride)
    starts = np.concatenate([starts, rng.integers(0, [H - tile + 1, W - tile + 1], (5, 2))])
    plan = StitchPlan(starts, (H, W), tile=tile, halo=halo)
    boxes = _plan(starts, H, W, tile, halo)[0]
    hann = hann_table(tile).astype(np.float64)
    Z = np.zeros((H, W))
    for _, _, ky0, ky1, kx0, kx1 in boxes:
        w = np.outer(hann[ky1 - ky0, :ky1 - ky0], hann[kx1 - kx0, :kx1 - kx0])
        Z[ky0:ky1, kx0:kx1] += np.maximum(w, 1e-6)
    z = plan._weights(dtype)
    assert z.dtype == dtype
    np.testing.assert_allclose(z, np.maximum(Z, 1e-6), rtol=1e-5 if dtype == np.float32 else 1e-12)
    p = rng.standard_normal((len(starts), tile, tile)).astype(dtype)
    gather = fastds.stitch(p, starts, (H, W), halo=halo, backend="cpu-gather")
    np.testing.assert_array_equal(plan.stitch(p), gather)
    before = _band_weights_cached.cache_info()
    for _ in range(2):
        np.testing.assert_array_equal(fastds.stitch(p, starts, (H, W), halo=halo), gather)
    after = _band_weights_cached.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 1
