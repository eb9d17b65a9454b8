"""Out-of-fold regression means for the CorrDiff DDPM (``train.oof_folds``).

The DDPM diffuses the residual of the run's U-Net. On the U-Net's own training days that
residual is smaller than on days it never saw (it fitted them), so a DDPM trained on it
learns too small a spread and the sampler needs a widening α > 1 to cover rollout errors.
With K folds, K more U-Nets are fitted, U-Net k without fold k of the training days, and
each training item's mean comes from the U-Net that never saw its day: the residual learnt
is the size sampling meets. Validation items (no fold) keep the run's U-Net, as sampling
does. Folds are blocks of consecutive days dealt in turn, so a held-out day's neighbours,
which share its weather, are mostly held out with it.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

__all__ = ["OOF_BLOCK", "fold_of_days", "OOFMeans", "fit_fold_means"]

OOF_BLOCK = 14  # days per fold block: several decorrelation times of the twins' weather


def fold_of_days(days, n_days: int, folds: int, block: int = OOF_BLOCK) -> np.ndarray:
    """The fold of each fine-record day: ``days`` (the training days' record indices) are cut
    into blocks of ``block`` consecutive record days, dealt to folds 0..K-1 in turn; every
    other day of the record gets -1. (n_days,) int64."""
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"train.oof_folds must be 0 (off) or at least 2, got {folds!r}")
    days = np.asarray(days, np.int64)
    fold = np.full(int(n_days), -1, np.int64)
    blocks = np.unique(days // block)
    if len(blocks) < folds:
        raise ValueError(f"train.oof_folds={folds}: the training days fall in only {len(blocks)} "
                         f"block(s) of {block} days; use fewer folds")
    rank = np.searchsorted(blocks, days // block)
    fold[days] = rank % folds
    return fold


class OOFMeans:
    """Each item's regression mean from the U-Net of its day's fold, the model's own mean
    (the run's U-Net) for days outside every fold. ``fold`` (n_days,) from
    :func:`fold_of_days`; ``nets``: K frozen U-Net ConditionalModels, net k never trained on
    fold k."""

    def __init__(self, fold: np.ndarray, nets):
        self.fold = torch.as_tensor(np.asarray(fold), dtype=torch.long)
        self.nets = list(nets)
        for net in self.nets:
            net.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, model, b) -> torch.Tensor:
        """The means (B, 1, h, w) of batch ``b`` (FinePatches items: coarse, covariates,
        lags, day, optional drop)."""
        folds = self.fold.to(b["day"].device)[b["day"]]
        drop = b.get("drop")
        out = torch.empty_like(b["target"])
        for k in torch.unique(folds).tolist():
            sel = folds == k
            args = (b["coarse"][sel], b["covariates"][sel], b["lags"][sel],
                    drop[sel] if drop is not None else None)
            # under bf16 autocast (train.precision) the nets answer in bf16; out keeps the
            # target's dtype, as the in-sample mean does once subtracted from it
            if k < 0:
                out[sel] = model.regression_mean(*args).to(out.dtype)
            else:
                net = self.nets[k]
                out[sel] = net(None, None, net.cond(*args)).to(out.dtype)
        return out


def fit_fold_means(train_set, folds: int, fit_fold, new_unet, load_best) -> OOFMeans:
    """Fit (or resume) the K fold U-Nets of ``train_set`` and return their :class:`OOFMeans`.
    ``fit_fold(k, net, subset)`` fits ``net`` on ``subset`` (``train_set`` restricted to the
    days outside fold k) and returns its best checkpoint's path; ``new_unet()`` builds an
    untrained U-Net as the run's was built; ``load_best(net, path)`` loads the weights."""
    fold = fold_of_days(train_set.days, len(train_set.times), folds)
    days = np.asarray(train_set.days)
    nets = []
    for k in range(folds):
        subset = copy.copy(train_set)  # views of the same arrays: only the target days differ
        subset.days = days[fold[days] != k]
        net = new_unet()
        load_best(net, fit_fold(k, net, subset))
        nets.append(net)
    return OOFMeans(fold, nets)
