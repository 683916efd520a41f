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


def test_runs_log_after_a_torn_line_stays_valid_json_lines(tmp_path):
    import json

    import pytest
    from medsass.pipeline.build import _log_run

    from medsass.errors import MedsassWarning

    (tmp_path / "runs.jsonl").write_bytes(b'{"seconds": 1.0}\n{"seconds": 2.')
    with pytest.warns(MedsassWarning, match="torn"):
        _log_run(tmp_path, {"seconds": 3.0})
    assert [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()] == [{"seconds": 1.0}, {"seconds": 3.0}]


def test_a_torn_manifest_part_is_redone_on_resume(tmp_path, dask_scheduler):
    """Parts are written atomically; a torn one (a store copied mid-build, a bad disk) means its shard is written again."""
    import pytest
    from medsass.pipeline.build import build
    from medsass.pipeline.shards import part_path
    from medsass.pipeline.config import BuildConfig, InputSource

    from medsass.errors import MedsassWarning

    write_blob_pngs(tmp_path / "in", 40, size=48)  # two shards of at most 32 records
    cfg = BuildConfig(sources=[InputSource(path=str(tmp_path / "in"))], out=str(tmp_path / "s.zarr"))
    cfg.geometry.size, cfg.runtime.shard_records, cfg.runtime.scheduler, cfg.runtime.progress = 32, 32, dask_scheduler, False
    build(cfg)
    before = manifest.read_manifest(tmp_path / "s.zarr")
    part = part_path(tmp_path / "s.zarr", 1)
    part.write_bytes(part.read_bytes()[:-40])
    with pytest.warns(MedsassWarning, match="shard 1"):
        res = build(cfg)
    assert res.shards_done == 1 and manifest.read_manifest(tmp_path / "s.zarr").equals(before)  # NaN == NaN here
