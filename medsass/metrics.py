"""IoU and Dice from confusion counts: the one home shared by prep's reports, the trainer, the study and benchmarks.

Micro scores pool the pixels of all images (as ``smp.metrics.iou_score(..., reduction='micro')``); per-image
scores are averaged over images. Per-image convention: an image whose prediction and target are both empty scores
IoU = Dice = 1 (nothing to find, nothing found); smp would give NaN -> 0 ("warn") there; micro scores are unaffected.
numpy only (the trainer's torch confusion counts are in ``medsass.trainer.metrics``).
"""
from __future__ import annotations

import numpy as np


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


def mask_counts(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(tp, fp, fn) of boolean masks over their last two axes: shape (..., 3), int64."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    axes = (-2, -1)
    return np.stack([(pred & target).sum(axes), (pred & ~target).sum(axes), (~pred & target).sum(axes)], -1).astype(np.int64)


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """IoU of two boolean masks (1 when both are empty)."""
    return float(iou(*mask_counts(pred, target)))


def micro_iou(counts: np.ndarray) -> float:
    """Pooled IoU of per-image (tp, fp, fn[, tn]) counts, shape (N, 3 or 4)."""
    c = np.asarray(counts, np.int64).reshape(len(counts), -1) if len(counts) else np.zeros((0, 3), np.int64)
    return float(iou(*c[:, :3].sum(0)))


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
