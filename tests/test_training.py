import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import copied_run
from fastds.models.baselines import VAE, DeterministicUNet
from fastds.models.conditional import build_model
from fastds.models.transfer import TransferEncoder
from fastds.models.unet import Denoiser, TemporalUNet
from fastds.training.loop import FitSettings, fit, load_checkpoint


@pytest.mark.parametrize("hw", [(9, 9), (16, 16), (13, 22), (55, 37)])
def test_shapes_through_every_model(hw):
    H, W = hw
    u = TemporalUNet(5, (8, 16, 16))
    assert u(torch.randn(2, 5, H, W)).shape == (2, 1, H, W)
    te = TransferEncoder.from_unet(u)
    assert te(torch.randn(3, 5, H, W)).shape == (3, 16, H, W)
    d = Denoiser(7 + 16, (8, 16, 16))
    out = d(torch.randn(2, 1, H, W), torch.tensor([0, 999]), torch.randn(2, 23, H, W))
    assert out.shape == (2, 1, H, W) and (out > 0).all() and (out < 1).all()
    assert DeterministicUNet(23, (8, 16, 16))(None, None, torch.randn(2, 23, H, W)).shape == (2, 1, H, W)
    v = VAE(23, (8, 16, 16), latent=3)
    r, mu, lv = v(torch.randn(2, 1, H, W), torch.randn(2, 23, H, W))
    assert r.shape == (2, 1, H, W) and mu.shape[1] == 3
    cond = torch.randn(2, 23, H, W)
    assert v.generate(cond, torch.randn(v.latent_shape(cond))).shape == (2, 1, H, W)


def test_transfer_free_ablation_is_one_setting():
    with_t = build_model("ddpm", widths=(8, 16, 16), t_lag=4, transfer_widths=(8, 16, 16))
    without = build_model("ddpm", widths=(8, 16, 16), t_lag=4, transfer_widths=None)
    assert with_t.transfer is not None and without.transfer is None
    b = dict(coarse=torch.randn(2, 1, 16, 16), covariates=torch.randn(2, 6, 16, 16),
             lags=torch.randn(2, 4, 16, 16))
    assert with_t.cond(**b).shape[1] == 7 + 16 and without.cond(**b).shape[1] == 7


class _Patches(torch.utils.data.Dataset):
    def __init__(self, n=64, t_lag=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = [dict(target=torch.rand(1, 16, 16, generator=g), coarse=torch.rand(1, 16, 16, generator=g),
                           covariates=torch.rand(6, 16, 16, generator=g), lags=torch.rand(t_lag, 16, 16, generator=g))
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _l1(m, b, gen):
    cond = m.cond(b["coarse"], b["covariates"], b["lags"])
    return F.l1_loss(m(None, None, cond), b["target"])


@pytest.mark.parametrize("name,ref", [("l1", F.l1_loss), ("l2", F.mse_loss)])
def test_unet_loss_is_the_setting(name, ref):
    import dataclasses
    from fastds.config import load_config
    from fastds.training.stages import _loss_for
    cfg = load_config("tiny")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, unet_loss=name))
    torch.manual_seed(0)
    unet = build_model("unet", widths=(8, 8, 8), t_lag=4, transfer_widths=(8, 8, 8))
    b = torch.utils.data.default_collate([_Patches(4)[i] for i in range(4)])
    pred = unet(None, None, unet.cond(b["coarse"], b["covariates"], b["lags"]))
    got = _loss_for("unet", cfg)(unet, b, None)
    torch.testing.assert_close(got, ref(pred, b["target"]), rtol=0, atol=0)
    assert not torch.equal(F.l1_loss(pred, b["target"]), F.mse_loss(pred, b["target"]))
    with pytest.raises(ValueError, match="train.unet_loss"):
        _loss_for("unet", dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, unet_loss="huber")))


