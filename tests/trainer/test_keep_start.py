"""``finetune.keep_start``: the starting weights are scored on val before the first step and are the first best.pt
candidate; the fine-tune's trajectory is the same with and without it."""
from __future__ import annotations

import json

import pytest
import torch
from medsass.trainer import loop as loop_mod
from medsass.trainer.config import load_config
from medsass.trainer.run import run_stages

from medsass.errors import ConfigError
from medsass.testing import tiny_train_config


def _cfg(out, store, keep_start: bool):
    return load_config(tiny_train_config(out, {"syn": store}, pretrain={"steps": 2},
                                         finetune={"steps": 4, "eval_every": 2, "keep_start": keep_start},
                                         evaluate={"overlays": 0, "checkpoint": "best"}))


def _val_lines(out):
    lines = [json.loads(x) for x in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_iou"]) for r in lines if "val_iou" in r]


def test_keep_start_scores_the_start_and_leaves_the_trajectory_alone(tmp_path, store):
    off, on = tmp_path / "off", tmp_path / "on"
    run_stages(_cfg(off, store, False), ["pretrain", "finetune"])
    run_stages(_cfg(on, store, True), ["pretrain", "finetune"])
    assert [s for s, _ in _val_lines(off)] == [2, 4]
    vals = _val_lines(on)
    assert [s for s, _ in vals] == [0, 2, 4]
    assert [v for _, v in vals][1:] == [v for _, v in _val_lines(off)]  # the same fine-tune, one more val check
    final_off = torch.load(off / "finetune" / "final.pt", weights_only=True)["model"]
    final_on = torch.load(on / "finetune" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(final_off[k], final_on[k]) for k in final_off)
    best = torch.load(on / "finetune" / "best.pt", weights_only=True)
    top = max(v for _, v in vals)
    assert best["best"] == top and best["step"] == next(s for s, v in vals if v == top)


def test_keep_start_keeps_the_pretrained_weights_when_no_fine_tuned_checkpoint_beats_them(tmp_path, store, monkeypatch):
    cfg = _cfg(tmp_path, store, True)
    run_stages(cfg, ["pretrain"])
    scores = iter([0.9, 0.5, 0.6])  # the fine-tune's val checks: the start, step 2, step 4
    monkeypatch.setattr(loop_mod, "val_iou", lambda *a, **k: next(scores))
    run_stages(cfg, ["finetune"])
    best = torch.load(tmp_path / "finetune" / "best.pt", weights_only=True)
    start = torch.load(tmp_path / "pretrain" / "final.pt", weights_only=True)["model"]
    assert best["step"] == 0 and best["best"] == 0.9
    assert all(torch.equal(best["model"][k], start[k]) for k in start)
    res = run_stages(cfg, ["evaluate"])  # evaluate.checkpoint: best scores the pretrained weights
    assert res["evaluate"].metrics


def test_the_study_reports_keep_start_from_the_pretraining_val_evaluation():
    from medsass.trainer.study.jobs import Job
    from medsass.trainer.study.report import kept_start

    job = Job("finetune", "d", "t", "end_to_end", 0, "/x", {}, {}, n_labels=1, needs="pre")

    def ev(*counts):  # per-image [tp, fp, fn, tn]
        return {"ids": [f"i{k}" for k in range(len(counts))], "counts": [list(c) for c in counts], "floor_counts": []}

    pre = {"evals": {"val": ev((8, 1, 1, 90)), "test": ev((7, 0, 3, 90), (1, 0, 0, 99))}}  # start: val IoU 0.8
    row = {"evals": {"test": ev((5, 5, 0, 90), (1, 1, 0, 98))}, "train_metrics": {"best_val_iou": 0.7}}
    got = kept_start(row, pre, job)
    assert [e["eval"] for e in got] == ["test"] and got[0]["start_kept"]
    assert got[0]["counts"].tolist() == pre["evals"]["test"]["counts"]
    row["train_metrics"]["best_val_iou"] = 0.81  # a fine-tuned checkpoint beat the start: the fine-tune's own scores
    got = kept_start(row, pre, job)
    assert not got[0]["start_kept"] and got[0]["counts"].tolist() == row["evals"]["test"]["counts"]
    assert kept_start(row, {"evals": {"test": pre["evals"]["test"]}}, job) == []  # an older line without val: no arm
    scratch = Job("finetune", "d", "t", "scratch", 0, "/x", {}, {}, n_labels=1)
    assert kept_start(row, pre, scratch) == []


def test_keep_start_with_the_final_checkpoint_evaluated_is_an_error_that_says_what_to_change(tmp_path, store):
    with pytest.raises(ConfigError, match="set evaluate.checkpoint: best"):
        load_config(tiny_train_config(tmp_path, {"syn": store}, finetune={"keep_start": True},
                                      evaluate={"checkpoint": "finetune"}))
