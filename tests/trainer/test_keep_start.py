"""``finetune.keep_start``: the starting weights are scored on val before the first step and are the first best.pt
candidate; the fine-tune's trajectory is the same with and without it."""
from __future__ import annotations

import json

import pytest
import torch
from medsass.trainer import checkpoint as ck_mod
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
    assert best["best"] == top and best["step"] == next(s for s, v in vals if v == top) == best["best_step"]


def test_keep_start_keeps_the_pretrained_weights_when_no_fine_tuned_checkpoint_beats_them(tmp_path, store, monkeypatch):
    cfg = _cfg(tmp_path, store, True)
    run_stages(cfg, ["pretrain"])
    scores = iter([0.9, 0.5, 0.6])  # the fine-tune's val checks: the start, step 2, step 4
    monkeypatch.setattr(loop_mod, "val_iou", lambda *a, **k: next(scores))
    summary = run_stages(cfg, ["finetune"])["finetune"].metrics
    assert summary["start_kept"] is True and summary["best_step"] == 0
    notes = [json.loads(x).get("note", "") for x in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert any("best.pt is the pretrained model" in n for n in notes)
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
    row["train_metrics"]["best_val_iou"] = 0.7
    recipe = Job("finetune", "d", "t", "end_to_end", 0, "/x", {}, {}, n_labels=1, needs="pre", recipe="strong_aug")
    got = kept_start(row, pre, recipe)  # a recipe's fine-tune has its own keep_start arm: the shipped default with it
    assert got[0]["arm"] == "end_to_end_kept+strong_aug" and got[0]["start_kept"]
    picked = kept_start(row, pre, Job("finetune", "d", "t", "end_to_end", 0, "/x", {}, {}, n_labels=1, needs="pre",
                                      strategy="uncertain"))  # suggest's picks too: is the pick worth it with keep_start?
    assert picked[0]["arm"] == "strategy_kept:uncertain" and picked[0]["start_kept"]


def test_the_report_compares_a_recipe_with_the_plain_fine_tune_both_under_keep_start():
    import numpy as np
    from medsass.trainer.study.report import Index, kept_recipe_block

    def run(arm, seed, tp, start="pre"):
        return {"dataset": "d", "eval": "test", "target": "t", "arm": arm, "n_labels": 1, "steps_factor": 1,
                "seed": seed, "start": start, "ids": ["a", "b"], "counts": np.array([[tp, 10 - tp, 0], [5, 0, 5]])}

    key = lambda arm, t, n: ("d", "test", t, arm, n, 1)  # noqa: E731
    kept_equal = [run("end_to_end", s, 6) for s in (0, 1)] + [run("end_to_end+strong_aug", s, 7) for s in (0, 1)]
    plain_kept = [run("end_to_end_kept", s, 6) for s in (0, 1)]
    recipe_kept = [run("end_to_end_kept+strong_aug", s, 7) for s in (0, 1)]
    # keep_start kept the start nowhere: the kept arms are the plain ones and the block would repeat the table above
    assert kept_recipe_block("strong_aug", "t", [1], Index(kept_equal + plain_kept + recipe_kept), key, "t", 50) == []
    recipe_kept = [run("end_to_end_kept+strong_aug", s, 9) for s in (0, 1)]  # the start (tp 9) kept under the recipe
    [block] = kept_recipe_block("strong_aug", "t", [1], Index(kept_equal + plain_kept + recipe_kept), key, "t", 50)
    assert block[2] == ("| labels | end-to-end, keep_start | end-to-end, keep_start + strong_aug | end-to-end, keep_start "
                        "+ strong_aug − end-to-end, keep_start |")
    assert block[4].startswith("| 1 | 0.550 ± 0.000 (2) | 0.700 ± 0.000 (2) | +0.150")


def test_keep_start_is_the_default_and_applies_only_to_a_fine_tune_from_a_whole_pretrained_model(tmp_path, store):
    assert load_config(tiny_train_config(tmp_path, {"syn": store})).finetune.keep_start
    for init in ("scratch", "encoder_only"):  # a (partly) random start is never the model to keep: no step-0 check
        out = tmp_path / init
        cfg = load_config(tiny_train_config(out, {"syn": store}, pretrain={"steps": 2, "mode": "encoder_only"},
                                            finetune={"steps": 2, "eval_every": 2, "init": init}))
        run_stages(cfg, ["pretrain", "finetune"] if init != "scratch" else ["finetune"])
        assert [s for s, _ in _val_lines(out)] == [2]
    cfg = _cfg(tmp_path / "e2e", store, True)
    run_stages(cfg, ["pretrain", "finetune"])
    assert [s for s, _ in _val_lines(tmp_path / "e2e")] == [0, 2, 4]


def test_evaluate_auto_scores_best_pt_where_the_fine_tune_had_val_labels_else_final_pt(tmp_path, store):
    def scored(out, **finetune):
        cfg = load_config(tiny_train_config(out, {"syn": store}, pretrain={"steps": 2},
                                            finetune={"steps": 4, "eval_every": 2, **finetune}, evaluate={"overlays": 0}))
        assert cfg.evaluate.checkpoint == "auto"  # the default
        run_stages(cfg)
        marker = json.loads((out / "evaluate" / "done").read_text())
        return {name for name in ("best.pt", "final.pt")
                if ck_mod.same_file(marker["checkpoint"], out / "finetune" / name)}

    assert "best.pt" in scored(tmp_path / "val")
    assert (tmp_path / "val" / "finetune" / "best.pt").is_file()
    # val in the fine-tune's own splits: no held-out labels, no best.pt, so final.pt (not the error `best` gives)
    assert scored(tmp_path / "noval", splits=["train", "val"]) == {"final.pt"}
    assert not (tmp_path / "noval" / "finetune" / "best.pt").exists()
    with pytest.raises(ConfigError, match="evaluate.checkpoint=finetune"):
        run_stages(load_config(tiny_train_config(tmp_path / "best", {"syn": store}, finetune={"splits": ["train", "val"]},
                                                 evaluate={"checkpoint": "best"})))


def test_an_older_fine_tune_without_keep_start_resumes_and_skips_with_keep_start_false(tmp_path, store):
    """Runs written before the option existed have no keep_start in their sections: false matches them."""
    from medsass.trainer.config import stage_section

    off = load_config(tiny_train_config(tmp_path, {"syn": store}, finetune={"keep_start": False}))
    assert "keep_start" not in stage_section(off, "finetune")["finetune"]
    assert stage_section(load_config(tiny_train_config(tmp_path, {"syn": store})), "finetune")["finetune"]["keep_start"]


def test_a_study_refuses_keep_start_in_its_train_section_and_runs_its_fine_tunes_without_it(tmp_path):
    from medsass.trainer.study.jobs import _identity, run_config
    from medsass.trainer.study.spec import load_study

    study = tmp_path / "s.yaml"
    study.write_text("name: s\nout_dir: out\nresults_dir: res\ndatasets: [{name: d, store: x.zarr, targets: [store]}]\n"
                     "train: {base: cpu_small, finetune: {keep_start: true}}\n")
    with pytest.raises(ConfigError, match="keep_start.*remove the key"):
        load_study(study)
    cfg = run_config({"finetune": {"steps": 3}}, "x.zarr", tmp_path, 0)
    assert cfg["finetune"]["keep_start"] is False and "keep_start" not in _identity(cfg)["finetune"]
