"""The one training loop for every model (Stage A, DDPM, baselines).

- AdamW over *trainable* parameters only (frozen ones get no slot, no update, no decay:
  Eq. 3); weight decay on weight matrices/kernels, none on biases and norms.
- Gradient clipping, ReduceLROnPlateau on validation loss, early stopping, EMA of weights,
  optional bf16 autocast, tqdm progress with the running loss.
- Seeded data order (a permutation per epoch from (seed, epoch)), one torch.Generator for
  the loss's randomness, both saved in checkpoints together with every other RNG state.
- Checkpoints are atomic; ``resume=True`` continues a killed run from its last checkpoint
  (epoch end, or every ``checkpoint_every`` steps) and ends with the same weights as an
  uninterrupted run.
- Data parallel under ``torchrun`` (DistributedDataParallel; gloo on CPU): each rank takes a
  strided shard of the epoch's permutation; rank 0 writes checkpoints.
"""
from __future__ import annotations

import gc
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .._io import atomic_path
from ..runs import load_checkpoint

__all__ = ["FitSettings", "fit", "save_checkpoint", "load_checkpoint", "trainable_parameters"]


@dataclass(frozen=True)
class FitSettings:
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch: int = 32
    epochs: int = 10
    grad_clip: float = 0.0
    plateau_factor: float = 0.1
    plateau_patience: int = 3
    early_stop: int = 6
    ema: float = 0.0
    bf16: bool = False
    max_steps: int = 0
    checkpoint_every: int = 0
    epoch_subset: int = 0       # samples per epoch (seeded subset), 0: all
    seed: int = 0


def trainable_parameters(model: nn.Module):
    return [p for p in model.parameters() if p.requires_grad]


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for p in trainable_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_OWN_GROUP = False  # True once fit() has started the process group itself (a torchrun launch)


def _maybe_init_distributed():
    global _OWN_GROUP
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _OWN_GROUP = True


def shutdown_distributed() -> None:
    """Tear down the process group that ``fit`` started under ``torchrun``; a no-op otherwise.

    Ranks meet at a barrier first, so none leaves while another still talks to it, and the
    group is destroyed while the interpreter is whole: gloo's worker threads destroyed during
    interpreter finalisation abort the process ("terminate called without an active exception").
    A group the caller created is the caller's to destroy.
    """
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        # anything still holding the group (a DDP reducer in a cycle, a pending work handle)
        # is released now, while the interpreter is whole, and not at exit
        gc.collect()
    _OWN_GROUP = False


class _WithLoss(nn.Module):
    """The loss computation as one module call, so that DistributedDataParallel sees every
    parameter the loss touches inside its forward (a loss that calls a sub-module directly,
    like the VAE's ``model.net``, would otherwise bypass DDP and leave gradients unsynchronised).
    """

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, gen):
        return self.loss_fn(self.model, batch, gen)


def _rng_state(gen):
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(), "loss_gen": gen.get_state()}


def _set_rng_state(state, gen):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["loss_gen"])


