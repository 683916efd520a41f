"""The gallery of ``medsass-train suggest``: one self-contained HTML page the expert opens.

Per pick, side by side: the stored image, the image with the pseudo-mask's outline, and the image with
the zero-shot prediction's outline (threshold 0.5). PNGs are embedded as data URIs (medsass.html_report),
so the file opens offline and can be mailed as it is.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsass import html_report as H

PSEUDO_COLOUR = (0, 190, 255)  # cyan outline: the free threshold pseudo-mask
PRED_COLOUR = (255, 40, 40)  # red outline: the pretrained model's zero-shot prediction
PANEL_PX = 224


def pick_block(rec: dict[str, Any], image: np.ndarray, pseudo: np.ndarray, prob: np.ndarray, *, threshold: float = 0.5) -> str:
    """One pick: a heading, its reason and three panels (image, pseudo-mask, zero-shot prediction)."""
    panels = [
        H.figure(H.contour_overlay(image, [], size=PANEL_PX), "image"),
        H.figure(H.contour_overlay(image, [(pseudo > 0, PSEUDO_COLOUR)], size=PANEL_PX),
                 f"pseudo-mask (fg {float((pseudo > 0).mean()):.1%})"),
        H.figure(H.contour_overlay(image, [(prob >= threshold, PRED_COLOUR)], size=PANEL_PX),
                 f"zero-shot prediction (fg {float((prob >= threshold).mean()):.1%})"),
    ]
    head = f"#{rec['rank']} {rec['sample_id']}"
    return (f'<section class="pick" id="pick-{int(rec["rank"])}"><h2>{H.esc(head)}</h2>'
            f'<p>{H.esc(rec["reason"])}<br><span class="muted">file: {H.esc(rec["source_rel"])}; score {H.esc(H.fmt(rec["score"]))}; '
            f'entropy {H.esc(H.fmt(rec["entropy"]))}</span></p><div class="grid">{"".join(panels)}</div></section>')


def write_gallery(path: str | Path, picks: Sequence[dict[str, Any]], images: np.ndarray, pseudo: np.ndarray, probs: np.ndarray,
                  summary: dict[str, Any]) -> Path:
    """Write the gallery of ``picks`` (rank order) whose maps are ``images[i]``, ``pseudo[i]``, ``probs[i]``."""
    if not len(picks) == len(images) == len(pseudo) == len(probs):
        raise ValueError(f"gallery: {len(picks)} picks but {len(images)} / {len(pseudo)} / {len(probs)} maps")
    ck = summary["checkpoint"]
    intro = (f'<p>Please draw the segmentation mask of these {len(picks)} image(s), in rank order. '
             f'Each row shows the image, the automatic threshold pseudo-mask '
             f'(<span style="color:rgb{PSEUDO_COLOUR}">cyan</span>) and the pretrained model\'s zero-shot prediction '
             f'(<span style="color:rgb{PRED_COLOUR}">red</span>); neither is the answer. The files are listed in '
             f'picks.csv (source_rel: path relative to the folder the store was built from).</p>')
    overview = H.table(["rank", "sample_id", "file", "score", "reason"],
                       [(r["rank"], r["sample_id"], r["source_rel"], r["score"], r["reason"]) for r in picks])
    params = H.kv_table({"strategy": summary["strategy"], "n": summary["n"], "seed": summary["seed"],
                         "candidates": summary["candidates"], "left out": summary["excluded"],
                         "checkpoint": f"{ck['path']} (stage {ck['stage']}, step {ck['step']})", "store": summary["store"]["path"]})
    blocks = [pick_block(r, images[i], pseudo[i], probs[i], threshold=summary["threshold"]) for i, r in enumerate(picks)]
    doc = H.page("Images to label", [intro, H.section("Picks", overview), H.section("Parameters", params), *blocks],
                 subtitle=f"medsass-train suggest, strategy {summary['strategy']}, {summary['created']}")
    return H.write(path, doc)
