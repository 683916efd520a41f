"""The local Dask cluster prep runs on: worker settings measured to matter (pipeline/parallel.py)."""
from __future__ import annotations

import os

import dask
from medsass.pipeline.parallel import WORKER_MALLOC_ENV, dask_client, environment, run_tasks


def _worker_settings() -> tuple[dict, bool]:
    return {k: os.environ.get(k) for k in WORKER_MALLOC_ENV}, bool(dask.config.get("distributed.worker.profile.enabled"))


def test_local_workers_get_the_malloc_env_and_no_profiler(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # left behind by any earlier Dask cluster in this process
    with dask_client(1, quiet=True) as client:
        (env, profiling), = client.run(_worker_settings).values()
        results = dict(run_tasks(client, pow, [(2, 3), (3, 2)], desc="t", progress=False))
    assert env == WORKER_MALLOC_ENV and profiling is False
    assert results == {0: 8, 1: 9}
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment is left as it was


def _worker_start() -> tuple[str, bool, str | None]:
    import multiprocessing
    import sys

    return (multiprocessing.get_start_method(allow_none=True) or "", "medsass.pipeline.process" in sys.modules,
            os.environ.get("OPENBLAS_NUM_THREADS"))


def test_local_workers_are_forked_with_prep_imported_and_dasks_thread_limits():
    with dask_client(2, quiet=True) as client:
        starts = list(client.run(_worker_start).values())  # before any task: nothing imported by a task yet
    assert starts == [("forkserver", True, os.environ.get("OPENBLAS_NUM_THREADS", "1"))] * 2  # an existing value wins


def test_environment_sets_variables_for_the_block_then_restores_all_of_them(monkeypatch):
    monkeypatch.setenv("MEDSASS_T_KEPT", "before")
    monkeypatch.delenv("MEDSASS_T_NEW", raising=False)
    monkeypatch.delenv("MEDSASS_T_STRAY", raising=False)
    with environment({"MEDSASS_T_KEPT": "inside", "MEDSASS_T_NEW": "1"}):
        assert (os.environ["MEDSASS_T_KEPT"], os.environ["MEDSASS_T_NEW"]) == ("inside", "1")
        os.environ["MEDSASS_T_STRAY"] = "x"  # as Dask's nanny writes PYTHONHASHSEED while it starts workers
    assert os.environ["MEDSASS_T_KEPT"] == "before"
    assert "MEDSASS_T_NEW" not in os.environ and "MEDSASS_T_STRAY" not in os.environ


def test_dashboard_only_when_someone_is_told_where(capsys, monkeypatch):
    import distributed.dashboard.scheduler as dashboard

    connected = []
    real_connect = dashboard.connect
    monkeypatch.setattr(dashboard, "connect", lambda *a, **k: (connected.append(1), real_connect(*a, **k))[1])
    with dask_client(1, quiet=False) as client:
        assert _status(client.dashboard_link) == 200
    err = capsys.readouterr().err
    assert "dashboard http://127.0.0.1:" in err and "this machine only; from yours: ssh -N -L " in err and connected == [1]
    with dask_client(1, quiet=True):
        pass
    assert capsys.readouterr().err == "" and connected == [1]  # no dashboard built for a quiet cluster


def _status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _listening(pid: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def test_local_cluster_listens_on_localhost_only_unless_told(monkeypatch):
    """A shared login node: the dashboard (and the scheduler's other HTTP endpoints) must not be open to every host."""
    monkeypatch.delenv("MEDSASS_DASHBOARD_ADDRESS", raising=False)
    for quiet in (False, True):  # a quiet cluster has no dashboard but still serves HTTP endpoints
        with dask_client(1, quiet=quiet):
            assert _listening(os.getpid()) == {"127.0.0.1"}, quiet
    monkeypatch.setenv("MEDSASS_DASHBOARD_ADDRESS", "127.0.0.2:0")  # what a user sets to expose it (e.g. 0.0.0.0:8787)
    with dask_client(1, quiet=False):
        assert _listening(os.getpid()) == {"127.0.0.1", "127.0.0.2"}  # the scheduler itself stays on 127.0.0.1
    with dask_client(1, quiet=False, dashboard="127.0.0.3:0"):  # the flag wins over the variable
        assert _listening(os.getpid()) == {"127.0.0.1", "127.0.0.3"}


def test_build_masks_flag_sets_the_dashboard_address(tmp_path, monkeypatch):
    from contextlib import contextmanager

    import medsass.pipeline.build as build_mod
    from click.testing import CliRunner
    from medsass.pipeline.cli import main

    from medsass.errors import StoreError
    from medsass.testing import write_blob_pngs

    seen = {}

    @contextmanager
    def client(workers, scheduler, *, quiet, dashboard):
        seen["dashboard"] = dashboard
        raise StoreError("stopped by the test")
        yield

    monkeypatch.setattr(build_mod, "dask_client", client)
    write_blob_pngs(tmp_path / "in", 1, size=32)
    res = CliRunner().invoke(main, ["build-masks", str(tmp_path / "in"), "--out", str(tmp_path / "s.zarr"),
                                    "--dashboard-address", "0.0.0.0:8787"])
    assert res.exit_code == 2 and "stopped by the test" in res.output and seen == {"dashboard": "0.0.0.0:8787"}

