"""The diffusion process (METHOD.md §4), separate from any network and any sampler.

Schedules are computed in float64 (improved-diffusion's practice) and cast only where a
tensor meets the data. Symbols: ``alpha_bar`` = ᾱ_t, ``t`` in 0..T-1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["squaredcos_cap_v2", "Diffusion", "PREDICTIONS"]

PREDICTIONS = ("sample", "epsilon", "v")


def squaredcos_cap_v2(T: int, max_beta: float = 0.999) -> np.ndarray:
    """β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta), ᾱ(s) = cos²((s + 0.008)/1.008 · π/2). float64 (T,)."""
    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)])


class Diffusion:
    """Forward process and training loss for one schedule and prediction type.

    Parameters
    ----------
    T : number of training timesteps (paper 1000, reference code 2000).
    prediction : ``"sample"`` (the network predicts x0; the reference code), ``"epsilon"``
        or ``"v"``.
    """

    def __init__(self, T: int = 1000, prediction: str = "sample", schedule: str = "squaredcos_cap_v2"):
        if schedule != "squaredcos_cap_v2":
            raise ValueError(f"unknown schedule {schedule!r}; fastds implements 'squaredcos_cap_v2'")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if T < 2:
            raise ValueError(f"T must be >= 2, got {T}")
        self.T = int(T)
        self.prediction = prediction
        self.betas = squaredcos_cap_v2(self.T)
        self.alpha_bar = np.cumprod(1.0 - self.betas)

    def _coef(self, values, t, like):
        v = torch.as_tensor(values, dtype=torch.float64, device=like.device)[t]
        return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε; x0, noise (B, ...), t (B,) long."""
        return (self._coef(np.sqrt(self.alpha_bar), t, x0) * x0
                + self._coef(np.sqrt(1 - self.alpha_bar), t, x0) * noise)

    def target(self, x0, noise, t):
        """What the network learns to output for this prediction type."""
        if self.prediction == "sample":
            return x0
        if self.prediction == "epsilon":
            return noise
        return (self._coef(np.sqrt(self.alpha_bar), t, x0) * noise
                - self._coef(np.sqrt(1 - self.alpha_bar), t, x0) * x0)

    def predict_x0(self, out, x_t, t):
        """x̂0 from a network output ``out`` at (x_t, t)."""
        if self.prediction == "sample":
            return out
        sa = self._coef(np.sqrt(self.alpha_bar), t, x_t)
        so = self._coef(np.sqrt(1 - self.alpha_bar), t, x_t)
        if self.prediction == "epsilon":
            return (x_t - so * out) / sa
        return sa * x_t - so * out

    def loss(self, model, x0, cond, *, generator=None):
        """MSE between the network output and :meth:`target` at uniform random t.

        x0 (B, 1, h, w), cond (B, C, h, w); ``model(x_t, t, cond)``. Randomness comes from
        ``generator`` only, so a resumed run draws the same t and noise.
        """
        B = x0.shape[0]
        t = torch.randint(0, self.T, (B,), generator=generator, device="cpu").to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
        out = model(self.q_sample(x0, t, noise), t, cond)
        return torch.mean((out.float() - self.target(x0, noise, t).float()) ** 2)
