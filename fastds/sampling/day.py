"""One day of one network in model space: :func:`downscale_day`.

Per day: plan patches once, compute the conditioning (next-day coarse, covariates, frozen
transfer features of the lag window) once per patch, generate the patches (a U-Net's
prediction, a VAE's draw, or a diffusion sampler run on batches of patches, the conditioning
reused by every step and every member that shares the lag window), stitch with
Halo-and-Hann weights. The strategies around a network are composed here, not branched in
it: precision (bf16 autocast of the network calls), ``torch.compile`` (on a copy:
:func:`sampling_twin`), fusion (``final``: stitch finished
patches; ``step``: blend the patch outputs at every step into one image-space trajectory),
CUDA graphs (the same loop captured), and CorrDiff (a regression mean plus a widened,
scaled residual sample: :mod:`fastds.sampling.spread`).
"""
from __future__ import annotations

import copy
import dataclasses
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .. import _backend
from .._backend import PRECISIONS
from .._warn import warn_caller
from ..config import SampleConfig
from ..models.conditional import FixedBatch
from ..stitch import StitchPlan, plan_patches, stitch
from .graphs import GraphCache, StaticSampler
from .fusion import PatchFusedModel
from .samplers import make_plan, run_plan
from .spread import sampler_record, state_gain, widen

__all__ = ["DayInputs", "downscale_day", "check_geometry", "member_draws", "inflate_residuals",
           "spread_widening", "state_widening", "texture_widening", "PRECISIONS", "sampling_twin"]

# captured StaticSamplers per model and batch shape (CUDA only), bounded and evicted LRU
_GRAPHS = GraphCache(max_entries=4)
# model -> (its weights' identity, its compiled twin); a twin dies with its model
_TWINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def sampling_twin(model: torch.nn.Module, *, compile: bool) -> torch.nn.Module:
    """The copy of ``model`` that :func:`downscale_day` samples with when ``compile``
    (``sample.compile``): its networks through ``torch.compile``, so the caller's model is
    never modified. Cached while the model lives and its weights are unchanged (same storage
    and version counter: an optimizer step or a ``load_state_dict`` makes a new twin, which
    compiles anew); the model itself when not ``compile``."""
    if not compile:
        return model
    if not hasattr(model, "compile_for_sampling"):
        raise TypeError(f"sample.compile: a {type(model).__name__} has no compile_for_sampling(); "
                        "compile is for fastds's trained models (ConditionalModel, JointModel)")
    key = _weights_key(model)
    hit = _TWINS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    twin = copy.deepcopy(model).compile_for_sampling()
    _TWINS[model] = (key, twin)
    return twin


# network pixel-evaluations after which torch.compile pays for itself on 2 CPU cores: its
# ~40-60 s for two tiny-preset networks over the ~0.25 us it saves a pixel-evaluation (bf16,
# an Area-1 member 3.04 -> 2.23 s a day, the 4-member student 3.85 -> 3.08 s; round 19)
COMPILE_PAYBACK = 2e8


def compile_pays(compile, *, shape, cfg: SampleConfig, days: int, members: int, evals: int) -> bool:
    """``sample.compile`` resolved for a job: ``True``/``False`` as set; ``"auto"``: True when
    the job's network pixel-evaluations, estimated as ``days × members × residual patches ×
    evals × tile²`` on the fine grid ``shape`` (H, W) (``evals``: network calls a patch gets,
    the sampler's steps for a DDPM, 1 for a U-Net), reach :data:`COMPILE_PAYBACK`. The demo's
    64×80 twin needs about 200 days of 16 members; an 8-member Area-1 (357×432) ensemble 9."""
    if isinstance(compile, bool):
        return compile
    if compile != "auto":
        raise ValueError(f"sample.compile must be true, false or \"auto\", got {compile!r}")
    fitted = fit_to_domain(cfg, tuple(shape))
    patches = len(plan_patches(tuple(shape), fitted.tile, fitted.halo, fitted.stride))
    return float(days) * members * patches * max(int(evals), 1) * fitted.tile ** 2 >= COMPILE_PAYBACK


def resolve_compile(compile, *, device, **job) -> bool:
    """``sample.compile`` for a job (``job``: :func:`compile_pays`'s keywords): true / false
    as set; ``"auto"``: compiled where the job pays it back and ``torch.compile`` runs on
    ``device`` (:func:`fastds._backend.compile_unavailable`; otherwise a warning says why and
    the job samples eager, as it would have before "auto")."""
    if not compile_pays(compile, **job):
        return False
    why = None if compile is True else _backend.compile_unavailable(torch.device(device).type)
    if why:
        warn_caller(f"sample: sample.compile='auto' would compile this job, but {why}; sampling eager "
                    "(--set sample.compile=false silences this)")
    return why is None


