"""Every compiled entry point returns the reference's numbers or refuses, naming the argument.

The matrix is {contiguous, transposed, channels_last, sliced} x {fp16, bf16, fp32, fp64} x
every backend that runs here (interpreted Triton included; CUDA/CuPy where a device is).
A cell either matches the float64 reference within the dtype's rounding, writing into the
very ``out`` it was given, or raises TypeError/ValueError/BackendUnavailable whose message
names the offending argument. Nothing may come back wrong or be written into a silent copy.
"""
import gc
import importlib

import numpy as np
import pytest
import torch

from conftest import TRITON_DEVICE
from fastds import _backend
from fastds.sampling.steps import fused_step, fused_step_ref
from fastds.sampling.samplers import make_plan

LAYOUTS = ("contiguous", "transposed", "channels_last", "sliced")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 2e-6, torch.float64: 1e-12}
SHAPE = (3, 2, 7, 9)  # (B, C, h, w): no dimension a multiple of any block


def _make(layout, dtype, device, gen):
    """A (3, 2, 7, 9) tensor of standard normals in the given memory layout."""
    B, C, H, W = SHAPE
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731 - before the view is taken
    if layout == "contiguous":
        t = cast(torch.randn(SHAPE, generator=gen))
    elif layout == "transposed":
        t = cast(torch.randn((B, C, W, H), generator=gen)).transpose(-1, -2)
    elif layout == "channels_last":
        t = cast(torch.randn(SHAPE, generator=gen)).contiguous(memory_format=torch.channels_last)
    else:
        t = cast(torch.randn((B, C, H, 2 * W + 1), generator=gen))[..., 1::2]
    assert t.shape == SHAPE and t.is_contiguous() == (layout == "contiguous"), layout
    return t


def _step_backends():
    out = ["ref", "torch", "cpu", "triton", "cuda"]
    return out


def _devices(backend):
    if backend == "cuda":
        return ["cuda"]
    if backend == "triton":
        return [TRITON_DEVICE]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() and backend in ("ref", "torch") else [])


CELLS = [(b, d, lay, dt) for b in _step_backends() for d in _devices(b) for lay in LAYOUTS
         for dt in DTYPES]


@pytest.mark.parametrize("backend,device,layout,dtype", CELLS,
                         ids=[f"{b}-{d}-{lay}-{str(dt)[6:]}" for b, d, lay, dt in CELLS])
def test_fused_step_matrix(backend, device, layout, dtype):
    why = _backend.why_unavailable(backend)
    if why is not None:  # an unavailable backend refuses with the reason, nothing else
        with pytest.raises(_backend.BackendUnavailable, match=backend):
            fused_step(torch.zeros(2), torch.zeros(2), [0] * 6, backend=backend)
        return
    gen = torch.Generator().manual_seed(7)
    m, x, z, xp, out, x0 = (_make(layout, dtype, device, gen) for _ in range(6))
    coef = make_plan("dpmpp", T=1000, steps=10).coef[4].copy()
    coef[5] = 0.37  # a noisy DPM++ row: every coefficient is non-zero
    if backend in ("cpu", "cuda") and dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"backend '{backend}' computes .* x is"):
            fused_step(m, x, coef, noise=z, x0_prev=xp, out=out, x0_out=x0, clip=1.5, backend=backend)
        return
    got = fused_step(m, x, coef, noise=z, x0_prev=xp, out=out, x0_out=x0, clip=1.5, backend=backend)
    want, want_x0 = fused_step_ref(*(t.double() for t in (m, x)), coef, noise=z.double(),
                                   x0_prev=xp.double(), clip=1.5)
    assert got is out, "the result must be written into the out it was given"
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(x0.double(), want_x0, rtol=tol, atol=tol)
    # without out=: a fresh C-contiguous result with the same numbers
    fresh = fused_step(m, x, coef, noise=z, x0_prev=xp, clip=1.5, backend=backend)
    assert fresh.is_contiguous() and fresh.dtype == dtype
    torch.testing.assert_close(fresh.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["ref", "torch", "cpu"])
