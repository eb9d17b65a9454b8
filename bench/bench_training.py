"""Training throughput (patches/s) of the DDPM step on CPU: tiny and medium sizes; providers
fp32 (reference), bf16 autocast, and the transfer-free ablation (no frozen encoder pass)."""
import pytest
import torch

from fastds.diffusion.schedule import Diffusion
from fastds.models.conditional import build_model

SIZES = {"tiny": ((24, 48, 48), (16, 32, 32)), "medium": ((64, 128, 128), (32, 64, 64))}
STEPS, BATCH, T_LAG = 4, 64, 8


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["ref", "bf16", "no_transfer"])
def test_train_throughput(benchmark, record, size, provider):
    widths, twidths = SIZES[size]
    torch.manual_seed(0)
    model = build_model("ddpm", widths=widths, t_lag=T_LAG,
                        transfer_widths=None if provider == "no_transfer" else twidths)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    diff = Diffusion(1000, "sample")
    g = torch.Generator().manual_seed(0)
    b = dict(target=torch.rand(BATCH, 1, 16, 16, generator=g), coarse=torch.rand(BATCH, 1, 16, 16, generator=g),
             covariates=torch.rand(BATCH, 6, 16, 16, generator=g), lags=torch.rand(BATCH, T_LAG, 16, 16, generator=g))
    gen = torch.Generator().manual_seed(1)

    def steps():
        for _ in range(STEPS):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=provider == "bf16"):
                loss = diff.loss(model, b["target"], model.cond(b["coarse"], b["covariates"], b["lags"]), generator=gen)
            opt.zero_grad()
            loss.backward()
            opt.step()

    benchmark.group = f"DDPM training step, {size} model, batch {BATCH} of 16x16 patches"
    benchmark.pedantic(steps, rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, provider, items=STEPS * BATCH, unit="patches")
