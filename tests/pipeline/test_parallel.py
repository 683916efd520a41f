"""The local Dask cluster prep runs on: worker settings measured to matter (pipeline/parallel.py)."""
from __future__ import annotations

import os

import dask
from medsass.pipeline.parallel import WORKER_MALLOC_ENV, dask_client, run_tasks


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


def test_dashboard_only_when_someone_is_told_where(capsys, monkeypatch):
    import distributed.dashboard.scheduler as dashboard

    connected = []
    real_connect = dashboard.connect
    monkeypatch.setattr(dashboard, "connect", lambda *a, **k: (connected.append(1), real_connect(*a, **k))[1])
    with dask_client(1, quiet=False) as client:
        assert _status(client.dashboard_link) == 200
    assert "dashboard http" in capsys.readouterr().err and connected == [1]
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
