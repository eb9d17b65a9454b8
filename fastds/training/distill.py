"""Distilling the run's DDPM into a few-step student (``train --model distill``).

Two methods, ``train.distill_method``:

- ``"trajectory"``: the student learns, in one training, to end where the run's own sampler
  ends from the same latents (:func:`trajectory_loss`);
- ``"progressive"`` (Salimans & Ho 2022): rounds, each teaching a student to take in one
  deterministic DDIM step what its teacher takes in two (:func:`progressive_loss`), from the
  DDPM on ``train.distill_teacher_steps`` steps down to ``train.distill_steps``
  (:func:`distill_rounds`); each round's student is the next round's teacher.

Every student samples with deterministic DDIM on its trailing grid
(:func:`~fastds.runs.distill_settings`). Symbols: ᾱ_t the schedule's cumulative product,
α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), x̂0 a network's data prediction.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..diffusion.schedule import Diffusion
from ..runs import distill_settings
from ..sampling.samplers import alpha_bar_for, make_plan, run_plan
from ..sampling.steps import timesteps

__all__ = ["DISTILL_METHODS", "distill_rounds", "trajectory_loss", "progressive_loss", "progressive_target"]

DISTILL_METHODS = ("trajectory", "progressive")


def distill_rounds(config: Config) -> list[tuple[int, int]]:
    """Progressive distillation's rounds, [(teacher DDIM steps, student steps), ...]: each
    halves the grid, from ``train.distill_teacher_steps`` to ``train.distill_steps``."""
    tc = config.train
    n, first = int(tc.distill_steps), int(tc.distill_teacher_steps)
    if n < 1:
        raise ValueError(f"train.distill_steps must be >= 1, got {tc.distill_steps}")
    rounds, t = [], first
    while t > n and t % 2 == 0:
        rounds.append((t, t // 2))
        t //= 2
    if t != n or not rounds:
        raise ValueError(f"train.distill_teacher_steps={first} must be train.distill_steps={n} "
                         "times a power of 2 (at least 2x): each progressive round halves the grid")
    T = int(config.diffusion.T)
    for teacher, student in rounds:
        if not np.array_equal(timesteps(T, teacher, "trailing")[0][::2], timesteps(T, student, "trailing")[0]):
            raise ValueError(f"train.distill_teacher_steps={first}: the trailing grid of {student} steps "
                             f"is not every other step of {teacher}'s with diffusion.T={T}")
    return rounds


def _freeze(teacher):
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _residual(m, b):
    """The batch's target in the space the DDPM diffuses (the CorrDiff residual, scaled)."""
    target = b["target"]
    mean = m.regression_mean(b["coarse"], b["covariates"], b["lags"], b.get("drop"))
    return target if mean is None else (target - mean) / m.regression_scale


