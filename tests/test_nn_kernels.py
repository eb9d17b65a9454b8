"""Network kernels (attention core, GroupNorm+SiLU): Triton and torch against the written-out
references, the dispatchers, and the ahead-of-time sm_90 compile."""
import textwrap

import pytest
import torch

from fastds import BackendUnavailable
from fastds.models.attention import attention, attention_ref
from fastds.models.blocks import Attention, ResBlock, set_kernel_backend
from fastds.models.norm import group_norm_silu, group_norm_silu_ref
from fastds.models.unet import Denoiser

from conftest import TRITON_DEVICE, requires_triton, requires_triton_run, run_aot

# irregular token counts and head dims: partial query/key tiles, head dims padded to 16+
SHAPES = [(3, 37, 12), (2, 16, 64), (5, 100, 7), (1, 1, 5), (2, 3, 70, 33), (1, 2, 129, 128),
          (1, 1, 40, 256)]


def _qkv(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((2 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype) for _ in range(3))


def test_reference_is_softmax_formula():
    q, k, v = _qkv((2, 9, 5), torch.float64)
    w = torch.exp(q @ k.transpose(-1, -2) / 5 ** 0.5)
    expected = (w / w.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(attention_ref(q, k, v), expected)
    torch.testing.assert_close(attention_ref(q, k, v, scale=0.3),
                               torch.softmax(0.3 * q @ k.transpose(-1, -2), -1) @ v)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_matches_ref(shape, dtype):
    q, k, v = _qkv(shape, dtype)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(attention(q, k, v, backend="torch"), attention_ref(q, k, v),
                               rtol=tol, atol=tol)


@requires_triton_run
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_ref(shape, dtype):
    q, k, v = _qkv(shape, dtype, TRITON_DEVICE)
    got = attention(q, k, v, backend="triton")
    assert got.dtype == dtype and got.shape == q.shape and got.device == q.device
    ref = attention_ref(q.double(), k.double(), v.double())
    err = (got.double() - ref).abs().max().item()
    print(shape, dtype, "max abs error", err)
    # fp32: IEEE dots, so only summation order differs; fp16: inputs and p rounded to fp16
    assert err < (2e-5 if dtype == torch.float32 else 1e-2)
    scaled = attention(q, k, v, scale=0.05, backend="triton")
    assert (scaled.double() - attention_ref(q.double(), k.double(), v.double(), scale=0.05)
            ).abs().max().item() < (2e-5 if dtype == torch.float32 else 1e-2)


@requires_triton_run
def test_triton_is_stable_for_large_scores():
    """Scores of ±1e4 would overflow exp() without the running max."""
    q, k, v = _qkv((2, 50, 16), torch.float32, TRITON_DEVICE)
    q = q * 300
    got = attention(q, k, v, backend="triton")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, attention_ref(q, k, v), rtol=1e-4, atol=1e-4)


@requires_triton_run
def test_attention_module_backends_agree():
    torch.manual_seed(0)
    block = Attention(32, heads=4).to(TRITON_DEVICE).eval()
    x = torch.randn(3, 32, 7, 9, device=TRITON_DEVICE)  # 63 tokens, head dim 8
    with torch.no_grad():
        outs = {b: set_kernel_backend(block, b)(x) for b in ("ref", "torch", "triton")}
    torch.testing.assert_close(outs["torch"], outs["ref"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["triton"], outs["ref"], rtol=1e-5, atol=1e-5)


def test_auto_picks_torch_on_cpu_and_for_training():
    q, k, v = _qkv((2, 10, 8), torch.float32)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="torch"))
    block = Attention(16, heads=2)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    block(x).sum().backward()  # auto under autograd: the differentiable backend
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dispatcher_errors_name_the_problem():
    q, k, v = _qkv((2, 10, 8), torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match=r"share one \(\.\.\., N, D\) shape"):
        attention(q, k[:, :5], v)
    with pytest.raises(TypeError, match="floating dtype"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="set_kernel_backend: unknown backend"):
        set_kernel_backend(Attention(8, heads=2), "fast")
    if TRITON_DEVICE == "cpu":  # the interpreter lets triton run here: the autograd rule bites
        q.requires_grad_(True)
        with pytest.raises(BackendUnavailable, match="forward only"):
            attention(q, k, v, backend="triton")
        with pytest.raises(BackendUnavailable, match="head dim <= 256"):
            attention(*_qkv((1, 4, 300), torch.float32), backend="triton")