@pytest.mark.parametrize("drop", [False, True])
def test_ddpm_loss_takes_its_mean_from_its_own_conditioning_with_the_same_numbers(monkeypatch, drop):
    """A CorrDiff DDPM whose regression carries the same frozen transfer weights computes a
    batch's transfer features once per training step (not again for the mean): the loss is
    the one computed with the mean apart, bit for bit; with other weights the mean is apart."""
    import copy

    import fastds.models.transfer as transfer_mod
    from fastds.config import load_config
    from fastds.training.stages import _loss_for
    torch.manual_seed(0)
    ddpm = build_model("ddpm", widths=(8, 8, 8), t_lag=4, transfer_widths=(8, 8, 8), target="residual")
    unet = build_model("unet", widths=(8, 8, 8), t_lag=4, transfer_widths=(8, 8, 8), target="residual")
    unet.transfer.load_state_dict(ddpm.transfer.state_dict())
    ddpm.set_regression(unet, scale=0.5)
    b = torch.utils.data.default_collate([_Patches(6)[i] for i in range(6)])
    if drop:
        b["drop"] = torch.tensor([True, False] * 3)
    loss = _loss_for("ddpm", load_config("tiny"))
    calls = []
    forward = transfer_mod.TransferEncoder.forward
    monkeypatch.setattr(transfer_mod.TransferEncoder, "forward",
                        lambda self, lags: calls.append(self) or forward(self, lags))
    shared = loss(ddpm, b, torch.Generator().manual_seed(3))
    assert calls == [ddpm.transfer]
    calls.clear()
    monkeypatch.setattr(type(ddpm), "shares_conditioning", lambda self: False)
    apart = loss(ddpm, b, torch.Generator().manual_seed(3))
    assert calls == [ddpm.transfer, unet.transfer]
    torch.testing.assert_close(shared, apart, rtol=0, atol=0)
    monkeypatch.undo()
    other = copy.deepcopy(ddpm)
    with torch.no_grad():
        next(other.regression.transfer.parameters()).add_(1.0)
    assert not other.shares_conditioning()


@pytest.mark.parametrize("kind", ["ddpm", "unet"])
def test_validation_computes_its_frozen_parts_once_with_the_same_losses(tmp_path, monkeypatch, kind):
    """The validation items recur unchanged every epoch: their transfer features and (DDPM)
    CorrDiff mean are computed on the first validation only, and every epoch's validation
    loss equals the one recomputed from scratch, bit for bit (the DDPM with EMA: its copy of
    the frozen weights stays equal). Without room to keep them, nothing is kept."""
    import fastds.models.transfer as transfer_mod
    import fastds.training.loop as loop
    from fastds.config import load_config
    from fastds.training.stages import _loss_for

    def run(budget, name):
        monkeypatch.setattr(loop, "VAL_CACHE_BYTES", budget)
        torch.manual_seed(0)
        model = build_model(kind, widths=(8, 8, 8), t_lag=4, transfer_widths=(8, 8, 8), target="residual")
        if kind == "ddpm":
            unet = build_model("unet", widths=(8, 8, 8), t_lag=4, transfer_widths=(8, 8, 8), target="residual")
            unet.transfer.load_state_dict(model.transfer.state_dict())
            model.set_regression(unet, scale=0.5)
        calls = []
        forward = transfer_mod.TransferEncoder.forward
        monkeypatch.setattr(transfer_mod.TransferEncoder, "forward",
                            lambda self, lags: calls.append(torch.is_grad_enabled()) or forward(self, lags))
        settings = FitSettings(lr=1e-2, batch=16, epochs=3, ema=0.9 if kind == "ddpm" else 0.0)
        hist = fit(model, _loss_for(kind, load_config("tiny")), _Patches(32), _Patches(40, seed=1),
                   ckpt_path=tmp_path / f"{name}.pt", progress=False, settings=settings)["history"]
        monkeypatch.undo()
        return [h["val_loss"] for h in hist], calls.count(False)  # no-grad passes: validation

    kept, passes_kept = run(loop.VAL_CACHE_BYTES, "kept")
    fresh, passes_fresh = run(0, "fresh")
    assert kept == fresh and len(kept) == 3 and all(np.isfinite(kept))
    assert passes_kept == 3 and passes_fresh == 3 * 3  # 40 items in batches of 16, per epoch


def test_the_ddpm_trains_its_epoch_factor_longer():
    import dataclasses
    from fastds.config import load_config
    from fastds.training.stages import _model_settings
    tc = load_config("tiny", None, ["train.epochs=5", "train.ddpm_epoch_factor=3"]).train
    assert _model_settings("ddpm", tc) == {"ema": tc.ema, "epochs": 15}
    for kind in ("unet", "vae"):  # no EMA, and their own epochs (the section's)
        assert _model_settings(kind, tc) == {"ema": 0.0}
    assert load_config("tiny").train.ddpm_epoch_factor == 2
    with pytest.raises(ValueError, match="train.ddpm_epoch_factor"):
        _model_settings("ddpm", dataclasses.replace(tc, ddpm_epoch_factor=0))


