"""The denoiser, ≥ 99 % of a sampled day's FLOPs: fp32 vs bf16 (autocast) forward, with the
achieved GFLOP/s (FLOPs counted by ``torch.utils.flop_counter``) set against torch's own
GEMM rate measured in the same run (``sgemm``: fp32, ``bf16_gemm``), and patches/s.

Providers per model size: ``ref`` = fp32 forward, ``bf16`` = the same forward under
``torch.autocast(dtype=bfloat16)`` (what ``sample.precision = "bf16"`` does), ``sgemm`` /
``bf16_gemm`` = a square matmul of about the same work; ``compiled`` / ``compiled_bf16`` =
the fp32 / bf16 forward through ``torch.compile`` (inductor; slow: minutes of compilation).
The summary's "speedup vs ref" of ``bf16`` is the patches/s ratio; ``GFLOP/s`` lines compare
the denoiser with the GEMM peak.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastds.config import load_config
from fastds.models.conditional import build_model

SIZES = {  # name: (widths, batch)
    "tiny_16x16_b256": ((24, 48, 48), 256),
    "paper_16x16_b64": ((64, 128, 256), 64),
}


def _setup(widths, batch):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model("ddpm", widths=widths, t_lag=cfg.data.t_lag, transfer_widths=None,
                        n_covariates=7, target="residual").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 16, 16, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    cond = torch.randn(batch, 8, 16, 16, generator=g)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, t, cond)
    return model, x, t, cond, fc.get_total_flops()


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["ref", "bf16", "sgemm", "bf16_gemm",
                                      pytest.param("compiled", marks=pytest.mark.slow),
                                      pytest.param("compiled_bf16", marks=pytest.mark.slow)])
def test_denoiser_forward(benchmark, record, size, provider):
    widths, batch = SIZES[size]
    model, x, t, cond, flops = _setup(widths, batch)
    benchmark.group = f"denoiser forward {size} ({flops / 1e9:.2f} GFLOP per call; items = GFLOP)"
    if provider in ("sgemm", "bf16_gemm"):
        dtype = torch.float32 if provider == "sgemm" else torch.bfloat16
        n = 1024
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        benchmark(lambda: a @ b)
        record(benchmark, benchmark.group, provider, items=2 * n ** 3 / 1e9, unit="GFLOP")
        return
    bf16 = provider in ("bf16", "compiled_bf16")
    net = model
    if provider.startswith("compiled"):
        # inductor's C++/OpenMP code for this CPU; compiled once here, outside the timing
        net = torch.compile(model, dynamic=False)
    with torch.no_grad():
        want = model(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            got = net(x, t, cond).float()
    # bf16 keeps 8 mantissa bits: outputs agree to a few percent of their spread, not
    # bitwise; inductor's fused fp32 kernels reorder sums (agreement to ~1e-6 of the spread)
    err = (got - want).abs().mean() / want.std()
    assert err < (0.05 if bf16 else 1e-5 if provider == "compiled" else 1e-6), float(err)

    def fn():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(x, t, cond)
    benchmark(fn)
    record(benchmark, benchmark.group, provider, items=flops / 1e9, unit="GFLOP")
    benchmark.extra_info["patches_per_s"] = batch / benchmark.stats.stats.median if benchmark.stats else None
