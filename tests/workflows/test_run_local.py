"""workflows/run_local.sh: prep -> pretrain -> finetune -> evaluate -> reports in one command, on real PH2 images."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from medsass.manifest import read_manifest


@pytest.mark.timeout(600)
def test_run_local_end_to_end_then_rerun_skips(tmp_path, ph2_dataset, workflows, tiny_train):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "PREP_ARGS": "--workers 2 --no-progress", "GPUS": "1"}
    out = tmp_path / "out"
    cmd = ["bash", str(workflows / "run_local.sh"), str(ph2_dataset), "cpu_small", str(out), *tiny_train]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert first.returncode == 0, first.stderr[-3000:]

    assert (read_manifest(out / "store.zarr")["status"] == "ok").sum() == 8
    metrics = json.loads((out / "run" / "evaluate" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 2 and 0 <= metrics["test"]["iou"] <= 1
    for stage in ("pretrain", "finetune"):
        assert (out / "run" / stage / "final.pt").exists()
    for name in ("store_report.html", "run_report.html"):
        assert (out / name).stat().st_size > 1000

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # every step resumes or skips
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrain: skipped" in again.stderr and "finetune: skipped" in again.stderr


def test_run_local_usage_error(workflows):
    res = subprocess.run(["bash", str(workflows / "run_local.sh"), "only-one-arg"], capture_output=True, text=True)
    assert res.returncode == 2 and "usage:" in res.stderr