def test_frozen_encoder_gets_no_update_and_no_decay(tmp_path):
    model = build_model("unet", widths=(8, 16, 16), t_lag=4, transfer_widths=(8, 16, 16))
    before = {k: v.clone() for k, v in model.transfer.state_dict().items()}
    fit(model, _l1, _Patches(), None, ckpt_path=tmp_path / "m.pt", progress=False,
        settings=FitSettings(lr=1e-2, weight_decay=0.5, batch=16, epochs=2))
    for k, v in model.transfer.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(not p.requires_grad for p in model.transfer.parameters())
    assert not model.transfer.training
    ck = load_checkpoint(tmp_path / "m.pt")
    n_opt = sum(len(g["params"]) for g in ck["optimizer"]["param_groups"])
    assert n_opt == sum(1 for p in model.net.parameters())
    assert set(ck["optimizer"]["state"]) == set(range(n_opt))
    # decay only on weight tensors of the trainable net
    decayed = [g for g in ck["optimizer"]["param_groups"] if g["weight_decay"] > 0]
    assert len(decayed) == 1 and len(decayed[0]["params"]) == sum(p.ndim >= 2 for p in model.net.parameters())


def test_resume_after_kill_gives_same_weights(tmp_path):
    settings = FitSettings(lr=5e-3, weight_decay=1e-3, batch=8, epochs=3, checkpoint_every=1,
                           ema=0.9, grad_clip=0.5)

    def fresh():
        torch.manual_seed(0)
        return build_model("vae", widths=(8, 8, 8), t_lag=4, transfer_widths=(8, 8, 8))

    def vae_loss(m, b, gen):
        cond = m.cond(b["coarse"], b["covariates"], b["lags"])
        recon, mu, lv = m.net(b["target"], cond)
        return F.mse_loss(recon, b["target"]) - 1e-3 * torch.mean(1 + lv - mu ** 2 - lv.exp())

    data, val = _Patches(40), _Patches(16, seed=1)
    full = fresh()
    fit(full, vae_loss, data, val, settings=settings, ckpt_path=tmp_path / "a.pt", progress=False)

    class Killed(Exception):
        pass

    def kill(step):
        if step == 7:  # mid second epoch, right after the step-7 checkpoint
            raise Killed

    part = fresh()
    with pytest.raises(Killed):
        fit(part, vae_loss, data, val, settings=settings, ckpt_path=tmp_path / "b.pt", progress=False,
            on_step=kill)
    torch.manual_seed(123)  # the process that resumes starts with other RNG states
    resumed = fresh()
    fit(resumed, vae_loss, data, val, settings=settings, ckpt_path=tmp_path / "b.pt", progress=False,
        resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    ea, eb = load_checkpoint(tmp_path / "a.pt")["ema"], load_checkpoint(tmp_path / "b.pt")["ema"]
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=0)


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from test_training import _Patches, _l1
    from fastds.config import load_config
    from fastds.models.conditional import build_model
    from fastds.training.loop import FitSettings, fit, shutdown_distributed
    from fastds.training.stages import _loss_for

    def check_in_step(model, name):
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered), name + ": ranks diverged"
        return float(flat.abs().sum())

    settings = FitSettings(lr=1e-2, batch=8, epochs=2, weight_decay=1e-2)
    torch.manual_seed(0)
    unet = build_model("unet", widths=(8, 8, 8), t_lag=4, transfer_widths=(8, 8, 8))
    fit(unet, _l1, _Patches(64), _Patches(16, seed=1), ckpt_path=sys.argv[1], progress=False,
        settings=settings)
    assert dist.get_world_size() == 2
    a = check_in_step(unet, "unet")
    # the VAE loss calls model.net directly, outside the model's forward
    torch.manual_seed(0)
    vae = build_model("vae", widths=(8, 8, 8), t_lag=4, transfer_widths=None)
    fit(vae, _loss_for("vae", load_config("tiny")), _Patches(64), None, progress=False,
        ckpt_path=sys.argv[1].replace(".pt", "_vae.pt"), settings=settings)
    b = check_in_step(vae, "vae")
    if dist.get_rank() == 0:
        print("DDP_OK", a, b)
    shutdown_distributed()
    assert not dist.is_initialized()
