"""Pre-emption: SIGUSR1/SIGTERM -> finish the step, write last.pt, exit PREEMPT_EXIT; a re-run ends where an uninterrupted run ends."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from medsass.trainer import preempt
from medsass.trainer.config import load_config
from medsass.trainer.preempt import PREEMPT_EXIT, Preempted
from medsass.trainer.run import run_stages

from medsass import configio
from medsass.testing import TINY_ENCODER

STEPS = 20


def tiny(out, store, workers=0, steps=STEPS):
    return load_config({
        "out_dir": str(out), "stores": {"syn": str(store)}, "model": {"encoder": TINY_ENCODER},
        "pretrain": {"steps": steps, "batch_size": 4, "log_every": 1, "checkpoint_every": 1000, "eval_every": 7},
        "runtime": {"num_workers": workers, "progress": False, "threads": 1, "tensorboard": False, "device": "cpu"},
    })


def _loss_steps(out):
    lines = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if "loss" in x]


def _assert_same_weights(a, b):
    ref, got = (torch.load(p / "pretrain" / "final.pt", weights_only=True) for p in (a, b))
    assert got["step"] == ref["step"] == STEPS and got["batches"] == ref["batches"] and got["best"] == ref["best"]
    for key, value in ref["model"].items():
        assert torch.equal(value, got["model"][key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store):
    """Uninterrupted runs, one per DataLoader worker count (the batch order depends on it)."""
    done = {}

    def get(workers):
        if workers not in done:
            done[workers] = tmp_path_factory.mktemp(f"ref{workers}")
            run_stages(tiny(done[workers], store, workers), ["pretrain"])
        return done[workers]

    return get


# SIGTERM to the whole group is what SLURM's pre-emption and scancel send: torch's own worker handler would end the
# workers on it and fail the run ("worker killed by signal: Terminated"); make_loader's workers ignore it.
@pytest.mark.parametrize(("sig", "workers", "group"), [(signal.SIGUSR1, 0, False), (signal.SIGUSR1, 2, True),
                                                       (signal.SIGTERM, 2, True)],
                         ids=["usr1", "usr1-to-the-process-group-with-dataloader-workers",
                              "term-to-the-process-group-with-dataloader-workers"])
def test_signal_checkpoints_exits_75_and_rerun_matches_uninterrupted(tmp_path, store, reference, sig, workers, group):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(configio.to_dict(tiny(tmp_path / "run", store, workers))))
    cmd = [sys.executable, "-m", "medsass.trainer.cli", "run", str(cfg_file), "--stages", "pretrain"]
    log = tmp_path / "run" / "pretrain" / "metrics.jsonl"
    # A process group of its own: group=True signals the trainer and its DataLoader workers (as `scancel --full` would).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        (os.killpg if group else os.kill)(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPT_EXIT, err[-2000:]
    stopped = int(re.search(rf"pre-empted by {sig.name} after step (\d+)", err).group(1))
    assert 0 < stopped < STEPS, "the run finished before the signal"
    last = torch.load(tmp_path / "run" / "pretrain" / "last.pt", weights_only=True)
    assert last["step"] == stopped and "optimizer" in last  # the regular resumable checkpoint, at the step it stopped
    assert _loss_steps(tmp_path / "run")[-1] == stopped
    marks = [x for x in map(json.loads, log.read_text().splitlines()) if "preempted" in x]
    assert [(m["step"], m["preempted"]) for m in marks] == [(stopped, sig.name)]
    assert not (tmp_path / "run" / "pretrain" / "done").exists()

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    _assert_same_weights(reference(workers), tmp_path / "run")
    assert _loss_steps(tmp_path / "run") == list(range(1, STEPS + 1))
    assert [x["step"] for x in map(json.loads, log.read_text().splitlines()) if "preempted" in x] == [stopped]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_watch_turns_the_signal_into_a_flag_and_restores_the_handlers(sig):
    from medsass.trainer.distributed import DistInfo

    before = signal.getsignal(sig)
    with preempt.watch():
        assert not preempt.requested(DistInfo())
        os.kill(os.getpid(), sig)  # would end this process without the handler
        time.sleep(0.05)
        assert preempt.requested(DistInfo())
    assert signal.getsignal(sig) is before and not preempt.requested(DistInfo())


def test_preempted_is_a_system_exit_with_the_documented_code():
    exc = Preempted(signal.SIGUSR1, 7)
    assert isinstance(exc, SystemExit) and exc.code == PREEMPT_EXIT == 75
    assert str(exc) == "pre-empted by SIGUSR1 after step 7"


# -- DDP: one rank gets the signal, every rank stops after the same step -------------------------------------


def _ddp_worker(rank: int, world: int, port: int, root: str, store: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pathlib import Path

    from medsass.trainer import loop
    from medsass.trainer.distributed import leave, teardown

    root_p = Path(root)
    run_stages(tiny(root_p / "ref", store, steps=STEPS // 3), ["pretrain"])  # uninterrupted, two processes

    original = loop.Loop.train_step

    def signal_rank_1_after_step_3(self, batches, state):
        loss = original(self, batches, state)
        if self.dist.rank == 1 and state.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # only this rank is signalled
        return loss

    loop.Loop.train_step = signal_rank_1_after_step_3
    try:
        run_stages(tiny(root_p / "run", store, steps=STEPS // 3), ["pretrain"])
        outcome = {"rank": rank, "preempted": None}
    except Preempted as exc:
        outcome = {"rank": rank, "preempted": exc.step, "code": exc.code}
    loop.Loop.train_step = original
    (root_p / f"outcome{rank}.json").write_text(json.dumps(outcome))
    run_stages(tiny(root_p / "run", store, steps=STEPS // 3), ["pretrain"])  # the re-run resumes
    teardown()
    leave(0)  # as the CLI ends a torchrun process (distributed.leave)


def test_ddp_ranks_agree_on_the_stop_step_and_resume(tmp_path, store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path), str(store)), nprocs=2, join=True, start_method="spawn")
    outcomes = [json.loads((tmp_path / f"outcome{r}.json").read_text()) for r in (0, 1)]
    assert [o["preempted"] for o in outcomes] == [3, 3] and {o["code"] for o in outcomes} == {PREEMPT_EXIT}
    ref, got = (torch.load(tmp_path / d / "pretrain" / "final.pt", weights_only=True) for d in ("ref", "run"))
    assert got["step"] == ref["step"] == STEPS // 3 and got["world_size"] == 2
    for key, value in ref["model"].items():
        assert torch.equal(value, got["model"][key]), key
