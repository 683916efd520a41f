"""prep -> pretrain -> fine-tune -> evaluate on real images, on CPU, through the two CLIs: on the bundled sample
(sample_data/, always there, never skipped) and on PH2 dermoscopy from ../shared/data where that folder exists."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from medsass.pipeline.cli import main as prep
from medsass.trainer.cli import main as train

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def test_prep_pretrain_finetune_evaluate_on_the_bundled_sample(tmp_path):
    _prep_pretrain_finetune_evaluate(tmp_path, "sample", n_test=4)  # 16 tiles, test 0.25


@pytest.mark.skipif(not (DATA / "ph2_dermoscopy").exists(), reason="../shared/data/ph2_dermoscopy is absent")
def test_prep_pretrain_finetune_evaluate_on_ph2(tmp_path):
    _prep_pretrain_finetune_evaluate(tmp_path, "ph2_dermoscopy", n_test=8)


def _prep_pretrain_finetune_evaluate(tmp_path, dataset: str, n_test: int) -> None:
    store = tmp_path / f"{dataset}.zarr"
    res = CliRunner().invoke(prep, ["build-masks", "--dataset", str(REPO / "data_manifests" / f"{dataset}.yaml"),
                                    "--out", str(store), "--size", "64", "--workers", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    args = ["run", "cpu_small", "--set", f"stores.main={store}", "--set", f"out_dir={run}",
            "--set", "model.encoder=tu-mobilenetv3_small_100", "--set", "runtime.num_workers=1", "--set", "runtime.threads=1",
            "--set", "runtime.progress=false",
            "--set", "pretrain.steps=40", "--set", "pretrain.log_every=1", "--set", "pretrain.eval_every=20",
            "--set", "pretrain.checkpoint_every=20", "--set", "pretrain.lr=0.001",
            "--set", "finetune.steps=10", "--set", "finetune.eval_every=10", "--set", "finetune.checkpoint_every=10",
            "--set", "finetune.label_fraction=0.25", "--set", "evaluate.overlays=2"]
    res = CliRunner().invoke(train, args)
    assert res.exit_code == 0, res.output
    for f in ("config.yaml", "pretrain/final.pt", "pretrain/metrics.jsonl", "finetune/final.pt",
              "evaluate/metrics.json", "evaluate/per_image.csv"):
        assert (run / f).exists(), f
    assert list((run / "evaluate" / "overlays").glob("*.png"))
    losses = [json.loads(l)["loss"] for l in (run / "pretrain" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) >= 30 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < np.mean(losses[:8]), "pretraining did not lower the pseudo-mask loss"
    ft = [json.loads(l)["loss"] for l in (run / "finetune" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert ft and all(np.isfinite(ft))
    m = json.loads((run / "evaluate" / "metrics.json").read_text())["test"]
    assert m["n"] == n_test and 0 <= m["iou"] <= 1 and 0 <= m["otsu_floor"]["iou"] <= 1
