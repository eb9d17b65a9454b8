"""Training throughput (patches/s) of Stage C's DDPM step on CPU, as ``train`` runs it: the
CorrDiff loss (frozen transfer features, the frozen U-Net mean, the residual's denoising
loss) on the preset's patch size, tiny and medium widths. Providers: fp32 (the reference,
``train.precision = "fp32"``), bf16 autocast (``"bf16"``, what ``"auto"`` picks on a CPU with
AVX512-BF16 or AMX), the transfer-free ablation (no frozen encoder pass) in fp32, and
``mean_apart``: fp32 with the U-Net mean's transfer features computed again from the lags
(the step before the mean took the DDPM's own conditioning; the same loss bit for bit)."""
import pytest
import torch

from fastds.config import load_config
from fastds.data.transforms import COVARIATE_SETS
from fastds.models.conditional import build_model
from fastds.runs import covariate_set
from fastds.training.stages import _loss_for

SIZES = {"tiny": ((24, 48, 48), (16, 32, 32)), "medium": ((64, 128, 128), (32, 64, 64))}
STEPS, BATCH = 4, 64


@pytest.mark.parametrize("size,provider", [
    (size, provider) if size == "tiny" or provider != "mean_apart"
    else pytest.param(size, provider, marks=pytest.mark.slow)  # minutes of CPU in bench-check
    for size in SIZES for provider in ("ref", "bf16", "no_transfer", "mean_apart")])
def test_train_throughput(benchmark, record, size, provider):
    config = load_config("tiny")
    widths, twidths = SIZES[size]
    tile, t_lag = config.data.tile, config.data.t_lag
    kw = dict(widths=widths, t_lag=t_lag, transfer_widths=None if provider == "no_transfer" else twidths,
              prediction=config.diffusion.prediction, target="residual",
              n_covariates=len(COVARIATE_SETS[covariate_set(config)]))
    torch.manual_seed(0)
    model = build_model("ddpm", **kw)
    model.set_regression(build_model("unet", **kw))
    if model.transfer is not None:  # trained runs load Stage A's encoder into both networks
        model.regression.transfer.load_state_dict(model.transfer.state_dict())
    if provider == "mean_apart":
        model.shares_conditioning = lambda: False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = _loss_for("ddpm", config)
    g = torch.Generator().manual_seed(0)
    b = dict(target=torch.rand(BATCH, 1, tile, tile, generator=g),
             coarse=torch.rand(BATCH, 1, tile, tile, generator=g),
             covariates=torch.rand(BATCH, kw["n_covariates"], tile, tile, generator=g),
             lags=torch.rand(BATCH, t_lag, tile, tile, generator=g))
    gen = torch.Generator().manual_seed(1)

    def steps():
        for _ in range(STEPS):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=provider == "bf16"):
                loss = loss_fn(model, b, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()

    benchmark.group = f"DDPM training step (CorrDiff), {size} model, batch {BATCH} of {tile}x{tile} patches"
    benchmark.pedantic(steps, rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, provider, items=STEPS * BATCH, unit="patches", peer=provider == "ref")
