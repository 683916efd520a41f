"""How close a target's masks are to the expert labels: measured, never trained on.

Two users: self-training scores each round's new pseudo-labels (:mod:`medsass.trainer.selftrain`), and a joint
fine-tune (``finetune.pseudo_weight > 0``) scores the pool's pseudo-masks before it starts. Joint training fits
those pseudo-masks beside the labeled batch; in the scale study that paid where they were close to the labels and
hurt where they were crude (docs/results/label_efficiency.md, "Joint training": DSB nuclei, pseudo-masks at IoU
0.82 against the labels, +0.005 to +0.008 test IoU over the default recipe; Shenzhen chest X-rays, 0.62, −0.10 to
−0.13). So the fine-tune logs the figure on the pool records that carry an expert mask, and warns below
:data:`JOINT_WARN_BELOW`. Labels are read here only; nothing they give is fed back.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from medsass.trainer.stream import ArrayReader, read_rows
from medsass.trainer.targets import target_encoding, to_mask

from medsass import manifest as manifest_mod
from medsass import store as store_mod
from medsass.metrics import iou, mask_counts

# Between the study's two measured cases (0.62 hurt, 0.82 helped); one figure per side, so a guide, not a rule.
JOINT_WARN_BELOW = 0.75
# At most this many labeled records per store are read (evenly spaced over the rows): a few hundred masks give the
# figure to about +-0.01, and a large archive's labeled pool is not read whole before training starts.
MAX_RECORDS = 512


def target_counts(store: str | Path, target: str, rows: np.ndarray) -> np.ndarray:
    """(n, 3) int64 per-row (tp, fp, fn) of ``target``'s masks against the expert labels on ``rows``."""
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
        return np.zeros((0, 3), np.int64)
    pred = to_mask(read_rows(ArrayReader(store, target), rows), target_encoding(store, target))
    label = read_rows(ArrayReader(store, store_mod.LABEL), rows) > 0
    return mask_counts(pred, label)


def quality_of(counts: np.ndarray) -> dict[str, Any]:
    """n, mean per-image IoU and micro IoU of (n, 3) counts (None where n = 0)."""
    if len(counts) == 0:
        return {"n": 0, "iou_per_image_mean": None, "iou": None}
    tp, fp, fn = np.asarray(counts).T
    return {"n": len(tp), "iou_per_image_mean": float(np.mean(iou(tp, fp, fn))), "iou": float(iou(tp.sum(), fp.sum(), fn.sum()))}


def mask_quality(store: str | Path, target: str, rows: np.ndarray) -> dict[str, Any]:
    """IoU of ``target``'s masks against the expert labels on ``rows`` (labeled ones): mean per image and micro."""
    return quality_of(target_counts(store, target, np.unique(np.asarray(rows, np.int64))))


def labeled_rows(store: str | Path) -> np.ndarray:
    """Sorted rows of the store's stored records that carry an expert mask."""
    df = manifest_mod.read_manifest(store)
    keep = (df["status"] == "ok") & (df["row"] >= 0) & df["has_label"].astype(bool)
    return np.sort(df.loc[keep, "row"].to_numpy(np.int64))


def _spread(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` of ``rows``, evenly spaced (deterministic)."""
    if len(rows) <= limit:
        return rows
    return rows[np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(np.int64))]


def pool_agreement(stores: Mapping[str, str | Path], rows: Mapping[str, np.ndarray], target: str,
                   max_records: int = MAX_RECORDS) -> dict[str, Any]:
    """``target`` against the expert labels on the records of ``rows`` (store name -> pool rows) that have one.

    Returns ``quality_of`` over all stores together (micro IoU sums the pixel counts) plus ``per_store``
    (name -> quality) and ``target``.
    """
    per_store, counts = {}, []
    for name, pool in rows.items():
        scored = _spread(np.intersect1d(np.asarray(pool, np.int64), labeled_rows(stores[name])), max_records)
        c = target_counts(stores[name], target, scored)
        per_store[name] = quality_of(c)
        counts.append(c)
    total = quality_of(np.concatenate(counts) if counts else np.zeros((0, 3), np.int64))
    return {**total, "per_store": per_store, "target": target}


def agreement_note(result: Mapping[str, Any], threshold: float = JOINT_WARN_BELOW) -> tuple[str, bool]:
    """(text for the run's log, whether to warn) for a joint fine-tune's :func:`pool_agreement`."""
    target = result["target"]
    if not result["n"]:
        return (f"finetune.pseudo_weight: none of the pool's records has an expert mask, so its pseudo-masks (pretrain.target="
                f"{target}) could not be scored against labels. Joint training helps only where they are close to what your experts draw "
                "(docs/results/label_efficiency.md, 'Joint training'): score them first with medsass-prep report on a "
                "store that has some labels", True)
    text = (f"finetune.pseudo_weight: the pool's pseudo-masks (pretrain.target={target}) score IoU {result['iou']:.3f} against the expert masks of "
            f"the {result['n']} pool record(s) that have one (mean per image {result['iou_per_image_mean']:.3f})")
    if result["iou"] >= threshold:
        return text, False
    return (text + f". That is below {threshold}: in the scale study joint training lost 0.10-0.13 test IoU where the "
            "pseudo-masks scored 0.62 (chest X-rays) and gained where they scored 0.82 (nuclei). Consider "
            "finetune.pseudo_weight=0 (pretrain, then fine-tune) unless a val comparison on your data says otherwise", True)
