"""Atomic writes keep the old file on failure and give new files the umask's permissions (not mkstemp's 0600)."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from medsass.atomic import atomic_open, atomic_write_bytes
from medsass.trainer import checkpoint as ck


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_follow_the_umask_and_secrets_stay_private(tmp_path, umask_022):
    atomic_write_bytes(tmp_path / "manifest.json", b"{}")
    ck.save(tmp_path / "run" / "final.pt", {"model": {"w": torch.zeros(3)}, "model_args": {}})
    atomic_write_bytes(tmp_path / "salt", b"abc", mode=0o600)
    assert _mode(tmp_path / "manifest.json") == 0o644  # a group sharing the store can read its manifest
    assert _mode(tmp_path / "run" / "final.pt") == 0o644
    assert _mode(tmp_path / "salt") == 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
