#!/usr/bin/env python
"""Prep on many nodes with dask-jobqueue: a ``SLURMCluster`` that grows and shrinks with the work
(``cluster.adapt(minimum_jobs, maximum_jobs)``), and ``medsass-prep build-masks ARGS --scheduler ADDRESS``.

    python workflows/slurm_prep.py --dataset data_manifests/ph2_dermoscopy.yaml --out /shared/ph2.zarr --size 256

Every argument goes to ``build-masks``; its exit status is this script's. Run it where ``sbatch`` works (a login
node, or inside a small long-running job): the Dask scheduler lives in this process, the workers in SLURM jobs
of ``PREP_CORES`` single-threaded worker processes each. Settings (PREP_*) come from the environment or
workflows/medsass.env; see workflows/README.md. The store must be on a file system the worker nodes see.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def settings() -> dict[str, str]:
    """PREP_* from the environment, else from medsass.env (``: "${NAME:=value}"`` lines), else the defaults here."""
    values = {"PREP_MIN_JOBS": "1", "PREP_MAX_JOBS": "8", "PREP_CORES": "4", "PREP_MEMORY": "8GB", "PREP_WALLTIME": "02:00:00",
              "PREP_QUEUE": "", "PREP_ACCOUNT": "", "PREP_INTERFACE": "", "PREP_JOB_EXTRA": "", "PREP_LOG_DIR": "dask-logs"}
    env_file = Path(os.environ.get("MEDSASS_ENV", HERE / "medsass.env"))
    if env_file.is_file():  # let bash read it, exactly as the .sbatch scripts do
        names = " ".join(f"{n}=${{{n}}}" for n in values)
        out = subprocess.run(["bash", "-c", f'. "$0" >/dev/null && printf "%s\\n" {names}', str(env_file)],
                             capture_output=True, text=True, check=True, env=os.environ).stdout
        values.update(line.split("=", 1) for line in out.splitlines() if "=" in line)
    values.update({n: os.environ[n] for n in values if n in os.environ})
    return values


def make_cluster(s: dict[str, str]):
    from dask_jobqueue import SLURMCluster
    from medsass.pipeline.parallel import WORKER_MALLOC_ENV, dashboard_address

    cores = int(s["PREP_CORES"])
    # the local cluster's worker settings (medsass.pipeline.parallel): glibc keeps freed image buffers, no profiler
    env = {**WORKER_MALLOC_ENV, "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}
    return SLURMCluster(
        cores=cores,
        processes=cores,  # one thread per worker process: decoding and thresholding hold the GIL
        memory=s["PREP_MEMORY"],
        walltime=s["PREP_WALLTIME"],
        queue=s["PREP_QUEUE"] or None,
        account=s["PREP_ACCOUNT"] or None,
        interface=s["PREP_INTERFACE"] or None,
        job_extra_directives=[d.strip() for d in s["PREP_JOB_EXTRA"].split(";") if d.strip()],
        log_directory=s["PREP_LOG_DIR"] or None,
        python=sys.executable,  # this venv's interpreter on the worker nodes
        job_name="medsass-prep-worker",
        job_script_prologue=[f"export {k}={v}" for k, v in env.items()],
        # dask-jobqueue's default ':8787' is every interface of the login node: 127.0.0.1 unless MEDSASS_DASHBOARD_ADDRESS
        scheduler_options={"dashboard_address": dashboard_address()},
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    from medsass.pipeline.parallel import dashboard_address, dashboard_hint

    s = settings()
    cluster = make_cluster(s)
    try:
        cluster.adapt(minimum_jobs=int(s["PREP_MIN_JOBS"]), maximum_jobs=int(s["PREP_MAX_JOBS"]))
        print(f"slurm_prep: scheduler {cluster.scheduler_address}; worker jobs adapt between {s['PREP_MIN_JOBS']} and "
              f"{s['PREP_MAX_JOBS']} x {s['PREP_CORES']} workers; dashboard "
              f"{dashboard_hint(cluster.dashboard_link, dashboard_address())}; job script:\n{cluster.job_script()}",
              file=sys.stderr, flush=True)
        build = [sys.executable, "-m", "medsass.pipeline.cli", "build-masks", *argv, "--scheduler", cluster.scheduler_address]
        print("slurm_prep: medsass-prep " + shlex.join(build[3:]), file=sys.stderr, flush=True)
        return subprocess.call(build)
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