""")


def _torchrun(args, timeout=300):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    print(res.stdout[-2000:], res.stderr[-3000:])
    return res


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """Both ranks end with the same weights (the VAE's loss included) and exit cleanly."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    res = _torchrun([script, tmp_path / "ddp.pt", Path(__file__).parent])
    assert res.returncode == 0 and "DDP_OK" in res.stdout
    assert "terminate called" not in res.stderr
    assert load_checkpoint(tmp_path / "ddp.pt")["loop"]["done"]
    assert load_checkpoint(tmp_path / "ddp_vae.pt")["loop"]["done"]


@pytest.mark.slow
def test_torchrun_cli_train(tmp_path, store_path):
    """The README's multi-process recipe: `torchrun ... -m fastds.cli train --run-dir ...`."""
    res = _torchrun(["-m", "fastds.cli", "train", "--data", store_path, "--run-dir", tmp_path / "run",
                     "--model", "unet", "--season", "3", "--quiet", "--set", "train.transfer=false",
                     "--set", "train.widths=[8, 8, 8]", "--set", "train.epochs=1",
                     "--set", "train.max_steps=6", "--set", "train.batch=8", "--set", "data.t_lag=6"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "terminate called" not in res.stderr
    ck = load_checkpoint(tmp_path / "run" / "season3" / "unet.pt")
    assert ck["loop"]["done"] and ck["loop"]["global_step"] == 6
    assert (tmp_path / "run" / "season3" / "unet.best.pt").exists()


def test_ddpm_loss_falls_on_twin(trained_run):
    log = json.loads((trained_run / "season3" / "ddpm.log.json").read_text())
    first, epoch1, last = log[0]["first_loss"], log[0]["train_loss"], log[-1]["train_loss"]
    print(f"DDPM train loss: first step {first:.4g}, epoch 1 mean {epoch1:.4g}, last epoch mean "
          f"{last:.4g} after {log[-1]['steps']} steps")
    # v-prediction of a unit-sd residual starts near 1 (E[v²] = 1) and cannot reach 0: the
    # irreducible part is the residual's own noise
    assert last < 0.75 * first and last < epoch1
    assert log[-1]["val_loss"] < log[0]["val_loss"]


def test_pretrain_and_run_layout(trained_run):
    s3 = trained_run / "season3"
    for name in ("pretrain.pt", "pretrain.best.pt", "ddpm.pt", "ddpm.best.pt", "ddpm.log.json"):
        assert (s3 / name).exists(), name
    assert json.loads((trained_run / "run.json").read_text())["store"].endswith("store.zarr")
    ck = load_checkpoint(s3 / "ddpm.pt")
    assert {"model", "optimizer", "scheduler", "ema", "rng", "norm_y", "config"} <= set(ck)


def test_train_without_pretrain_says_what_to_do(store_path, tiny_config, tmp_path):
    from fastds.training.stages import train
    with pytest.raises(FileNotFoundError, match="run `fastds pretrain`"):
        train(data=store_path, run=tmp_path, config=tiny_config, progress=False)


def test_checkpoints_from_before_spread_calibration_still_load():
    """A CorrDiff state without the inflation or the per-band gains (older runs) loads with
    none of them; gains of any saved length load as saved."""
    import copy
    from fastds.models.conditional import build_model
    unet = build_model("unet", widths=[8, 16, 16], t_lag=4)
    m = build_model("ddpm", widths=[8, 16, 16], t_lag=4)
    m.set_regression(copy.deepcopy(unet))
    state = m.state_dict()
    del state["regression_bands"], state["regression_inflation"]
    fresh = build_model("ddpm", widths=[8, 16, 16], t_lag=4)
    fresh.set_regression(copy.deepcopy(unet))
    fresh.load_state_dict(state)
    assert fresh.regression_bands.numel() == 0 and float(fresh.regression_inflation) == 1.0
    state["regression_bands"] = torch.tensor([1.5, 1.2, 1.0, 0.9, 0.8])
    fresh.load_state_dict(state)
    assert fresh.regression_bands.tolist() == pytest.approx([1.5, 1.2, 1.0, 0.9, 0.8])


def test_out_of_fold_days_are_blocks_dealt_in_turn():
    from fastds.training.oof import fold_of_days
    days = np.array([3, 4, 5, 20, 21, 40, 41, 42, 70, 71])
    fold = fold_of_days(days, 80, 2, block=10)
    # blocks 0, 2, 4, 7 of the training days -> folds 0, 1, 0, 1; other days -1
    assert fold[[3, 4, 5]].tolist() == [0, 0, 0] and fold[[20, 21]].tolist() == [1, 1]
    assert fold[[40, 41, 42]].tolist() == [0, 0, 0] and fold[[70, 71]].tolist() == [1, 1]
    assert (fold[np.setdiff1d(np.arange(80), days)] == -1).all()
    with pytest.raises(ValueError, match="oof_folds must be 0 .off. or at least 2"):
        fold_of_days(days, 80, 1)
    with pytest.raises(ValueError, match="only 4 block.s. of 10 days; use fewer folds"):
        fold_of_days(days, 80, 5, block=10)


def test_out_of_fold_means_take_each_items_fold_unet_and_the_run_unet_elsewhere():
    from fastds.training.oof import OOFMeans, fit_fold_means

    class Const(torch.nn.Module):  # a "U-Net" whose mean is its number everywhere
        def __init__(self, v):
            super().__init__()
            self.v = v
            self.w = torch.nn.Parameter(torch.zeros(()))

        def cond(self, coarse, cov, lags, drop):
            return coarse

        def forward(self, x, t, cond):
            return torch.full_like(cond[:, :1], float(self.v))

    class Run:  # the DDPM side: its regression mean is the run's U-Net's (-1 here)
        regression = True

        def regression_mean(self, coarse, cov, lags, drop):
            return torch.full_like(coarse[:, :1], -1.0)

    fold = np.array([-1, 0, 1, 0, -1])
    oof = OOFMeans(fold, [Const(10), Const(11)])
    b = {"day": torch.tensor([1, 2, 0, 3, 2, 4]), "target": torch.zeros(6, 1, 2, 2),
         "coarse": torch.zeros(6, 1, 2, 2), "covariates": torch.zeros(6, 3, 2, 2),
         "lags": torch.zeros(6, 4, 2, 2)}
    got = oof(Run(), b)[:, 0, 0, 0].tolist()
    assert got == [10, 11, -1, 10, 11, -1]
    assert all(not p.requires_grad for n in oof.nets for p in n.parameters())

    class Set:  # what fit_fold_means reads of a FinePatches
        def __init__(self):
            self.days, self.times = np.arange(10, 66), np.arange(70)
    seen = {}

    def fit_fold(k, net, subset):
        seen[k] = subset.days
        return f"fold{k}"
    res = fit_fold_means(Set(), 2, fit_fold, lambda: Const(0), lambda net, path: setattr(net, "v", path))
    for k in (0, 1):  # U-Net k never sees a day of fold k, and sees every other training day
        assert not np.isin(seen[k], np.flatnonzero(res.fold == k)).any()
        assert set(seen[k]) | set(np.flatnonzero(res.fold == k)) == set(range(10, 66))
    assert [n.v for n in res.nets] == ["fold0", "fold1"]


def test_ddpm_trains_on_out_of_fold_means(trained_run, store_path, tiny_config, tmp_path, monkeypatch):
    """``train.oof_folds = 2``: two fold U-Nets are fitted next to the run's, and the DDPM's
    loss takes every training item's mean from the fold U-Net that never saw its day."""
    import dataclasses

    from fastds.training import oof as oof_mod
    from fastds.training.stages import train
    run = copied_run(trained_run, tmp_path / "run", drop=("ddpm*",))
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(
        tiny_config.train, oof_folds=2, epochs=1, calibrate_spread=False))
    calls, real = [], oof_mod.OOFMeans.__call__
    monkeypatch.setattr(oof_mod.OOFMeans, "__call__",
                        lambda self, m, b: calls.append(self.fold[b["day"]]) or real(self, m, b))
    train(data=store_path, run=run, config=cfg, model="ddpm", progress=False)
    s3 = run / "season3"
    assert (s3 / "unet-fold0.best.pt").exists() and (s3 / "unet-fold1.best.pt").exists()
    assert (s3 / "ddpm.best.pt").exists()
    folds = torch.cat(calls)
    assert (folds >= 0).any() and (folds == -1).any()  # training items in folds, validation not
    # resuming the finished DDPM walks no fold U-Net
    import fastds.training.stages as stages

    def walked(*a, **k):
        raise AssertionError("the fold U-Nets were walked again")
    monkeypatch.setattr(stages, "fit_fold_means", walked)
    train(data=store_path, run=run, config=cfg, model="ddpm", progress=False, resume=True)


def test_resuming_a_finished_run_rebuilds_nothing(trained_run, store_path, tiny_config, tmp_path, monkeypatch):
    """A resumed ``train`` whose fit ran to its end (and, for the CorrDiff DDPM, was
    calibrated) returns its best checkpoint without building training sets or means."""
    import shutil

    import fastds.training.stages as stages
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    stamps = {p: p.stat().st_mtime_ns for p in (run / "season3").glob("*.pt")}

    def rebuilt(*a, **k):
        raise AssertionError("a finished run was rebuilt")
    monkeypatch.setattr(stages, "prepared_sets", rebuilt)
    for kind in ("unet", "ddpm"):
        assert stages.train(data=store_path, run=run, config=tiny_config, model=kind, progress=False,
                            resume=True) == [run / "season3" / f"{kind}.best.pt"]
    assert {p: p.stat().st_mtime_ns for p in (run / "season3").glob("*.pt")} == stamps


def test_train_precision_resolves_per_device_and_names_a_bad_value(monkeypatch):
    """``train.precision``: "auto" trains under bf16 autocast where the device has bf16
    natively, fp32 elsewhere; "fp32"/"bf16" as asked; the older ``train.bf16 = true`` still
    forces bf16; anything else is refused by the setting's name."""
    import dataclasses
    from fastds import _backend
    from fastds.config import load_config
    from fastds.training.stages import train_bf16
    tc = load_config("tiny").train
    assert tc.precision == "auto" and load_config("paper").train.precision == "fp32"  # the paper's arithmetic
    for flags, native in (({"avx512_bf16"}, True), ({"amx_bf16"}, True), ({"avx2", "fma"}, False)):
        monkeypatch.setattr(_backend, "_cpu_flags", lambda flags=flags: set(flags))
        _backend.bf16_native.cache_clear()
        assert train_bf16(dataclasses.replace(tc, precision="auto"), "cpu") is native
        assert train_bf16(dataclasses.replace(tc, precision="fp32"), "cpu") is False
        assert train_bf16(dataclasses.replace(tc, precision="bf16"), "cpu") is True
        assert train_bf16(dataclasses.replace(tc, precision="fp32", bf16=True), "cpu") is True
    _backend.bf16_native.cache_clear()
    with pytest.raises(ValueError, match="train.precision must be one of fp32, bf16, auto, got 'fp16'"):
        train_bf16(dataclasses.replace(tc, precision="fp16"), "cpu")


def test_bf16_training_runs_the_networks_in_bf16_and_keeps_fp32_weights(trained_run, store_path, tiny_config,
                                                                        tmp_path, monkeypatch):
    """Stage C with ``train.precision = "bf16"``: the fit gets ``bf16``, the denoiser's
    convolutions run in bf16 under autocast, and the saved weights, EMA and optimizer state
    stay fp32 (autocast casts per call, it never converts the parameters)."""
    import dataclasses

    import fastds.training.stages as stages
    run = copied_run(trained_run, tmp_path / "run", drop=("ddpm*",))
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(
        tiny_config.train, precision="bf16", epochs=1, calibrate_spread=False, max_steps=2))
    seen, dtypes, real_fit = [], set(), stages.fit

    def spy(model, *a, settings, **k):
        seen.append(settings.bf16)
        conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if torch.is_grad_enabled() else None)
        return real_fit(model, *a, settings=settings, **k)
    monkeypatch.setattr(stages, "fit", spy)
    stages.train(data=store_path, run=run, config=cfg, model="ddpm", progress=False)
    assert seen == [True] and dtypes == {torch.bfloat16}
    ck = load_checkpoint(run / "season3" / "ddpm.pt")
    floats = [v for v in ck["model"].values() if torch.is_floating_point(v)]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    assert all(s["exp_avg"].dtype == torch.float32 for s in ck["optimizer"]["state"].values())