def _weights_key(model: torch.nn.Module) -> tuple:
    """What a cached twin is valid for: each parameter's storage and version counter."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


@dataclass
class DayInputs:
    """Normalised inputs of one day on the fine grid: coarse (1, H, W), covariates (C, H, W),
    lags (members or 1, t_lag, H, W). A joint model of K species
    (:class:`~fastds.models.joint.JointModel`): coarse (K, H, W) and lags (members or 1,
    K·t_lag, H, W), species k's window at ``k·t_lag``."""
    coarse: np.ndarray
    covariates: np.ndarray
    lags: np.ndarray


@dataclass
class _Patches:
    """A day's patch geometry and its per-patch base conditioning (coarse + covariates)."""
    starts: np.ndarray
    tile: int
    halo: int
    shape: tuple
    base: torch.Tensor      # (N, K + C, tile, tile): K coarse channels (1, or one per species)
    k: int = 1

    @property
    def coarse(self):
        return self.base[:, :self.k]

    @property
    def covariates(self):
        return self.base[:, self.k:]

    @classmethod
    def of(cls, inputs: DayInputs, cfg: SampleConfig, device):
        H, W = inputs.coarse.shape[-2:]
        cfg = fit_to_domain(cfg, (H, W))
        starts = plan_patches((H, W), cfg.tile, cfg.halo, cfg.stride)
        base = np.concatenate([inputs.coarse, inputs.covariates], 0)
        return cls(starts, cfg.tile, cfg.halo, (H, W),
                   torch.from_numpy(_patchify(base, starts, cfg.tile)).to(device), len(inputs.coarse))

    def lags(self, lags, sl=slice(None), device="cpu"):
        """A lag stack (t_lag, H, W) cut into the patches ``sl``: (n, t_lag, tile, tile)."""
        return torch.from_numpy(_patchify(lags, self.starts[sl], self.tile)).to(device)

    def stitch(self, patches):
        """(N, tile, tile) -> the (H, W) image, numpy (stitched where the patches are);
        (N, K, tile, tile) -> (K, H, W)."""
        return stitch(patches.float(), self.starts, self.shape, halo=self.halo).cpu().numpy()

    def channels(self, out):
        """A network's patch output (N, K, tile, tile) as :meth:`stitch` takes it: the one
        channel dropped for a single field."""
        return out[:, 0] if self.k == 1 else out


def _drop(cfg, n, device):
    """The conditioning-dropout flag of n patches: all set for the coarse-only fallback."""
    return None if cfg.lag_conditioning else torch.ones(n, dtype=torch.bool, device=device)


def _patchify(a, starts, tile):
    """(C, H, W) -> (N, C, tile, tile) views gathered for the starts (N, 2)."""
    return np.stack([a[:, y:y + tile, x:x + tile] for y, x in starts])


def _batches(n, batch):
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def check_geometry(cfg: SampleConfig):
    """Refuse patch settings that leave no kept region or leave gaps between kept regions,
    naming the setting: 0 <= 2·halo < tile, 1 <= stride <= tile - 2·halo, the same for the
    regression mean's ``mean_halo`` (-1: ``halo``) and ``mean_stride`` (0: ``stride``), and
    at least one sampler step and one patch per network call. Only a domain smaller than
    ``tile`` shrinks the geometry (the tile to the domain, then the halo and strides to fit
    it); a setting the user asked for is never changed silently."""
    for key in ("tile", "steps", "batch"):
        if int(getattr(cfg, key)) < 1:
            raise ValueError(f"sample.{key} must be >= 1, got {getattr(cfg, key)}")
    mean_stride, mean_halo = _mean_geometry(cfg)
    for pre, halo, stride in (("", cfg.halo, cfg.stride), ("mean_", mean_halo, mean_stride)):
        if not 0 <= 2 * halo < cfg.tile:
            raise ValueError(f"sample.{pre}halo={halo} leaves no kept region in sample.tile={cfg.tile} "
                             f"patches: it must be >= 0 and < tile/2" + (" (or -1: sample.halo)" if pre else ""))
        if not 1 <= stride <= cfg.tile - 2 * halo:
            raise ValueError(f"sample.{pre}stride={stride} must be between 1 and tile - 2*{pre}halo = "
                             f"{cfg.tile - 2 * halo}: a larger one leaves gaps between the kept regions"
                             + (" (0: sample.stride)" if pre else ""))


