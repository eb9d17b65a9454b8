"""CUDA-graph sampling: the same loop as :func:`~fastds.sampling.samplers.run_plan`, with its
state in static buffers so one captured step (network + fused update) replays for every step.

What changes against the eager loop, and why:
- the per-step coefficients and timesteps live in device tensors indexed by a device-side
  step counter that the graph itself increments (scalars would be frozen at capture);
- noise is drawn inside the step from one 64-bit seed per trajectory and a counter of (step,
  element) (Triton's ``randn4x`` stream), not by ``torch.randn`` on the host, so trajectories
  are deterministic per seed but differ from ``run_plan``'s draws (deterministic samplers such
  as DDIM η=0 and DPM-Solver++ agree). The CPU step draws the same stream
  (:func:`~fastds.sampling.steps.step_noise_ref`), so the eager twin on the CPU follows the
  graphed GPU trajectory of the same seed.

:class:`StaticSampler` runs eagerly when no graph can be captured (CPU, or
``use_graph=False``): that eager twin is what the CPU test suite checks.

Two hazards the capture avoids:
- autocast's weight cache: under ``torch.autocast`` with parameters that require grad, the
  bf16 copies of the weights are cached for the autocast block and freed when it ends; a
  graph that recorded them would read freed memory from the next day on. The body runs
  under the autocast state the sampler was built with, with ``cache_enabled=False``, so the
  casts are recorded in the graph and write into its own pool; a call under another autocast
  state refuses.
- keeping models alive: a sampler holds its network weakly, and :class:`GraphCache` drops
  every entry of a model as soon as the model is collected (``weakref.finalize``), releasing
  its graphs and static buffers.
"""
from __future__ import annotations

import weakref

import torch

from .steps import StepPlan, fused_step

__all__ = ["StaticSampler", "GraphCache"]


class GraphCache:
    """A bounded, least-recently-used cache of captured samplers.

    Each :class:`StaticSampler` holds static buffers (the conditioning alone can be hundreds of
    MB at batch 1024) and a graph memory pool, so an unbounded module-level cache grows with
    every ``sample()`` call. Keys are ``(id(model), shape key)``; the cache holds models
    weakly (the samplers too), and when a model is collected its entries go at once. At
    most ``max_entries`` are kept.
    """

    def __init__(self, max_entries=4):
        import collections
        self.max_entries = int(max_entries)
        self._items = collections.OrderedDict()
        self._watched = {}  # id(model) -> weakref.finalize

    def __len__(self):
        self._prune()
        return len(self._items)

    def _prune(self):
        for k in [k for k, (ref, _) in self._items.items() if ref() is None]:
            del self._items[k]

    def _drop_model(self, model_id):
        self._watched.pop(model_id, None)
        for k in [k for k in self._items if k[0] == model_id]:
            del self._items[k]

    def get(self, model, key, factory):
        """The cached value for (model, key), else ``factory()`` stored as the newest entry.
        The value must not hold ``model`` strongly (a :class:`StaticSampler` does not), or the
        model could never be collected."""
        self._prune()
        full = (id(model), key)
        if full in self._items:
            self._items.move_to_end(full)
            return self._items[full][1]
        value = factory()
        self._items[full] = (weakref.ref(model), value)
        if id(model) not in self._watched:
            fin = weakref.finalize(model, self._drop_model, id(model))
            fin.atexit = False
            self._watched[id(model)] = fin
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        return value

    def has(self, model) -> bool:
        self._prune()
        return any(k[0] == id(model) for k in self._items)

    def clear(self):
        self._items.clear()


def _autocast_state(device_type):
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


class StaticSampler:
    """Sampler over fixed shapes: x (B, C, h, w), cond (B, Cc, h, w).

    ``sampler(x_T, cond, seed)`` -> x_0 (a new tensor); ``seed`` is one int64 (a (1,) tensor)
    per trajectory. Calling it with other shapes than it was built for raises (the static
    buffers would otherwise broadcast silently), and so does calling it under another
    autocast state than it was built under.

    ``model`` is held weakly: the caller (or the cache's owner) keeps it alive. ``wrap``, if
    given, turns the network into what each step calls, ``wrap(model)(x, t, cond)``; it is
    applied per eager step (cheap) and must hold no reference to the model itself, e.g.
    step fusion's ``lambda net: PatchFusedModel(net, plan, None)`` over the image.
    """

    def __init__(self, model, plan: StepPlan, x_like, cond_like, *, clip=None, backend="triton",
                 use_graph=None, wrap=None):
        if bool(plan.noisy.any()) and backend not in ("triton", "cpu", "torch", "ref"):
            raise ValueError(f"StaticSampler: the {plan.name} plan draws noise from the trajectory's "
                             f"seed inside the step, which backend {backend!r} cannot")
        dev, dt = x_like.device, x_like.dtype
        self._model = weakref.ref(model)
        self.wrap, self.plan, self.clip, self.backend = wrap, plan, clip, backend
        self.autocast = _autocast_state(dev.type)
        self.coef = torch.tensor(plan.coef, dtype=torch.float64 if dt == torch.float64 else torch.float32,
                                 device=dev)
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

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("StaticSampler: its model has been garbage-collected")
        return model

    @torch.no_grad()
    def _body(self):
        t = self.ts.index_select(0, self.step).expand(self.x.shape[0])
        net = self.model if self.wrap is None else self.wrap(self.model)
        on, dtype = self.autocast
        with torch.autocast(self.x.device.type, dtype=dtype, enabled=on, cache_enabled=False):
            m = net(self.x, t, self.cond)
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
        if _autocast_state(self.x.device.type) != self.autocast:
            raise ValueError(f"StaticSampler: built under autocast {self.autocast}, called under "
                             f"{_autocast_state(self.x.device.type)}; build one per precision")
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
