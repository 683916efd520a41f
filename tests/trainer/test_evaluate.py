"""Evaluation: metrics as smp computes them, the Otsu floor, report files, zero-shot checkpoints."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from medsass.trainer import checkpoint as ck
from medsass.trainer.config import ModelConfig, load_config
from medsass.trainer.distributed import DistInfo
from medsass.trainer.evaluate import EvalSource, eval_rows, evaluate_split, overlay_png
from medsass.trainer.metrics import confusion, summarize
from medsass.trainer.model import build_model, model_args
from medsass.trainer.run import run_stages
from torch import nn

from medsass.testing import TINY_ENCODER, tiny_train_config


def tiny(tmp_path, store, **sections):
    """The tiny run on tests/trainer/conftest.py's store."""
    return load_config(tiny_train_config(tmp_path / "out", {"syn": store}, **sections))


def test_micro_and_per_image_scores_match_smp_metrics():
    import segmentation_models_pytorch as smp

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 1, 16, 16, generator=g)
    target = (torch.rand(6, 1, 16, 16, generator=g) > 0.5).long()
    ours = summarize(confusion(probs >= 0.5, target).numpy())
    tp, fp, fn, tn = smp.metrics.get_stats(probs, target, mode="binary", threshold=0.5)
    assert ours["iou"] == pytest.approx(smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro").item())
    assert ours["dice"] == pytest.approx(smp.metrics.f1_score(tp, fp, fn, tn, reduction="micro").item())
    assert ours["iou_per_image_mean"] == pytest.approx(smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro-imagewise").item())
    assert ours["n"] == 6


def test_empty_prediction_on_empty_label_scores_one_per_image():
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    full = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    counts = torch.cat([confusion(empty, empty), confusion(full, empty)]).numpy()
    s = summarize(counts)
    assert (s["iou_per_image_mean"], s["dice_per_image_mean"]) == (0.5, 0.5)  # (1 + 0) / 2
    assert s["iou"] == 0.0  # micro: 16 false positives, nothing right


class AllForeground(nn.Module):
    def forward(self, x):
        return torch.full_like(x, 10.0)


def test_evaluate_split_against_numpy_and_otsu_floor(store):
    from medsass.store import open_store

    rows = eval_rows(store, "test", "label")
    metrics, records = evaluate_split(AllForeground(), [EvalSource("syn", store, rows, "label")], batch_size=5,
                                      dist=DistInfo(), amp=None, threshold=0.5)
    group, _ = open_store(store)
    label = np.asarray(group["label"][rows]) > 0
    pseudo = np.asarray(group["pseudo_mask"][rows]) > 0
    assert metrics["n"] == len(rows) == len(records)
    assert metrics["iou"] == pytest.approx(label.sum() / label.size)
    per_image = (label.sum((1, 2)) / label[0].size).mean()
    assert metrics["iou_per_image_mean"] == pytest.approx(per_image)
    inter, union = (pseudo & label).sum(), (pseudo | label).sum()
    assert metrics["otsu_floor"]["iou"] == pytest.approx(inter / union)
    assert [r["row"] for r in records] == rows.tolist()
    assert records[0]["pseudo_iou"] == pytest.approx((pseudo[0] & label[0]).sum() / (pseudo[0] | label[0]).sum())


def test_overlay_png_draws_both_outlines():
    from PIL import Image

    image = np.full((32, 32), 100, np.uint8)
    pred = np.zeros((32, 32), bool)
    pred[4:12, 4:12] = True
    label = np.zeros((32, 32), bool)
    label[16:28, 16:28] = True
    rgb = np.asarray(Image.open(io.BytesIO(overlay_png(image, pred, label))))
    assert rgb.shape == (256, 256, 3)
    assert ((rgb == (255, 0, 0)).all(-1)).any() and ((rgb == (0, 255, 0)).all(-1)).any()


def test_evaluate_stage_writes_report_for_a_checkpoint_path(tmp_path, store):
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=TINY_ENCODER))
    path = tmp_path / "model.pt"
    ck.save(path, {"kind": "final", "stage": "finetune", "model": model.state_dict(), "model_args": model_args(ModelConfig(encoder=TINY_ENCODER))})
    cfg = tiny(tmp_path, store, stages=["evaluate"], evaluate={"checkpoint": str(path), "splits": ["val", "test"], "overlays": 2})
    res = run_stages(cfg)["evaluate"]
    out = tmp_path / "out" / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == res.metrics and set(metrics) == {"val", "test"}
    for split in ("val", "test"):
        m = metrics[split]
        assert {"iou", "dice", "iou_per_image_mean", "dice_per_image_mean", "n", "otsu_floor"} <= set(m)
        assert {"iou", "iou_per_image_mean"} <= set(m["otsu_floor"])
        assert 0 <= m["iou"] <= 1 and m["n"] == len(eval_rows(store, split, "label"))
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == metrics["val"]["n"] + metrics["test"]["n"]
    assert {"sample_id", "row", "iou", "dice", "pseudo_iou"} <= set(rows[0]) and rows[0]["sample_id"].startswith("synthetic/")
    assert len(list((out / "overlays").glob("test_*.png"))) == 4
    assert run_stages(cfg)["evaluate"].status == "skipped"
    assert run_stages(tiny(tmp_path, store, stages=["evaluate"], evaluate={"checkpoint": str(path), "splits": ["test"]}))["evaluate"].status == "done"


def test_zero_shot_pretrained_model_against_labels_and_pseudo_masks(tmp_path, store):
    cfg = tiny(tmp_path, store, stages=["pretrain", "evaluate"], evaluate={"checkpoint": "pretrain"})
    res = run_stages(cfg)
    assert res["pretrain"].status == "done" and res["evaluate"].metrics["test"]["n"] > 0
    done = json.loads((tmp_path / "out" / "evaluate" / "done").read_text())
    assert done["checkpoint_stage"] == "pretrain"
    vs_pseudo = run_stages(tiny(tmp_path, store, stages=["evaluate"], evaluate={"checkpoint": "pretrain", "target": "pseudo_mask"}))
    m = vs_pseudo["evaluate"].metrics["test"]
    assert "otsu_floor" not in m and m["n"] > 0
