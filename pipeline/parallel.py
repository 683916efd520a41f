"""The one module that knows Dask: a client (local cluster or an existing scheduler) and a
progress-reporting map over tasks.

Workers are processes with one thread each (decoding and thresholding hold the GIL for much of
their time). Three Dask defaults are changed for the local cluster, each measured on prep's own work: Dask's
``MALLOC_TRIM_THRESHOLD_=65536`` in the workers' environment makes glibc map, fault in and unmap every
image-sized array (+30% CPU per image); :data:`WORKER_MALLOC_ENV` keeps freed memory (up to 128 MiB) for
reuse instead. The workers' statistical profiler, which samples the running task every 10 ms, is off. And the
workers are forked from a fork server (multiprocessing's ``forkserver``) that has imported Dask and prep's worker
modules once, instead of each being a fresh interpreter that imports them again on its first tasks: the server is
started (:func:`start_worker_server`) while this process imports its own modules, so the two overlap, and a worker
exits without tearing an interpreter down. With spawned workers, build-masks on 4 small PNGs spent ~3.5 s of its
~5.5 s outside its tasks on this (loaded) 2-core machine: cluster 1.4 s, the first tasks' imports 1.5 s, closing 0.6 s.
workflows/ exports the same variables for workers on a cluster (an existing environment variable wins over
Dask's config). ``scheduler`` points at an existing cluster, e.g. one started by dask-jobqueue's
``SLURMCluster`` or by ``dask scheduler`` / ``dask worker`` under ``srun`` (see workflows/).
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from tqdm.auto import tqdm

# glibc malloc for prep workers: allocations below 16 MiB (images, masks) come from the heap and up to 128 MiB
# of freed memory is kept for the next image, rather than mmap/munmap per array. Same speed as glibc's own
# default here, and, unlike unsetting Dask's value, expressible as plain environment variables on a cluster.
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(128 << 20), "MALLOC_MMAP_THRESHOLD_": str(16 << 20)}
# Dask's nanny sets its pre-spawn variables in the environment just before it starts a worker; a forked worker has the
# fork server's environment instead, so the server starts with them (BLAS reads its thread count, glibc its malloc
# settings, once per process). An existing variable wins, as in Dask, except for ours.
DASK_PRE_SPAWN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
LOCAL_WORKER_CONFIG = {
    **{f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC_ENV.items()},
    "distributed.worker.profile.enabled": False,
}
# What the fork server imports before it forks the first worker: Dask's worker and every module prep's tasks run.
WORKER_MODULES = ("distributed", "medsass.pipeline.plan", "medsass.pipeline.shards", "medsass.pipeline.store_polarity")
# Where the scheduler's dashboard (and its other HTTP endpoints) listen. Dask's ":port" means every interface: on a
# shared login node anyone could read the task stream and the logs. This machine only, on a free port, unless the
# variable or --dashboard-address says otherwise; from elsewhere, tunnel to it (workflows/README.md).
DASHBOARD_ENV = "MEDSASS_DASHBOARD_ADDRESS"
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:0"


def dashboard_address(given: str | None = None) -> str:
    """``given`` (the --dashboard-address flag), else $MEDSASS_DASHBOARD_ADDRESS, else 127.0.0.1 on a free port."""
    return given or os.environ.get(DASHBOARD_ENV) or DEFAULT_DASHBOARD_ADDRESS


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """The block runs with ``values`` set in this process's environment, which is then put back exactly as it was:
    Dask's nanny writes its own pre-spawn variables (ours, PYTHONHASHSEED) into it while it starts the workers."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update(saved)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def dask_client(
    workers: int = 0, scheduler: str | None = None, *, quiet: bool = False, dashboard: str | None = None
) -> Iterator[Any]:
    """A client of ``scheduler``, or of a local cluster of ``workers`` processes. Unless ``quiet``, prints where
    it runs and the dashboard's address (a quiet local cluster has no dashboard). The local cluster's HTTP
    endpoints listen on :func:`dashboard_address` (``dashboard``: host:port, default 127.0.0.1, a free port)."""
    # lazy (here and in run_tasks): dask.distributed takes ~0.4 s to import, and prep's CLI imports this module
    # first, to start the workers' fork server, which imports Dask while this process imports the rest (cli.py build)
    import dask
    from dask.distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler, timeout="60s")
        cluster = None
    else:
        # Dask's nanny prefers a variable already in the environment over its config, and every Dask cluster started
        # in this process leaves MALLOC_TRIM_THRESHOLD_=65536 there: set ours in the environment while it starts.
        method = "forkserver" if start_worker_server() else "spawn"
        with dask.config.set({**LOCAL_WORKER_CONFIG, "distributed.worker.multiprocessing-method": method}), \
                environment(WORKER_MALLOC_ENV):
            cluster = LocalCluster(
                n_workers=workers or default_workers(),
                threads_per_worker=1,
                processes=True,
                dashboard_address=dashboard_address(dashboard),  # also the scheduler's other HTTP endpoints
                scheduler_kwargs={"dashboard": not quiet},  # quiet: nobody is told its address (bokeh: ~0.6 s)
                silence_logs=logging.ERROR,
            )
        client = Client(cluster)
    if not quiet:
        where = f"scheduler {scheduler}" if scheduler else f"local cluster, {len(client.scheduler_info()['workers'])} worker(s)"
        link = client.dashboard_link if scheduler else dashboard_hint(client.dashboard_link, dashboard_address(dashboard))
        print(f"dask: {where}; dashboard {link}", file=sys.stderr)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def start_worker_server() -> bool:
    """Start the fork server local workers are forked from, unless it runs (False where there is none: Windows).

    Returns at once: the server imports :data:`WORKER_MODULES` in its own process, with the workers' environment
    (:data:`WORKER_MALLOC_ENV`, :data:`DASK_PRE_SPAWN_ENV`), while the caller goes on; the first worker waits for it.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_MODULES))
    env = {**DASK_PRE_SPAWN_ENV, **{k: os.environ[k] for k in DASK_PRE_SPAWN_ENV if k in os.environ}, **WORKER_MALLOC_ENV}
    with environment(env):
        multiprocessing.forkserver.ensure_running()
    return True


def dashboard_hint(link: str, address: str) -> str:
    """The URL of a dashboard started with ``address`` (Dask's ``link`` names the scheduler's host, not the
    dashboard's; its port is right), and for a loopback one the SSH tunnel that opens it from another machine."""
    port, host = urlsplit(link).port, address.rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "[::1]"):
        return (f"http://{host}:{port}/status (this machine only; from yours: "
                f"ssh -N -L {port}:127.0.0.1:{port} {socket.gethostname()}, then open http://localhost:{port}/status)")
    return f"http://{socket.gethostname() if host in ('', '0.0.0.0', '[::]') else host}:{port}/status"


def run_tasks(
    client: Any,
    fn: Callable[..., Any],
    calls: Sequence[tuple],
    *,
    desc: str,
    progress: bool = True,
    key: str = "medsass",
) -> Iterator[tuple[int, Any]]:
    """Submit ``fn(*args)`` for each tuple in ``calls``; yield ``(index, result)`` as tasks finish.

    An exception in a task cancels the rest and is re-raised here.
    """
    from dask.distributed import as_completed  # lazy: see dask_client

    token = uuid.uuid4().hex[:8]  # unique per run: a shared scheduler must not reuse an old result
    futures = [client.submit(fn, *args, key=f"{key}-{desc}-{token}-{i}", pure=False) for i, args in enumerate(calls)]
    index = {f.key: i for i, f in enumerate(futures)}
    bar = tqdm(total=len(futures), desc=desc, unit="task", disable=not progress, file=sys.stderr)
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                exc = fut.exception()
                client.cancel(futures)
                raise exc
            yield index[fut.key], fut.result()
            bar.update(1)
    finally:
        bar.close()