def test_recalibrate_fits_the_widening_for_new_sample_settings_and_saves_them(trained_run, tmp_path):
    """``recalibrate(run, sample=...)`` fits the widening with the sampler given (its record
    in the calibration), then saves those settings as the run's, so ``sample`` without
    settings samples what the widening was fitted for (no warning); the run's old sampler
    then warns. Without ``sample`` the run's settings and config are kept."""
    import dataclasses
    import shutil
    import warnings

    from fastds.runs import load_trained, run_config
    from fastds.sampling.day import spread_widening, state_widening, texture_widening
    from fastds.training.stages import FINAL_BAND_LIMITS, recalibrate
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    old = run_config(run).sample
    new = dataclasses.replace(old, sampler="dpmpp", steps=5, spacing="karras-linear")
    assert (old.sampler, old.steps, old.spacing) == ("dpmpp", 5, "leading")  # the tiny preset's
    out = recalibrate(run, season=3, sample=new)
    assert run_config(run).sample == new and run_config(run).train == run_config(trained_run).train
    model, _ = load_trained(run, 3, "ddpm")
    assert model.calibration["sampler"] == out[3]["sampler"]
    assert model.calibration["sampler"]["spacing"] == "karras-linear" and model.calibration["sampler"]["steps"] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spread_widening(model, run_config(run).sample)
        # the grid-scale texture gain is fitted with the band gains and is what sampling reads
        kappa = texture_widening(model, run_config(run).sample)
        # and so are the coarse-state gains (asked for): sampling reads them on the day's coarse field
        coarse = np.linspace(min(out[3]["state_nodes"]) - 1, max(out[3]["state_nodes"]) + 1, 7)[None, None]
        state = state_widening(model, dataclasses.replace(run_config(run).sample, calibrate_state=True), coarse)
    assert kappa[0] == out[3]["texture_gain"] and FINAL_BAND_LIMITS[0] <= kappa[0] <= FINAL_BAND_LIMITS[1]
    assert kappa[0] != 1.0 and out[3]["texture_power"] > 0
    assert len(out[3]["state_gains"]) == len(out[3]["state_nodes"]) >= 2
    assert all(FINAL_BAND_LIMITS[0] <= g <= FINAL_BAND_LIMITS[1] for g in out[3]["state_gains"])
    assert np.diff(out[3]["state_nodes"]).min() > 0
    np.testing.assert_array_equal(state[0][0, [0, -1]], [out[3]["state_gains"][0], out[3]["state_gains"][-1]])
    with pytest.warns(UserWarning, match="fitted for spacing='karras-linear' and is applied to spacing='leading'"):
        spread_widening(model, old)
    text = (run / "config.toml").read_text()
    recalibrate(run, season=3)  # the saved settings, unchanged
    assert (run / "config.toml").read_text() == text


