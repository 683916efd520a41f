"""``medsass-prep report``: one self-contained HTML page describing a store.

Counts (from :func:`medsass.pipeline.inspect_store.inspect_store`), failures and skipped inputs
grouped by reason, the pseudo-mask foreground-fraction histogram, thumbnails of a seeded sample of
records with the pseudo-mask outline (red) and the real-mask outline (green) where there is one,
the QC-flagged / degenerate records, and per-image IoU of the pseudo-mask (any --method) against the real
masks. Everything shown comes from the manifest and the store's arrays: nothing from DICOM headers
beyond what the manifest holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsass import html_report as H
from medsass import manifest, store
from medsass.metrics import mask_iou

from .inspect_store import inspect_store

PSEUDO_COLOUR = (255, 40, 40)
LABEL_COLOUR = (40, 220, 40)
MAX_LISTED = 200  # rows listed per failure reason / flagged table
MAX_FLAGGED_THUMBS = 12
WORST_IOU_ROWS = 50


def build_store_report(path: str | Path, *, n_samples: int = 24, seed: int = 0) -> str:
    """The report page of the store at ``path`` as an HTML string."""
    path = Path(path)
    rep = inspect_store(path)
    df = manifest.read_manifest(path)
    group, info = store.open_store(path)
    ok = df[(df.status == "ok") & (df.row >= 0)].sort_values("row")
    body = [
        H.section("Summary", _summary(rep)),
        H.section("Failed and skipped inputs", _failures(df)),
        H.section("Pseudo-mask foreground fraction", _fg_histogram(ok)),
        H.section(f"Sample of records (seed {seed})", _legend(), _thumbnails(group, sample_records(ok, n_samples, seed))),
        H.section("QC-flagged and degenerate records", _flagged(group, ok)),
        H.section("Pseudo-mask vs real mask", _pseudo_vs_label(group, info, ok)),
    ]
    return H.page(f"medsass store report: {path.name}", body,
                  subtitle=f"{path} \u2014 schema v{info.schema_version}, {info.size}\u00d7{info.size} px, {info.n_records} rows")


def write_store_report(path: str | Path, out: str | Path, *, n_samples: int = 24, seed: int = 0) -> Path:
    """Build the report of store ``path`` and write it to ``out`` (atomically)."""
    return H.write(out, build_store_report(path, n_samples=n_samples, seed=seed))


def _summary(rep: dict[str, Any]) -> str:
    fg = rep["fg_fraction"]
    items = {
        "inputs (files)": rep["n_inputs"], "records (manifest rows)": rep["n_records"], "stored (ok)": rep["n_ok"],
        "failed": rep["n_failed"], "skipped": rep["n_skipped"], "with a real mask": rep["n_labeled"],
        "degenerate (excluded from pretraining)": rep["n_degenerate"], "splits": rep["splits"],
        "labeled by split": rep["labeled_by_split"], "polarity": rep["polarity"], "QC flags": rep["qc_flags"],
        "label status": rep["label_status"],
    }
    if fg:
        items["foreground fraction"] = {k: fg[k] for k in ("median", "p5", "p95", "mean")}
    return H.kv_table(items)


def _failures(df: pd.DataFrame) -> str:
    parts = []
    for status in ("failed", "skipped"):
        sub = df[df.status == status]
        if sub.empty:
            parts.append(f"<p>No {status} inputs.</p>")
            continue
        for code, rows in sub.groupby("reason_code", sort=True):
            shown = rows.head(MAX_LISTED)
            more = f'<p class="muted">... and {len(rows) - len(shown)} more</p>' if len(rows) > len(shown) else ""
            parts.append(f"<h3>{H.esc(status)}: {H.esc(code or 'unknown')} ({len(rows)})</h3>"
                         + H.table(["source", "frame", "reason"], zip(shown.source, shown.frame.astype(int), shown.reason)) + more)
    return "".join(parts)


def _fg_histogram(ok: pd.DataFrame) -> str:
    if ok.empty:
        return "<p>No stored records.</p>"
    png = H.histogram_png(ok.fg_fraction.to_numpy(float), title="pseudo-mask foreground fraction", xlabel="foreground fraction")
    return H.img(png, "foreground-fraction histogram")


def sample_records(ok: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` records drawn without replacement with ``np.random.default_rng(seed)``, in row order."""
    if n <= 0 or ok.empty:
        return ok.iloc[:0]
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(ok), size=min(n, len(ok)), replace=False))
    return ok.iloc[picks]


