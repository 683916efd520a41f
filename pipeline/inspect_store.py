"""``medsass-prep inspect``: what is in a store, from its manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medsass import manifest, store


def manifest_counts(df) -> dict[str, Any]:
    """Counts of a manifest (a DataFrame): rows by status, inputs, labeled and degenerate records, records by split,
    failed and skipped rows by reason code. build-masks writes them into the summary; ``inspect`` reports them."""
    ok = df[df.status == "ok"]
    return {
        "counts": {s: int((df.status == s).sum()) for s in manifest.STATUSES},
        "n_inputs": int(df.source.nunique()),
        "n_labeled": int(ok.has_label.sum()),
        "n_degenerate": int(ok.degenerate.sum()),
        "splits": {k: int(v) for k, v in ok.split.value_counts().sort_index().items()},
        "failures_by_code": {k: int(v) for k, v in df[df.status == "failed"].groupby("reason_code").size().sort_index().items()},
        "skipped_by_code": {k: int(v) for k, v in df[df.status == "skipped"].groupby("reason_code").size().sort_index().items()},
    }


def inspect_store(path: str | Path) -> dict[str, Any]:
    _, info = store.open_store(path)
    df = manifest.read_manifest(path)
    c = manifest_counts(df)
    ok = df[df.status == "ok"]
    flags: dict[str, int] = {}
    for s in ok.qc_flags:
        for f in filter(None, s.split(",")):
            flags[f] = flags.get(f, 0) + 1
    fg = ok.fg_fraction.to_numpy(dtype=float)
    fg = fg[np.isfinite(fg)]
    failed = df[df.status == "failed"]
    skipped = df[df.status == "skipped"]
    return {
        "store": str(path),
        "schema_version": info.schema_version,
        "size": info.size,
        "n_records": len(df),
        "n_rows": info.n_records,
        "n_ok": c["counts"]["ok"],
        "n_failed": c["counts"]["failed"],
        "n_skipped": c["counts"]["skipped"],
        "n_inputs": c["n_inputs"],
        "n_labeled": c["n_labeled"],
        "n_degenerate": c["n_degenerate"],
        "splits": c["splits"],
        "labeled_by_split": {k: int(v) for k, v in ok[ok.has_label].split.value_counts().sort_index().items()},
        "polarity": {k: int(v) for k, v in ok.polarity.value_counts().sort_index().items()},
        "qc_flags": dict(sorted(flags.items())),
        "fg_fraction": _summary(fg),
        "label_status": {k: int(v) for k, v in ok.label_status.value_counts().sort_index().items() if k},
        "failures_by_code": c["failures_by_code"],
        "skipped_by_code": c["skipped_by_code"],
        "failures": [{"source": s, "reason": r, "code": c} for s, r, c in zip(failed.source, failed.reason, failed.reason_code)],
        "skipped": [{"source": s, "reason": r, "code": c} for s, r, c in zip(skipped.source, skipped.reason, skipped.reason_code)],
    }


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    q = np.percentile(values, [0, 5, 25, 50, 75, 95, 100])
    return {k: round(float(v), 4) for k, v in zip(["min", "p5", "p25", "median", "p75", "p95", "max"], q)} | {
        "mean": round(float(values.mean()), 4)
    }


def format_report(rep: dict[str, Any], max_list: int = 20) -> str:
    lines = [
        f"store      {rep['store']}  (schema v{rep['schema_version']}, {rep['size']}x{rep['size']}, {rep['n_rows']} rows)",
        f"inputs     {rep['n_inputs']}   records: {rep['n_ok']} ok, {rep['n_failed']} failed, {rep['n_skipped']} skipped",
        f"splits     {_kv(rep['splits'])}   labeled: {rep['n_labeled']} ({_kv(rep['labeled_by_split'])})",
        f"polarity   {_kv(rep['polarity'])}",
        f"QC flags   {_kv(rep['qc_flags']) or 'none'}   degenerate (excluded from pretraining): {rep['n_degenerate']}",
    ]
    if rep["fg_fraction"]:
        f = rep["fg_fraction"]
        lines.append(f"foreground median {f['median']:.3f}  (p5 {f['p5']:.3f}, p95 {f['p95']:.3f}, mean {f['mean']:.3f})")
    if rep["label_status"]:
        lines.append(f"labels     {_kv(rep['label_status'])}")
    if rep["skipped_by_code"]:
        lines.append(f"skipped    {_kv(rep['skipped_by_code'])}")
    if rep["failures_by_code"]:
        lines.append(f"failures   {_kv(rep['failures_by_code'])}")
        lines += capped([f"  FAILED {item['source']}: {item['reason']}" for item in rep["failures"]], max_list,
                        "  ... and {n} more (--json lists all)")
    return "\n".join(lines)


def capped(lines: list[str], max_list: int, more: str) -> list[str]:
    """The first ``max_list`` of ``lines``, then ``more`` (a template with ``{n}``) saying how many were left out."""
    return lines[:max_list] + ([more.format(n=len(lines) - max_list)] if len(lines) > max_list else [])


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())
