"""Losses on logits (B, 1, H, W) against {0, 1} float targets.

Focal-Tversky as in the paper (Abraham & Khan): TI = TP / (TP + fn_weight·FN + fp_weight·FP),
loss = (1 − TI)^gamma, with soft TP/FP/FN from sigmoid probabilities.

Why not ``smp.losses.TverskyLoss``: its ``alpha`` weighs false *positives* and ``beta`` false
negatives (the paper's names are the other way round) — that alone is easy to map — but with
``gamma < 1`` an all-empty target gives a NaN gradient (0 ** 0.75 is differentiated before the
empty-target mask). Here an all-empty target gives loss 0 with a zero gradient, as smp intends.
Dice uses ``smp.losses.DiceLoss`` (same empty-target rule); BCE is torch's.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from medsass.trainer.config import LossConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def tversky_index(probs: torch.Tensor, target: torch.Tensor, *, fn_weight: float, fp_weight: float, dims) -> torch.Tensor:
    """Soft Tversky index summed over ``dims``; 0 where the target and prediction are both empty."""
    tp = (probs * target).sum(dims)
    fp = (probs * (1 - target)).sum(dims)
    fn = ((1 - probs) * target).sum(dims)
    return tp / (tp + fn_weight * fn + fp_weight * fp).clamp_min(1e-7)


def focal_tversky(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    fn_weight: float = 0.7,
    fp_weight: float = 0.3,
    gamma: float = 0.75,
    per_image: bool = False,
) -> torch.Tensor:
    """(1 − TI)^gamma from probabilities; pooled over the batch unless ``per_image``.

    A batch (or image, when ``per_image``) whose target has no positive pixel contributes 0.
    """
    probs, target = probs.float(), target.float()
    dims = tuple(range(1, probs.ndim)) if per_image else tuple(range(probs.ndim))
    ti = tversky_index(probs, target, fn_weight=fn_weight, fp_weight=fp_weight, dims=dims)
    has_fg = target.sum(dims) > 0
    base = torch.where(has_fg, (1 - ti).clamp_min(1e-6), torch.ones_like(ti))  # pow's gradient stays finite
    loss = torch.where(has_fg, base**gamma, torch.zeros_like(ti))
    return loss.mean()


def build_loss(cfg: LossConfig) -> LossFn:
    """``loss(logits, target)`` for the configured loss."""
    if cfg.name == "focal_tversky":

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return focal_tversky(
                torch.sigmoid(logits.float()), target,
                fn_weight=cfg.fn_weight, fp_weight=cfg.fp_weight, gamma=cfg.gamma, per_image=cfg.per_image,
            )

        return loss
    from segmentation_models_pytorch.losses import DiceLoss

    dice = DiceLoss("binary", from_logits=True)
    if cfg.name == "dice":
        return lambda logits, target: dice(logits.float(), target.float())
    if cfg.name == "bce":
        return lambda logits, target: F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return lambda logits, target: (
        F.binary_cross_entropy_with_logits(logits.float(), target.float()) + dice(logits.float(), target.float())
    )
