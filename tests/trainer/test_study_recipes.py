"""The study's ``recipes``: fine-tune variants of an arm (same start, labels and seed), keyed apart from the arm, run
and reported next to it."""
from __future__ import annotations

import csv
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


def _run_tiny_study(tmp_path: Path, recipes: list[dict], site: bool = False) -> None:
    """Run a one-seed, one-label study of ``recipes`` on a synthetic store (2 pretrain and 2 fine-tune steps), with a
    second synthetic store as site ``other`` if ``site``."""
    store = make_synthetic_store(tmp_path / "main.zarr", n=40, size=32, seed=0)
    data = {"name": "d", "store": str(store), "targets": ["store"]}
    if site:
        data["sites"] = [{"name": "other", "store": str(make_synthetic_store(tmp_path / "site.zarr", n=12, size=32, seed=5))}]
    path = _write(tmp_path, seeds=[0], budgets=["1"], datasets=[data],
                  recipes=recipes, train={
                      "base": "cpu_small", "model": {"encoder": TINY},
                      "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1},
                      "finetune": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 1, "label_fraction": None},
                      "evaluate": {"overlays": 0, "batch_size": 16, "checkpoint": "best"},
                      "runtime": {"device": "cpu", "num_workers": 0, "threads": 1, "progress": False, "tensorboard": False}})
    res = CliRunner().invoke(main, ["study", str(path)])
    assert res.exit_code == 0, res.output


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
    _run_tiny_study(tmp_path, [GENTLE])
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
    assert arm_label("scratch+gentle", "main", "main") == "scratch + gentle"
    assert arm_label("scratch+joint", "otsu", "main") == "scratch (otsu) + joint"  # a joint recipe's scratch fits otsu's masks
    assert arm_label("end_to_end", "fov_otsu_hull+sites", "main") == "end-to-end (fov_otsu_hull+sites)"
    from medsass.trainer.study.spec import teacher_arm

    assert teacher_arm("scratch", "selftrain") == "scratch+selftrain/teacher"
    assert arm_label(teacher_arm("scratch", "selftrain"), "otsu", "main") == "scratch, teacher of selftrain"  # plain scratch
    assert arm_label(teacher_arm("end_to_end", "selftrain"), "otsu", "main") == "end-to-end (otsu), teacher of selftrain"


LONG = {"name": "long", "finetune": {"steps": 4}, "budgets": ["1"], "arms": ["scratch"]}
CHECK = {"budgets": ["2"], "arms": ["scratch"], "factor": 2, "recipes": ["long"]}


def test_a_recipe_s_longer_schedule_is_checked_for_convergence_and_shared_work_runs_once(tmp_path):
    jobs = _jobs(tmp_path, arms=["scratch"], recipes=[LONG], convergence=CHECK, train={
        "base": "cpu_small", "finetune": {"steps": 2}})
    ft = {(j.recipe, j.n_labels, j.steps_factor, j.seed): j for j in jobs if j.kind == "finetune"}
    # the recipe at the check's budget is 4 steps, as the grid's 2x run there (which writes warmup_steps: 0 and the
    # recipe does not): the same work, run once in the grid run's folder and reported under both
    assert (("long", 2, 1, 0)) not in ft
    plain_x2 = ft[(None, 2, 2, 0)]
    assert plain_x2.aliases == [("long", 1)] and plain_x2.dir.endswith("seed0/n002_x2")
    long_x2 = ft[("long", 2, 2, 0)]
    assert long_x2.config["finetune"]["steps"] == 8 and long_x2.dir.endswith("seed0/n002_x2_long")
    assert ft[("long", 1, 1, 0)].config["finetune"]["steps"] == 4 and ("long", 1, 2, 0) not in ft
    chosen = {(j.recipe, j.n_labels, j.steps_factor) for j in select(jobs, recipes=["long"], seeds=[0])}
    assert chosen == {("long", 1, 1), (None, 2, 2), ("long", 2, 2)}  # the shared run is the recipe's too
    # a recipe whose schedule is not the grid's 2x one gets its own run at the check's budget
    jobs = _jobs(tmp_path, arms=["scratch"], recipes=[{**LONG, "finetune": {"steps": 3}}], convergence=CHECK,
                 train={"base": "cpu_small", "finetune": {"steps": 2}})
    ft = {(j.recipe, j.n_labels, j.steps_factor, j.seed): j for j in jobs if j.kind == "finetune"}
    assert ft[("long", 2, 1, 0)].config["finetune"]["steps"] == 3 and ft[("long", 2, 2, 0)].config["finetune"]["steps"] == 6
    assert not any(j.aliases for j in jobs)


