"""medsass-train study: stats with known answers, the grid, and a tiny study end to end (synthetic stores, a few
steps per stage): every arm incl. SimCLR, a cross-site store, the convergence check, the report, and resume."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from medsass.testing import TINY_ENCODER, make_synthetic_store, tiny_study_train
from medsass.trainer.cli import main
from medsass.trainer.study import ledger
from medsass.trainer.study.spec import budget_count, load_study, parse_budget
from medsass.trainer.study.stats import estimate, micro_iou, paired_difference

torch.set_num_threads(1)
TINY = TINY_ENCODER


def test_budgets():
    assert [budget_count(b, 28) for b in ["1", "2", "5", "10%", "100%"]] == [1, 2, 5, 3, 28]
    assert [budget_count(b, 2) for b in ["1", "5", "100%"]] == [1, 2, 2]
    for bad in ["0", "abc", "0%", "150%"]:
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_micro_iou_and_intervals():
    assert micro_iou(np.array([[1, 1, 0], [3, 0, 1]])) == pytest.approx(4 / 6)
    rng = np.random.default_rng(0)
    base = rng.integers(50, 100, size=(3, 40, 3))
    better = base.copy()
    better[..., 1] = 0  # no false positives: strictly better on every image and seed
    d = paired_difference(better, base, reps=500)
    assert d.mean > 0 and d.lo > 0 and d.excludes_zero
    same = paired_difference(base, base, reps=500)
    assert same.mean == 0 and same.lo == 0 and same.hi == 0 and not same.excludes_zero
    e = estimate(base, reps=500)
    assert e.lo <= e.mean <= e.hi and e.n_seeds == 3
    with pytest.raises(ValueError):
        paired_difference(base[:2], base, reps=100)


def test_ledger_drops_torn_last_line(tmp_path):
    ledger.append(tmp_path, {"key": "a", "x": 1})
    with ledger.ledger_path(tmp_path).open("ab") as fh:
        fh.write(b'{"key": "b", "x": ')
    with pytest.warns(UserWarning, match="torn last line"):
        assert set(ledger.read_ledger(tmp_path)) == {"a"}
    with pytest.warns(UserWarning):
        ledger.append(tmp_path, {"key": "c"})
    assert set(ledger.read_ledger(tmp_path)) == {"a", "c"}
    ledger.ledger_path(tmp_path).write_text('{"key": "a"}\nnot json\n{"key": "c"}\n')
    with pytest.raises(Exception, match="line 2"):
        ledger.read_ledger(tmp_path)


def _study(tmp_path: Path, **extra) -> Path:
    main_store = make_synthetic_store(tmp_path / "main.zarr", n=40, size=32, seed=0)
    site = make_synthetic_store(tmp_path / "site.zarr", n=12, size=32, seed=5)
    data = {
        "name": "tiny", "out_dir": str(tmp_path / "out"), "results_dir": str(tmp_path / "results"), "seeds": [0],
        "budgets": ["1", "100%"], "arms": ["scratch", "end_to_end", "encoder_only", "ssl"], "jobs": 1, "bootstrap": 200,
        "convergence": {"budgets": ["1"], "arms": ["scratch"], "factor": 2},
        "strategies": {"names": ["diverse", "hybrid"], "budgets": ["5"]},
        "ssl": {"steps": 3, "batch_size": 4},
        "datasets": [{"name": "synth", "store": str(main_store), "targets": ["store"],
                      "sites": [{"name": "other", "store": str(site)}], "pool_sites": True}],
        "other_targets": {"arms": ["end_to_end"], "budgets": ["1"]},
        "train": tiny_study_train(),
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_study_end_to_end_and_resume(tmp_path):
    path = _study(tmp_path)
    res = CliRunner().invoke(main, ["study", str(path)])
    assert res.exit_code == 0, res.output
    rows = ledger.read_ledger(tmp_path / "results")
    kinds = sorted((r["kind"], r["arm"]) for r in rows.values())
    # 1 pretrain, 1 ssl, scratch / e2e / enc / ssl at n=1 and n=24 (100%), scratch x2 at n=1
    assert kinds.count(("pretrain", "pretrain")) == 2 and kinds.count(("ssl", "ssl_pretrain")) == 1  # + pooled with the site
    assert kinds.count(("finetune", "scratch")) == 3 and kinds.count(("finetune", "ssl")) == 2
    picked = [r for r in rows.values() if r.get("strategy")]
    assert sorted(r["strategy"] for r in picked) == ["diverse", "hybrid"] and len(kinds) == 16  # + e2e at n=5, pooled e2e
    for r in picked:  # fine-tuned on exactly the suggested images
        picks = tmp_path / f"out/runs/synth/store/seed0/n005/end_to_end_{r['strategy']}/suggest/picks.csv"
        with picks.open() as fh:
            assert sorted(p["sample_id"] for p in csv.DictReader(fh)) == r["labeled_ids"]
    fine = [r for r in rows.values() if r["kind"] == "finetune"]
    for r in fine:
        assert set(r["evals"]) == {"test", "site:other"} and len(r["evals"]["site:other"]["ids"]) == 12
        assert len(r["labeled_ids"]) == r["n_labels"]
    # pairing: every arm of (seed, n) saw the same labeled images
    by = {}
    for r in fine:
        if r.get("strategy"):
            continue  # picked by suggest, not the seeded subset
        by.setdefault((r["seed"], r["n_labels"]), set()).add(tuple(r["labeled_ids"]))
    assert all(len(v) == 1 for v in by.values())
    pooled = next(r for r in rows.values() if r["kind"] == "pretrain" and r["target"] == "store+sites")
    pool_cfg = yaml.safe_load((tmp_path / "out/runs/synth/store+sites/seed0/config.yaml").read_text())
    assert set(pool_cfg["pretrain"]["stores"]) == {"main", "site_other"} and pool_cfg["evaluate"]["stores"] == ["main"]
    assert set(pooled["evals"]) == {"test", "site:other", "val"}  # val: the start's score, for the keep_start arm
    # the SSL checkpoint carries a trained encoder and loads into the fine-tune arm
    ssl_final = torch.load(tmp_path / "out/runs/synth/ssl/seed0/pretrain/final.pt", weights_only=True)
    assert ssl_final["mode"] == "encoder_only" and ssl_final["model_args"]["encoder_name"] == TINY
    table = (tmp_path / "results" / "table.md").read_text()
    for text in ("## synth", "Paired differences", "Cross-site", "Convergence check", "Compute", "SimCLR encoder",
                 "Which images to label", "hybrid − random", "The same with `finetune.keep_start`", "Errors on the test split", "Errors on other", "end-to-end (store+sites)",
                 "end-to-end (store+sites) − scratch", "### keep_start: fine-tunes that kept the pretrained model",
                 "Every arm of a (dataset, seed, labels) used the same labeled images"):
        assert text in table, text
    assert (tmp_path / "results" / "synth.png").stat().st_size > 1000
    assert (tmp_path / "results" / "synth_strategies.png").stat().st_size > 1000 and "synth_strategies.png" in table
    # arms that start from different pretrainings (end-to-end's, SimCLR's) pair by seed: their column has values
    lines = table.splitlines()
    head = lines.index(next(x for x in lines if x.startswith("| labels | end-to-end − scratch")))
    cells = dict(zip(lines[head].split(" | "), lines[head + 2].split(" | ")))
    assert lines[head + 2].startswith("| 1 | ") and cells["end-to-end − SimCLR encoder"] != "—", lines[head + 2]
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "studies" / "pairs.py"
    out = subprocess.run([sys.executable, str(script), str(path), "--dataset", "synth", "--a", "end_to_end", "--b", "ssl",
                          "--labels", "1", "--eval", "test,site:other"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [x.split(" = ")[0] for x in out.stdout.splitlines()] == ["test 1 labels: end_to_end − ssl",
                                                                   "site:other 1 labels: end_to_end − ssl"]
    assert all("(1 seed; seed 0 " in x for x in out.stdout.splitlines())
    script = script.with_name("best_step.py")  # the convergence check's scratch pairs, with where their best val fell
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    body = out.stdout.splitlines()
    assert body[0].startswith("dataset | seed | labels | steps") and body[1].startswith("synth | 0 | "), out.stdout
    assert any(x.startswith(("best val in the last fifth: ", "best val earlier: ")) for x in body), out.stdout
    with (tmp_path / "results" / "results.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert {r["arm"] for r in csv_rows} >= {"floor", "zero_shot", "scratch", "end_to_end", "encoder_only", "ssl"}
    # resume: a second call runs nothing; a lost ledger line is redone from the finished run folder
    res = CliRunner().invoke(main, ["study", str(path)])
    assert "0 to run" in res.output
    lines = ledger.ledger_path(tmp_path / "results").read_text().splitlines()
    ledger.ledger_path(tmp_path / "results").write_text("\n".join(lines[:-1]) + "\n")
    res = CliRunner().invoke(main, ["study", str(path)])
    assert res.exit_code == 0 and "1 to run" in res.output, res.output
    assert len(ledger.read_ledger(tmp_path / "results")) == len(rows)


def test_study_dry_run_and_bad_file(tmp_path):
    path = _study(tmp_path)
    res = CliRunner().invoke(main, ["study", str(path), "--dry-run", "--seeds", "0", "--arms", "scratch"])
    assert res.exit_code == 0, res.output
    todo = [line for line in res.output.splitlines() if line.startswith("todo")]
    assert todo and all("scratch" in line for line in todo)
    res = CliRunner().invoke(main, ["study", str(path), "--dry-run", "--arms", "end_to_end", "--targets", "store",
                                    "--strategies", "random"])
    todo = [line for line in res.output.splitlines() if line.startswith("todo")]
    # the random-subset end-to-end runs on the main target and the pretraining they need; no picks, no pooled target
    assert todo and not any("picked by" in line or "store+sites" in line for line in todo), res.output
    assert any("pretrain" in line for line in todo) and any("end_to_end" in line for line in todo)
    res = CliRunner().invoke(main, ["study", str(path), "--dry-run", "--strategies", "diverse"])
    todo = [line for line in res.output.splitlines() if line.startswith("todo")]
    finetunes = [line for line in todo if " n=" in line]
    assert finetunes and all("picked by diverse" in line for line in finetunes), res.output
    data = yaml.safe_load(path.read_text())
    data["arms"] = ["scratch", "simclr"]
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["study", str(path), "--dry-run"])
    assert res.exit_code == 2 and "unknown arm" in res.output
    data["arms"] = ["scratch"]
    data["datasets"][0].update(store=None, dataset="data.yaml", targets=["fov_otsu_hull@sideways"])
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["study", str(path), "--dry-run"])
    assert res.exit_code == 2 and "METHOD@POLARITY" in res.output, res.output
    data["datasets"][0].update(store=str(tmp_path / "main.zarr"), dataset=None, targets=["store"])
    data["trian"] = {}
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["study", str(path), "--dry-run"])
    assert res.exit_code == 2 and "trian" in res.output


def test_pinning_the_thresholding_in_prep_overrides_keeps_the_job_keys(tmp_path):
    """A study file that pins threshold.polarity=auto (done when the prep default became store, so the ledgers kept
    their meaning) must find its finished runs: thresholding overrides stay out of the job keys (the pseudo-masks
    they change are in the target's data digest); other prep overrides (the stored images) change the keys."""
    from medsass.trainer.study.jobs import StudyData, make_jobs

    def keys(overrides: list[str]) -> list[str]:
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({
            "out_dir": "out", "results_dir": "res", "seeds": [0], "budgets": ["1"], "arms": ["scratch", "end_to_end"],
            "convergence": None, "prep": {"size": 32, "overrides": overrides},
            "datasets": [{"name": "d", "store": "x.zarr", "targets": ["store"]}], "train": {"base": "cpu_small"}}))
        study, train = load_study(tmp_path / "s.yaml")
        data = [StudyData("d", {"store": "x.zarr"}, {}, {}, 10, digests={"store": "abc", "images": "def"})]
        return [j.key for j in make_jobs(study, train, data)]

    before = keys([])
    assert len(before) == 3 and keys(["threshold.polarity=auto"]) == before  # pretrain, scratch, end-to-end
    assert set(keys(["geometry.resize=pad"])).isdisjoint(before)
    assert set(keys(["threshold.intensity=minmax"])).isdisjoint(before)  # changes the stored images: new keys


