"""Checkpoints: atomic, weights-only readable, exact resume after kill -9, skip / restart / changed inputs."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from medsass.trainer import checkpoint as ck
from medsass.trainer.config import load_config
from medsass.trainer.run import plan_run, run_stages

from medsass import configio
from medsass.errors import ConfigError, CorruptFileError, StoreError
from medsass.testing import tiny_train_config, with_sections


def tiny(out, store, **sections):
    """The tiny run (tests/trainer/conftest.py's store) with 3 pretrain steps, a checkpoint after each, no overlays."""
    cfg = tiny_train_config(out, {"syn": store}, pretrain={"steps": 3, "checkpoint_every": 1}, evaluate={"overlays": 0})
    return load_config(with_sections(cfg, **sections))


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    ck.seed_everything(5)
    state = ck.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ck.save(tmp_path / "x.pt", {"model": {}, "model_args": {}, "rng": state})
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temp file left behind
    loaded = torch.load(tmp_path / "x.pt", weights_only=True)
    ck.restore_rng(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    assert loaded["medsass_version"] and loaded["format"] == ck.FORMAT


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable medsass checkpoint"):
        ck.load(tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        ck.load(tmp_path / "missing.pt")


def _final_state(out, stage="pretrain"):
    return torch.load(out / stage / "final.pt", weights_only=True)


@pytest.mark.parametrize(("workers", "accum"), [(0, 2), (2, 1)])
def test_kill_9_mid_stage_then_rerun_reaches_the_same_weights(tmp_path, store, workers, accum):
    sections = {"pretrain": {"steps": 10, "checkpoint_every": 3, "eval_every": 4, "grad_accum": accum}, "runtime": {"num_workers": workers}}
    reference = tiny(tmp_path / "ref", store, **sections)
    run_stages(reference, ["pretrain"])

    cfg = tiny(tmp_path / "killed", store, **sections)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(configio.to_dict(cfg)))
    cmd = [sys.executable, "-m", "medsass.trainer.cli", "run", str(cfg_file), "--stages", "pretrain"]
    last = tmp_path / "killed" / "pretrain" / "last.pt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert last.exists() and not (tmp_path / "killed" / "pretrain" / "done").exists(), "the run finished before the kill"
    killed_at = torch.load(last, weights_only=True)["step"]
    assert 0 < killed_at < 10

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    ref, resumed = _final_state(tmp_path / "ref"), _final_state(tmp_path / "killed")
    assert resumed["step"] == ref["step"] == 10 and resumed["batches"] == ref["batches"]
    assert ref["model"].keys() == resumed["model"].keys()
    for key, value in ref["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["best"] == ref["best"]
    lines = [json.loads(x) for x in (tmp_path / "killed" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == list(range(1, 11))  # lines written after the checkpoint by the killed run are dropped


def test_finished_stage_is_skipped_changed_config_refused_restart_redoes(tmp_path, store):
    cfg = tiny(tmp_path / "out", store)
    assert run_stages(cfg, ["pretrain"])["pretrain"].status == "done"
    saved = (tmp_path / "out" / "pretrain" / "final.pt").stat().st_mtime_ns
    assert run_stages(cfg, ["pretrain"])["pretrain"].status == "skipped"
    changed = tiny(tmp_path / "out", store, pretrain={"lr": 0.01})
    with pytest.raises(ConfigError, match="pretrain.lr"):
        run_stages(changed, ["pretrain"])
    assert run_stages(changed, ["pretrain"], restart=True)["pretrain"].status == "done"
    assert (tmp_path / "out" / "pretrain" / "final.pt").stat().st_mtime_ns != saved
    assert (tmp_path / "out" / "config.yaml").exists()


def test_changed_store_is_refused_before_resuming(tmp_path, store, run_killed_before_done):
    import shutil

    from medsass import manifest

    copy = shutil.copytree(store, tmp_path / "copy.zarr")
    cfg = tiny(tmp_path / "out", copy)
    run_killed_before_done(cfg)
    table = manifest.read_table(manifest.manifest_path(copy)).to_pandas()
    table.loc[0, "split"] = "val"
    manifest.write_table(manifest.rows_to_table(table.to_dict("records")), manifest.manifest_path(copy))
    with pytest.raises(StoreError, match="changed since"):
        plan_run(cfg, ["pretrain"])
    plans = plan_run(cfg, ["pretrain"], allow_changed_store=True)
    assert plans[0].resume is not None and plans[0].resume["step"] == 3


def test_resume_needs_same_worker_count(tmp_path, store, run_killed_before_done):
    run_killed_before_done(tiny(tmp_path / "out", store))
    with pytest.raises(ConfigError, match="num_workers"):
        plan_run(tiny(tmp_path / "out", store, runtime={"num_workers": 2}), ["pretrain"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_gpu_code_paths_run_on_cpu(tmp_path, store, amp):
    """bf16/fp16 autocast (+ GradScaler), channels_last, accumulation, clipping and warm-up on the CPU."""
    cfg = tiny(tmp_path / "out", store, pretrain={"steps": 2, "grad_accum": 2, "grad_clip": 1.0, "warmup_steps": 1},
               runtime={"amp": amp, "channels_last": True, "pin_memory": True})
    summary = run_stages(cfg, ["pretrain"])["pretrain"].metrics
    final = torch.load(tmp_path / "out" / "pretrain" / "final.pt", weights_only=True)
    assert summary["step"] == 2 and final["batches"] == 4 and summary["samples"] == 16
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    lines = [json.loads(x) for x in (tmp_path / "out" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)


@pytest.mark.parametrize(("fmt", "words"), [(ck.FORMAT + 1, ["newer", "upgrade medsass"]), (0, ["older", "medsass version that wrote it"]),
                                            ("1", ["older"])])
def test_checkpoint_format_version_is_checked_on_load(tmp_path, fmt, words):
    path = tmp_path / "final.pt"
    ck.save(path, {"model": {}, "model_args": {}, "format": fmt})
    with pytest.raises(ConfigError) as err:
        ck.load(path)
    message = str(err.value)
    assert str(path) in message and f"format {fmt!r}" in message and f"reads format {ck.FORMAT}" in message
    for word in words:
        assert word in message, message


def test_torn_checkpoint_error_says_what_happened_which_file_and_what_to_do(tmp_path):
    path = tmp_path / "pretrain" / "last.pt"
    ck.save(path, {"model": {"w": torch.zeros(5000)}, "model_args": {}})
    path.write_bytes(path.read_bytes()[:9000])  # a write cut short
    with pytest.raises(ConfigError) as err:
        ck.load(path)
    message = str(err.value)
    assert str(path) in message and "damaged" in message
    assert "Delete it" in message and "--restart" in message  # the remedy, not cut off


def test_torn_last_pt_resumes_from_the_previous_checkpoint(tmp_path, store, run_killed_before_done, recwarn):
    """last.pt is rotated to last.prev.pt before each write; an unreadable last.pt resumes from it, with a warning."""
    reference = tiny(tmp_path / "ref", store)
    run_stages(reference, ["pretrain"])
    cfg = tiny(tmp_path / "out", store)
    run_killed_before_done(cfg)
    stage = tmp_path / "out" / "pretrain"
    assert torch.load(stage / "last.prev.pt", weights_only=True)["step"] == 2
    last = stage / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn by a bad disk or copy

    plans = plan_run(cfg, ["pretrain"])
    assert plans[0].resume["step"] == 2
    assert any("last.prev.pt" in str(w.message) and str(last) in str(w.message) for w in recwarn.list)
    run_stages(cfg, ["pretrain"])
    ref, resumed = _final_state(tmp_path / "ref"), _final_state(tmp_path / "out")
    for key, value in ref["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert not last.exists() and not (stage / "last.prev.pt").exists()  # a finished stage keeps neither


def test_copied_run_resumes_and_a_rewritten_pretrain_checkpoint_is_still_refused(tmp_path, store):
    """cp -a runs/a runs/b: the done markers record content hashes, so the copy's finished stages are skipped."""
    import shutil

    run_stages(tiny(tmp_path / "a", store), ["pretrain", "finetune", "evaluate"])
    for copy in (shutil.copy2, shutil.copyfile):  # cp -a keeps mtimes, a plain cp does not
        b = tmp_path / f"b-{copy.__name__}"
        shutil.copytree(tmp_path / "a", b, copy_function=copy)
        plans = plan_run(tiny(b, store), ["pretrain", "finetune", "evaluate"])
        assert [p.skip for p in plans] == [True, True, True], copy.__name__

    final = b / "pretrain" / "final.pt"
    state = torch.load(final, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    ck.save(final, state)  # same size, other weights
    with pytest.raises(ConfigError, match="pretrain checkpoint .* changed since finetune"):
        plan_run(tiny(b, store), ["pretrain", "finetune"])


def test_done_markers_of_older_runs_still_resume_after_a_move(tmp_path, store):
    """Markers written before content hashes hold (path, size, mtime): a moved file with its size and mtime is accepted."""
    import shutil

    run_stages(tiny(tmp_path / "a", store), ["pretrain", "finetune"])
    src = tmp_path / "a" / "pretrain" / "final.pt"
    marker_path = tmp_path / "a" / "finetune" / "done"
    marker = json.loads(marker_path.read_text())
    st = src.stat()
    marker["source_id"] = [str(src.resolve()), st.st_size, st.st_mtime_ns]
    marker_path.write_text(json.dumps(marker))
    shutil.move(tmp_path / "a", tmp_path / "moved")
    assert [p.skip for p in plan_run(tiny(tmp_path / "moved", store), ["pretrain", "finetune"])] == [True, True]
    os.utime(tmp_path / "moved" / "pretrain" / "final.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten?
    with pytest.raises(ConfigError, match="changed since finetune"):
        plan_run(tiny(tmp_path / "moved", store), ["pretrain", "finetune"])


def test_resume_after_a_torn_metrics_line(tmp_path, store, run_killed_before_done):
    """A kill mid-append leaves a torn last line in metrics.jsonl: resume drops it (warning) and the log stays clean."""
    cfg = tiny(tmp_path / "out", store)
    run_killed_before_done(cfg)
    log = tmp_path / "out" / "pretrain" / "metrics.jsonl"
    log.write_bytes(log.read_bytes() + b'{"step": 9, "loss": 0.')
    with pytest.warns(UserWarning, match="torn last line"):
        run_stages(cfg, ["pretrain"])
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines() if "loss" in x]
    assert steps == [1, 2, 3]  # resumed at step 3: nothing left to train; the torn line is gone

    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.1}\n')
    (tmp_path / "out" / "pretrain" / "done").unlink()
    from medsass.trainer.loop import MetricsLog

    with pytest.raises(CorruptFileError, match=r"metrics\.jsonl, line 2: not valid JSON.*delete"):
        MetricsLog(log, enabled=True, resume_step=3, tensorboard=False)
