"""IoU and Dice from confusion counts, as ``smp.metrics`` computes them.

Micro scores pool the pixels of all images (``smp.metrics.iou_score(..., reduction='micro')``);
per-image scores are averaged over images. Per-image convention: an image whose prediction and
target are both empty scores IoU = Dice = 1 (nothing to find, nothing found). smp would give
NaN → 0 ("warn") there; the micro scores are unaffected.
"""
from __future__ import annotations

import numpy as np
import torch


def confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image (tp, fp, fn, tn) as an int64 tensor (B, 4) from boolean (B, 1, H, W) masks."""
    pred = pred.bool().flatten(1)
    target = target.bool().flatten(1)
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    tn = pred.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], 1).long()


def iou(tp, fp, fn, empty: float = 1.0):
    """tp / (tp + fp + fn); ``empty`` where the denominator is 0. Works on numbers and numpy arrays."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    den = tp + fp + fn
    return np.where(den > 0, tp / np.maximum(den, 1), empty)


def dice(tp, fp, fn, empty: float = 1.0):
    """2tp / (2tp + fp + fn); ``empty`` where the denominator is 0."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), empty)


def summarize(counts: np.ndarray) -> dict[str, float]:
    """Micro and per-image-mean IoU/Dice from per-image counts (N, 4)."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 4)
    tp, fp, fn, _ = counts.sum(0)
    per_iou = iou(counts[:, 0], counts[:, 1], counts[:, 2])
    per_dice = dice(counts[:, 0], counts[:, 1], counts[:, 2])
    n = len(counts)
    return {
        "iou": float(iou(tp, fp, fn)),
        "dice": float(dice(tp, fp, fn)),
        "iou_per_image_mean": float(per_iou.mean()) if n else float("nan"),
        "dice_per_image_mean": float(per_dice.mean()) if n else float("nan"),
        "n": int(n),
    }
