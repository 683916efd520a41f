"""Losses on logits (B, 1, H, W) against {0, 1} float targets.

Focal-Tversky as in the paper (Abraham & Khan): TI = TP / (TP + fn_weight·FN + fp_weight·FP),
loss = (1 − TI)^gamma, with soft TP/FP/FN from sigmoid probabilities.

Why not ``smp.losses.TverskyLoss``: its ``alpha`` weighs false *positives* and ``beta`` false
negatives (the paper's names are the other way round) — that alone is easy to map — but with
``gamma < 1`` an all-empty target gives a NaN gradient (0 ** 0.75 is differentiated before the
empty-target mask). Here an all-empty target gives loss 0 with a zero gradient, as smp intends.
Dice uses ``smp.losses.DiceLoss`` (same empty-target rule); BCE is torch's.

Soft pseudo-labels (``medsass.trainer.selftrain``, mode soft) reach the loss as probabilities
p in [0, 1]; ``loss.soft_labels`` says how they are used (:func:`soft_target`): thresholded at 0.5,
thresholded with per-pixel weights w = |2p - 1| (focal-Tversky: weighted TP/FP/FN sums; BCE: the
weighted mean sum(w·bce) / sum(w)), or p itself as a soft target. On a {0, 1} target all three give
exactly the unweighted loss (w = 1).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from medsass.trainer.config import LossConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def tversky_index(probs: torch.Tensor, target: torch.Tensor, *, fn_weight: float, fp_weight: float, dims,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Tversky index summed over ``dims`` (each pixel counted ``weights`` times); 0 where the target and prediction are both empty."""
    w = 1.0 if weights is None else weights.float()
    tp = (w * probs * target).sum(dims)
    fp = (w * probs * (1 - target)).sum(dims)
    fn = (w * (1 - probs) * target).sum(dims)
    return tp / (tp + fn_weight * fn + fp_weight * fp).clamp_min(1e-7)


def focal_tversky(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    fn_weight: float = 0.7,
    fp_weight: float = 0.3,
    gamma: float = 0.75,
    per_image: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(1 − TI)^gamma from probabilities; pooled over the batch unless ``per_image``.

    ``weights`` (same shape, >= 0) weigh each pixel's share of TP/FP/FN. A batch (or image, when
    ``per_image``) whose (weighted) target has no positive pixel contributes 0.
    """
    probs, target = probs.float(), target.float()
    dims = tuple(range(1, probs.ndim)) if per_image else tuple(range(probs.ndim))
    ti = tversky_index(probs, target, fn_weight=fn_weight, fp_weight=fp_weight, dims=dims, weights=weights)
    has_fg = (target if weights is None else target * weights).sum(dims) > 0
    base = torch.where(has_fg, (1 - ti).clamp_min(1e-6), torch.ones_like(ti))  # pow's gradient stays finite
    loss = torch.where(has_fg, base**gamma, torch.zeros_like(ti))
    return loss.mean()


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged as sum(w·bce) / sum(w) (the plain mean when ``weights`` is None)."""
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    w = weights.float()
    return (w * per_pixel).sum() / w.sum().clamp_min(1e-7)


def soft_target(p: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(target, per-pixel weights or None) from a target p in [0, 1], for ``loss.soft_labels`` = ``mode``."""
    if mode == "target":
        return p, None
    hard = (p >= 0.5).to(p.dtype)
    return (hard, (2 * p - 1).abs()) if mode == "weight" else (hard, None)


def build_loss(cfg: LossConfig) -> LossFn:
    """``loss(logits, target)``; ``target`` in [0, 1]: {0, 1} masks, or soft pseudo-labels used as ``cfg.soft_labels`` says."""
    dice = None
    if cfg.name in ("dice", "bce_dice"):
        # lazy, as model.py's smp: ~3.7 s to import (python -X importtime), and only the Dice losses need it
        from segmentation_models_pytorch.losses import DiceLoss

        dice = DiceLoss("binary", from_logits=True)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target, weights = soft_target(target.float(), cfg.soft_labels)  # {0, 1} targets: unchanged, weights 1
        if cfg.name == "focal_tversky":
            return focal_tversky(torch.sigmoid(logits), target, fn_weight=cfg.fn_weight, fp_weight=cfg.fp_weight,
                                 gamma=cfg.gamma, per_image=cfg.per_image, weights=weights)
        if cfg.name == "bce":
            return weighted_bce(logits, target, weights)
        if cfg.name == "dice":
            return dice(logits, target)
        return weighted_bce(logits, target) + dice(logits, target)

    return loss
