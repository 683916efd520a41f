"""Shared by the trainer tests: one torch thread (the test machines have two cores), the default tiny store, and a
pretrain run stopped as a kill would stop it. Tiny configs: ``medsass.testing.tiny_train_config``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from medsass.trainer.run import run_stages

from medsass import manifest
from medsass.testing import make_synthetic_store

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """48 synthetic records at 32 px, one store per test module; a module that needs other records defines its own."""
    return make_synthetic_store(tmp_path_factory.mktemp("store") / "s.zarr", n=48, size=32)


@pytest.fixture
def run_killed_before_done(monkeypatch):
    """``run_killed_before_done(cfg)``: run pretrain, stopped as a kill would stop it between its last checkpoint and
    its ``done`` marker."""
    def run(cfg) -> None:
        real = manifest.write_json

        def write_json(obj, path, *args, **kwargs):
            if Path(path).name == "done":
                raise KeyboardInterrupt
            return real(obj, path, *args, **kwargs)

        monkeypatch.setattr(manifest, "write_json", write_json)
        with pytest.raises(KeyboardInterrupt):
            run_stages(cfg, ["pretrain"])
        monkeypatch.setattr(manifest, "write_json", real)
        assert (Path(cfg.out_dir) / "pretrain" / "last.pt").exists()

    return run
