"""A full disk is a clear error naming the output and the free space, and nothing already written is lost."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from medsass.errors import DiskFullError, check_free_space, disk_full
from medsass.manifest import read_manifest
from medsass.trainer import checkpoint as ck

REPO = Path(__file__).resolve().parents[1]
PREP = [sys.executable, "-c", "from medsass.pipeline.cli import main; main()", "build-masks"]  # as tests/pipeline/test_resume.py
PH2 = REPO.parent / "shared" / "data" / "ph2_dermoscopy" / "images"


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), where this machine lets the tests mount one (root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enospc_wrapped_by_a_library_is_recognised(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3851328 vs 3851224")  # noqa: B904
    except RuntimeError as exc:
        err = disk_full(exc, tmp_path / "run" / "best.pt", "checkpoint best.pt")
    assert isinstance(err, DiskFullError)
    assert "no space left on the disk holding" in str(err) and "best.pt" in str(err) and "MiB free" in str(err)
    assert disk_full(RuntimeError("some other failure"), tmp_path, "x") is None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path, "x") is None


def test_free_space_check_names_need_and_free(tmp_path, monkeypatch):
    check_free_space(tmp_path / "not" / "yet" / "made", 1, "a small file")  # the nearest existing parent is asked
    need = shutil.disk_usage(tmp_path).free + 2**40  # more than this disk holds, whatever its size (a fixed 1 TiB was not)
    with pytest.raises(DiskFullError, match=rf"needs about {need / 2**20:,.0f} MiB and [\d,]+ MiB are free"):
        check_free_space(tmp_path, need, "a file bigger than the disk")

    # Exact figures, on a pretend disk with 3 TiB free
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=3 * 2**40))
    check_free_space(tmp_path, 2**40, "a 1 TiB file")
    with pytest.raises(DiskFullError, match=r"needs about 4,194,304 MiB and 3,145,728 MiB are free"):
        check_free_space(tmp_path, 4 * 2**40, "a 4 TiB file")


def test_checkpoint_on_a_full_disk_keeps_the_previous_file(small_disk):
    path = small_disk / "best.pt"
    ck.save(path, {"model": {"w": torch.zeros(1000)}, "model_args": {}})
    before = path.read_bytes()
    with pytest.raises(DiskFullError, match=r"checkpoint best.pt: it needs about 5 MiB and [12] MiB are free"):  # refused before writing
        ck.save(path, {"model": {"w": torch.zeros(1_000_000)}, "model_args": {}})
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - int(1.5 * 2**20)))  # leave 1.5 MiB: enough for the estimate
    with pytest.raises(DiskFullError, match="no space left on the disk holding"):  # ... but the file is bigger
        ck.save(path, {"model": {"w": torch.zeros(0)}, "model_args": {}, "pad": list(range(500_000))})
    assert path.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["best.pt", "filler"]  # no temporary file left behind


@pytest.mark.skipif(not PH2.is_dir(), reason=f"real data folder {PH2} is absent")
def test_prep_onto_a_full_disk_stops_with_a_clear_error_and_resumes(small_disk, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted(PH2.glob("*.png"))[:12]:
        (images / src.name).symlink_to(src)
    salt = uuid.uuid4().hex

    def prep(out):
        args = ["--size", "512", "--shard-records", "2", "--workers", "1", "--no-progress", "--salt", salt]
        return subprocess.run([*PREP, str(images), "--out", str(out), *args], capture_output=True, text=True, timeout=300)

    out = small_disk / "store.zarr"
    r = prep(out)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # after the Dask worker's own log of the failed task
    assert last.startswith("error: no space left on the disk holding") and "re-run the same command" in last, r.stderr[-2000:]
    parts = sorted((out / "_medsass" / "parts").glob("shard-*.jsonl"))
    assert 0 < len(parts) < 6  # some shards were finished before the disk filled

    # Move the unfinished store to a disk with room: the re-run keeps the finished shards and does the rest.
    roomy = tmp_path / "store.zarr"
    shutil.copytree(out, roomy, symlinks=True)
    done = {p.name: p.read_bytes() for p in parts}
    r = prep(roomy)
    assert r.returncode == 0, r.stderr[-2000:]
    for name, data in done.items():
        assert (roomy / "_medsass" / "parts" / name).read_bytes() == data
    df = read_manifest(roomy)
    assert len(df) == 12 and (df["status"] == "ok").all()
