"""The labeling loop of the README's "Choose which images to label", end to end on the bundled sample, through the CLIs:
build a store without labels -> pretrain -> suggest N images -> the "expert" copies their masks (and those of
val/test) -> add-labels -> fine-tune on exactly the picked ids -> evaluate."""
import csv
import json
import shutil
from pathlib import Path

import medsass.trainer.loop as loop_mod
from click.testing import CliRunner
from medsass.manifest import read_manifest
from medsass.pipeline.cli import main as prep
from medsass.trainer.cli import main as train
from medsass.trainer.records import sample_ids_digest

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "dsb2018_nuclei"
N = 3
TINY = ["--set", "model.encoder=tu-mobilenetv3_small_100", "--set", "runtime.threads=1", "--set", "runtime.num_workers=0",
        "--set", "runtime.progress=false", "--set", "pretrain.steps=3", "--set", "finetune.steps=3",
        "--set", "evaluate.overlays=1"]


def test_suggest_add_labels_finetune_on_the_picks_evaluate(tmp_path, monkeypatch):
    store, run, picks, expert = tmp_path / "sample.zarr", tmp_path / "run", tmp_path / "picks", tmp_path / "expert"
    common = ["--set", f"stores.main={store}", "--set", f"out_dir={run}", *TINY]

    # 1. a store of the images only (no labels yet), with val and test splits
    res = CliRunner().invoke(prep, ["build-masks", str(SAMPLE / "images"), "--out", str(store), "--size", "64",
                                    "--polarity", "bright", "--split", "val=0.125,test=0.25", "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    df = read_manifest(store)
    assert not df["has_label"].any() and df["split"].value_counts().to_dict() == {"train": 10, "test": 4, "val": 2}

    # 2. pretrain on the pseudo-masks
    res = CliRunner().invoke(train, ["run", "cpu_small", "--stages", "pretrain", *common])
    assert res.exit_code == 0, res.output

    # 3. which N images should the expert label?
    res = CliRunner().invoke(train, ["suggest", str(run), "--store", str(store), "--n", str(N), "--out", str(picks),
                                     "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    with open(picks / "picks.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked = [r["sample_id"] for r in rows]
    train_ids = set(df.loc[df["split"] == "train", "sample_id"])
    assert len(picked) == N == len(set(picked)) and set(picked) <= train_ids
    assert (picks / "gallery.html").is_file()

    # 4. the "expert": masks of the picked images, and of val/test (to pick checkpoints and to score)
    expert.mkdir()
    held_out = df.loc[df["split"] != "train", "source_rel"].tolist()
    for rel in [r["source_rel"] for r in rows] + held_out:
        shutil.copy(SAMPLE / "masks" / rel, expert)
    copied = {p.name for p in expert.iterdir()}
    assert len(copied) == N + 6

    # 5. write them into the store, in place
    res = CliRunner().invoke(prep, ["add-labels", str(store), "--labels", str(expert), "--label-pattern", "{stem}.tif"])
    assert res.exit_code == 0, res.output
    assert f"{N + 6} label(s) written ({N + 6} new" in res.output, res.output
    df = read_manifest(store)
    assert set(df.loc[df["has_label"], "source_rel"]) == copied
    assert set(df.loc[df["has_label"] & (df["split"] == "train"), "sample_id"]) == set(picked)

    # 6. fine-tune on exactly the picked ids, 7. evaluate (the rows handed to the training loop are recorded)
    seen = {}
    real = loop_mod.run_training

    def spy(config, plan, dist):
        seen[plan.stage] = {name: list(rows) for name, rows in plan.rows.items()}
        return real(config, plan, dist)

    monkeypatch.setattr(loop_mod, "run_training", spy)
    res = CliRunner().invoke(train, ["run", "cpu_small", "--stages", "finetune,evaluate", *common,
                                     "--set", f"finetune.labeled_ids={picks / 'picks.csv'}", "--set", "finetune.label_fraction=null"])
    assert res.exit_code == 0, res.output
    by_row = dict(zip(df["row"], df["sample_id"]))
    assert sorted(by_row[r] for r in seen["finetune"]["main"]) == sorted(picked)
    done = json.loads((run / "finetune" / "done").read_text())
    assert done["section"]["labeled_ids_sha256"] == sample_ids_digest(picked) and done["metrics"]["step"] == 3
    assert done["source"].endswith("pretrain/final.pt")
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())["test"]
    assert metrics["n"] == 4 and 0 <= metrics["iou"] <= 1 and 0 <= metrics["otsu_floor"]["iou"] <= 1
    assert (run / "evaluate" / "per_image.csv").is_file()
