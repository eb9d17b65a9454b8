"""Patch fusion: how overlapping patch samples become one field.

``"final"`` (the paper): every patch is sampled on its own and the finished samples are
stitched with Halo-and-Hann weights. Where kept regions overlap, independent samples are
averaged, which shrinks the variance there (towards an ensemble mean) and leaves seams where
they do not.

``"step"`` (MultiDiffusion / CorrDiff style): the sampler's state is one image. At every step
the image is cut into patches, the network runs on them, its outputs are blended back into
one image with the same Halo-and-Hann weights, and the sampler update (and its noise) is
applied to the image. Overlapping patches therefore denoise one shared field, and each pixel
gets exactly one noise draw per step, so the sample keeps its variance. Because the update is
affine in the network output at a fixed x_t, blending the outputs is the same as blending the
x̂0 predictions.
"""
from __future__ import annotations

import torch

from ..stitch import StitchPlan

__all__ = ["FUSIONS", "PatchFusedModel"]

FUSIONS = ("final", "step")


class PatchFusedModel:
    """An image-space network built from a patch network: ``f(x_img, t, _)`` with x_img
    (M, C, H, W) -> blended output (M, C, H, W): M images of one geometry (members sampled
    together), whose patches go through the network together, ``batch`` at a time.

    model : the patch network ``model(x (B, C, tile, tile), t (B,), cond)``;
    plan : :class:`~fastds.stitch.StitchPlan` of the day's patch geometry (N patches);
    cond : (M·N, C_cond, tile, tile) conditioning of every patch of every image (image-major),
    or a function of a slice of those patches returning theirs (to recompute it every step),
    or None to take it from each call's third argument (a CUDA graph's static buffer);
    batch : patches per call. Pass it to :func:`~fastds.sampling.samplers.run_plan` in place
    of the network; every image must take the same timestep.
    """

    def __init__(self, model, plan: StitchPlan, cond, *, batch=1024):
        self.model, self.plan, self.batch = model, plan, int(batch)
        self.cond = cond if callable(cond) or cond is None else (lambda sl: cond[sl])

    def __call__(self, x_img, t, cond=None):
        if self.cond is None and cond is None:
            raise ValueError("PatchFusedModel: built with cond=None, so each call must pass the "
                             "patches' conditioning")
        of = self.cond if cond is None else (lambda sl: cond[sl])
        m = x_img.shape[0]
        patches = torch.cat([self.plan.cut(x_img[k]) for k in range(m)]) if m > 1 \
            else self.plan.cut(x_img[0])                           # (M·N, C, tile, tile)
        tt = t[:1].expand(patches.shape[0])
        out = torch.cat([self.model(patches[i:i + self.batch], tt[i:i + self.batch],
                                    of(slice(i, i + self.batch)))
                         for i in range(0, patches.shape[0], self.batch)]).to(x_img.dtype)
        if m == 1:
            return self.plan.stitch(out)[None]                     # (1, C, H, W)
        n = out.shape[0] // m
        return torch.stack([self.plan.stitch(out[k * n:(k + 1) * n]) for k in range(m)])
