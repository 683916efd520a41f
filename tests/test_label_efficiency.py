"""benchmarks/label_efficiency.py: a tiny study end to end (synthetic store, 2-4 steps per stage), its pairing,
its outputs and its resumability; budgets; prep of one store per threshold method with identical splits."""
from __future__ import annotations

import csv
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from medsass.trainer.study.spec import budget_count, parse_budget
from medsass.trainer.study.stores import check_same_records

from medsass.errors import MedsassError
from medsass.testing import make_synthetic_store, write_blob_pngs

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = "tu-mobilenetv3_small_100"


@pytest.fixture(scope="module")
def le():
    """The study's modules, imported as ``python benchmarks/label_efficiency.py`` imports them (benchmarks/ is a folder
    of scripts, not a package: its folder goes first on the path)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        names = ("label_efficiency", "label_efficiency_grid", "label_efficiency_runs", "label_efficiency_report")
        cli, grid, _, report = (importlib.import_module(n) for n in names)
    return SimpleNamespace(main=cli.main, ARMS=grid.ARMS, load_study=grid.load_study, prepare_stores=grid.prepare_stores,
                           CSV_COLUMNS=report.CSV_COLUMNS, write_csv=report.write_csv, compare=report.compare)


def test_budgets():
    assert [budget_count(b, 28) for b in ["1", "2", "5", "10%", "100%"]] == [1, 2, 5, 3, 28]
    assert [budget_count(b, 9) for b in ["1", "2", "5", "10%", "100%"]] == [1, 2, 5, 1, 9]
    assert [budget_count(b, 2) for b in ["1", "2", "5", "10%", "100%"]] == [1, 2, 2, 1, 2]  # capped: dedupe
    for bad in ["0", "abc", "0%", "150%"]:
        with pytest.raises(ValueError):
            parse_budget(bad)


def _study(tmp_path, datasets, **extra):
    data = {
        "out_dir": str(tmp_path / "out"), "results_dir": str(tmp_path / "results"), "seeds": [0],
        "budgets": ["1", "5%"], "jobs": 1, "datasets": datasets,
        "train": {
            "base": "cpu_small", "model": {"encoder": TINY},
            "pretrain": {"steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 0},
            # a vanishing lr: each fine-tuned model keeps its initial weights, so the pairing of inits is observable
            "finetune": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 0, "lr": 1e-12, "label_fraction": None},
            "evaluate": {"overlays": 0, "batch_size": 16},
            "runtime": {"device": "cpu", "num_workers": 0, "threads": 1, "progress": False, "tensorboard": False},
        },
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _weights(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def test_tiny_study_pairs_arms_and_is_resumable(le, tmp_path, capsys):
    store = make_synthetic_store(tmp_path / "syn.zarr", n=24, size=32, shard_records=8)  # 14 train, 5 val, 5 test
    study = _study(tmp_path, [{"name": "syn", "store": str(store)}])
    assert le.main([str(study)]) == 0
    res = tmp_path / "results"
    for name in ("results.csv", "table.md", "plot.png"):
        assert (res / name).stat().st_size > 0, name
    rows = list(csv.DictReader((res / "results.csv").open()))
    arms = {(r["arm"], int(r["n_labels"])) for r in rows}
    assert arms == {("zero_shot", 0), ("otsu_floor", 0)} | {(a, 1) for a in le.ARMS}
    assert next(r for r in rows if r["n_labels"] == "1")["budget"] == "1, 5%"  # 5% of 14 = 1 label: one run
    assert {r["test_digest"] for r in rows} == {rows[0]["test_digest"]} and {r["n_test"] for r in rows} == {"5"}
    subset = {r["labeled_ids"] for r in rows if r["arm"] in le.ARMS}  # the three arms of a seed saw the same images
    assert len(subset) == 1 and len(next(iter(subset)).split()) == 1 and {r["n_labeled_train"] for r in rows} == {"14"}
    table = (res / "table.md").read_text()
    assert "## syn" in table and "Δ end-to-end" in table and "label_efficiency.py" in table

    # same initial weights: decoder of encoder_only == decoder of scratch; its encoder and end_to_end == pretrain
    runs = tmp_path / "out" / "runs" / "syn"
    pre = _weights(runs / "otsu" / "seed0" / "pretrain" / "final.pt")
    scratch = _weights(runs / "scratch" / "seed0" / "n001" / "finetune" / "final.pt")
    enc = _weights(runs / "otsu" / "seed0" / "n001" / "encoder_only" / "finetune" / "final.pt")
    e2e = _weights(runs / "otsu" / "seed0" / "n001" / "end_to_end" / "finetune" / "final.pt")
    close = lambda a, b, keys: all(torch.allclose(a[k], b[k], atol=1e-6) for k in keys)
    dec = [k for k in pre if not k.startswith("encoder.")]
    assert close(enc, scratch, dec) and close(enc, pre, [k for k in pre if k.startswith("encoder.")])
    assert close(e2e, pre, list(pre)) and not close(scratch, pre, list(pre))

    capsys.readouterr()
    assert le.main([str(study)]) == 0  # re-run: nothing trains
    assert "4 runs: 4 finished before, 0 to run" in capsys.readouterr().out


def test_prep_one_store_per_method_same_split(le, tmp_path):
    images, masks = tmp_path / "img", tmp_path / "mask"
    write_blob_pngs(images, 10, size=64, seed=1, masks=masks)
    ds = tmp_path / "blobs.yaml"
    ds.write_text(yaml.safe_dump({"name": "blobs", "sources": [{"path": str(images), "labels": {"dir": str(masks)}}],
                                  "split": {"val": 0.2, "test": 0.3, "group_by": "file"}}))
    study, _ = le.load_study(_study(tmp_path, [{"name": "blobs", "dataset": str(ds), "methods": ["otsu", "li"]}],
                                    prep={"size": 32, "workers": 1}))
    stores = le.prepare_stores(study, study.datasets[0], log=lambda m: None)
    assert list(stores) == ["otsu", "li"]
    from medsass.manifest import read_manifest

    tests = [read_manifest(p).query("split == 'test'")[["row", "sample_id"]].values.tolist() for p in stores.values()]
    assert tests[0] == tests[1] and len(tests[0]) == 3
    assert le.prepare_stores(study, study.datasets[0], log=lambda m: None) == stores  # built once


def test_stores_with_other_splits_are_refused(tmp_path):
    a = make_synthetic_store(tmp_path / "a.zarr", n=12, size=32)
    b = make_synthetic_store(tmp_path / "b.zarr", n=12, size=32, splits=(0.5, 0.25, 0.25))
    check_same_records({"otsu": str(a), "otsu_again": str(a)})
    with pytest.raises(MedsassError, match="differ in rows/splits"):
        check_same_records({"otsu": str(a), "li": str(b)})


def test_compare_pairs_rows_by_dataset_labels_and_seed(le, tmp_path):
    def write(path, target, ious):
        rows = [{"dataset": "d", "target": target, "arm": "end_to_end", "n_labels": 2, "seed": s, "iou": v}
                for s, v in enumerate(ious)] + [{"dataset": "d", "target": target, "arm": "scratch", "n_labels": 2,
                                                 "seed": 0, "iou": 0.0}]
        le.write_csv([{c: r.get(c, "") for c in le.CSV_COLUMNS} for r in rows], path)
        return str(path)

    a = write(tmp_path / "a.csv", "fov_otsu_hull", [0.6, 0.7, 0.8])
    b = write(tmp_path / "b.csv", "otsu", [0.5, 0.6, 0.9])  # diffs +0.1, +0.1, -0.1: mean +0.033, not all one side
    lines = le.compare(a, b)
    assert lines[-1] == "| d | 2 | `fov_otsu_hull` − `otsu`: +0.033 ± 0.115 (2/3) |"
    assert le.main(["compare", a]) == 2