def test_a_run_of_some_datasets_reports_every_dataset_whose_stores_are_built(tmp_path):
    """A study run in parts (``--datasets A``, later ``--datasets B``) keeps one table.md with every dataset: the
    report of a part is not cut down to the part's datasets."""
    stores = {n: make_synthetic_store(tmp_path / f"{n}.zarr", n=24, size=32, seed=k) for k, n in enumerate(("a", "b"))}
    data = {"name": "parts", "out_dir": str(tmp_path / "out"), "results_dir": str(tmp_path / "results"), "seeds": [0],
            "budgets": ["1"], "arms": ["scratch"], "jobs": 1, "bootstrap": 100,
            "datasets": [{"name": n, "store": str(p), "targets": ["store"]} for n, p in stores.items()],
            "train": tiny_study_train()}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    for part in ("a", "b"):
        res = CliRunner().invoke(main, ["study", str(path), "--datasets", part])
        assert res.exit_code == 0 and "1 to run" in res.output, res.output
    table = (tmp_path / "results" / "table.md").read_text()
    assert "## a" in table and "## b" in table and "Left out" not in table
    assert len(ledger.read_ledger(tmp_path / "results")) == 2
    shutil.rmtree(stores["a"])  # a store that is gone is left out of a part's report, not an error after its runs
    res = CliRunner().invoke(main, ["study", str(path), "--datasets", "b"])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "results" / "table.md").read_text()
    assert "## a" not in table and "## b" in table
    assert "Left out of this report: a (stores not built" in table  # named, so a reader does not take it for dropped