def test_a_convergence_check_of_a_recipe_must_name_one_that_runs_a_checked_arm(tmp_path):
    with pytest.raises(ConfigError, match="'lnog' is not one of the study's recipes"):
        _jobs(tmp_path, arms=["scratch"], recipes=[LONG], convergence={**CHECK, "recipes": ["lnog"]})
    with pytest.raises(ConfigError, match="none of the arms the check re-runs"):
        _jobs(tmp_path, recipes=[{**LONG, "arms": ["end_to_end"]}], convergence=CHECK)


def test_the_report_checks_the_recipe_s_schedule_from_runs_shared_with_the_grid(tmp_path):
    store = make_synthetic_store(tmp_path / "main.zarr", n=40, size=32, seed=0)
    path = _write(tmp_path, seeds=[0], budgets=["1", "2"], arms=["scratch"], recipes=[LONG], convergence=CHECK,
                  datasets=[{"name": "d", "store": str(store), "targets": ["store"]}], train={
                      "base": "cpu_small", "model": {"encoder": TINY},
                      "finetune": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 1, "label_fraction": None},
                      "evaluate": {"overlays": 0, "batch_size": 16, "checkpoint": "best"},
                      "runtime": {"device": "cpu", "num_workers": 0, "threads": 1, "progress": False, "tensorboard": False}})
    res = CliRunner().invoke(main, ["study", str(path)])
    assert res.exit_code == 0, res.output
    rows = [r for r in ledger.read_ledger(tmp_path / "res").values() if r["kind"] == "finetune"]
    assert len(rows) == 5  # scratch at 1 and 2, its 2x run at 2 (= long at 2), long at 1, long 2x at 2
    table = (tmp_path / "res" / "table.md").read_text()
    conv = table.split("### Convergence check")[1]
    assert "| scratch | 2 |" in conv and "| scratch + long | 2 |" in conv
    recipes = table.split("### Fine-tune recipes on the test split")[1].split("###")[0]
    assert "| 2 |" in recipes and "| 1 |" in recipes  # long at the check's budget (from the grid's 2x run) too
    with open(tmp_path / "res" / "results.csv") as f:
        test = {(r["arm"], r["n_labels"], r["steps_factor"]): r["iou"] for r in csv.DictReader(f) if r["eval"] == "test"}
    assert test[("scratch+long", "2", "1")] == test[("scratch", "2", "2")]  # one run, reported as both
    assert ("scratch+long", "2", "2") in test and ("scratch+long", "1", "1") in test


def test_a_joint_recipe_keys_scratch_on_the_pseudo_masks_it_reads(tmp_path):
    joint = {"name": "joint", "finetune": {"pseudo_weight": 1.0}, "budgets": ["1"], "arms": ["scratch", "end_to_end"]}
    study, train = load_study(_write(tmp_path, recipes=[joint, GENTLE]))

    def keys(pseudo_digest: str) -> dict[tuple[str, str], str]:
        data = [StudyData("d", {"store": "x.zarr"}, {}, {}, 10, digests={"store": pseudo_digest, "images": "def"})]
        return {(j.recipe, j.arm): j.key for j in make_jobs(study, train, data) if j.recipe and j.seed == 0}

    a, b = keys("abc"), keys("other pseudo-masks")
    assert a[("joint", "scratch")] != b[("joint", "scratch")]  # a joint scratch run fits the pool's pseudo-masks
    assert a[("gentle", "scratch")] == b[("gentle", "scratch")]  # a plain scratch run never reads them
    assert a[("joint", "end_to_end")] != b[("joint", "end_to_end")]


