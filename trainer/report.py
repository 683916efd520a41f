"""``medsass-train report``: one self-contained HTML page describing a run folder.

Reads only what the stages wrote (no torch, no store access): ``<stage>/metrics.jsonl`` for the loss
and val-IoU curves, ``<stage>/done`` for the stage summaries, ``evaluate/metrics.json`` (with the
Otsu floor), ``evaluate/per_image.csv``, the best/worst overlay PNGs of ``evaluate/overlays/``
(embedded as they are) and the resolved ``config.yaml``.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from medsass import html_report as H
from medsass.errors import ConfigError

TRAIN_STAGES = ("pretrain", "finetune")
OVERLAY_RE = re.compile(r"^(?P<split>.+?)_(?P<kind>best|worst)(?P<rank>\d+)_(?P<store>.+)_row(?P<row>\d+)_iou(?P<iou>[0-9.]+)\.png$")


def build_run_report(run_dir: str | Path) -> str:
    """The report page of the run folder ``run_dir`` as an HTML string."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run folder {run} does not exist")
    if not any((run / s).is_dir() for s in (*TRAIN_STAGES, "evaluate")) and not (run / "config.yaml").exists():
        raise ConfigError(f"{run} is not a medsass run folder (no config.yaml, pretrain/, finetune/ or evaluate/)")
    body = [H.section("Stages", _stages(run))]
    for stage in TRAIN_STAGES:
        if (run / stage / "metrics.jsonl").exists():
            body.append(H.section(f"{stage}: training curves", _curves(run / stage / "metrics.jsonl", stage)))
    body += [
        H.section("Evaluation", _metrics(run / "evaluate")),
        H.section("Best and worst test images", _overlays(run / "evaluate")),
        H.section("Resolved config", _config(run)),
    ]
    return H.page(f"medsass run report: {run.name}", body, subtitle=str(run))


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Build the report of ``run_dir`` and write it to ``out`` (default ``RUN_DIR/report.html``)."""
    return H.write(Path(out) if out else Path(run_dir) / "report.html", build_run_report(run_dir))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; a torn last line (a run killed mid-write) is ignored."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stages(run: Path) -> str:
    rows = []
    for stage in (*TRAIN_STAGES, "evaluate"):
        folder = run / stage
        if not folder.is_dir():
            continue
        done = _read_json(folder / "done")
        metrics = (done or {}).get("metrics") or {}
        status = "done" if done else "resumable (last.pt)" if (folder / "last.pt").exists() else "incomplete"
        rows.append((stage, status, metrics.get("step", (done or {}).get("checkpoint_step")), metrics.get("best_val_iou"),
                     (done or {}).get("init", (done or {}).get("checkpoint_stage", ""))))
    if not rows:
        return "<p>No stage has run in this folder yet.</p>"
    return H.table(["stage", "status", "steps", "best val IoU", "init / checkpoint scored"], rows)


def _curves(path: Path, stage: str) -> str:
    lines = read_jsonl(path)
    loss = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    val = [(r["step"], r["val_iou"]) for r in lines if "val_iou" in r]
    if not loss and not val:
        return "<p>No metrics logged yet.</p>"
    fig = H.new_figure(9.0, 3.2)
    ax_loss, ax_val = fig.subplots(1, 2)
    if loss:
        ax_loss.plot(*zip(*loss), color="#4477aa", marker="." if len(loss) < 30 else None)
    ax_loss.set(title=f"{stage} training loss", xlabel="step", ylabel="loss")
    if val:
        ax_val.plot(*zip(*val), color="#228833", marker="o")
    ax_val.set(title=f"{stage} val IoU" + ("" if val else " (none logged)"), xlabel="step", ylabel="IoU", ylim=(0, 1))
    last = f"last loss {loss[-1][1]:.4f} at step {loss[-1][0]}" if loss else ""
    best = f"; best val IoU {max(v for _, v in val):.4f}" if val else ""
    return H.img(H.figure_png(fig), f"{stage} curves") + f'<p class="muted">{H.esc(last + best)}</p>'


def _metrics(folder: Path) -> str:
    metrics = _read_json(folder / "metrics.json")
    if not metrics:
        return "<p>No evaluate/metrics.json: the evaluate stage has not run.</p>"
    rows = []
    for split, m in metrics.items():
        floor = m.get("otsu_floor", {})
        rows.append((split, "all", m.get("n"), m.get("iou"), m.get("dice"), m.get("iou_per_image_mean"), m.get("dice_per_image_mean"),
                     floor.get("iou"), floor.get("iou_per_image_mean"), floor.get("dice")))
        for name, s in (m.get("stores") or {}).items():
            rows.append((split, name, s.get("n"), s.get("iou"), s.get("dice"), s.get("iou_per_image_mean"),
                         s.get("dice_per_image_mean"), None, None, None))
    tab = H.table(["split", "store", "n", "IoU", "Dice", "IoU per image", "Dice per image",
                   "pseudo-mask floor IoU", "floor IoU per image", "floor Dice"], rows)
    note = ('<p class="muted">IoU/Dice are micro scores (pixels pooled over the split, threshold 0.5); the pseudo-mask floor '
            "(<code>otsu_floor</code> in metrics.json) scores the stored pseudo-masks, whichever threshold method made "
            "them, against the same labels.</p>")
    return tab + note + _per_image_hist(folder / "per_image.csv")


def _per_image(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _per_image_hist(path: Path) -> str:
    rows = _per_image(path)
    if not rows:
        return ""
    fig = H.new_figure()
    ax = fig.add_subplot()
    model = np.array([float(r["iou"]) for r in rows])
    floor = np.array([float(r["pseudo_iou"]) for r in rows if r.get("pseudo_iou")])
    ax.hist(model, bins=20, range=(0, 1), alpha=0.7, label="model", color="#4477aa")
    if floor.size:
        ax.hist(floor, bins=20, range=(0, 1), alpha=0.5, label="Otsu pseudo-mask", color="#ee6677")
    ax.set(title=f"per-image IoU (n={model.size})", xlabel="IoU", ylabel="images")
    ax.legend()
    return H.img(H.figure_png(fig), "per-image IoU histogram")


def _overlays(folder: Path) -> str:
    files = sorted((folder / "overlays").glob("*.png")) if (folder / "overlays").is_dir() else []
    if not files:
        return "<p>No overlays (evaluate.overlays = 0, or the evaluate stage has not run).</p>"
    ids = {(r.get("split"), r.get("store"), r.get("row")): r.get("sample_id", "") for r in _per_image(folder / "per_image.csv")}
    groups: dict[str, list[tuple[int, str, bytes]]] = {}
    for f in files:
        m = OVERLAY_RE.match(f.name)
        if m:
            key = f"{m['split']}: {m['kind']}"
            sid = ids.get((m["split"], m["store"], m["row"]), "")
            caption = f"#{m['rank']} IoU {m['iou']} \u2014 {sid or m['store'] + ' row ' + m['row']}"
            groups.setdefault(key, []).append((int(m["rank"]), caption, f.read_bytes()))
        else:
            groups.setdefault("other", []).append((0, f.name, f.read_bytes()))
    legend = ('<p class="legend muted"><span style="color:#ff0000">&#9632; prediction outline</span>'
              '<span style="color:#00c000">&#9632; target outline</span></p>')
    parts = [legend]
    for key in sorted(groups, key=lambda k: (k.split(":")[0], "worst" in k)):
        figs = "".join(H.figure(png, cap, width=220) for _, cap, png in sorted(groups[key], key=lambda t: t[0]))
        parts.append(f"<h3>{H.esc(key)}</h3><div class=\"grid\">{figs}</div>")
    return "".join(parts)


def _config(run: Path) -> str:
    path = run / "config.yaml"
    if not path.exists():
        return "<p>No config.yaml in the run folder.</p>"
    return f"<pre>{H.esc(path.read_text())}</pre>"