@torch.no_grad()
def downscale_day(model, inputs: DayInputs, *, kind="ddpm", cfg: SampleConfig = SampleConfig(),
                  T=1000, prediction="sample", members=1, seed=0, day_key=0,
                  cache_conditioning=True, device="cpu", backend="auto", progress=None, member0=0,
                  parts=False):
    """One day, all members: the model-space field (members, H, W) (min-max or standardised
    residual, as the model was trained).

    ``cfg.fusion`` "step" samples one image-space trajectory per member, blending the patch
    outputs at every step (on a GPU, one CUDA graph per geometry holds the whole step);
    "final" samples patches on their own and stitches the finished samples. A DDPM with a
    regression mean (CorrDiff) returns ``mean + widen(scale · sample)``. Latents are drawn
    per member from ``torch.Generator`` seeded by (seed, member, day_key), so a day's result
    does not depend on which other days were sampled before it; ``member0`` numbers the
    members from there (a worker sampling members k.. of an ensemble draws what the whole
    ensemble would). ``cache_conditioning=False`` recomputes the transfer features at every
    sampler step (the reference code's recipe, kept for benchmarks). ``parts=True`` (a
    CorrDiff DDPM): ``(means, residuals)``, each (members, H, W), whose sum is the field
    returned otherwise: the spread calibration needs both, and the mean is then computed once.
    A joint model of K species (``model.channels`` > 1, inputs as :class:`DayInputs` says)
    gives (members, K, H, W), each species widened and scaled by its own calibration.
    """
    check_geometry(cfg)
    precision = _backend.resolve_precision(cfg.precision, device)
    # "auto" for one day: what a job of one day would do (a job resolves it for its length)
    cfg = dataclasses.replace(cfg, compile=resolve_compile(
        cfg.compile, device=device, shape=inputs.coarse.shape[-2:], cfg=cfg, days=1, members=members,
        evals=cfg.steps if kind == "ddpm" else 1))
    run = dict(kind=kind, cfg=cfg, T=T, prediction=prediction, members=members, seed=seed,
               day_key=day_key, cache_conditioning=cache_conditioning, device=device,
               backend=backend, progress=progress, member0=member0)
    model = sampling_twin(model, compile=cfg.compile)
    if cfg.compile:  # its networks' calls padded to this day's batch size: one compiled shape
        for net in model.modules():
            if isinstance(net, FixedBatch):
                net.fix(cfg.batch)
    # bf16 autocast covers the network calls only: run_plan and the fusion cast each output
    # back to the fp32 state, so updates, noise and stitching are unchanged
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                        enabled=precision == "bf16"):
        if kind == "ddpm" and getattr(model, "regression", None) is not None:
            means, res = _corrdiff(model, inputs, **run)
            return (means, res) if parts else means + res
        if parts:
            raise ValueError("downscale_day: parts=True needs a DDPM with a regression mean (CorrDiff)")
        if cfg.spread_scale != 1.0:
            raise ValueError(f"sample.spread_scale={cfg.spread_scale} scales an ensemble's spread around "
                             "its regression mean, which this model has none of (a CorrDiff DDPM, its "
                             "distilled student and the null ensembles have one)")
        return _generate(model, inputs, **run)


def _corrdiff(model, inputs, *, cfg, members, member0, device, **run):
    """CorrDiff: the sample is the scaled, widened residual of a regression mean; stitching
    is linear, so mean and residual are stitched apart (and added by the caller): (means,
    scaled residuals), each (members, H, W). The residual pass runs the same model (so
    captured graphs stay keyed to it), without the mean.

    Where every one of the mean's patches is also a residual patch (the same geometry, or
    ``mean_halo`` 0 at twice the stride: every other patch, kept whole) and the regression
    shares the model's conditioning (:meth:`~fastds.models.conditional.ConditionalModel.shares_conditioning`:
    the same frozen transfer weights), the step-fused sampler hands each member's
    conditioning to the mean as it computes it: a lag window's transfer features are
    computed once, not once for each network."""
    patches = _Patches.of(inputs, cfg, device)
    mpatches = _mean_patches(inputs, patches, cfg, device)
    shared_lags = inputs.lags.shape[0] == 1
    rows = _rows_within(mpatches.starts, patches.starts)
    means, on_cond = None, None
    if rows is not None and cfg.fusion == "step" and run["cache_conditioning"] and model.shares_conditioning():
        means = np.empty((members,) + _field_shape(patches), np.float32)
        rows = torch.from_numpy(rows).to(device)

        def on_cond(k, cond):
            parts = [model.regression_mean_of(cond[rows[sl]]) for sl in _batches(len(rows), cfg.batch)]
            means[k:] = mpatches.stitch(mpatches.channels(torch.cat(parts)))  # members after k share it until their own
    res = _generate(model, inputs, cfg=cfg, members=members, member0=member0, device=device,
                    patches=patches, on_cond=on_cond, **run)
    res = _widened(model, res, cfg, member0, patches.k, inputs.coarse)
    if means is None:
        means = np.empty_like(res)
        means[:] = _stitched_means(model, inputs, mpatches, cfg, 1 if shared_lags else members, device)
    return means, res