def test_a_joint_recipe_runs_scratch_on_each_of_its_targets(tmp_path):
    # scratch under a joint recipe fits the pool's pseudo-masks: on the recipe's target (here not the main one), in that
    # target's folder, keyed on its masks; a plain recipe's scratch stays on the main target's store
    joint = {"name": "joint", "finetune": {"pseudo_weight": 1.0}, "budgets": ["1"], "arms": ["scratch", "end_to_end"],
             "targets": ["other"]}
    study, train = load_study(_write(tmp_path, recipes=[joint, GENTLE], other_targets={"arms": ["end_to_end"], "budgets": ["1"]}))

    def jobs(other_digest: str):
        data = [StudyData("d", {"store": "x.zarr", "other": "y.zarr"}, {}, {}, 10,
                          digests={"store": "abc", "other": other_digest, "images": "def"})]
        return {(j.recipe, j.arm): j for j in make_jobs(study, train, data) if j.recipe and j.seed == 0}

    a, b = jobs("o1"), jobs("o2")
    js = a[("joint", "scratch")]
    assert js.target == "other" and js.config["stores"]["main"] == "y.zarr" and js.config["finetune"]["init"] == "scratch"
    assert js.dir.endswith("/d/other/seed0/n001_joint/scratch")
    assert js.key != b[("joint", "scratch")].key  # the other target's masks are what it fits
    gs = a[("gentle", "scratch")]
    assert gs.target == "store" and gs.key == b[("gentle", "scratch")].key


def test_a_joint_recipe_from_scratch_is_reported_against_pretrain_then_fine_tune(tmp_path):
    joint = {"name": "joint", "finetune": {"pseudo_weight": 1.0}, "budgets": ["1"], "arms": ["scratch", "end_to_end"]}
    _run_tiny_study(tmp_path, [joint])
    recipes = (tmp_path / "res" / "table.md").read_text().split("### Fine-tune recipes on the test split")[1].split("###")[0]
    block = next(b for b in recipes.split("`joint`")[1:] if "| scratch | scratch + joint |" in b)
    for text in ("scratch + joint − scratch", "scratch + joint − end-to-end |", "scratch + joint − end-to-end, keep_start"):
        assert text in block, text


TEACHER = {"name": "selftrain", "finetune": {"pseudo_weight": 1.0}, "budgets": ["1"], "arms": ["scratch", "end_to_end"],
           "teacher": True}


def test_a_teacher_recipe_needs_a_joint_fine_tune(tmp_path):
    with pytest.raises((ConfigError, ValueError), match="teacher"):
        load_study(_write(tmp_path, recipes=[{**GENTLE, "teacher": True}]))


def test_a_teacher_recipe_is_taught_by_the_arm_s_plain_run_through_a_store_copy(tmp_path):
    jobs = _jobs(tmp_path, recipes=[TEACHER, {**TEACHER, "name": "joint", "teacher": False}])
    plain = {(j.arm, j.seed): j for j in jobs if not j.recipe and j.n_labels == 1}
    taught = [j for j in jobs if j.recipe == "selftrain"]
    joint = {(j.arm, j.seed): j for j in jobs if j.recipe == "joint"}
    assert sorted((j.arm, j.seed) for j in taught) == [("end_to_end", 0), ("end_to_end", 1), ("scratch", 0), ("scratch", 1)]
    for j in taught:
        p = plain[(j.arm, j.seed)]
        assert j.teacher["key"] == p.key and j.teacher["store"] == p.config["stores"]["main"] == "x.zarr"
        # the teacher is the plain run's config, trained again inside this run's folder
        assert j.teacher["config"] == {**p.config, "out_dir": f"{j.dir}/teacher"}
        assert j.config["stores"]["main"] == f"{j.dir}/pool.zarr" and j.config["pretrain"]["target"] == "pseudo_labels/teacher"
        assert j.needs == p.needs and j.config["finetune"]["pretrained"] == p.config["finetune"]["pretrained"]
        assert j.key != joint[(j.arm, j.seed)].key  # the same finetune keys as a joint recipe, other targets