def trajectory_loss(teacher, config: Config):
    """Trajectory distillation of the run's DDPM sampler into ``train.distill_steps`` network
    evaluations (Luhman & Luhman 2021, multistep on the student's DDIM grid).

    Per batch: latents x_T, the teacher's sample x̂0 from them with the run's sampler (its
    ``[sample]`` sampler, steps and spacing; no gradient); then the student, at each time τ_k
    of its grid (trailing spacing), sees the point its own deterministic DDIM trajectory
    reaches if every earlier step returned x̂0 (x_T at τ_1, then √ᾱ x̂0 + √(1−ᾱ) ε̂ with ε̂ the
    noise x_T implies) and learns to predict x̂0 there (MSE on x0, whatever the network's
    parameterisation). A perfect student reproduces the teacher's sample from the same x_T."""
    sc, d = config.sample, config.diffusion
    if int(config.train.distill_steps) < 1:
        raise ValueError(f"train.distill_steps must be >= 1, got {config.train.distill_steps}")
    teacher_plan = make_plan(sc.sampler, T=d.T, steps=sc.steps, prediction=d.prediction, eta=sc.eta,
                             spacing=sc.spacing)
    st = distill_settings(sc, config)
    taus = make_plan(st.sampler, T=d.T, steps=st.steps, prediction=d.prediction, eta=0.0,
                     spacing=st.spacing).timesteps
    ab = alpha_bar_for(d.T)
    diffusion = Diffusion(d.T, d.prediction, d.schedule)
    _freeze(teacher)

    def distill(m, b, gen):
        cond = m.cond(b["coarse"], b["covariates"], b["lags"], b.get("drop"))
        x_T = torch.randn(b["target"].shape, generator=gen, device="cpu", dtype=cond.dtype).to(cond.device)
        with torch.no_grad():
            noise = torch.Generator(device=cond.device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
            x0 = run_plan(teacher, x_T, teacher_plan, cond=cond.detach(), generator=noise, clip=sc.clip or None)
            eps = (x_T - float(np.sqrt(ab[taus[0]])) * x0) / float(np.sqrt(1 - ab[taus[0]]))
        loss = 0.0
        for k, tau in enumerate(taus):
            x = x_T if k == 0 else float(np.sqrt(ab[tau])) * x0 + float(np.sqrt(1 - ab[tau])) * eps
            t = torch.full((x.shape[0],), int(tau), dtype=torch.long, device=x.device)
            pred = diffusion.predict_x0(m(x, t, cond), x, t)
            loss = loss + torch.mean((pred.float() - x0.float()) ** 2) / len(taus)
        return loss
    return distill


def _ddim(z, x0, ab_from, ab_to):
    """One deterministic DDIM move of z from ᾱ_from to ᾱ_to given x̂0 (ε̂ kept)."""
    eps = (z - ab_from.sqrt() * x0) / (1 - ab_from).sqrt()
    return ab_to.sqrt() * x0 + (1 - ab_to).sqrt() * eps


def progressive_target(x0_of, z, ab_t, ab_mid, ab_end):
    """The x̂0 a student must predict at z (ᾱ_t) so that its one DDIM step to ᾱ_end lands where
    the teacher's two steps (through ᾱ_mid) land: with z'' the teacher's end point,
    x̃ = (z'' − (σ_end/σ_t) z) / (α_end − (σ_end/σ_t) α_t) (Salimans & Ho 2022, Alg. 2).
    ``x0_of(z, which)``: the teacher's x̂0 at z, ``which`` 0 (at t) or 1 (at the midpoint);
    the ᾱ are tensors broadcasting against z ((B, 1, 1, 1)); ᾱ_end = 1 ends at the data."""
    z_mid = _ddim(z, x0_of(z, 0), ab_t, ab_mid)
    z_end = _ddim(z_mid, x0_of(z_mid, 1), ab_mid, ab_end)
    ratio = (1 - ab_end).sqrt() / (1 - ab_t).sqrt()
    return (z_end - ratio * z) / (ab_end.sqrt() - ratio * ab_t.sqrt())


def progressive_loss(teacher, config: Config, teacher_steps: int):
    """One round of progressive distillation: the student learns one DDIM step of the trailing
    grid of ``teacher_steps // 2`` steps, the teacher's two steps on its grid of
    ``teacher_steps``. Per batch: the data residual x0, a student step k per item, z_t =
    α_t x0 + σ_t ε, the target :func:`progressive_target` (no gradient), and the student's
    x̂0 at (z_t, t) against it, weighted by the truncated SNR max(ᾱ/(1−ᾱ), 1)."""
    d = config.diffusion
    if teacher_steps < 2 or teacher_steps % 2:
        raise ValueError(f"progressive_loss: teacher_steps must be even and >= 2, got {teacher_steps}")
    t_ts, _ = timesteps(d.T, teacher_steps, "trailing")
    s_ts, s_prev = timesteps(d.T, teacher_steps // 2, "trailing")
    ab = np.append(alpha_bar_for(d.T), 1.0)  # index -1: ᾱ = 1 (the data)
    grid = {"t": s_ts, "mid": t_ts[1::2], "end": s_prev}
    diffusion = Diffusion(d.T, d.prediction, d.schedule)
    _freeze(teacher)

    def distill(m, b, gen):
        cond = m.cond(b["coarse"], b["covariates"], b["lags"], b.get("drop"))
        with torch.no_grad():
            x0 = _residual(m, b).float()
        k = torch.randint(0, len(s_ts), (x0.shape[0],), generator=gen).numpy()
        t = {key: torch.as_tensor(v[k], dtype=torch.long, device=x0.device) for key, v in grid.items()}
        a = {key: torch.as_tensor(ab[v[k]], dtype=torch.float32, device=x0.device).view(-1, 1, 1, 1)
             for key, v in grid.items()}
        eps = torch.randn(x0.shape, generator=gen, device="cpu").to(x0.device)
        z = a["t"].sqrt() * x0 + (1 - a["t"]).sqrt() * eps
        with torch.no_grad():
            c = cond.detach()
            at = (t["t"], t["mid"])
            target = progressive_target(
                lambda x, i: diffusion.predict_x0(teacher(x, at[i], c), x, at[i]).float(),
                z, a["t"], a["mid"], a["end"])
        pred = diffusion.predict_x0(m(z, t["t"], cond), z, t["t"]).float()
        weight = torch.clamp(a["t"] / (1 - a["t"]), min=1.0)
        return torch.mean(weight * (pred - target) ** 2)
    return distill
