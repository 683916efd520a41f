"""Two gloo processes on the CPU (as torchrun starts them): disjoint data, reduced metrics, rank 0 writes."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from medsass.trainer.config import load_config

from medsass import configio
from medsass.testing import make_synthetic_store

TINY = "tu-mobilenetv3_small_100"


def _config(out, store, stages, **evaluate):
    return load_config({
        "out_dir": str(out), "stores": {"syn": str(store)}, "stages": stages, "model": {"encoder": TINY},
        "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 1},
        "evaluate": {"checkpoint": "pretrain", "batch_size": 4, "overlays": 1, **evaluate},
        "runtime": {"num_workers": 0, "progress": False, "threads": 1, "tensorboard": False, "device": "cpu"},
    })


def _worker(rank: int, world: int, port: int, out: str, store: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from medsass.trainer.data import ShardStream, Source, make_loader, select_rows
    from medsass.trainer.distributed import all_gather_objects, leave, setup, teardown
    from medsass.trainer.run import run_stages

    cfg = _config(out, store, ["pretrain", "evaluate"])
    results = run_stages(cfg)
    # a joint fine-tune (pool batches beside the labeled ones) from it: DDP's one backward over both
    joint = configio.to_dict(_config(out, store, ["finetune"]))
    joint["finetune"].update(steps=2, batch_size=4, log_every=1, pseudo_weight=1.0)
    run_stages(load_config(joint))
    info = setup("cpu")
    rows = select_rows(store, splits=["train"])
    # What this rank reads in the first epoch (shuffle buffer off: it mixes epochs on tiny stores).
    stream = ShardStream([Source(store, rows)], seed=cfg.seed, rank=rank, world_size=world, batch_size=4, shuffle_buffer=0)
    loader = iter(make_loader(stream, batch_size=4, num_workers=0, pin_memory=False))
    seen = [int(r) for _ in range(3) for r in next(loader)["row"]]
    everyone = all_gather_objects(seen, info)
    metrics = all_gather_objects(results["evaluate"].metrics, info)
    wrote = all_gather_objects(sorted(os.listdir(os.path.join(out, "pretrain"))) + sorted(os.listdir(os.path.join(out, "finetune"))), info)
    teardown()
    if rank == 0:
        with open(os.path.join(out, "ddp_summary.json"), "w") as fh:
            json.dump({"seen": everyone, "metrics": metrics, "world": info.world_size, "files": wrote[1]}, fh)
    leave(0)  # as the CLI ends a torchrun process: without it, 1 run in ~10 aborted at exit on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_process_gloo_run(tmp_path):
    from medsass.trainer.evaluate import eval_rows
    from medsass.trainer.run import run_stages

    store = make_synthetic_store(tmp_path / "s.zarr", n=48, size=32)
    out = tmp_path / "ddp"
    mp.start_processes(_worker, args=(2, _free_port(), str(out), str(store)), nprocs=2, join=True, start_method="spawn")
    summary = json.loads((out / "ddp_summary.json").read_text())
    assert summary["world"] == 2
    a, b = summary["seen"]
    assert len(a) == len(b) == 12 and not set(a) & set(b)  # disjoint shares of the train records
    assert summary["metrics"][0] == summary["metrics"][1]  # every rank returns the same, reduced metrics
    assert {"final.pt", "done"} <= set(summary["files"]) and "last.pt" not in summary["files"]  # resume point dropped
    assert summary["files"].count("final.pt") == 2  # the joint fine-tune finished too
    joint_log = [json.loads(x) for x in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in joint_log if "loss" in x] == [1, 2]

    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["test"]["n"] == len(eval_rows(store, "test", "label"))  # both ranks' images, once each
    assert len((out / "evaluate" / "per_image.csv").read_text().splitlines()) == 1 + metrics["test"]["n"]
    log = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [1, 2]  # rank 0 alone writes the log

    # The same checkpoint scored by one process gives the same numbers.
    single = _config(tmp_path / "single", store, ["evaluate"], checkpoint=str(out / "pretrain" / "final.pt"))
    assert run_stages(single)["evaluate"].metrics["test"] == metrics["test"]


def test_leave_ends_a_torchrun_process_with_its_code_and_flushed_output_and_is_a_no_op_alone():
    import subprocess
    import sys

    from medsass.trainer.distributed import leave

    code = ("import sys; from medsass.trainer.distributed import leave; print('written', end=''); "
            "sys.stderr.write('and logged'); leave(75); print(' not reached')")
    env = {**os.environ, "WORLD_SIZE": "2"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert (res.returncode, res.stdout, res.stderr) == (75, "written", "and logged")
    assert os.environ.get("WORLD_SIZE", "1") == "1" and leave(3) is None  # one process: nothing to leave


def test_a_failed_command_under_torchrun_reports_its_error_and_leaves_with_its_exit_code(tmp_path, store):
    """Under torchrun a failed ``run`` prints its error (a usage error's one line, else the traceback) and leaves with
    the command's exit code without interpreter finalization (no atexit handler runs), as a finished one does; alone
    it exits as before."""
    import subprocess
    import sys

    import yaml

    from medsass.testing import tiny_train_config

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(tmp_path / "out", {"syn": store})))
    code = ("import atexit, sys; atexit.register(lambda: print('finalized'))\n"
            "import medsass.trainer.run as r\n"
            "def boom(*a, **k): raise RuntimeError('boom')\n"
            "if sys.argv[1] == 'crash': r.run_stages = boom\n"
            "from medsass.trainer.cli import main; main(['run', sys.argv[2], *sys.argv[3:]])")

    def cli(world: str, how: str, *extra: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "WORLD_SIZE": world, "RANK": "0"}
        return subprocess.run([sys.executable, "-c", code, how, str(cfg), *extra], env=env, capture_output=True,
                              text=True, timeout=300)

    usage = cli("2", "usage", "--set", "pretrain.stpes=3")
    assert usage.returncode == 2 and "Error: " in usage.stderr and "pretrain.stpes" in usage.stderr, usage
    assert "finalized" not in usage.stdout and "Traceback" not in usage.stderr
    crash = cli("2", "crash")
    assert crash.returncode == 1 and "RuntimeError: boom" in crash.stderr and "finalized" not in crash.stdout, crash
    alone = cli("1", "crash")
    assert alone.returncode == 1 and "RuntimeError: boom" in alone.stderr and "finalized" in alone.stdout, alone
