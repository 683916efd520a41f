"""The SLURM workflows on a real single-node SLURM (.ci/services/slurm.sh start), with real PH2 images at 64 px.

Prep through `dask scheduler` + `srun dask worker` in one allocation and through dask-jobqueue's SLURMCluster,
training with train.sbatch, evaluation and prediction as job arrays, and a training job pre-empted with USR1 that
requeues itself and resumes. Job states come from `scontrol show job` (there is no sacct without accounting).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from medsass.pipeline.parallel import WORKER_MALLOC_ENV

from medsass.manifest import read_manifest
from medsass.store import open_store

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]
SALT = "medsass-test"  # split groups are salted hashes: the same salt gives the same splits in both builds
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("no SLURM here (sinfo/sbatch not found); `bash .ci/services/slurm.sh start` sets one up (root + apt)")
    res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    states = set(res.stdout.split())
    if res.returncode != 0 or not states & {"idle", "mixed", "allocated"}:
        pytest.skip(f"SLURM is installed but no node is up (sinfo: {res.stdout.strip() or res.stderr.strip()!r}); "
                    "run `bash .ci/services/slurm.sh start`")


@pytest.fixture(scope="module")
def env():
    """The jobs get this environment (sbatch's default --export=ALL): the venv first on PATH."""
    return {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm")


def sbatch(script: Path, *args: str, options: tuple[str, ...] = (), env, cwd: Path) -> str:
    res = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], env=env, cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job_records(job: str) -> list[dict[str, str]]:
    """One dict per job (one per array task) from `scontrol -o show job` (key=value pairs)."""
    res = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in res.stdout.splitlines() if line.strip()]