def test_a_teacher_recipe_runs_end_to_end_and_is_reported_against_its_teacher(tmp_path):
    _run_tiny_study(tmp_path, [TEACHER])
    rows = ledger.read_ledger(tmp_path / "res")
    taught = [r for r in rows.values() if r.get("recipe") == "selftrain"]
    assert sorted(r["arm"] for r in taught) == ["end_to_end", "scratch"]
    for r in taught:
        t = r["teacher"]
        assert t["labeled_ids"] == r["labeled_ids"] and len(t["evals"]["test"]["counts"]) == len(r["evals"]["test"]["counts"])
        assert 0.0 <= t["pool_agreement"]["iou"] <= 1.0 and t["pool_agreement"]["n"] > 0
        plain = next(p for p in rows.values() if not p.get("recipe") and p["arm"] == r["arm"] and p["kind"] == "finetune")
        assert t["key"] == plain["key"] and t["labeled_ids"] == plain["labeled_ids"]
    pools = sorted((tmp_path / "out").rglob("pool.zarr"))
    assert len(pools) == 2 and not list((tmp_path / "out").rglob("pool.zarr.partial"))
    for pool in pools:  # the teacher's labels: its predictions on the pool (train, val), never on test
        import zarr
        from medsass.manifest import read_manifest
        labels = zarr.open_group(str(pool), mode="r")["pseudo_labels/teacher"][:]
        df = read_manifest(pool)
        test_rows = df.loc[(df["split"] == "test") & (df["row"] >= 0), "row"].to_numpy()
        assert labels[test_rows].sum() == 0 and set(map(int, labels.ravel())) <= {0, 1}
    recipes = (tmp_path / "res" / "table.md").read_text().split("### Fine-tune recipes on the test split")[1].split("###")[0]
    assert "scratch + selftrain − scratch, teacher of selftrain" in recipes
    assert "end-to-end + selftrain − end-to-end, teacher of selftrain" in recipes
    # run again: everything is in the ledger, nothing reruns
    before = (tmp_path / "res" / "results.jsonl").read_text()
    res = CliRunner().invoke(main, ["study", str(tmp_path / "s.yaml")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "res" / "results.jsonl").read_text() == before


RELABEL = {"name": "relabel", "relabel": True, "budgets": ["1", "2"]}


def test_a_relabel_recipe_needs_a_pretrained_arm_and_a_plain_fine_tune(tmp_path):
    load_study(_write(tmp_path, recipes=[RELABEL]))  # no finetune keys needed: the start is what changes
    for bad, match in [({"arms": ["scratch"]}, "pseudo-mask arms"), ({"teacher": True}, "relabel"),
                       ({"finetune": {"pseudo_weight": 1.0}}, "relabel")]:
        with pytest.raises((ConfigError, ValueError), match=match):
            load_study(_write(tmp_path, recipes=[{**RELABEL, **bad}]))


def test_a_relabel_recipe_fine_tunes_from_a_pretraining_on_the_start_s_labels_shared_by_its_budgets(tmp_path):
    from dataclasses import replace

    from medsass.trainer.study.jobs import start_from

    jobs = _jobs(tmp_path, recipes=[RELABEL])
    pre = {j.seed: j for j in jobs if j.kind == "pretrain"}
    plain = {(j.seed, j.n_labels): j for j in jobs if j.arm == "end_to_end" and not j.recipe}
    runs = [j for j in jobs if j.recipe == "relabel"]
    assert sorted((j.seed, j.n_labels) for j in runs) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for j in runs:
        start, shared = pre[j.seed], f"{pre[j.seed].dir}/relabel"
        assert j.needs == start.key and j.key != plain[(j.seed, j.n_labels)].key
        assert j.relabel["source"] == f"{start.dir}/pretrain/final.pt" and j.relabel["store"] == "x.zarr"
        assert j.relabel["dir"] == shared and j.config["finetune"]["pretrained"] == f"{shared}/pretrain/final.pt"
        # the pretraining on the labels: the start's own config, on the store copy and the new labels
        rc = j.relabel["config"]
        assert rc["out_dir"] == shared and rc["stores"] == {"main": f"{shared}/pool.zarr"}
        assert rc["pretrain"] == {**start.config["pretrain"], "target": "pseudo_labels/relabel"}
        assert j.relabel["rule"]["threshold"] == "match_fg" and j.config["stores"]["main"] == "x.zarr"
    assert len({j.relabel["dir"] for j in runs if j.seed == 0}) == 1  # the budgets of a start share it
    # started from an adopted rerun of the start: the shared folder is the rerun's own
    moved = start_from(runs[0], replace(pre[runs[0].seed], realization=2))
    assert moved.relabel["dir"] == f"{pre[runs[0].seed].dir}/relabel@rerun2"
    assert moved.config["finetune"]["pretrained"] == f"{moved.relabel['dir']}/pretrain/final.pt"
    assert moved.relabel["config"]["stores"]["main"] == f"{moved.relabel['dir']}/pool.zarr"
    assert moved.relabel["source"] == runs[0].relabel["source"]  # the rerun's checkpoint is in the start's folder


def test_a_relabel_recipe_runs_end_to_end_once_per_start_and_is_reported(tmp_path):
    import zarr
    from medsass.manifest import read_manifest

    _run_tiny_study(tmp_path, [{**RELABEL, "budgets": ["1", "2"]}], site=True)
    rows = ledger.read_ledger(tmp_path / "res")
    runs = [r for r in rows.values() if r.get("recipe") == "relabel"]
    assert sorted(r["n_labels"] for r in runs) == [1, 2] and all(r["arm"] == "end_to_end" for r in runs)
    shared = tmp_path / "out" / "runs" / "d" / "store" / "seed0" / "relabel"
    assert runs[0]["relabel"] == runs[1]["relabel"]  # made once, by whichever run came first
    info = runs[0]["relabel"]
    assert info["rule"]["threshold_rule"] == "match_fg" and 0 < info["rule"]["threshold"] < 1
    assert set(info["evals"]) == {"test", "val", "site:other"} and info["pool_agreement"]["labels"]["n"] > 0
    assert len(info["evals"]["site:other"]["counts"]) == len(runs[0]["evals"]["site:other"]["counts"]) > 0
    pool = shared / "pool.zarr"
    labels = zarr.open_group(str(pool), mode="r")["pseudo_labels/relabel"][:]
    df = read_manifest(pool)
    test_rows = df.loc[(df["split"] == "test") & (df["row"] >= 0), "row"].to_numpy()
    assert labels[test_rows].sum() == 0 and labels.sum() > 0 and set(map(int, labels.ravel())) <= {0, 1}
    assert not (shared.parent / "relabel" / "pool.zarr.partial").exists() and (shared / "pretrain" / "final.pt").exists()
    for r in runs:  # fine-tuned from the re-labelled pretraining, on the main store
        cfg = yaml.safe_load((Path(tmp_path / "out" / "runs" / "d" / "store" / "seed0" / f"n{r['n_labels']:03d}_relabel"
                                   / "end_to_end" / "config.yaml")).read_text())
        assert cfg["finetune"]["pretrained"] == str(shared / "pretrain" / "final.pt")
    table = (tmp_path / "res" / "table.md").read_text()
    recipes = table.split("### Fine-tune recipes on the test split")[1].split("###")[0]
    assert "end-to-end + relabel − end-to-end" in recipes and "the pool re-labelled by the pretrained model" in recipes
    assert "relabel start: pretrain" in table  # its compute, counted once
    at_site = table.split("### Fine-tune recipes on other")[1].split("###")[0]  # the start's zero-shot score there too
    assert "without labels the re-labelled pretraining scores" in at_site
    before = (tmp_path / "res" / "results.jsonl").read_text()
    res = CliRunner().invoke(main, ["study", str(tmp_path / "s.yaml")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "res" / "results.jsonl").read_text() == before


def test_a_relabel_start_made_before_its_sites_were_scored_is_scored_there_once(tmp_path, monkeypatch):
    from dataclasses import replace

    from medsass.manifest import read_json, write_json
    from medsass.trainer.study import execute

    run = next(j for j in _jobs(tmp_path, recipes=[RELABEL]) if j.recipe == "relabel")
    job = replace(run, sites={"a": "a.zarr", "b": "b.zarr"})
    shared = tmp_path / "shared"
    (shared / "pretrain").mkdir(parents=True)
    old = {"evals": {"test": {"ids": ["t"], "counts": [[1, 0, 0]]}, "site:a": {"ids": ["x"], "counts": [[2, 0, 0]]}},
           "seconds": {"pretrain": 1.0}}
    write_json(old, shared / "relabel.json")
    calls = []

    def fake_site(j, site, store, ckpt):
        calls.append((j.dir, site, store, str(ckpt)))
        return {"ids": ["y"], "counts": [[3, 1, 0]], "floor_counts": []}

    monkeypatch.setattr(execute, "_evaluate_site", fake_site)
    info = execute._relabel_sites(job, shared, run.relabel["config"], read_json(shared / "relabel.json"),
                                  shared / "relabel.json")
    # only the missing site, from the re-labelled pretraining's checkpoint, scored in the shared folder
    assert calls == [(str(shared), "b", "b.zarr", str(shared / "pretrain" / "final.pt"))]
    assert info["evals"]["site:a"] == old["evals"]["site:a"] and info["evals"]["site:b"]["counts"] == [[3, 1, 0]]
    assert read_json(shared / "relabel.json") == info and "sites" in info["seconds"]
    execute._relabel_sites(job, shared, run.relabel["config"], info, shared / "relabel.json")
    assert len(calls) == 1  # nothing left to score
