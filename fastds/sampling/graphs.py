"""CUDA-graph sampling: the same loop as :func:`~fastds.sampling.samplers.run_plan`, with its
state in static buffers so one captured step (network + fused update) replays for every step.

What changes against the eager loop, and why:
- the per-step coefficients and timesteps live in device tensors indexed by a device-side
  step counter that the graph itself increments (scalars would be frozen at capture);
- noise is drawn inside the Triton kernel from a per-step seed table (``tl.randn``), not by
  ``torch.randn`` on the host, so trajectories are deterministic per seed but differ from the
  eager path's draws (deterministic samplers such as DDIM η=0 and DPM-Solver++ agree).

:class:`StaticSampler` runs eagerly when no graph can be captured (CPU, or
``use_graph=False``): that eager twin is what the CPU test suite checks.
"""
from __future__ import annotations

import torch

from .steps import StepPlan, fused_step

__all__ = ["StaticSampler"]


class StaticSampler:
    """Sampler over fixed shapes: x (B, C, h, w), cond (B, Cc, h, w).

    ``sampler(x_T, cond, seeds)`` -> x_0 (a new tensor). ``seeds`` (n_steps,) int64.
    """

    def __init__(self, model, plan: StepPlan, x_like, cond_like, *, clip=None, backend="triton",
                 use_graph=None):
        dev, dt = x_like.device, x_like.dtype
        self.model, self.plan, self.clip, self.backend = model, plan, clip, backend
        self.coef = torch.tensor(plan.coef, dtype=dt, device=dev)
        self.ts = torch.tensor(plan.timesteps, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.seeds = torch.zeros(len(plan), dtype=torch.long, device=dev)
        self.x = torch.zeros_like(x_like)
        self.x0 = torch.zeros_like(x_like)
        self.x0_prev = torch.zeros_like(x_like)
        self.cond = None if cond_like is None else torch.zeros_like(cond_like)
        self.noisy = bool(plan.noisy.any())
        if use_graph is None:
            use_graph = dev.type == "cuda" and torch.cuda.is_available()
        self.graph = self._capture() if use_graph else None

    @torch.no_grad()
    def _body(self):
        t = self.ts.index_select(0, self.step).expand(self.x.shape[0])
        m = self.model(self.x, t, self.cond)
        new = fused_step(m.to(self.x.dtype), self.x, self.coef, step=self.step,
                         seeds=self.seeds if self.noisy else None, x0_prev=self.x0_prev,
                         x0_out=self.x0, clip=self.clip, backend=self.backend)
        self.x0_prev.copy_(self.x0)
        self.x.copy_(new)
        self.step.add_(1)

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton JIT and allocator, off the capture
            for _ in range(min(2, len(self.plan))):  # a 1-step plan has no step 1 to index
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body()
        return graph

    @torch.no_grad()
    def __call__(self, x_T, cond, seeds):
        self.x.copy_(x_T)
        if self.cond is not None:
            self.cond.copy_(cond)
        self.seeds.copy_(seeds)
        self.step.zero_()
        self.x0_prev.zero_()
        for _ in range(len(self.plan)):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()
        return self.x.clone()