def wait(job: str, *, timeout: float = 300, until=None) -> list[dict[str, str]]:
    """Poll until every task of ``job`` has left the active states (or ``until(records)`` holds)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = job_records(job)
        if recs and (until(recs) if until else all(r["JobState"] not in ACTIVE for r in recs)):
            return recs
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} still active after {timeout} s: {[(r.get('JobId'), r.get('JobState')) for r in job_records(job)]}")


def log_of(rec: dict[str, str]) -> str:
    path = Path(rec["StdOut"])
    return path.read_text() if path.exists() else f"(no log at {path})"


def assert_completed(recs: list[dict[str, str]]) -> None:
    for r in recs:
        what = f"job {r['JobId']}: {r['JobState']} {r['ExitCode']}\n{log_of(r)[-3000:]}"
        assert r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0", what


# -- prep ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(slurm, env, work, ph2_dataset, workflows):
    """prep_srun.sbatch: `dask scheduler` in the batch shell, 2 `dask worker` tasks under srun, build-masks --scheduler."""
    job = sbatch(workflows / "prep_srun.sbatch", "--dataset", str(ph2_dataset), "--out", str(work / "srun.zarr"), "--no-progress",
                 "--salt", SALT, options=("--ntasks=2",), env=env, cwd=work)
    recs = wait(job)
    assert_completed(recs)
    log = log_of(recs[0])
    assert re.search(r"scheduler tcp://\S+, 2 worker task\(s\)", log) and "records: 8 ok" in log, log[-3000:]
    return work / "srun.zarr"


def test_prep_in_one_allocation_with_srun_workers(store, workflows):
    manifest = read_manifest(store)
    assert (manifest["status"] == "ok").sum() == 8 and manifest["has_label"].all()
    script = (workflows / "prep_srun.sbatch").read_text()
    for k, v in WORKER_MALLOC_ENV.items():  # the srun workers get the local cluster's malloc settings
        assert f"{k}=${{{k}:-{v}}}" in script


def test_prep_with_dask_jobqueue_slurmcluster_gives_the_same_store(store, env, work, ph2_dataset, workflows):
    logs = work / "dask-logs"
    settings = {"PREP_CORES": "1", "PREP_MEMORY": "1GB", "PREP_MIN_JOBS": "1", "PREP_MAX_JOBS": "2", "PREP_WALLTIME": "00:10:00",
                "PREP_LOG_DIR": str(logs)}
    res = subprocess.run([sys.executable, str(workflows / "slurm_prep.py"), "--dataset", str(ph2_dataset), "--out", str(work / "jq.zarr"),
                          "--no-progress", "--salt", SALT], env={**env, **settings}, cwd=work, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "#SBATCH --cpus-per-task=1" in res.stderr and "--scheduler tcp://" in res.stderr
    for k, v in WORKER_MALLOC_ENV.items():  # the worker jobs get the local cluster's malloc settings
        assert f"export {k}={v}" in res.stderr
    assert list(logs.glob("medsass-prep-worker-*.out")), "no worker job ran"  # the workers were SLURM jobs
    a, b = read_manifest(store), read_manifest(work / "jq.zarr")
    assert list(a["sample_id"]) == list(b["sample_id"]) and list(a["split"]) == list(b["split"])
    ga, gb = open_store(store)[0], open_store(work / "jq.zarr")[0]
    for name in ("image", "pseudo_mask", "label"):
        assert np.array_equal(ga[name][:], gb[name][:]), name


# -- training, evaluation, prediction --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(store, env, work, workflows, tiny_train):
    out = work / "run"
    job = sbatch(workflows / "train.sbatch", "cpu_small", "--set", f"stores.main={store}", "--set", f"out_dir={out}", *tiny_train,
                 options=("--cpus-per-task=1",), env=env, cwd=work)
    recs = wait(job)
    assert_completed(recs)
    assert "1 process(es): medsass-train run cpu_small" in log_of(recs[0])
    return out


def test_train_sbatch_runs_all_stages(run_dir):
    for stage in ("pretrain", "finetune"):
        assert (run_dir / stage / "final.pt").exists() and (run_dir / stage / "done").exists()
    assert json.loads((run_dir / "evaluate" / "metrics.json").read_text())["test"]["n"] == 2


def test_train_multinode_sbatch_on_one_node(store, env, work, workflows, tiny_train):
    """srun + torchrun with c10d rendezvous (here 1 node x 2 CPU processes, gloo)."""
    out = work / "multinode"
    job = sbatch(workflows / "train_multinode.sbatch", "cpu_small", "--stages", "pretrain", "--set", f"stores.main={store}",
                 "--set", f"out_dir={out}", *tiny_train, "--set", "runtime.device=cpu",
                 options=("--nodes=1", "--cpus-per-task=2"), env={**env, "GPUS": "2"}, cwd=work)
    recs = wait(job)
    assert_completed(recs)
    assert "1 node(s) x 2 process(es), rendezvous" in log_of(recs[0])
    import torch

    final = torch.load(out / "pretrain" / "final.pt", weights_only=True)
    assert final["world_size"] == 2 and final["step"] == 6


def test_evaluate_array_one_task_per_line(run_dir, env, work, workflows):
    listing = work / "evaluations.txt"
    listing.write_text(
        "# run folder, then the same run scored on val into its own folder\n"
        f"{run_dir}\n\n"
        f"{run_dir} --set out_dir={run_dir}/eval_val --set evaluate.checkpoint={run_dir}/finetune/final.pt --set evaluate.splits=[val]\n"
    )
    job = sbatch(workflows / "evaluate_array.sbatch", str(listing), "--set", "runtime.threads=1", options=("--array=1-2",),
                 env=env, cwd=work)
    recs = wait(job)
    assert sorted(r["ArrayTaskId"] for r in recs) == ["1", "2"]
    assert_completed(recs)
    assert "test" in json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    val = json.loads((run_dir / "eval_val" / "evaluate" / "metrics.json").read_text())
    assert list(val) == ["val"] and val["val"]["n"] == 2


def test_predict_array_one_task_per_chunk(run_dir, env, work, workflows, ph2_dataset):
    inputs = sorted((ph2_dataset.parent / "images").glob("*.png"))[:3]
    listing = work / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in inputs))
    out = work / "pred"
    job = sbatch(workflows / "predict_array.sbatch", str(run_dir), str(listing), str(out), "--device", "cpu",
                 options=("--array=1-2",), env={**env, "PREDICT_CHUNK": "2"}, cwd=work)
    recs = wait(job)
    assert_completed(recs)
    assert len(list((out / "chunk-0001").glob("*_mask.png"))) == 2 and len(list((out / "chunk-0002").glob("*_mask.png"))) == 1
    assert (out / "chunk-0001" / "predictions.csv").exists()


# -- pre-emption ------------------------------------------------------------------------------------------------


def test_preempted_training_job_requeues_itself_and_resumes(store, env, work, workflows, tiny_train):
    out, steps = work / "preempt", 40
    job = sbatch(workflows / "train.sbatch", "cpu_small", "--stages", "pretrain", "--set", f"stores.main={store}",
                 "--set", f"out_dir={out}", *tiny_train, "--set", f"pretrain.steps={steps}", options=("--cpus-per-task=1",),
                 env=env, cwd=work)
    log = out / "pretrain" / "metrics.jsonl"
    wait(job, timeout=180, until=lambda recs: log.exists() and log.read_text().strip() != "" or recs[0]["JobState"] not in ACTIVE)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what #SBATCH --signal=B:USR1@120 sends
    # The job checkpoints, exits 75 and requeues itself; SLURM holds a requeued job ~2 min (BeginTime): release it now.
    wait(job, timeout=120, until=lambda recs: recs[0]["JobState"] == "PENDING" and recs[0]["Restarts"] == "1")
    # slurmd revokes the first run's credential with 1 s resolution: a relaunch within the same second is killed
    # ("Job credential revoked", seen twice in CI). SLURM's own ~2 min hold avoids that; ours must wait >= 1 s.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    recs = wait(job)
    assert_completed(recs)
    assert recs[0]["Restarts"] == "1"
    text = log_of(recs[0])
    assert "got SIGUSR1" in text and "exit 75" in text and f"requeueing job {job}" in text and "(restart 1)" in text, text[-3000:]

    lines = [json.loads(x) for x in log.read_text().splitlines()]
    stopped = [x["step"] for x in lines if "preempted" in x]
    assert len(stopped) == 1 and 0 < stopped[0] < steps  # where the first run stopped; the second resumed after it
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, steps + 1))
    import torch

    final = torch.load(out / "pretrain" / "final.pt", weights_only=True)
    assert final["step"] == steps and (out / "pretrain" / "done").exists()
