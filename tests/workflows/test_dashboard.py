"""The Dask dashboards the workflows start listen on 127.0.0.1 unless MEDSASS_DASHBOARD_ADDRESS says otherwise."""
from __future__ import annotations

import importlib
import sys

import pytest


@pytest.fixture
def slurm_prep(workflows, monkeypatch):
    monkeypatch.syspath_prepend(str(workflows))
    sys.modules.pop("slurm_prep", None)
    return importlib.import_module("slurm_prep")


def test_slurm_prep_dashboard_is_not_open_on_the_login_node(slurm_prep, monkeypatch):
    """dask-jobqueue's default ':8787' is every interface of the login node its scheduler runs on."""
    pytest.importorskip("dask_jobqueue")
    monkeypatch.delenv("MEDSASS_DASHBOARD_ADDRESS", raising=False)
    cluster = slurm_prep.make_cluster(slurm_prep.settings())  # no job is submitted before adapt()
    try:
        http = cluster.scheduler.http_server  # (dashboard_link names the scheduler's host, whatever the dashboard's)
        assert {s.getsockname()[0] for s in http._sockets.values()} == {"127.0.0.1"}
    finally:
        cluster.close()


def test_prep_srun_scheduler_dashboard_address_is_configurable(workflows):
    script = (workflows / "prep_srun.sbatch").read_text()
    assert '--dashboard-address "${MEDSASS_DASHBOARD_ADDRESS:-127.0.0.1:0}"' in script and "--dashboard-address :0" not in script