AOT = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastds.kernels.attention import attention_fwd_kernel, block_sizes
    names = attention_fwd_kernel.arg_names
    for dtype, tdt in (("fp32", torch.float32), ("fp16", torch.float16)):
        for d in (8, 33, 64, 128, 256):
            bm, bn, bd = block_sizes(d, tdt)
            consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=dtype == "fp32")
            sig = {n: "*" + dtype for n in names[:4]}
            sig.update(n="i32", d="i32", scale="fp32", **{k: "constexpr" for k in consts})
            src = ASTSource(fn=attention_fwd_kernel, signature=sig,
                            constexprs={(names.index(k),): v for k, v in consts.items()})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
            assert k.asm["cubin"] and ".target sm_90" in k.asm["ptx"]
            # 99 KiB: the per-block limit of sm_86/sm_89, the tightest GPU we build for
            assert k.metadata.shared <= 99 * 1024, (dtype, d, k.metadata.shared)
            print("compiled", dtype, d, (bm, bn, bd), "shared", k.metadata.shared)
""")


@requires_triton
def test_attention_kernel_compiles_ahead_of_time_for_sm90():
    assert run_aot(AOT).count("compiled") == 10


# ----------------------------------------------------------------------------- GroupNorm+SiLU
NORM_CASES = [((2, 16, 7, 9), 8), ((3, 6, 13, 5), 3), ((1, 24, 33, 31), 8), ((4, 5, 1, 1), 1),
              ((2, 8, 40, 40), 2)]  # 1,600-value groups: several kernel blocks per group


def _norm(c, groups, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.nn.GroupNorm(groups, c)
    with torch.no_grad():
        n.weight.copy_(1 + 0.5 * torch.randn(c, generator=g))
        n.bias.copy_(0.3 * torch.randn(c, generator=g))
    return n.to(device)


@pytest.mark.parametrize("shape,groups", NORM_CASES)
def test_group_norm_silu_ref_and_torch_agree(shape, groups):
    x = 3 * torch.randn(*shape, dtype=torch.float64) + 2
    n = _norm(shape[1], groups).double()
    torch.testing.assert_close(group_norm_silu(x, n, backend="ref"), torch.nn.functional.silu(n(x)))
    torch.testing.assert_close(group_norm_silu(x, n, backend="torch"), torch.nn.functional.silu(n(x)))


@requires_triton_run
@pytest.mark.parametrize("shape,groups", NORM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_group_norm_silu_triton_matches_ref(shape, groups, dtype):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(*shape, generator=g) + 2).to(TRITON_DEVICE, dtype)
    n = _norm(shape[1], groups, TRITON_DEVICE)
    with torch.no_grad():
        got = group_norm_silu(x, n, backend="triton")
        ref = group_norm_silu_ref(x.double(), groups, n.weight.double(), n.bias.double(), n.eps)
    assert got.dtype == dtype and got.shape == x.shape
    err = (got.double() - ref).abs().max().item()
    print(shape, groups, dtype, "max abs error", err)
    assert err < (2e-5 if dtype == torch.float32 else 1e-2)


@requires_triton_run
def test_group_norm_silu_triton_keeps_precision_with_a_large_mean():
    """mean 1e4, spread 1: naive E[x²] − E[x]² in float32 would lose the variance."""
    g = torch.Generator().manual_seed(2)
    x = (1e4 + torch.randn(2, 8, 20, 20, generator=g)).to(TRITON_DEVICE)
    n = _norm(8, 4, TRITON_DEVICE)
    with torch.no_grad():
        got = group_norm_silu(x, n, backend="triton")
        ref = group_norm_silu_ref(x.double(), 4, n.weight.double(), n.bias.double(), n.eps)
    assert (got.double() - ref).abs().max().item() < 2e-3


@requires_triton_run
def test_networks_agree_across_kernel_backends():
    """A whole denoiser with attention and ResBlocks: triton, torch and ref kernels agree."""
    torch.manual_seed(0)
    net = Denoiser(3, widths=(8, 16, 16), attention=True).to(TRITON_DEVICE).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 16, 12, generator=g).to(TRITON_DEVICE)
    cond = torch.randn(2, 3, 16, 12, generator=g).to(TRITON_DEVICE)
    t = torch.tensor([3, 700], device=TRITON_DEVICE)
    with torch.no_grad():
        outs = {b: set_kernel_backend(net, b)(x, t, cond) for b in ("ref", "torch", "triton")}
    torch.testing.assert_close(outs["torch"], outs["ref"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["triton"], outs["ref"], rtol=1e-4, atol=1e-4)


def test_group_norm_silu_errors():
    n = _norm(8, 4)
    with pytest.raises(ValueError, match=r"expected \(B, 8, \.\.\.\)"):
        group_norm_silu(torch.randn(2, 6, 4, 4), n)
    with pytest.raises(ValueError, match="unknown backend"):
        group_norm_silu(torch.randn(2, 8, 4, 4), n, backend="cuda")
    if TRITON_DEVICE == "cpu":
        with pytest.raises(BackendUnavailable, match="forward only"):  # weights require grad
            group_norm_silu(torch.randn(2, 8, 4, 4), n, backend="triton")
    block = ResBlock(8, 8)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    block(x).sum().backward()  # "auto" under autograd trains through torch
    assert x.grad is not None


AOT_NORM = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastds.kernels.groupnorm import group_norm_silu_kernel, BLOCK
    names = group_norm_silu_kernel.arg_names
    for dtype in ("fp32", "fp16"):
        for silu in (True, False):
            consts = dict(SILU=silu, BLOCK=BLOCK)
            sig = dict(x_ptr="*" + dtype, w_ptr="*fp32", b_ptr="*fp32", y_ptr="*" + dtype,
                       group_size="i32", hw="i32", cg="i32", groups="i32", eps="fp32",
                       **{k: "constexpr" for k in consts})
            src = ASTSource(fn=group_norm_silu_kernel, signature=sig,
                            constexprs={(names.index(k),): v for k, v in consts.items()})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
            assert k.asm["cubin"] and ".target sm_90" in k.asm["ptx"]
            print("compiled", dtype, silu, "shared", k.metadata.shared)
""")


