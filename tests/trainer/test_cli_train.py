"""``medsass-train``: fast --help, one-line errors before any training, end-to-end run and re-run."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import yaml
from click.testing import CliRunner
from medsass.trainer.cli import main

from medsass.testing import TINY_ENCODER, make_synthetic_store, tiny_train_config, with_sections


def write_config(tmp_path, store, **sections):
    """The tiny run on tests/trainer/conftest.py's store, half of its train labels, as a YAML file."""
    cfg = with_sections(tiny_train_config(tmp_path / "out", {"syn": store}, finetune={"label_fraction": 0.5}), **sections)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, medsass.trainer.cli as c; assert 'torch' not in sys.modules and 'segmentation_models_pytorch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "medsass.trainer.cli", "--help"], check=True, capture_output=True, text=True)
    assert time.perf_counter() - t0 < 1.0
    for command in ("run", "pretrain", "finetune", "evaluate", "arms"):
        assert command in out.stdout


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = result.output.strip()
    assert text.startswith("Error: ") and len(text.splitlines()) == 1, text
    for fragment in fragments:
        assert fragment in text, text


def test_unknown_key_and_wrong_type(tmp_path, store):
    cfg = write_config(tmp_path, store)
    _one_line_error(invoke("run", cfg, "--set", "pretrain.stpes=3"), "pretrain.stpes")
    _one_line_error(invoke("run", cfg, "--set", "pretrain.steps=abc"), "pretrain.steps")
    _one_line_error(invoke("run", cfg, "--stages", "pretrain,train"), "train")


def test_unknown_encoder(tmp_path, store):
    _one_line_error(invoke("run", write_config(tmp_path, store), "--set", "model.encoder=resnet5000"), "Available options are", "resnet50")


def test_missing_foreign_and_unknown_schema_stores(tmp_path, store):
    import shutil

    import zarr

    cfg = write_config(tmp_path, store)
    _one_line_error(invoke("run", cfg, "--set", f"stores.syn={tmp_path / 'nope.zarr'}"), "nope.zarr", "not a Zarr")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w")
    _one_line_error(invoke("run", cfg, "--set", f"stores.syn={tmp_path / 'foreign.zarr'}"), "not a medsass store")
    future = shutil.copytree(store, tmp_path / "future.zarr")
    summary = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**summary, "schema_version": 99}))
    _one_line_error(invoke("run", cfg, "--set", f"stores.syn={future}"), "schema version 99")
    assert not (tmp_path / "out").exists()  # nothing was started


def test_no_labeled_records_fails_before_pretraining(tmp_path):
    unlabeled = make_synthetic_store(tmp_path / "u.zarr", n=32, size=32, labeled_fraction=0.0)
    result = invoke("run", write_config(tmp_path, unlabeled))
    _one_line_error(result, "no labeled records")
    assert not (tmp_path / "out" / "pretrain").exists()


def test_checkpoint_of_another_architecture(tmp_path, store):
    from medsass.trainer import checkpoint as ck
    from medsass.trainer.config import ModelConfig
    from medsass.trainer.model import model_args

    other = tmp_path / "other.pt"
    args = model_args(ModelConfig(encoder="resnet18"))
    ck.save(other, {"model": {}, "model_args": args})
    cfg = write_config(tmp_path, store)
    _one_line_error(invoke("evaluate", cfg, "--set", f"evaluate.checkpoint={other}"), "resnet18", TINY_ENCODER)
    _one_line_error(invoke("finetune", cfg, "--set", f"finetune.pretrained={other}"), "resnet18", TINY_ENCODER)
    _one_line_error(invoke("finetune", cfg), "pretrain")  # init auto, no pretrain run to start from


def test_run_all_stages_then_rerun_skips_and_single_stage_commands(tmp_path, store):
    cfg = write_config(tmp_path, store)
    result = invoke("run", cfg)
    assert result.exit_code == 0, result.output
    assert "test: iou=" in result.output and "otsu_floor_iou=" in result.output
    out = tmp_path / "out"
    for path in ("config.yaml", "pretrain/final.pt", "pretrain/best.pt", "pretrain/metrics.jsonl", "pretrain/done",
                 "finetune/final.pt", "finetune/done", "evaluate/metrics.json", "evaluate/per_image.csv"):
        assert (out / path).exists(), path
    assert json.loads((out / "finetune" / "done").read_text())["init"] == "end_to_end"
    again = invoke("run", cfg)
    assert again.exit_code == 0 and again.output.count("skipped") == 3
    best = invoke("evaluate", cfg, "--set", "evaluate.checkpoint=best")
    assert best.exit_code == 0 and "evaluate: done" in best.output
    redo = invoke("run", cfg, "--stages", "finetune,evaluate", "--restart", "--set", "finetune.init=encoder_only")
    assert redo.exit_code == 0, redo.output
    assert json.loads((out / "finetune" / "done").read_text())["init"] == "encoder_only"


def test_encoder_only_pretrain_refuses_whole_model_transfer(tmp_path, store):
    cfg = write_config(tmp_path, store, pretrain={"mode": "encoder_only"}, finetune={"init": "end_to_end"})
    _one_line_error(invoke("run", cfg), "encoder_only")


def test_arms_share_one_pretrain_run(tmp_path, store):
    cfg = write_config(tmp_path, store, evaluate={"overlays": 0})
    result = invoke("arms", cfg, "--arms", "scratch,encoder_only")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "arms" / "summary.json").read_text())
    assert set(summary) == {"scratch", "encoder_only"} and summary["scratch"]["test"]["n"] > 0
    assert (tmp_path / "out" / "pretrain" / "final.pt").exists()
    assert not (tmp_path / "out" / "arms" / "scratch" / "pretrain").exists()
    done = json.loads((tmp_path / "out" / "arms" / "encoder_only" / "finetune" / "done").read_text())
    assert done["init"] == "encoder_only" and done["source"].endswith("pretrain/final.pt")