def test_a_season_without_validation_days_warns_with_its_fallbacks_at_the_callers_line(
        store_path, tiny_config, monkeypatch, tmp_path):
    """A season whose record leaves no validation day (a short record) trains on, and says
    which fallbacks replace what validation gives: the warning names the season and the
    store, and points at the line that asked for training, not inside fastds."""
    import dataclasses
    import fastds.training.stages as stages
    from fastds.data.store import open_store
    store = open_store(store_path)
    train_set, _ = stages.training_sets(store, 3, tiny_config)
    monkeypatch.setattr(stages, "training_sets", lambda st, season, config: (train_set, []))
    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, pushforward=0))
    with pytest.warns(UserWarning, match=rf"season 3 of {store.path} has no validation day.*falling back "
                                         r"to: the last epoch.*no spread calibration") as seen:
        got = stages.prepared_sets(tmp_path, store, 3, config)
    assert got[1] == [] and len(got[0]) == len(train_set)
    assert [w.filename for w in seen] == [__file__]


def test_source_covariates_train_and_sample_from_the_saved_anchor(trained_run, store_path, tiny_config, tmp_path):
    """data.covariates='sources' end to end: the U-Net takes nine covariate channels, its
    checkpoint's anchor carries the source maps, and sampling (beyond what training saw: the
    store's anchor is never refitted) reads them from the checkpoint."""
    import dataclasses

    from fastds.runs import load_trained
    from fastds.sampling.pipeline import sample
    from fastds.training.stages import train
    run = copied_run(trained_run, tmp_path / "run", drop=("[!p]*.pt",))  # all but Stage A's
    cfg = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, covariates="sources"),
                              train=dataclasses.replace(tiny_config.train, epochs=1, max_steps=2))
    train(data=store_path, run=run, config=cfg, model="unet", progress=False)
    net, saved = load_trained(run, 3, "unet")
    assert saved.data.covariates == "sources"
    assert net.anchor.spread[3].shape == net.anchor.clim[3].shape
    ds = sample(run=run, start="2005-08-25", end="2005-08-26", model="unet", progress=False)
    assert np.isfinite(ds[list(ds.data_vars)[0]].values).all()