def fit_to_domain(cfg: SampleConfig, shape) -> SampleConfig:
    """``cfg`` with its patch geometry shrunk to a domain ``shape`` (H, W) smaller than its
    tile: the tile to the domain's short side, then each halo to below half of it and each
    stride to what leaves no gaps (``mean_stride`` 0 and ``mean_halo`` -1 keep meaning the
    residual's). ``cfg`` itself on a domain at least a tile wide. What a day samples with,
    and what ``sample`` records in its output's attributes."""
    tile = min(cfg.tile, *shape)
    if tile == cfg.tile:
        return cfg
    halo = min(cfg.halo, (tile - 1) // 2)
    fitted = dataclasses.replace(cfg, tile=tile, halo=halo, stride=min(cfg.stride, tile - 2 * halo),
                                 mean_halo=cfg.mean_halo if cfg.mean_halo == -1 else min(cfg.mean_halo, (tile - 1) // 2))
    if not cfg.mean_stride:  # 0: the (fitted) residual stride
        return fitted
    return dataclasses.replace(fitted, mean_stride=min(cfg.mean_stride, tile - 2 * _mean_geometry(fitted)[1]))


def _mean_geometry(cfg) -> tuple:
    """The regression mean's (stride, halo): ``mean_stride`` (0: ``stride``) and
    ``mean_halo`` (-1: ``halo``; other negatives are refused by :func:`check_geometry`)."""
    return cfg.mean_stride or cfg.stride, cfg.halo if cfg.mean_halo == -1 else cfg.mean_halo


def _mean_patches(inputs, patches: _Patches, cfg, device) -> _Patches:
    """The regression mean's geometry: ``mean_stride`` and ``mean_halo`` (0 / -1: the
    residual's stride / halo); the deterministic mean needs no overlap for texture, so a
    sparser geometry is cheaper."""
    stride, halo = _mean_geometry(cfg)
    if (stride, halo) == (cfg.stride, cfg.halo):
        return patches
    # on a domain smaller than the tile the stride is cut to what fits, as the residual's is
    return _Patches.of(inputs, dataclasses.replace(cfg, stride=stride, halo=halo), device)


def _rows_within(starts, within):
    """The row of ``within`` (N, 2) holding each of ``starts`` (n, 2): (n,) int64, or None
    when some start is not there."""
    index = {(int(y), int(x)): i for i, (y, x) in enumerate(within)}
    rows = [index.get((int(y), int(x))) for y, x in starts]
    return None if None in rows else np.asarray(rows, np.int64)


def _widened(model, res, cfg, member0, k, coarse):
    """The residual sample scaled and widened as ``cfg`` says: (members, H, W), or per
    species channel for a joint model ((members, K, H, W), each its own α, gains and scale).
    ``coarse``: the day's coarse field(s) on the fine grid (K, H, W), for the state gain."""
    alpha, gains = spread_widening(model, cfg)
    texture = texture_widening(model, cfg, k)
    state = state_widening(model, cfg, coarse)
    scale = model.regression_scale.detach().cpu().double().numpy().reshape(-1)
    if k == 1:
        return float(scale[0]) * widen(res, alpha, gains=gains, texture=float(texture[0]), state=state[0],
                                       member0=member0, antithetic=cfg.antithetic)
    out = np.empty_like(res)
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), (k,))  # 1.0 when not calibrated
    for j in range(k):
        out[:, j] = scale[j] * widen(res[:, j], float(alpha[j]), gains=None if gains is None else gains[j],
                                     texture=float(texture[j]), state=state[j], member0=member0,
                                     antithetic=cfg.antithetic)
    return out


def _field_shape(patches: _Patches) -> tuple:
    """One member's field: (H, W), or (K, H, W) for K species."""
    return tuple(patches.shape) if patches.k == 1 else (patches.k,) + tuple(patches.shape)


def _stitched_means(model, inputs, patches: _Patches, cfg, members, device):
    """The regression mean of the first ``members`` lag sets, stitched like the samples:
    (members, H, W) numpy (a joint model's: (members, K, H, W)). The members' patches go
    through the network together, ``cfg.batch`` at a time, so a day has one partial batch,
    not one per member."""
    n = len(patches.starts)
    parts = []
    for sl in _batches(members * n, cfg.batch):
        pieces = [(k, slice(max(sl.start, k * n) - k * n, min(sl.stop, (k + 1) * n) - k * n))
                  for k in range(sl.start // n, (sl.stop - 1) // n + 1)]
        rows = torch.cat([torch.arange(p.start, p.stop) for _, p in pieces]).to(device)
        lag_p = torch.cat([patches.lags(inputs.lags[k], p, device) for k, p in pieces])
        parts.append(model.regression_mean(patches.coarse[rows], patches.covariates[rows], lag_p,
                                           _drop(cfg, len(lag_p), device)))
    out = patches.channels(torch.cat(parts))
    return np.stack([patches.stitch(out[k * n:(k + 1) * n]) for k in range(members)])


LATENT_STREAM_STRIDE = 7919  # seed offset between the latent streams of ``sample.latent_mix``


def _generate(model, inputs, *, kind, cfg, T, prediction, members, seed, day_key,
              cache_conditioning, device, backend, progress, member0, patches=None, on_cond=None):
    """The network's own field (no regression mean): (members, H, W). ``patches``: the day's
    geometry if the caller has built it already. ``on_cond(k, cond)``: called by the
    step-fused sampler with each conditioning tensor (N, C, tile, tile) it computes, from
    member k on (see :func:`_corrdiff`)."""
    patches = patches if patches is not None else _Patches.of(inputs, cfg, device)
    gens, signs = member_draws(seed, day_key, member0, members, antithetic=cfg.antithetic,
                               device=device)
    latents = _Latents(cfg.latent_mix, seed, day_key, member0, members, cfg.antithetic, device,
                       cfg.channel_mix)
    plans = None
    if kind == "ddpm":
        plan = make_plan(cfg.sampler, T=T, steps=cfg.steps, prediction=prediction, eta=cfg.eta,
                         spacing=cfg.spacing)
        plans = [plan if s > 0 else plan.mirrored() for s in signs]
    # CUDA graphs (one per batch shape) when on a GPU with Triton; the eager loop otherwise
    graphs = (_GRAPHS if kind == "ddpm" and cfg.cuda_graphs and torch.device(device).type == "cuda"
              and _backend.why_unavailable("triton") is None else None)
    if kind == "ddpm" and cfg.fusion == "step":
        return _fused(model, inputs, patches, plans, gens, signs, cfg=cfg,
                      cache_conditioning=cache_conditioning, device=device, backend=backend,
                      progress=progress, graphs=graphs, latents=latents, on_cond=on_cond)
    per_kind = _PATCH_KINDS[kind](model, cfg, plans, signs, graphs, backend, cache_conditioning, device)
    return _patchwise(per_kind, inputs, patches, gens, progress, latents)


class _Latents:
    """x_T of each member: ``signs[k] * randn`` from the member's generator, or with
    ``sample.latent_mix`` w the sum over j of w_j · randn from the member's generator of
    stream j (seed + LATENT_STREAM_STRIDE·j; stream 0 is the member's own generator, which
    then goes on to draw the trajectory's noise); with ``sample.channel_mix`` M (a joint
    model's K channels) channel k is Σ_j M[k, j] times channel j's draw."""

    def __init__(self, mix, seed, day_key, member0, members, antithetic, device, channel_mix=()):
        self.mix = tuple(float(w) for w in mix)
        self.channels = (torch.tensor(channel_mix, dtype=torch.float32, device=device)
                         if len(channel_mix) else None)
        self.streams = [member_draws(seed + LATENT_STREAM_STRIDE * j, day_key, member0, members,
                                     antithetic=antithetic, device=device)[0]
                        for j in range(1, len(self.mix))]
        self.device = device

    def draw(self, k, shape, gen, sign):
        x = torch.randn(shape, generator=gen, device=self.device)
        if self.mix:
            x = self.mix[0] * x
            for w, stream in zip(self.mix[1:], self.streams):
                x = x + w * torch.randn(shape, generator=stream[k], device=self.device)
        if self.channels is not None:  # a joint model's channels correlated: x[:, k] = Σ_j M[k, j] x[:, j]
            K = shape[1]
            if self.channels.numel() != K * K:
                raise ValueError(f"sample.channel_mix: needs {K} x {K} weights for {K} channels, "
                                 f"got {self.channels.numel()}")
            # in fp32 whatever autocast the network calls run under: x_T is the sampler's state
            with torch.autocast(device_type=torch.device(self.device).type, enabled=False):
                x = torch.einsum("kj,bjhw->bkhw", self.channels.view(K, K), x)
        return sign * x


def _patchwise(per_kind, inputs, patches: _Patches, gens, progress, latents: _Latents):
    """``fusion="final"`` (and the U-Net/VAE): each patch generated on its own by the kind's
    ``one``, batch by batch, members inside a batch; then stitched per member."""
    n, members, device = len(patches.starts), len(gens), per_kind.device
    shared_lags = inputs.lags.shape[0] == 1
    t = patches.tile
    x_T = [latents.draw(k, (n, patches.k, t, t), g, s) for k, (g, s) in enumerate(zip(gens, per_kind.signs))]
    pieces = [[] for _ in range(members)]
    for sl in _batches(n, per_kind.cfg.batch):
        coarse, cov = patches.coarse[sl], patches.covariates[sl]
        lags = cond = None
        for k, gen in enumerate(gens):
            if lags is None or not shared_lags:
                lags = patches.lags(inputs.lags[0 if shared_lags else k], sl, device)
                # the conditioning, transfer features included, once per patch: every
                # sampler step and every member that shares the lag window reuse it
                cond = (per_kind.model.cond(coarse, cov, lags, _drop(per_kind.cfg, len(lags), device))
                        if per_kind.cache else None)
            pieces[k].append(per_kind.one(k, gen, x_T[k][sl], cond, coarse, cov, lags))
        if progress is not None:
            progress.update(members * (sl.stop - sl.start))
    return np.stack([patches.stitch(patches.channels(torch.cat(p))) for p in pieces])


class _UNetPatches:
    """A deterministic network's patches: its prediction from the conditioning."""

    def __init__(self, model, cfg, plans, signs, graphs, backend, cache_conditioning, device):
        self.model, self.cfg, self.plans, self.signs = model, cfg, plans, signs
        self.graphs, self.backend, self.device = graphs, backend, device
        self.cache = True   # its conditioning is always computed once per patch

    def one(self, k, gen, x_T, cond, coarse, cov, lags):
        """One batch of member k's patches: (n, 1, tile, tile)."""
        return self.model(None, None, cond)


class _VAEPatches(_UNetPatches):
    """A VAE's patches: one latent draw per member (negated for an antithetic partner)."""

    def one(self, k, gen, x_T, cond, coarse, cov, lags):
        z = self.signs[k] * torch.randn(self.model.net.latent_shape(cond), generator=gen, device=self.device)
        return self.model.net.generate(cond, z)


class _DiffusionPatches(_UNetPatches):
    """A diffusion model's patches: the sampler's plan run from x_T, on a captured graph
    when one is available, else eagerly (with the conditioning cached, or recomputed at
    every step for the reference recipe)."""

    def __init__(self, model, cfg, plans, signs, graphs, backend, cache_conditioning, device):
        super().__init__(model, cfg, plans, signs, graphs, backend, cache_conditioning, device)
        self.cache = cache_conditioning  # False: the reference recipe recomputes it every step

    def one(self, k, gen, x_T, cond, coarse, cov, lags):
        model, cfg = self.model, self.cfg
        if self.cache and self.graphs is not None:
            key = (tuple(x_T.shape), tuple(cond.shape), cfg.sampler, cfg.steps, cfg.eta, cfg.clip,
                   cfg.precision, self.signs[k])
            static = self.graphs.get(model, key, lambda: StaticSampler(model, self.plans[k], x_T, cond,
                                                                       clip=cfg.clip or None))
            # one 64-bit seed per trajectory; the kernel counts steps and elements itself
            seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.long, generator=gen,
                                 device=self.device)
            return static(x_T, cond, seed)
        if self.cache:
            return run_plan(model, x_T, self.plans[k], cond=cond, generator=gen,
                            clip=cfg.clip or None, backend=self.backend)

        def recompute(x, t, _c):
            return model(x, t, model.cond(coarse, cov, lags, _drop(cfg, len(lags), self.device)))
        return run_plan(recompute, x_T, self.plans[k], cond=None, generator=gen,
                        clip=cfg.clip or None, backend=self.backend)


_PATCH_KINDS = {"unet": _UNetPatches, "vae": _VAEPatches, "ddpm": _DiffusionPatches}


MEMBER_BATCH_BYTES = 256 << 20  # conditioning held at once by members sampled together


def _together(plans, graphs, cache_conditioning) -> bool:
    """Whether members can share one trajectory batch: no graph is captured, the
    conditioning is cached, and the plans draw no noise after x_T, so a mirrored (antithetic)
    plan takes the same updates as the plain one and a member's draws are all in its x_T."""
    p0 = plans[0]
    return (graphs is None and cache_conditioning and not np.any(p0.noisy)
            and all(np.array_equal(p.timesteps, p0.timesteps) and np.array_equal(p.coef[:, :5], p0.coef[:, :5])
                    for p in plans))


def _fused(model, inputs, patches: _Patches, plans, gens, signs, *, cfg, cache_conditioning,
           device, backend, progress, graphs=None, latents: _Latents, on_cond=None):
    """``fusion="step"``: one image-space trajectory per member (see sampling/fusion.py).
    x_T is drawn on the image from the member's generator, so a one-patch geometry gives the
    unfused sampler's result. Where :func:`_together` allows, consecutive members run as one
    batch of images (their patches in the same network calls, up to MEMBER_BATCH_BYTES of
    conditioning): the same numbers, fewer and fuller calls."""
    H, W = patches.shape
    starts = patches.starts
    splan = StitchPlan(starts, patches.shape, tile=patches.tile, halo=patches.halo)
    shared_lags = inputs.lags.shape[0] == 1
    out = np.empty((len(gens),) + _field_shape(patches), np.float32)
    last = {}

    def member_cond(k):
        if "cond" not in last or not shared_lags:
            lags = patches.lags(inputs.lags[0 if shared_lags else k], slice(None), device)

            def cond_of(sl, lags=lags):
                return model.cond(patches.coarse[sl], patches.covariates[sl], lags[sl],
                                  _drop(cfg, len(lags[sl]), device))
            # the conditioning once per patch (every step and member that shares the lags
            # reuse it), or, for the reference recipe, recomputed at every step
            last["cond"] = (torch.cat([cond_of(sl) for sl in _batches(len(starts), cfg.batch)])
                            if cache_conditioning else cond_of)
            if on_cond is not None and cache_conditioning:
                on_cond(k, last["cond"])
        return last["cond"]

    together, k = _together(plans, graphs, cache_conditioning), 0
    while k < len(gens):
        cond = member_cond(k)
        size = max(1, MEMBER_BATCH_BYTES // (cond.numel() * cond.element_size())) if together else 1
        ks = range(k, min(k + size, len(gens)))
        conds = [cond] + [member_cond(j) for j in ks[1:]]
        x_T = torch.cat([latents.draw(j, (1, patches.k, H, W), gens[j], signs[j]) for j in ks])
        if graphs is not None and cache_conditioning:
            # the whole step (every patch batch, the blend, the fused update) in one graph per
            # geometry; the day's conditioning is copied into its static buffer
            key = ("step", np.ascontiguousarray(starts).tobytes(), patches.shape, tuple(cond.shape),
                   cfg.sampler, cfg.steps, cfg.eta, cfg.clip, cfg.precision, signs[k], cfg.batch)
            static = graphs.get(model, key, lambda: StaticSampler(
                model, plans[k], x_T, cond, clip=cfg.clip or None,
                wrap=lambda net: PatchFusedModel(net, splan, None, batch=cfg.batch)))
            seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.long, generator=gens[k],
                                 device=device)
            x0 = static(x_T, cond, seed)
        else:
            fused = PatchFusedModel(model, splan, conds[0] if len(ks) == 1 else torch.cat(conds), batch=cfg.batch)
            x0 = run_plan(fused, x_T, plans[k], generator=gens[k], clip=cfg.clip or None, backend=backend)
        out[k:ks.stop] = (x0[:, 0] if patches.k == 1 else x0).float().cpu().numpy()
        if progress is not None:
            progress.update(len(starts) * len(ks))
        k = ks.stop
    return out


def inflate_residuals(r, alpha, *, member0=0, antithetic=False):
    """Widen an ensemble's residuals (members, ...) by one inflation α: see
    :func:`fastds.sampling.spread.widen` (antithetic pairs keep their pair mean)."""
    return widen(r, alpha, member0=member0, antithetic=antithetic)


CALIBRATE_TO = ("crps", "spread", "bands")


def spread_widening(model, cfg: SampleConfig):
    """(α, band gains or None) a CorrDiff DDPM's residual is widened by when sampling with
    ``cfg``: nothing without ``cfg.calibrate``; the per-band gains saved by the calibration
    when ``cfg.calibrate_bands`` and the model has them; else its one inflation α.

    ``cfg.calibrate_to`` picks the band gains: ``"bands"`` (the default) the gains fitted
    after the projection, in log10, each band to validation spread/skill 1 (no common
    factor; a model calibrated before they existed is an error that says how to refit);
    ``"spread"`` and ``"crps"`` the model-space gains times one common factor, the one at
    which the saved validation spread/skill curve crosses 1 (linear interpolation between
    the scanned factors) or the saved fair-CRPS best. One α (``calibrate_bands`` off, or a
    model without band gains) takes the spread/skill-1 factor under "bands" and "spread".

    ``cfg.spread_scale`` multiplies the result (α, or every gain): a user's factor on the
    calibrated spread, 1 by default; it also scales an uncalibrated residual."""
    if cfg.calibrate_to not in CALIBRATE_TO:
        raise ValueError(f"sample.calibrate_to must be one of {', '.join(CALIBRATE_TO)}, got {cfg.calibrate_to!r}")
    alpha, gains = _calibrated_widening(model, cfg)
    scale = float(cfg.spread_scale)
    return alpha * scale, (None if gains is None else gains * scale)


def _calibrated_widening(model, cfg: SampleConfig):
    """:func:`spread_widening` before ``cfg.spread_scale``."""
    if not cfg.calibrate or not hasattr(model, "regression_inflation"):
        return 1.0, None
    bands = getattr(model, "regression_bands", None)
    bands = bands.detach().cpu().double().numpy() if bands is not None and bands.numel() > 0 else None
    inflation = model.regression_inflation.detach().cpu().double().numpy().reshape(-1)
    cal = getattr(model, "calibration", None)
    _check_fitted_sampler(cal, cfg)
    if getattr(model, "channels", 1) == 1:
        return _widening(cfg, float(inflation[0]), bands, cal)
    # a joint model: one widening per species channel, each from its own calibration
    cals = (cal or {}).get("species") or [None] * len(inflation)
    each = [_widening(cfg, float(inflation[j]), None if bands is None else bands[j], cals[j])
            for j in range(len(inflation))]
    alpha = np.array([a for a, _ in each])
    return alpha, (None if each[0][1] is None else np.stack([g for _, g in each]))


def _fine_calibrations(model, cfg: SampleConfig, k: int, extra: bool) -> list | None:
    """The calibration records of the model's ``k`` field channels (a joint model's: each
    species' own) where ``cfg`` widens by the band gains fitted after the projection
    (``calibrate``, ``calibrate_bands``, ``calibrate_to = "bands"``), with the texture gain
    (``calibrate_texture``) and ``extra`` (a further setting); None otherwise, or for a model
    without a calibration for ``k`` channels."""
    if not (extra and cfg.calibrate and cfg.calibrate_bands and cfg.calibrate_to == "bands"
            and cfg.calibrate_texture):
        return None
    cal = getattr(model, "calibration", None) or {}
    fields = cal.get("species") or [cal]
    return fields if cal and len(fields) == k else None


def texture_widening(model, cfg: SampleConfig, k=1) -> np.ndarray:
    """The grid-scale texture gain of each of the model's ``k`` field channels, (k,): the
    calibration's ``texture_gain`` (a joint model's: each species' own) where ``cfg``
    widens by the band gains fitted after the projection (``calibrate``, ``calibrate_bands``,
    ``calibrate_to = "bands"``) and ``cfg.calibrate_texture``; 1 otherwise. A calibration
    that predates the texture gain gets 1, with a warning naming the refit."""
    fields = _fine_calibrations(model, cfg, k, True)
    if fields is None:
        return np.ones(k)
    if any("texture_gain" not in c for c in fields):
        warn_caller("sample: the model's calibration predates the grid-scale texture gain, so its "
                    "finest scale is left as the band gains make it; refit with "
                    "`fastds train --run RUN --recalibrate`, or --set sample.calibrate_texture=false")
        return np.ones(k)
    return np.array([float(c["texture_gain"]) for c in fields])


def state_widening(model, cfg: SampleConfig, coarse) -> list:
    """The coarse-state spread gain field of each of the model's field channels: a list of
    (H, W) arrays or None, one per channel of ``coarse`` (K, H, W) (the day's normalised coarse
    field(s) on the fine grid, as :class:`DayInputs` holds them). The calibration's
    ``state_nodes`` and ``state_gains`` (:func:`~fastds.sampling.spread.state_gain`) where the
    texture gain applies (:func:`texture_widening`) and ``cfg.calibrate_state``; None
    otherwise. A calibration with a texture gain but no state gains gets None, with a warning
    naming the refit (an older one has had the texture gain's warning)."""
    fields = _fine_calibrations(model, cfg, len(coarse), cfg.calibrate_state)
    if fields is None or any("texture_gain" not in c for c in fields):
        return [None] * len(coarse)
    if any("state_gains" not in c for c in fields):
        warn_caller("sample: the model's calibration predates the coarse-state spread gain, so its "
                    "spread does not follow the coarse field; refit with "
                    "`fastds train --run RUN --recalibrate`, or --set sample.calibrate_state=false")
        return [None] * len(coarse)
    return [state_gain(c_j, c["state_nodes"], c["state_gains"]) for c_j, c in zip(coarse, fields)]


def _check_fitted_sampler(cal, cfg: SampleConfig):
    """Warn when ``cfg`` samples otherwise than the calibration ``cal`` was fitted with: the
    widening corrects the spread that sampler loses, scale by scale, and another sampler
    (steps, spacing, fusion, projection) loses a different amount."""
    fitted = (cal or {}).get("sampler")
    now = sampler_record(cfg)
    diff = {k: (fitted[k], v) for k, v in now.items() if fitted and k in fitted and fitted[k] != v}
    if diff:
        sets = " ".join(f"--set sample.{'consistency' if k == 'projection' else k}="
                        + (str(v).lower() if isinstance(v, bool) else str(v)) for k, (_, v) in diff.items())
        warn_caller("sample: the model's spread widening was fitted for "
                    + ", ".join(f"{k}={a!r}" for k, (a, _) in diff.items()) + " and is applied to "
                    + ", ".join(f"{k}={b!r}" for k, (_, b) in diff.items())
                    + f"; refit it for these settings with `fastds train --run RUN --recalibrate {sets}`")


def _widening(cfg: SampleConfig, inflation, bands, cal):
    """One field's (α, gains or None) from its saved inflation, band gains and calibration."""
    use_bands = cfg.calibrate_bands and bands is not None
    alpha, gains = (1.0, bands) if use_bands else (inflation, None)
    if cfg.calibrate_to == "bands" and use_bands:
        final = (cal or {}).get("final_band_gains")
        if final is None:
            raise ValueError("sample.calibrate_to='bands' needs the band gains fitted after the "
                             "projection, which this model's calibration predates: refit them "
                             "with `fastds train --run RUN --recalibrate`, or sample with "
                             "--set sample.calibrate_to=spread (the previous default)")
        return 1.0, np.asarray(final, np.float64)
    if cfg.calibrate_to in ("spread", "bands") and cal:
        saved, ratios = (cal["band_factor"], cal["spread_skill_bands"]) if use_bands else \
                        (cal["inflation"], cal["spread_skill"])
        # the curve rises with the factor; np.interp clamps beyond the scanned range
        factor = float(np.interp(1.0, ratios, cal["inflations"]))
        if use_bands:
            gains = gains * (factor / saved)
        else:
            alpha = factor
    return alpha, gains


def member_draw(member: int, *, antithetic=False) -> tuple[int, float]:
    """(draw, sign) of a member: its own draw, or with ``antithetic`` its pair's (members
    (0, 1), (2, 3), ...), negated for the odd one."""
    return (member // 2, -1.0 if member % 2 else 1.0) if antithetic else (member, 1.0)


def member_draws(seed, day_key, member0, members, *, antithetic=False, device="cpu"):
    """Each member's latent generator and sign: ([torch.Generator], [±1.0]).

    A member's draws depend only on (seed, its member number, day_key), never on which
    members or days are sampled beside it. With ``antithetic`` the members come in pairs
    (0, 1), (2, 3), ...: both share the pair's generator and the odd one negates every draw
    (x_T and, through :meth:`StepPlan.mirrored`, each step's noise). Member 0 draws the
    same either way.
    """
    gens, signs = [], []
    for k in range(members):
        draw, sign = member_draw(int(member0) + k, antithetic=antithetic)
        gens.append(torch.Generator(device=device).manual_seed(
            int(seed) * 1_000_003 + draw * 10_007 + int(day_key)))
        signs.append(sign)
    return gens, signs
