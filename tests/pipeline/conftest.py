from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"real data folder {DATA} is absent")
    return DATA


@pytest.fixture(scope="session")
def dask_scheduler():
    """One local Dask cluster shared by the build tests (exercises the --scheduler path, saves start-up time)."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster:
        yield cluster.scheduler_address
