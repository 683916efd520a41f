"""The study's ``recipes``: fine-tune variants of an arm (same start, labels and seed), keyed apart from the arm, run
and reported next to it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from medsass.trainer.cli import main
from medsass.trainer.study import ledger
from medsass.trainer.study.jobs import StudyData, make_jobs, select
from medsass.trainer.study.spec import load_study

from medsass.errors import ConfigError, MedsassError
from medsass.testing import make_synthetic_store

torch.set_num_threads(1)
TINY = "tu-mobilenetv3_small_100"
GENTLE = {"name": "gentle", "finetune": {"encoder_lr_scale": 0.1}, "budgets": ["1"], "arms": ["end_to_end", "scratch"]}


def _write(tmp_path: Path, **extra) -> Path:
    data = {"out_dir": str(tmp_path / "out"), "results_dir": str(tmp_path / "res"), "seeds": [0, 1], "budgets": ["1", "2"],
            "arms": ["scratch", "end_to_end"], "convergence": None, "bootstrap": 200,
            "datasets": [{"name": "d", "store": "x.zarr", "targets": ["store"]}], "train": {"base": "cpu_small"}, **extra}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _jobs(tmp_path: Path, **extra):
    study, train = load_study(_write(tmp_path, **extra))
    data = [StudyData("d", {"store": "x.zarr"}, {}, {}, 10, digests={"store": "abc", "images": "def"})]
    return make_jobs(study, train, data)


def test_recipe_runs_are_new_keys_beside_the_arms_they_vary(tmp_path):
    base = _jobs(tmp_path)
    jobs = _jobs(tmp_path, recipes=[GENTLE])
    assert [j.key for j in jobs if not j.recipe] == [j.key for j in base]  # the grid's keys are untouched
    rec = [j for j in jobs if j.recipe]
    assert sorted((j.arm, j.seed, j.n_labels) for j in rec) == [("end_to_end", 0, 1), ("end_to_end", 1, 1),
                                                               ("scratch", 0, 1), ("scratch", 1, 1)]
    assert jobs[-len(rec):] == rec  # run after the grid
    for j in rec:
        twin = next(b for b in base if (b.arm, b.seed, b.n_labels, b.kind) == (j.arm, j.seed, j.n_labels, "finetune"))
        assert j.key != twin.key and j.needs == twin.needs  # the same pretrained start
        assert j.config["finetune"]["encoder_lr_scale"] == 0.1 and "encoder_lr_scale" not in twin.config["finetune"]
        same = {k: v for k, v in j.config["finetune"].items() if k != "encoder_lr_scale"}
        assert same == twin.config["finetune"]  # same labels (label_count, seed), same schedule
        assert j.dir.endswith(f"seed{j.seed}/n001_gentle" + ("/end_to_end" if j.arm == "end_to_end" else ""))
        assert j.label.endswith("recipe gentle")
    assert select(jobs, recipes=["none"]) == select(base)
    assert {j.key for j in select(jobs, recipes=["gentle"]) if j.kind == "finetune"} == {j.key for j in rec}


def test_recipes_that_cannot_be_run_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="define the comparison"):
        _jobs(tmp_path, recipes=[{**GENTLE, "finetune": {"label_count": 3}}])
    with pytest.raises(ConfigError, match="recipes.gentle: .*encoder_lr_scale"):
        _jobs(tmp_path, recipes=[{**GENTLE, "finetune": {"encoder_lr_scale": 2.0}}])
    with pytest.raises(ConfigError, match="lr_scael"):
        _jobs(tmp_path, recipes=[{**GENTLE, "finetune": {"encoder_lr_scael": 0.1}}])
    with pytest.raises(MedsassError, match="not targets of d"):
        _jobs(tmp_path, recipes=[{**GENTLE, "targets": ["otsu"]}])
    with pytest.raises(MedsassError, match="needs its pretraining"):
        _jobs(tmp_path, arms=["scratch"], recipes=[GENTLE])
    with pytest.raises(ConfigError, match="unique"):
        _jobs(tmp_path, recipes=[GENTLE, GENTLE])


def test_a_recipe_runs_on_the_arm_s_labels_and_is_reported_against_it(tmp_path):
    store = make_synthetic_store(tmp_path / "main.zarr", n=40, size=32, seed=0)
    path = _write(tmp_path, seeds=[0], budgets=["1"], datasets=[{"name": "d", "store": str(store), "targets": ["store"]}],
                  recipes=[GENTLE], train={
                      "base": "cpu_small", "model": {"encoder": TINY},
                      "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1},
                      "finetune": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 1, "label_fraction": None},
                      "evaluate": {"overlays": 0, "batch_size": 16, "checkpoint": "best"},
                      "runtime": {"device": "cpu", "num_workers": 0, "threads": 1, "progress": False, "tensorboard": False}})
    res = CliRunner().invoke(main, ["study", str(path)])
    assert res.exit_code == 0, res.output
    rows = list(ledger.read_ledger(tmp_path / "res").values())
    e2e = [r for r in rows if r["kind"] == "finetune" and r["arm"] == "end_to_end"]
    assert len(e2e) == 2 and e2e[0]["labeled_ids"] == e2e[1]["labeled_ids"]
    assert sorted(str(r.get("recipe")) for r in e2e) == ["None", "gentle"]  # the ledger row names its recipe
    scratch = [r for r in rows if r["kind"] == "finetune" and r["arm"] == "scratch"]
    assert len(scratch) == 2 and scratch[0]["labeled_ids"] == e2e[0]["labeled_ids"]
    run = yaml.safe_load((tmp_path / "out/runs/d/store/seed0/n001_gentle/end_to_end/config.yaml").read_text())
    assert run["finetune"]["encoder_lr_scale"] == 0.1
    table = (tmp_path / "res" / "table.md").read_text()
    assert (tmp_path / "res" / "d.png").stat().st_size > 1000
    for text in ("### Fine-tune recipes on the test split", "`gentle`: finetune {'encoder_lr_scale': 0.1}",
                 "end-to-end + gentle − end-to-end", "end-to-end + gentle − scratch",
                 "end-to-end + gentle − scratch + gentle", "scratch + gentle − scratch",
                 "Every arm of a (dataset, seed, labels) used the same labeled images"):
        assert text in table, text


def test_recipe_arms_are_named_after_the_arm_and_the_recipe():
    from medsass.trainer.study.spec import arm_label

    assert arm_label("end_to_end+gentle", "main", "main") == "end-to-end + gentle"
    assert arm_label("end_to_end+gentle", "otsu", "main") == "end-to-end (otsu) + gentle"
    assert arm_label("scratch+gentle", "otsu", "main") == "scratch + gentle"
    assert arm_label("end_to_end", "fov_otsu_hull+sites", "main") == "end-to-end (fov_otsu_hull+sites)"