def test_a_store_not_built_yet_is_left_out_of_a_report_instead_of_built(tmp_path, monkeypatch):
    from medsass.trainer.study import stores as study_stores
    from medsass.trainer.study.spec import StoreSpec

    monkeypatch.setattr(study_stores, "build", lambda cfg: pytest.fail("a report must not build a store"))
    monkeypatch.setattr(study_stores, "load_dataset_file", lambda path, overrides: type("C", (), {"params_digest": lambda s: "x"})())
    study = type("S", (), {"prep": type("P", (), {"size": 32, "salt": "", "workers": 1, "overrides": []})(),
                           "out_dir": str(tmp_path)})()
    assert study_stores.build_store(study, StoreSpec("x", dataset="x.yaml"), "otsu", build_missing=False) is None


def test_the_gap_line_says_there_is_no_gap_where_scratch_is_within_the_tolerance_of_the_all_labels_model():
    from medsass.trainer.study.jobs import StudyData
    from medsass.trainer.study.report import Index, gap_closed

    def run(arm, n, seed, tp):  # micro IoU = tp / 1000 on two images
        return {"dataset": "d", "eval": "test", "target": "t", "arm": arm, "n_labels": n, "steps_factor": 1,
                "seed": seed, "ids": ["a", "b"], "counts": np.array([[tp, 1000 - tp, 0], [0, 0, 0]])}

    d = StudyData("d", {"t": "/s"}, {}, {}, n_labeled_train=100)
    runs = ([run("scratch", 100, s, 800) for s in (0, 1)] + [run("scratch", 1, s, 600) for s in (0, 1)]
            + [run("end_to_end", 1, s, 700) for s in (0, 1)]
            + [run("scratch", 10, s, 795) for s in (0, 1)] + [run("end_to_end", 10, s, 820) for s in (0, 1)])
    one, ten = gap_closed(d, Index(runs), {1: ["1"], 10: ["10"], 100: ["100%"]}, reps=20, min_gap=0.01)
    assert one == ("- 1 labels: scratch 0.600, end-to-end 0.700, all 100 labels 0.800 (2 seeds): end-to-end closes 50% "
                   "of the gap")
    # scratch at 10 labels is 0.005 below the all-labels model: 0.015 / 0.005 would read as 500% of a gap that is noise
    assert ten.endswith("no gap to close (scratch is within 0.01 of the all-labels model)")
    assert gap_closed(d, Index(runs[2:]), {1: ["1"], 100: ["100%"]}, reps=20) == []  # no all-labels run: no lines
    # against the all-labels model fine-tuned 2x as long (the convergence check's run), where there is one
    longer = runs + [{**run("scratch", 100, 0, 900), "steps_factor": 2}]
    assert gap_closed(d, Index(longer), {1: ["1"], 100: ["100%"]}, reps=20, factor=2) == [
        "- 1 labels: scratch 0.600, end-to-end 0.700, all 100 labels, 2x steps 0.900 (1 seed): end-to-end closes 33% of "
        "the gap"]
    assert gap_closed(d, Index(runs), {1: ["1"], 100: ["100%"]}, reps=20, factor=2) == []
    # every model fine-tuned with a recipe (e.g. a longer schedule): the recipe's runs only
    rec = runs + [{**run("scratch", 100, 0, 900), "arm": "scratch+long"}, {**run("scratch", 1, 0, 700), "arm": "scratch+long"},
                  {**run("end_to_end", 1, 0, 800), "arm": "end_to_end+long"}]
    assert gap_closed(d, Index(rec), {1: ["1"], 100: ["100%"]}, reps=20, recipe="long") == [
        "- 1 labels: scratch + long 0.700, end-to-end + long 0.800, all 100 labels 0.900 (1 seed): end-to-end + long "
        "closes 50% of the gap"]
