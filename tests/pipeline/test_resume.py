"""kill -9 in the middle of build-masks, re-run the same command: the store equals an uninterrupted build."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import zarr

from medsass import manifest
from medsass.testing import write_blob_pngs

PREP = [sys.executable, "-c", "from medsass.pipeline.cli import main; main()", "build-masks"]


def _cmd(src, out):
    return PREP + [str(src), "--out", str(out), "--size", "64", "--workers", "1", "--shard-records", "32",
                   "--salt", "fixed-test-salt", "--no-progress"]


def test_kill_minus_9_then_resume_gives_identical_store(tmp_path):
    src = tmp_path / "in"
    write_blob_pngs(src, 320, size=128, masks=tmp_path / "masks")
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_cmd(src, killed) + ["--labels", str(tmp_path / "masks")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed / "_medsass" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.exists() and len(list(parts.glob("*.jsonl"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed; make the input larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(parts.glob("*.jsonl")))
    assert 3 <= n_done < 10 and not (killed / "manifest.parquet").exists()

    resumed = subprocess.run(_cmd(src, killed) + ["--labels", str(tmp_path / "masks")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    fresh = tmp_path / "fresh.zarr"
    ref = subprocess.run(_cmd(src, fresh) + ["--labels", str(tmp_path / "masks")], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr

    a, b = zarr.open_group(str(killed), mode="r"), zarr.open_group(str(fresh), mode="r")
    for name in ("image", "pseudo_mask", "label"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert manifest.read_table(killed / "manifest.parquet").equals(manifest.read_table(fresh / "manifest.parquet"))
    assert (killed / "manifest.json").read_text() == (fresh / "manifest.json").read_text()
    runs = (killed / "_medsass" / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 1  # the killed run never logged completion; the resumed one did
    assert '"shards_run": %d' % (10 - n_done) in runs[0]
