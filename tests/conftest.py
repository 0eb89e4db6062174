"""Fixtures and hooks only; what the test modules share otherwise is in tests/support.py. Every
test runs with MLflow pointed at a temporary store, so nothing is written to the repository's
``mlflow.db`` or ``mlruns/``."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# One torch thread in every process of the suite (pytest's workers, and through the environment the
# stages, flows and servers they start): the suite runs two workers at once on two cores, and a
# process computing on two threads beside another busy one spends most of its CPU time in its thread
# pool's waits. The tiny pipeline's `vae evaluate` took 17 s of CPU time so, 6 s on one thread.
# Results do not change with it but for float rounding, and every test that compares two
# executions runs both on one thread. Set before torch is first imported (tests/support.py).
os.environ["OMP_NUM_THREADS"] = "1"

from support import REPO_ROOT, run_interrupted  # noqa: E402

# The suite's subprocesses (dvc, the stages, the servers, the flows) import torch, mlflow and prefect
# hundreds of times. Where PYTHONDONTWRITEBYTECODE is set, as on this project's machines, each of
# those imports compiles the packages from source again: `import torch, mlflow` took 10.0 s so, and
# 3.2 s from cached bytecode. The suite lets its processes cache bytecode (in .venv and the
# __pycache__ folders, which git and DVC ignore); pytest-xdist's workers, started after this file is
# loaded, inherit it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
# A flow run without PREFECT_API_URL starts Prefect's temporary server and gives up after 20 s by
# default; with the suite's two workers busy on a 2-core machine it can take longer to come up.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


# The test files that take minutes, in the order pytest-xdist's workers should start them (the rest
# follow, in their usual order): the longest first, so no worker is left with a long file at the
# end; test_pipeline.py after four others, so that whichever worker takes it finds the pipeline run
# that test_interruptions.py's worker builds (`interrupted_pipeline`) finished instead of waiting
# for it. Then the files of ten seconds or more, longest first (2026-12-07: test_mcmc.py 46 s,
# test_fuzz.py 21 s, ... test_report.py 12 s), so that the last files either worker takes are the
# short ones. Measured with `pytest --durations=0`; a file's tests keep their order.
SLOW_FILES = ("test_interruptions.py", "test_flows_e2e.py", "test_sweep_e2e.py", "test_profiles_e2e.py",
              "test_pipeline.py", "test_determinism.py", "test_tracking_faults.py", "test_train.py", "test_flows.py",
              "test_concurrency.py", "test_mcmc.py", "test_fuzz.py", "test_registry.py", "test_params_tracking.py",
              "test_two_layer.py", "test_visualize.py", "test_report.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: file order kept


@pytest.fixture(autouse=True, scope="session")
def _isolated_tracking(tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("mlflow")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    patch.setenv("DVC_NO_ANALYTICS", "1")
    yield
    patch.undo()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def interrupted_pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The pipeline on tests/support.py's ``SMALL`` settings, in a temporary git copy of the
    repository, run to the end through a kill -9 of each stage (``support.run_interrupted``, plain
    values). Shared by tests/test_interruptions.py and tests/test_pipeline.py, one run instead of
    two; under pytest-xdist the first worker to ask runs it and the other reads its result (a file
    lock in the run's common temporary folder)."""
    common = _common_folder(tmp_path_factory)
    result = common / "interrupted_pipeline.json"
    with open(common / "interrupted_pipeline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if result.exists():
            return json.loads(result.read_text())
        run = run_interrupted(tmp_path_factory)
        result.write_text(json.dumps(run))
        return run


def _common_folder(factory: pytest.TempPathFactory) -> Path:
    """The folder every pytest-xdist worker of this session shares (the session's own without xdist)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """Returns a function that makes a new, empty PREFECT_HOME whose database (``prefect.db``) is
    already migrated to the installed Prefect's schema, for a ``prefect server start`` or a flow's
    temporary server.

    Prefect migrates a new database when its server starts, some 200 Alembic migrations: a server
    on a new database took 19 s of CPU time to answer /health here, one on a migrated copy 7 s.
    So the migration runs once per test session (``prefect server database upgrade``, by the first
    worker to ask; the others wait on a file lock) and each home gets a copy (SQLite's backup API).
    """
    template = _common_folder(tmp_path_factory) / "prefect-template" / "prefect.db"
    with open(template.parent.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.exists():
            template.parent.mkdir(exist_ok=True)
            env = {**os.environ, "PREFECT_HOME": str(template.parent), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "DO_NOT_TRACK": "true"}
            for name in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL",
                         "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_PROFILES_PATH"):
                env.pop(name, None)
            done = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                                  env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0 and template.is_file(), done.stdout + done.stderr

    def new_home() -> Path:
        home = tmp_path_factory.mktemp("prefect-home")
        with contextlib.closing(sqlite3.connect(template)) as source, \
                contextlib.closing(sqlite3.connect(home / "prefect.db")) as copy:
            source.backup(copy)
        return home

    return new_home

