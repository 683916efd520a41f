"""The trainer's confusion counts on torch tensors; IoU and Dice from counts live in :mod:`medsass.metrics`
(shared with prep's reports, the study and benchmarks) and are re-exported here."""
from __future__ import annotations

import torch

from medsass.metrics import dice, iou, summarize

__all__ = ["confusion", "dice", "iou", "summarize"]


def confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image (tp, fp, fn, tn) as an int64 tensor (B, 4) from boolean (B, 1, H, W) masks."""
    pred = pred.bool().flatten(1)
    target = target.bool().flatten(1)
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    tn = pred.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], 1).long()