@requires_triton
def test_group_norm_kernel_compiles_ahead_of_time_for_sm90():
    assert run_aot(AOT_NORM).count("compiled") == 4


@pytest.mark.parametrize("hw,size", [((8, 8), (16, 16)), ((7, 11), (14, 22)), ((7, 11), (13, 22)),
                                     ((1, 3), (2, 6))])
def test_up_broadcast_copy_equals_nearest_interpolation(hw, size):
    from fastds.models.blocks import Up
    up = Up(4)
    x = torch.randn(2, 4, *hw)
    expected = up.conv(torch.nn.functional.interpolate(x, size=size, mode="nearest"))
    torch.testing.assert_close(up(x, torch.Size(size)), expected, rtol=0, atol=0)


def test_auto_norm_backend_avoids_narrow_grids():
    from fastds.models.norm import auto_norm_backend
    # sampling: 1024 patches x 8 groups of 16x16x(C/8) values -> a wide grid: Triton
    assert auto_norm_backend(1024, 8, 6 * 256, triton_ok=True) == "triton"
    # full-image Stage-A validation: a few images, 32 groups of ~10^5 values -> torch
    assert auto_norm_backend(4, 32, 2 * 361 * 576, triton_ok=True) == "torch"
    assert auto_norm_backend(2, 8, 64, triton_ok=True) == "torch"       # too few programs
    assert auto_norm_backend(1024, 8, 64, triton_ok=False) == "torch"   # no CUDA inference
