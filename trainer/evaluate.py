"""Evaluation: IoU and Dice (micro and per-image mean), the Otsu floor, a per-image CSV and overlays.

Every rank predicts its share of the records (``iter_eval`` with rank / world size); the confusion
sums are all-reduced and the per-image rows all-gathered, so every rank returns the same metrics
and only rank 0 writes files. Per-image IoU/Dice of an empty prediction on an empty target is 1
(see ``medsass.trainer.metrics``).
"""
from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medsass.trainer import checkpoint as ck
from medsass.trainer.config import stage_section
from medsass.trainer.data import iter_eval, select_rows
from medsass.trainer.distributed import DistInfo, all_gather_objects, all_reduce_sum
from medsass.trainer.metrics import confusion, dice, iou, summarize
from medsass.trainer.model import build_model, check_compatible, model_args
from medsass.trainer.precision import amp_dtype, use_channels_last
from PIL import Image
from scipy.ndimage import binary_erosion
from torch import nn

from medsass.manifest import atomic_write_bytes, read_manifest, write_json
from medsass.store import open_store

COUNTS = ("tp", "fp", "fn", "tn")


@dataclass(frozen=True)
class EvalSource:
    name: str  # store name in the config
    path: Path
    rows: np.ndarray
    target: str = "label"  # the array compared against: label, pseudo_mask or pseudo_labels/<name>


def eval_rows(path: str | Path, split: str, target: str) -> np.ndarray:
    """Rows scored on ``split``: labeled records for ``label``; every record for a pseudo-mask target."""
    return select_rows(path, splits=[split], target=target, exclude_degenerate=False, require_label=target == "label")


@torch.no_grad()
def predict(model: nn.Module, x_uint8: torch.Tensor, device: torch.device, amp: torch.dtype | None, threshold: float) -> torch.Tensor:
    """Boolean (B, 1, H, W) prediction from a uint8 (B, 1, H, W) batch."""
    x = x_uint8.to(device, non_blocking=True).float().div_(255)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(x)
    return torch.sigmoid(logits.float()) >= threshold


@torch.no_grad()
def score_source(
    model: nn.Module, src: EvalSource, *, batch_size: int, dist: DistInfo, amp: torch.dtype | None,
    threshold: float = 0.5, floor: bool = True,
) -> list[dict[str, Any]]:
    """This rank's per-image rows: counts vs the target and (``floor``) the pseudo-mask's counts."""
    was_training = model.training
    model.eval()
    arrays = ("image", src.target) + (("pseudo_mask",) if floor and src.target != "pseudo_mask" else ())
    out: list[dict[str, Any]] = []
    for batch in iter_eval(src.path, src.rows, batch_size=batch_size, rank=dist.rank, world_size=dist.world_size, arrays=arrays):
        target = batch[src.target].to(dist.device) > 0
        counts = confusion(predict(model, batch["image"], dist.device, amp, threshold), target).cpu().numpy()
        pseudo = confusion(batch["pseudo_mask"].to(dist.device) > 0, target).cpu().numpy() if len(arrays) == 3 else None
        for i, row in enumerate(batch["row"].tolist()):
            rec = {"store": src.name, "row": int(row), **{k: int(v) for k, v in zip(COUNTS, counts[i])}}
            if pseudo is not None:
                rec.update({f"pseudo_{k}": int(v) for k, v in zip(COUNTS, pseudo[i])})
            out.append(rec)
    model.train(was_training)
    return out


def val_iou(model: nn.Module, sources: list[EvalSource], *, batch_size: int, dist: DistInfo, amp: torch.dtype | None) -> float:
    """Micro IoU over all ``sources`` (used for best.pt); confusion sums all-reduced over ranks."""
    sums = torch.zeros(4, dtype=torch.float64)
    for src in sources:
        for rec in score_source(model, src, batch_size=batch_size, dist=dist, amp=amp, floor=False):
            sums += torch.tensor([rec[k] for k in COUNTS], dtype=torch.float64)
    sums = all_reduce_sum(sums.to(dist.device), dist).cpu()
    return float(iou(sums[0], sums[1], sums[2]))


def evaluate_split(
    model: nn.Module, sources: list[EvalSource], *, batch_size: int, dist: DistInfo, amp: torch.dtype | None, threshold: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics for one split (every rank gets them) and all ranks' per-image rows."""
    local = [rec for src in sources for rec in score_source(model, src, batch_size=batch_size, dist=dist, amp=amp, threshold=threshold)]
    sums = torch.tensor([sum(r[k] for r in local) for k in COUNTS], dtype=torch.float64, device=dist.device)
    sums = all_reduce_sum(sums, dist).cpu().numpy()
    records = sorted((r for part in all_gather_objects(local, dist) for r in part), key=lambda r: (r["store"], r["row"]))
    counts = np.array([[r[k] for k in COUNTS] for r in records], np.int64).reshape(-1, 4)
    metrics = summarize(counts)
    metrics["iou"], metrics["dice"] = float(iou(*sums[:3])), float(dice(*sums[:3]))  # from the all-reduced sums
    if records and "pseudo_tp" in records[0]:
        floor = summarize(np.array([[r[f"pseudo_{k}"] for k in COUNTS] for r in records], np.int64))
        metrics["otsu_floor"] = {"iou": floor["iou"], "iou_per_image_mean": floor["iou_per_image_mean"], "dice": floor["dice"]}
    if len(sources) > 1:
        metrics["stores"] = {s.name: summarize(counts[[r["store"] == s.name for r in records]]) for s in sources}
    for r in records:
        r["iou"] = float(iou(r["tp"], r["fp"], r["fn"]))
        r["dice"] = float(dice(r["tp"], r["fp"], r["fn"]))
        if "pseudo_tp" in r:
            r["pseudo_iou"] = float(iou(r["pseudo_tp"], r["pseudo_fp"], r["pseudo_fn"]))
    return metrics, records


def write_per_image_csv(path: Path, rows: list[dict[str, Any]], sample_ids: dict[tuple[str, int], str]) -> None:
    cols = ["split", "store", "sample_id", "row", "iou", "dice", "pseudo_iou", "tp", "fp", "fn", "tn",
            "pseudo_tp", "pseudo_fp", "pseudo_fn"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "sample_id": sample_ids.get((r["store"], r["row"]), ""),
                         **{k: r.get(k, "") for k in ("pseudo_iou", "pseudo_tp", "pseudo_fp", "pseudo_fn")}})
    atomic_write_bytes(path, buf.getvalue().encode())