def _legend() -> str:
    return ('<p class="legend muted"><span style="color:#ff2828">&#9632; pseudo-mask outline</span>'
            '<span style="color:#28dc28">&#9632; real-mask outline (where labeled)</span></p>')


def _thumbnails(group, rows: pd.DataFrame) -> str:
    if rows.empty:
        return "<p>No records to show.</p>"
    figs = []
    for r in rows.itertuples():
        image = np.asarray(group[store.IMAGE][int(r.row)])
        masks = [(np.asarray(group[store.PSEUDO_MASK][int(r.row)]) > 0, PSEUDO_COLOUR)]
        if r.has_label:
            masks.append((np.asarray(group[store.LABEL][int(r.row)]) > 0, LABEL_COLOUR))
        caption = f"{r.sample_id} | {r.split or '-'} | fg {r.fg_fraction:.3f}" + (f" | {r.qc_flags}" if r.qc_flags else "")
        figs.append(H.figure(H.contour_overlay(image, masks), caption))
    return f'<div class="grid">{"".join(figs)}</div>'


def _flagged(group, ok: pd.DataFrame) -> str:
    flagged = ok[(ok.qc_flags != "") | ok.degenerate]
    if flagged.empty:
        return "<p>No record was flagged by QC.</p>"
    shown = flagged.head(MAX_LISTED)
    tab = H.table(["sample_id", "split", "qc_flags", "degenerate", "fg_fraction", "polarity", "threshold"],
                  zip(shown.sample_id, shown.split, shown.qc_flags, shown.degenerate.map(str), shown.fg_fraction,
                      shown.polarity, shown.threshold))
    more = f'<p class="muted">{len(flagged)} flagged; the first {len(shown)} are listed.</p>' if len(flagged) > len(shown) else ""
    return tab + more + _thumbnails(group, flagged.head(MAX_FLAGGED_THUMBS))


def pseudo_label_iou(group, info: store.StoreInfo, rows: np.ndarray) -> np.ndarray:
    """Per-row IoU of ``pseudo_mask`` vs ``label`` (an empty pair scores 1), read shard by shard."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty(len(rows), dtype=float)
    shard_of = rows // info.shard_records
    for shard in np.unique(shard_of):
        a, b = info.shard_bounds(int(shard))
        pseudo = np.asarray(group[store.PSEUDO_MASK][a:b]) > 0
        label = np.asarray(group[store.LABEL][a:b]) > 0
        for i in np.flatnonzero(shard_of == shard):
            out[i] = mask_iou(pseudo[rows[i] - a], label[rows[i] - a])
    return out


def _pseudo_vs_label(group, info: store.StoreInfo, ok: pd.DataFrame) -> str:
    labeled = ok[ok.has_label]
    if labeled.empty:
        return "<p>No record has a real mask, so the pseudo-masks cannot be scored.</p>"
    iou = pseudo_label_iou(group, info, labeled.row.to_numpy())
    order = np.argsort(iou, kind="stable")[:WORST_IOU_ROWS]
    stats = {"labeled records": len(iou), "mean IoU": round(float(iou.mean()), 4), "median IoU": round(float(np.median(iou)), 4),
             "IoU < 0.5": int((iou < 0.5).sum())}
    by_split = {s: round(float(iou[(labeled.split == s).to_numpy()].mean()), 4) for s in sorted(set(labeled.split))}
    stats["mean IoU by split"] = by_split
    tab = H.table(["sample_id", "split", "IoU", "fg_fraction", "label_fg_fraction", "polarity"],
                  [(labeled.sample_id.iloc[i], labeled.split.iloc[i], iou[i], labeled.fg_fraction.iloc[i],
                    labeled.label_fg_fraction.iloc[i], labeled.polarity.iloc[i]) for i in order])
    png = H.histogram_png(iou, title="per-image IoU, pseudo-mask vs real mask", xlabel="IoU")
    note = (f'<p class="muted">At the stored {info.size}\u00d7{info.size} resolution; an empty pseudo-mask on an empty real '
            f"mask scores 1. Lowest {len(order)} of {len(iou)}:</p>")
    return H.kv_table(stats) + H.img(png, "pseudo-mask IoU histogram") + note + tab