def test_fused_step_refuses_mixed_operands(backend):
    x = torch.randn(4, 5)
    coef = [1.0, 0.5, 0.3, 0.2, 0.1, 0.0]
    with pytest.raises(TypeError, match="out is torch.float64 but x is torch.float32"):
        fused_step(torch.randn(4, 5), x, coef, out=torch.empty(4, 5, dtype=torch.float64), backend=backend)
    with pytest.raises(TypeError, match="m is torch.float16"):
        fused_step(torch.randn(4, 5).half(), x, coef, backend=backend)
    with pytest.raises(ValueError, match="x0_out has shape"):
        fused_step(torch.randn(4, 5), x, coef, x0_out=torch.empty(5, 4), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating"):
        fused_step(torch.zeros(4, 5, dtype=torch.int32), torch.zeros(4, 5, dtype=torch.int32), coef,
                   backend=backend)


def test_cpu_extension_never_writes_into_a_copy():
    """Direct callers of fastds._C: a mismatched output is refused, not converted."""
    ext = _backend.cpu_ext()
    n = 12
    a = np.ones(n, np.float32)
    coef = np.array([1, 1, 1, 0, 0, 0], np.float32)
    with pytest.raises(TypeError, match="out must be float32, got float64"):
        ext.fused_step_f32(a, a, None, None, None, np.empty(n), coef, 0, 0.0)
    strided = np.empty(2 * n, np.float32)[::2]
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        ext.fused_step_f32(a, a, None, None, None, strided, coef, 0, 0.0)
    with pytest.raises(ValueError, match="x0_out must be C-contiguous"):
        ext.fused_step_f32(a, a, None, None, strided, np.empty(n, np.float32), coef, 0, 0.0)
    with pytest.raises(TypeError, match="m must be float32, got float64"):
        ext.fused_step_f32(np.ones(n), a, None, None, None, np.empty(n, np.float32), coef, 0, 0.0)
    ro = np.empty(n, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out is read-only"):
        ext.fused_step_f32(a, a, None, None, None, ro, coef, 0, 0.0)
    out = np.empty(n, np.float32)
    ext.fused_step_f32(a, a, None, None, None, out, coef, 0, 0.0)
    np.testing.assert_array_equal(out, 2.0)  # x0 = x + m = 2, out = c0 * x0


def test_stitch_extension_never_writes_into_a_copy():
    st = importlib.import_module("fastds.stitch")  # fastds.stitch the attribute is the function
    starts = st.plan_patches((20, 24), 8, 2, 4)
    boxes, nb, kp, ki, fp, fi = st._band_plan(starts, 20, 24, 8, 2)
    patches = np.random.default_rng(0).random((len(starts), 1, 8, 8), dtype=np.float32)
    zden = st._band_weights_cached(*st._starts_key(starts), 20, 24, 8, 2, 1e-6, "<f4")
    hann = st._hann(8, np.float32)
    ext = _backend.cpu_ext()
    args = (patches, boxes, st.BAND, nb, kp, ki, fp, fi, hann, 1e-6)
    with pytest.raises(TypeError, match="out must be float32, got float64"):
        ext.stitch_band_f32(*args, np.empty((1, 20, 24)), None, zden)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        ext.stitch_band_f32(*args, np.empty((1, 24, 20), np.float32).transpose(0, 2, 1), None, zden)
    with pytest.raises(ValueError, match="cut must be C-contiguous"):
        ext.stitch_band_f32(*args, np.empty((1, 20, 24), np.float32), np.empty_like(patches)[..., ::-1, :], zden)
    with pytest.raises(TypeError, match="kept_ptr must be int64"):
        ext.stitch_band_f32(patches, boxes, st.BAND, nb, kp.astype(np.int32), ki, fp, fi, hann, 1e-6,
                            np.empty((1, 20, 24), np.float32), None, zden)


# ----------------------------------------------------------------------------- stitching
STITCH_BACKENDS = ("ref", "cpu", "cpu-gather", "plan", "plan-blend", "cuda", "cupy")


def _patch_layout(layout, dtype, n, tile, gen):
    shape = (n, 2, tile, tile)
    if layout == "contiguous":
        t = torch.rand(shape, generator=gen).to(dtype)
    elif layout == "transposed":
        t = torch.rand(shape, generator=gen).to(dtype).transpose(-1, -2)
    elif layout == "channels_last":
        t = torch.rand(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    else:
        t = torch.rand((n, 2, tile, 2 * tile), generator=gen).to(dtype)[..., ::2]
    assert t.is_contiguous() == (layout == "contiguous")
    return t


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
@pytest.mark.parametrize("backend", STITCH_BACKENDS)
def test_stitch_matrix(backend, dtype, layout, kind):
    from fastds.stitch import StitchPlan, cut_ref, plan_patches, stitch, stitch_ref
    if backend in ("cuda", "cupy") and _backend.why_unavailable(backend):
        with pytest.raises(_backend.BackendUnavailable, match=backend):
            stitch(np.zeros((1, 8, 8), np.float32), np.zeros((1, 2), np.int64), (8, 8), backend=backend)
        return
    if kind == "numpy" and dtype == torch.bfloat16:
        pytest.skip("numpy has no bfloat16")
    H, W, tile, halo = 29, 35, 12, 3
    starts = plan_patches((H, W), tile, halo, 5)
    p = _patch_layout(layout, dtype, len(starts), tile, torch.Generator().manual_seed(3))
    dev = "cuda" if backend == "cuda" else "cpu"
    p = p.to(dev) if kind == "torch" else p.numpy()
    if backend == "cupy":
        import cupy
        p = cupy.asarray(p)

    def run():
        if backend.startswith("plan"):
            plan = StitchPlan(starts, (H, W), tile=tile, halo=halo)
            return plan.stitch(p) if backend == "plan" else plan.blend_cut(p)
        return stitch(p, starts, (H, W), halo=halo, backend=backend)

    if dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="patches must be float32 or float64"):
            run()
        return
    got = run()
    host = lambda a: a.get() if type(a).__module__.startswith("cupy") else np.asarray(  # noqa: E731
        a.cpu() if isinstance(a, torch.Tensor) else a)
    ref = stitch_ref(np.ascontiguousarray(host(p)).astype(np.float64), starts, (H, W), halo=halo)
    tol = TOL[dtype]
    image = got[0] if backend == "plan-blend" else got
    assert type(image) is type(p) and image.dtype == p.dtype
    np.testing.assert_allclose(host(image), ref, rtol=tol, atol=tol)
    if backend == "plan-blend":
        np.testing.assert_allclose(host(got[1]), cut_ref(ref, starts, tile), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_cut_any_layout(kind, layout):
    from fastds.stitch import StitchPlan, cut, cut_ref, plan_patches
    H, W, tile = 23, 31, 8
    base = np.random.default_rng(1).random((2, 40, 40))
    img = {"contiguous": base[:, :H, :W].copy(), "transposed": base.transpose(0, 2, 1)[:, :H, :W],
           "sliced": base[:, 2:2 + H, 1:1 + W]}[layout]
    img = torch.from_numpy(img) if kind == "torch" else img
    starts = plan_patches((H, W), tile, 2, 3)
    want = np.asarray(cut_ref(img, starts, tile))
    np.testing.assert_array_equal(np.asarray(cut(img, starts, tile)), want)
    np.testing.assert_array_equal(np.asarray(StitchPlan(starts, (H, W), tile=tile, halo=2).cut(img)), want)
    np.testing.assert_array_equal(np.asarray(cut(img[0], starts, tile)), want[:, 0])


def test_plan_holds_no_per_pixel_index():
    """A global-grid plan must fit in memory: nothing of size N x tile x tile is built."""
    from fastds.stitch import StitchPlan, plan_patches
    starts = plan_patches((400, 500), 16, 4, 2)
    plan = StitchPlan(starts, (400, 500), tile=16, halo=4)
    big = [k for k, v in vars(plan).items()
           if isinstance(v, np.ndarray) and v.size >= len(starts) * 16 * 16]
    assert not big, big


def test_plan_offsets_are_64_bit():
    """The CSR offsets of both plans are int64: a global grid at stride 1 lists more than
    2**31 (patch, cell) pairs."""
    st = importlib.import_module("fastds.stitch")
    starts = st.plan_patches((40, 50), 8, 2, 2)
    boxes, ptr, idx, cell, ncx = st._plan(starts, 40, 50, 8, 2)
    _, nb, kp, ki, fp, fi = st._band_plan(starts, 40, 50, 8, 2)
    assert ptr.dtype == kp.dtype == fp.dtype == np.int64
    assert idx.dtype == ki.dtype == boxes.dtype == np.int32


# ----------------------------------------------------------------------------- Triton nn kernels
@pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")
def test_triton_nn_kernels_write_into_strided_out_or_refuse():
    from fastds.kernels.attention import attention_triton
    from fastds.kernels.groupnorm import group_norm_silu_triton
    from fastds.models.attention import attention_ref
    from fastds.models.norm import group_norm_silu_ref
    q, k, v = (torch.randn(3, 20, 16, device=TRITON_DEVICE) for _ in range(3))
    out = torch.empty(3, 16, 20, device=TRITON_DEVICE).transpose(1, 2)
    got = attention_triton(q, k, v, out=out)
    assert got is out
    torch.testing.assert_close(out, attention_ref(q, k, v), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out is torch.float16"):
        attention_triton(q, k, v, out=torch.empty(3, 20, 16, dtype=torch.float16, device=TRITON_DEVICE))
    with pytest.raises(ValueError, match="v is"):
        attention_triton(q, k, v[:, :10])
    x = torch.randn(2, 8, 5, 6, device=TRITON_DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(8, device=TRITON_DEVICE) + 0.5, torch.randn(8, device=TRITON_DEVICE)
    out = torch.empty_like(x)  # channels_last, like x
    assert group_norm_silu_triton(x, 4, w, b, out=out) is out
    torch.testing.assert_close(out, group_norm_silu_ref(x, 4, w, b), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="weight is"):
        group_norm_silu_triton(x, 4, w[:4], b)
    with pytest.raises(ValueError, match="out is"):
        group_norm_silu_triton(x, 4, w, b, out=torch.empty(2, 8, 5, 6, dtype=torch.float64, device=TRITON_DEVICE))


# ----------------------------------------------------------------------------- graphs
def test_graph_cache_does_not_keep_models_alive():
    from fastds.sampling.graphs import GraphCache, StaticSampler

    class Net(torch.nn.Module):
        def forward(self, x, t, cond):
            return 0.5 * x

    cache = GraphCache(max_entries=4)
    net = Net()
    plan = make_plan("ddim", T=100, steps=4)
    x = torch.randn(2, 1, 6, 6)
    def build(net=net):
        return StaticSampler(net, plan, x, None, backend="cpu", use_graph=False)

    sampler = cache.get(net, "k", build)
    assert cache.get(net, "k", lambda: None) is sampler and len(cache) == 1
    want = sampler(x, None, 0)
    del sampler, build  # the test's own references (build's default holds the model)
    net_ref = __import__("weakref").ref(net)
    del net
    gc.collect()
    assert net_ref() is None, "the cache (or its sampler) kept the model alive"
    assert len(cache._items) == 0, "entries of a collected model must go at once"
    assert torch.isfinite(want).all()


def test_static_sampler_autocast_without_weight_cache():
    """The eager twin of a capture under bf16 autocast: the body casts the weights itself
    (cache_enabled=False), so it equals the eager loop under the same autocast; called under
    another autocast state it refuses instead of replaying a graph of the wrong precision."""
    from fastds.sampling.graphs import StaticSampler
    from fastds.sampling.samplers import run_plan
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)

    def model(x, t, cond):
        return net(x)

    plan = make_plan("ddim", T=100, steps=4)
    x = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = StaticSampler(model, plan, x, None, backend="cpu", use_graph=False)
        got = s(x, None, 0)
        want = run_plan(model, x, plan, backend="cpu")
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="built under autocast"):
        s(x, None, 0)


def test_static_sampler_wraps_step_fusion_like_the_eager_loop():
    """Step fusion through StaticSampler (what the GPU graphs): the wrapped image-space model
    with its conditioning in the static buffer equals run_plan over PatchFusedModel."""
    from fastds.sampling.fusion import PatchFusedModel
    from fastds.sampling.graphs import StaticSampler
    from fastds.sampling.samplers import run_plan
    from fastds.stitch import StitchPlan, plan_patches

    def net(x, t, cond):
        return 0.3 * x + cond[:, :1]

    H, W, tile, halo = 21, 26, 10, 2
    starts = plan_patches((H, W), tile, halo, 6)
    splan = StitchPlan(starts, (H, W), tile=tile, halo=halo)
    cond = torch.randn(len(starts), 2, tile, tile)
    x = torch.randn(1, 1, H, W)
    plan = make_plan("dpmpp", T=100, steps=5)
    s = StaticSampler(net, plan, x, cond, backend="cpu", use_graph=False,
                      wrap=lambda m: PatchFusedModel(m, splan, None, batch=7))
    want = run_plan(PatchFusedModel(net, splan, cond, batch=7), x, plan, backend="cpu")
    torch.testing.assert_close(s(x, cond, 0), want)


def test_fixed_batch_pads_every_call_to_one_compiled_shape():
    """FixedBatch (sample.compile's wrapper): a smaller batch is padded to the largest seen,
    a broadcast argument stays a broadcast (dynamo guards strides), None and non-batch
    arguments pass through, each row equals the eager network's, and a larger batch
    becomes the new size; the network's own attributes stay reachable, unknown ones raise."""
    from fastds.models.conditional import FixedBatch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
            self.norm = torch.nn.GroupNorm(1, 3)

        def forward(self, x, t, cond, scale):
            base = cond if x is None else x + cond
            return self.norm(self.conv(base)) * t.view(-1, 1, 1, 1) * scale

        def width(self):
            return self.conv.out_channels

    torch.manual_seed(0)
    net = Net().eval()
    seen = []

    def backend(gm, example_inputs):
        seen.append([(tuple(a.shape), a.stride()) for a in example_inputs if torch.is_tensor(a)])
        return gm.forward
    fixed = FixedBatch(net, backend=backend)
    scale = torch.tensor(1.5)
    with torch.no_grad():
        for n, with_x in ((6, True), (4, True), (1, True), (5, True)):
            cond = torch.randn(n, 2, 5, 7)
            x = torch.randn(n, 2, 5, 7) if with_x else None
            t = torch.tensor([0.3]).expand(n)  # a step's t: one value, broadcast
            got = fixed(x, t, cond, scale)
            assert got.shape == (n, 3, 5, 7)
            torch.testing.assert_close(got, net(x, t, cond, scale), rtol=1e-6, atol=1e-6)
        assert len(seen) == 1 and fixed.rows == 6
        assert ((6, 2, 5, 7), (70, 35, 7, 1)) in seen[0] and ((6,), (0,)) in seen[0]  # t kept broadcast
        fixed(torch.randn(9, 2, 5, 7), torch.rand(9), torch.randn(9, 2, 5, 7), scale)  # larger: the new size
        assert fixed.rows == 9 and len(seen) == 2
        fixed(None, torch.rand(3), torch.randn(3, 2, 5, 7), scale)  # no x_t (a U-Net): padded cond and t
        fixed.fix(4)  # a caller's smaller batch size: that shape from now on, not 9 rows
        n_graphs, cond = len(seen), torch.randn(3, 2, 5, 7)
        t = torch.rand(3)
        torch.testing.assert_close(fixed(None, t, cond, scale), net(None, t, cond, scale), rtol=1e-6, atol=1e-6)
        assert len(seen) == n_graphs + 1 and ((4, 2, 5, 7), (70, 35, 7, 1)) in seen[-1] and fixed.rows == 4
    assert fixed.width() == 3 and fixed._orig_mod is net
    with pytest.raises(AttributeError, match="no_such"):
        fixed.no_such