def sample_id_map(stores: dict[str, Path]) -> dict[tuple[str, int], str]:
    out = {}
    for name, path in stores.items():
        df = read_manifest(path)
        df = df[df["row"] >= 0]
        out.update({(name, int(r)): str(s) for r, s in zip(df["row"], df["sample_id"])})
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~binary_erosion(mask, iterations=1, border_value=0)


def overlay_png(image: np.ndarray, pred: np.ndarray, label: np.ndarray, min_size: int = 256) -> bytes:
    """PNG of a gray image with the predicted outline (red) and the target outline (green)."""
    k = max(1, -(-min_size // image.shape[0]))  # nearest-neighbour upscale factor

    def up(a: np.ndarray) -> np.ndarray:
        return a.repeat(k, axis=0).repeat(k, axis=1)

    rgb = np.repeat(up(image)[..., None], 3, axis=2)
    rgb[_outline(up(label.astype(bool)))] = (0, 255, 0)
    rgb[_outline(up(pred.astype(bool)))] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def write_overlays(
    folder: Path, model: nn.Module, split: str, records: list[dict[str, Any]], sources: list[EvalSource], *,
    n: int, device: torch.device, amp: torch.dtype | None, threshold: float,
) -> list[Path]:
    """Overlays of the ``n`` best and ``n`` worst images by per-image IoU (rank 0 only)."""
    if n <= 0 or not records:
        return []
    ranked = sorted(records, key=lambda r: (r["iou"], r["store"], r["row"]))
    picks = [("worst", i, r) for i, r in enumerate(ranked[:n])] + [("best", i, r) for i, r in enumerate(ranked[::-1][:n])]
    by_name = {s.name: s for s in sources}
    model.eval()
    written = []
    for kind, i, rec in picks:
        src = by_name[rec["store"]]
        group, _ = open_store(src.path)
        image = np.asarray(group["image"][rec["row"]])
        target = np.asarray(group[src.target][rec["row"]]) > 0
        pred = predict(model, torch.from_numpy(image)[None, None], device, amp, threshold)[0, 0].cpu().numpy()
        path = folder / f"{split}_{kind}{i + 1}_{rec['store']}_row{rec['row']}_iou{rec['iou']:.3f}.png"
        atomic_write_bytes(path, overlay_png(image, pred, target))
        written.append(path)
    return written


def run_evaluate(config, plan, dist) -> dict[str, Any]:
    """The evaluate stage: score ``plan.source`` on every split; rank 0 writes the report files."""
    ev, path = config.evaluate, plan.source
    state = ck.load(path)
    check_compatible(state["model_args"], model_args(config.model), what=f"checkpoint {path}")
    model = build_model(state["model_args"])
    model.load_state_dict(state["model"])
    model.to(dist.device).eval()
    if use_channels_last(config.runtime.channels_last, dist.device):
        model.to(memory_format=torch.channels_last)
    amp = amp_dtype(config.runtime.amp, dist.device)
    stores = {n: Path(config.stores[n]) for n in config.stage_stores("evaluate")}
    results, all_rows, by_split = {}, [], {}
    for split, rows in plan.rows.items():
        sources = [EvalSource(n, stores[n], rows[n], ev.target) for n in stores]
        results[split], records = evaluate_split(model, sources, batch_size=ev.batch_size, dist=dist, amp=amp, threshold=ev.threshold)
        all_rows += [{"split": split, **r} for r in records]
        by_split[split] = (sources, records)
    if dist.is_main:
        write_json(results, plan.dir / "metrics.json")
        write_per_image_csv(plan.dir / "per_image.csv", all_rows, sample_id_map(stores))
        shutil.rmtree(plan.dir / "overlays", ignore_errors=True)
        for split, (sources, records) in by_split.items():
            write_overlays(plan.dir / "overlays", model, split, records, sources, n=ev.overlays, device=dist.device, amp=amp, threshold=ev.threshold)
        write_json({"stage": "evaluate", "section": stage_section(config, "evaluate"), "checkpoint": ck.file_id(path),
                    "checkpoint_step": state.get("step"), "checkpoint_stage": state.get("stage")}, plan.dir / "done")
    return results