def save_checkpoint(path, state: dict):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _epoch_indices(n, epoch, settings, rank, world):
    g = torch.Generator().manual_seed(settings.seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    if settings.epoch_subset and settings.epoch_subset < n:
        perm = perm[: settings.epoch_subset]
    usable = (len(perm) // world) * world  # equal shards keep DDP's collectives in step
    return perm[:usable][rank::world].tolist()


def _batches(dataset, indices, batch, collate):
    for i in range(0, len(indices), batch):
        yield collate([dataset[j] for j in indices[i:i + batch]])


# the most device memory the validation batches may keep between epochs (below)
VAL_CACHE_BYTES = 256 * 2 ** 20


def _val_batches(model, loss_fn, val_set, settings, collate, device, cache):
    """This rank's validation batches on ``device``: the same items every epoch (a fixed
    subset; validation items draw their offsets, pushforward and dropout from (seed, index),
    not the epoch). Kept in ``cache`` (a list, filled on first use) while they fit in
    VAL_CACHE_BYTES, each with the frozen parts of its loss precomputed by
    ``loss_fn.frozen(model, batch)`` where the loss offers it (the transfer features, the
    CorrDiff mean: the same numbers every epoch, since frozen weights stay bit-equal in the
    EMA copy too), so an epoch's validation runs only the trained network."""
    if cache:
        yield from cache
        return
    rank, world = _world()
    g = torch.Generator().manual_seed(settings.seed + 11)
    idx = torch.randperm(len(val_set), generator=g)[: max(settings.epoch_subset // 4, 256)].tolist()
    idx = idx[rank::world]
    frozen = getattr(loss_fn, "frozen", None)
    kept, size = [], 0
    for b in _batches(val_set, idx, settings.batch, collate):
        b = _to(b, device)
        if frozen is not None:
            b = frozen(model, b)
        size += sum(v.numel() * v.element_size() for v in b.values()) if isinstance(b, dict) else 0
        if kept is not None and isinstance(b, dict) and size <= VAL_CACHE_BYTES:
            kept.append(b)
        else:
            kept = None
        yield b
    if kept:
        cache.extend(kept)


def _val_loss(model, loss_fn, val_set, settings, collate, device, cache=None):
    if val_set is None or len(val_set) == 0:
        return float("nan")
    rank, world = _world()
    gen = torch.Generator().manual_seed(settings.seed + 7)  # same t/noise every evaluation
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in _val_batches(model, loss_fn, val_set, settings, collate, device,
                              [] if cache is None else cache):
            loss = loss_fn(model, b, gen)
            n = _batch_size(b)
            total += float(loss) * n
            count += n
    model.train()
    if world > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)  # NCCL wants device tensors
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return type(batch)(v.to(device) for v in batch)


def _batch_size(batch):
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return first.shape[0]


def fit(model: nn.Module, loss_fn, train_set, val_set, *, settings: FitSettings, ckpt_path,
        extra_state=None, resume=False, progress=True, device="cpu", on_step=None,
        desc="train", select=None) -> dict:
    """Train ``model`` with ``loss_fn(model, batch, generator) -> scalar``.

    ``loss_fn`` always gets the bare model; under ``torchrun`` the whole loss call runs inside
    one DistributedDataParallel forward, so it may use any sub-module. Call
    ``shutdown_distributed()`` once the process is done training.

    Writes ``ckpt_path`` (last state) and ``ckpt_path`` with suffix ``.best.pt`` (best
    validation loss, or lowest ``select(model)`` score when given, e.g. minus a strict-rollout
    R²: model and EMA weights; the plateau schedule and early stopping stay on the validation
    loss). ``extra_state`` (config, normalisation, ...) is
    stored in both. ``on_step(global_step)`` runs after each optimizer step and any
    checkpoint of that step (tests use it to interrupt a run). Returns the history dict.
    """
    _maybe_init_distributed()
    t = _Trainer(model, loss_fn, settings=settings, ckpt_path=ckpt_path, extra_state=extra_state,
                 progress=progress, device=device, desc=desc, select=select)
    if resume and t.ckpt_path.exists() and t.resume():
        return {"history": t.state["history"], "resumed": True, "best_val": t.state["best_val"],
                "already_done": True}
    t.wrap()
    model.train()
    stop = False
    while t.state["epoch"] < settings.epochs and not stop:
        stop = t.end_epoch(val_set, stopped=t.epoch(train_set, on_step))
    t.finish()
    return {"history": t.state["history"], "best_val": t.state["best_val"], "resumed": resume}


class _Trainer:
    """fit's state and steps: optimizer, plateau schedule, EMA, generator, loop counters."""

    def __init__(self, model, loss_fn, *, settings, ckpt_path, extra_state, progress, device, desc,
                 select):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        self.rank, self.world = _world()
        self.ckpt_path = Path(ckpt_path)
        self.best_path = self.ckpt_path.with_suffix(".best.pt")
        self.model, self.loss_fn, self.settings, self.device = model, loss_fn, settings, device
        self.progress, self.desc, self.select = progress, desc, select
        torch.manual_seed(settings.seed)
        model.to(device)
        if not trainable_parameters(model):
            raise ValueError(f"{desc}: the model has no trainable parameters")
        self.opt = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, factor=settings.plateau_factor, patience=settings.plateau_patience)
        self.ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema), use_buffers=True)
                    if settings.ema else None)
        self.gen = torch.Generator().manual_seed(settings.seed + 1)
        self.val_cache = []  # this fit's validation batches (_val_batches)
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_val": math.inf,
                      "bad_epochs": 0, "history": [], "done": False, "loss_sum": 0.0, "first_loss": None}
        self.extra_state = {**(extra_state or {}), "settings": asdict(settings)}
        self.autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                       enabled=settings.bf16)

    def resume(self) -> bool:
        """Load the last checkpoint; True when that run had already finished."""
        ck = load_checkpoint(self.ckpt_path)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        _set_rng_state(ck["rng"], self.gen)
        self.state = ck["loop"]
        return bool(self.state.get("done"))

    def wrap(self):
        self.net = _WithLoss(self.model, self.loss_fn)
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(self.net, find_unused_parameters=False)

    def checkpoint(self):
        if self.rank == 0:
            save_checkpoint(self.ckpt_path, {
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": _rng_state(self.gen), "loop": self.state, **self.extra_state})

    def save_best(self, val_loss, epoch):
        if self.rank == 0:
            save_checkpoint(self.best_path, {
                "model": self.model.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "val_loss": val_loss, "epoch": epoch, **self.extra_state})

    def epoch(self, train_set, on_step) -> bool:
        """The rest of the current epoch's optimizer steps; True when max_steps is reached."""
        from torch.utils.data import default_collate
        from tqdm.auto import tqdm
        st, settings = self.state, self.settings
        epoch = st["epoch"]
        if hasattr(train_set, "set_epoch"):  # per-epoch randomness of the items themselves
            train_set.set_epoch(epoch)
        indices = _epoch_indices(len(train_set), epoch, settings, self.rank, self.world)
        skip = st["step_in_epoch"] * settings.batch
        bar = tqdm(total=math.ceil(len(indices) / settings.batch), initial=st["step_in_epoch"],
                   desc=f"{self.desc} epoch {epoch + 1}/{settings.epochs}",
                   disable=not self.progress or self.rank != 0, leave=False, dynamic_ncols=True)
        running, stop = None, False
        for batch in _batches(train_set, indices[skip:], settings.batch, default_collate):
            value = self.step(batch)
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.4g}", lr=f"{self.opt.param_groups[0]['lr']:.2g}")
            bar.update(1)
            if settings.checkpoint_every and st["global_step"] % settings.checkpoint_every == 0:
                self.checkpoint()
            if on_step is not None:
                on_step(st["global_step"])
            if settings.max_steps and st["global_step"] >= settings.max_steps:
                stop = True
                break
        bar.close()
        return stop

    def step(self, batch) -> float:
        """One optimizer step on ``batch``; its loss."""
        with self.autocast:
            loss = self.net(_to(batch, self.device), self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.grad_clip:
            nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.settings.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        st = self.state
        st["step_in_epoch"] += 1
        st["global_step"] += 1
        value = loss.item()
        st["loss_sum"] += value
        if st["first_loss"] is None:
            st["first_loss"] = value
        return value

    def end_epoch(self, val_set, stopped=False) -> bool:
        """Validation, selection, the schedule and early stopping; True to stop (also when
        the epoch ``stopped`` at max_steps)."""
        from torch.utils.data import default_collate
        from tqdm.auto import tqdm
        st, settings = self.state, self.settings
        epoch = st["epoch"]
        eval_model = self.ema.module if self.ema is not None else self.model
        val = _val_loss(eval_model, self.loss_fn, val_set, settings, default_collate, self.device,
                        self.val_cache)
        train_loss = st["loss_sum"] / max(st["step_in_epoch"], 1)
        score = float("nan")
        if self.select is not None:
            was = eval_model.training
            eval_model.eval()
            with torch.no_grad():
                score = float(self.select(eval_model))
            eval_model.train(was)
        st["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val,
                              "lr": self.opt.param_groups[0]["lr"], "steps": st["global_step"],
                              "first_loss": st["first_loss"], "select": score})
        if self.progress and self.rank == 0:
            tqdm.write(f"{self.desc}: epoch {epoch + 1} train {train_loss:.4g} val {val:.4g}"
                       + (f" select {score:.4g}" if self.select is not None else ""))
        if not math.isnan(val):
            self.sched.step(val)
        key = score if self.select is not None else val
        improved = not math.isnan(key) and key < st.get("best_key", st["best_val"])
        if improved:
            st["best_key"] = key
            self.save_best(val, epoch + 1)
        val_improved = not math.isnan(val) and val < st["best_val"]
        if val_improved:
            st["best_val"] = val
        # patience counts epochs without a better checkpoint (the key that picks it), so a
        # model selected by its rollouts stops once they stop improving, not when its loss
        # does: epochs after that could only have changed the checkpoint by improving the key
        watched, better = (key, improved) if not math.isnan(key) else (val, val_improved)
        stop = stopped
        if not math.isnan(watched):
            st["bad_epochs"] = 0 if better else st["bad_epochs"] + 1
            stop = stop or st["bad_epochs"] >= settings.early_stop
        st["epoch"] += 1
        st["step_in_epoch"] = 0
        st["loss_sum"] = 0.0
        if stop or st["epoch"] >= settings.epochs:
            st["done"] = True
        self.checkpoint()
        return stop

    def finish(self):
        if not self.best_path.exists():  # no validation data: the last weights are "best"
            self.save_best(float("nan"), self.state["epoch"])
        if self.rank == 0:
            with atomic_path(self.ckpt_path.with_suffix(".log.json")) as tmp:
                tmp.write_text(json.dumps(self.state["history"], indent=1))
        if self.world > 1:
            # DDP sits in a reference cycle: without a collection it outlives the process group
            # and its reducer is torn down during interpreter exit, which can abort the process.
            del self.net
            gc.collect()
            dist.barrier()  # no rank goes on to read what rank 0 is still writing
