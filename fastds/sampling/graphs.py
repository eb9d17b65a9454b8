"""CUDA-graph sampling: the same loop as :func:`~fastds.sampling.samplers.run_plan`, with its
state in static buffers so one captured step (network + fused update) replays for every step.

What changes against the eager loop, and why:
- the per-step coefficients and timesteps live in device tensors indexed by a device-side
  step counter that the graph itself increments (scalars would be frozen at capture);
- noise is drawn inside the Triton kernel from one 64-bit seed per trajectory and a 64-bit
  counter (``tl.randn``), not by ``torch.randn`` on the host, so trajectories are
  deterministic per seed but differ from the eager path's draws (deterministic samplers such
  as DDIM η=0 and DPM-Solver++ agree). Only the Triton step can draw noise that way, so a
  noisy plan refuses any other backend.

:class:`StaticSampler` runs eagerly when no graph can be captured (CPU, or
``use_graph=False``): that eager twin is what the CPU test suite checks.
"""
from __future__ import annotations

import torch

from .steps import StepPlan, fused_step

__all__ = ["StaticSampler", "GraphCache"]


class GraphCache:
    """A bounded, least-recently-used cache of captured samplers.

    Each :class:`StaticSampler` holds its model, static buffers (the conditioning alone can be
    hundreds of MB at batch 1024) and a graph memory pool, so an unbounded module-level cache
    grows with every ``sample()`` call. Keys are ``(id(model), shape key)``; entries whose
    model has been garbage-collected are dropped, and at most ``max_entries`` are kept.
    """

    def __init__(self, max_entries=4):
        import collections
        self.max_entries = int(max_entries)
        self._items = collections.OrderedDict()

    def __len__(self):
        self._prune()
        return len(self._items)

    def _prune(self):
        for k in [k for k, (ref, _) in self._items.items() if ref() is None]:
            del self._items[k]

    def get(self, model, key, factory):
        """The cached value for (model, key), else ``factory()`` stored as the newest entry."""
        import weakref
        self._prune()
        full = (id(model), key)
        if full in self._items:
            self._items.move_to_end(full)
            return self._items[full][1]
        value = factory()
        self._items[full] = (weakref.ref(model), value)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        return value

    def has(self, model) -> bool:
        self._prune()
        return any(k[0] == id(model) for k in self._items)

    def clear(self):
        self._items.clear()


class StaticSampler:
    """Sampler over fixed shapes: x (B, C, h, w), cond (B, Cc, h, w).

    ``sampler(x_T, cond, seed)`` -> x_0 (a new tensor); ``seed`` is one int64 (a (1,) tensor)
    per trajectory. Calling it with other shapes than it was built for raises (the static
    buffers would otherwise broadcast silently).
    """

    def __init__(self, model, plan: StepPlan, x_like, cond_like, *, clip=None, backend="triton",
                 use_graph=None):
        if bool(plan.noisy.any()) and backend != "triton":
            raise ValueError(f"StaticSampler: the {plan.name} plan draws noise, which only the "
                             f"Triton step can do inside a graph; backend {backend!r} cannot")
        dev, dt = x_like.device, x_like.dtype
        self.model, self.plan, self.clip, self.backend = model, plan, clip, backend
        self.coef = torch.tensor(plan.coef, dtype=dt, device=dev)
        self.ts = torch.tensor(plan.timesteps, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.seed = torch.zeros(1, dtype=torch.long, device=dev)
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
                         seed=self.seed if self.noisy else None, x0_prev=self.x0_prev,
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
    def __call__(self, x_T, cond, seed):
        if tuple(x_T.shape) != tuple(self.x.shape) or (
                self.cond is not None and tuple(cond.shape) != tuple(self.cond.shape)):
            raise ValueError(
                f"StaticSampler: built for x {tuple(self.x.shape)} and cond "
                f"{None if self.cond is None else tuple(self.cond.shape)}, called with "
                f"{tuple(x_T.shape)} and {None if cond is None else tuple(cond.shape)}; "
                "build one per shape")
        self.x.copy_(x_T)
        if self.cond is not None:
            self.cond.copy_(cond)
        self.seed.copy_(torch.as_tensor(seed, dtype=torch.long).reshape(1))
        self.step.zero_()
        self.x0_prev.zero_()
        for _ in range(len(self.plan)):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()
        return self.x.clone()