def test_source_maps_for_the_ddpm_alone_keep_the_bounded_unet_mean(trained_run, store_path, tiny_config, tmp_path):
    """train.mean_covariates='bounded' under data.covariates='sources': the DDPM reads the
    nine covariate channels, its U-Net mean is the run's bounded U-Net (its weights, seven
    channels: the leading ones of the DDPM's inputs), the two do not share a conditioning
    tensor, and sampling works from the checkpoint; a set that does not lead the DDPM's, or
    out-of-fold U-Nets beside it, is refused by name."""
    import dataclasses

    from fastds.data.transforms import COVARIATE_SETS
    from fastds.runs import load_trained, model_for
    from fastds.sampling.pipeline import sample
    from fastds.training.stages import train
    run = copied_run(trained_run, tmp_path / "run", drop=("ddpm*",))
    cfg = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, covariates="sources"),
                              train=dataclasses.replace(tiny_config.train, epochs=1, max_steps=2,
                                                        mean_covariates="bounded"))
    train(data=store_path, run=run, config=cfg, model="ddpm", progress=False)
    ddpm, saved = load_trained(run, 3, "ddpm")
    unet, unet_cfg = load_trained(run, 3, "unet")
    assert saved.data.covariates == "sources" and unet_cfg.data.covariates == "bounded"
    n_b, n_s = len(COVARIATE_SETS["bounded"]), len(COVARIATE_SETS["sources"])
    assert ddpm.regression.covariate_channels == n_b and ddpm.covariate_channels is None
    for (k, a), b in zip(ddpm.regression.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(a, b), k  # the run's U-Net, unchanged
    assert not ddpm.shares_conditioning()
    x = torch.rand(2, 1, 32, 32), torch.rand(2, n_s, 32, 32), torch.rand(2, saved.data.t_lag, 32, 32)
    got = ddpm.regression_mean(*x)
    want = unet(None, None, unet.cond(x[0], x[1][:, :n_b], x[2]))
    torch.testing.assert_close(got, want)
    assert ddpm.cond(*x).shape[1] == ddpm.regression.cond(*x).shape[1] + n_s - n_b
    ds = sample(run=run, start="2005-08-25", end="2005-08-26", model="ddpm", progress=False,
                members=2, steps=2)
    assert np.isfinite(ds[list(ds.data_vars)[0]].values).all()
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mean_covariates="paper"))
    with pytest.raises(ValueError, match="train.mean_covariates='paper'.*do not lead"):
        model_for("ddpm", bad, run, 3)
    oof = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, oof_folds=2))
    with pytest.raises(ValueError, match="train.mean_covariates and train.oof_folds"):
        model_for("ddpm", oof, run, 3)


def test_auto_covariates_give_a_seasons_ddpm_the_source_maps_where_its_anchor_map_is_signal(
        trained_run, store_path, tiny_config, tmp_path, monkeypatch):
    """data.covariates='auto' (the default): every model but the CorrDiff DDPM trains on the
    bounded set; the DDPM takes the source maps, over the run's bounded U-Net mean, exactly
    where the season's anchor map reliability reaches runs.SOURCE_RELIABILITY, and its
    checkpoint keeps the concrete set, so sampling needs no decision; a distilled student
    takes its teacher's set, a refit of the widening or a resumed fit the model's; the
    out-of-fold recipe and the U-Net stay bounded."""
    import dataclasses

    import fastds.runs as R
    from fastds.data.transforms import COVARIATE_SETS
    from fastds.runs import load_trained, season_config
    from fastds.sampling.pipeline import sample
    from fastds.data.store import open_store
    from fastds.training.stages import recalibrate, train
    assert tiny_config.data.covariates == "auto"
    _, unet_cfg = load_trained(trained_run, 3, "unet")
    _, ddpm_cfg = load_trained(trained_run, 3, "ddpm")
    st = open_store(store_path)
    rel = R.fine_days(st, unet_cfg, 3).anchor.reliability[3]
    assert 0.0 <= rel < R.SOURCE_RELIABILITY  # the smooth test twin: no fixed sources
    assert unet_cfg.data.covariates == "bounded" and ddpm_cfg.data.covariates == "bounded"
    run = copied_run(trained_run, tmp_path / "run", drop=("ddpm*",))
    monkeypatch.setattr(R, "SOURCE_RELIABILITY", rel)  # the threshold reached: the maps go in
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, epochs=1, max_steps=2))
    for kind in ("unet", "vae"):
        assert season_config(cfg, kind=kind, store=st, season=3).data.covariates == "bounded"
    oof = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, oof_folds=2))
    assert season_config(oof, kind="ddpm", store=st, season=3).data.covariates == "bounded"
    train(data=store_path, run=run, config=cfg, model="ddpm", progress=False)
    ddpm, saved = load_trained(run, 3, "ddpm")
    assert saved.data.covariates == "sources" and saved.train.mean_covariates == "bounded"
    assert ddpm.regression.covariate_channels == len(COVARIATE_SETS["bounded"])
    assert season_config(cfg, kind="distill", store=st, season=3, run=run).data.covariates == "sources"
    assert 3 in recalibrate(run, season=3)  # the run's "auto" config, fed as the DDPM was trained
    ds = sample(run=run, start="2005-08-25", end="2005-08-26", model="ddpm", progress=False,
                members=2, steps=2)
    assert np.isfinite(ds[list(ds.data_vars)[0]].values).all()
    monkeypatch.setattr(R, "SOURCE_RELIABILITY", rel + 1e-6)  # just short of it: bounded
    assert season_config(cfg, kind="ddpm", store=st, season=3).data.covariates == "bounded"
    # a resumed fit (here: its widening left to refit) goes on with the set it started with
    best = run / "season3" / "ddpm.best.pt"
    ck = torch.load(best, weights_only=False)
    del ck["calibration"]
    torch.save(ck, best)
    train(data=store_path, run=run, config=cfg, model="ddpm", progress=False, resume=True)
    assert load_trained(run, 3, "ddpm")[1].data.covariates == "sources"
    pinned = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, covariates="bounded"))
    assert season_config(pinned, kind="ddpm", store=st, season=3) is pinned  # a named set is kept
