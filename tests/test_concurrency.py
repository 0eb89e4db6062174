"""Several processes logging to one SQLite MLflow store at once lose nothing, even when the store
is new (MLflow creates its schema on first use; vae.tracking serialises that step)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

WRITER = """
import os, sys, time
from pathlib import Path
import mlflow  # imported before the start line, so that the processes really start together
from vae import tracking

name, points, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
with tracking.start_run("vae-concurrency", name, "train", {"writer": name}) as tracker:
    tracker.log_params({"writer": name})
    for step in range(points):
        tracker.log_metrics({"elbo": -100.0 - step, "step_seconds": 0.5}, step=step)
    tracker.log_history({"curve": [(step, float(step)) for step in range(points)]})
    print(tracker.run_id)
"""
WRITERS, POINTS = 3, 60


def test_processes_logging_to_a_new_sqlite_store_at_once_lose_no_metric(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    store = tmp_path / "mlflow.db"  # does not exist yet: the first uses race to create its schema
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, f"writer-{i}", str(POINTS), str(go)], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(WRITERS)]
    time.sleep(1)
    go.touch()
    results = [(writer.wait(timeout=300), *writer.communicate()) for writer in writers]
    for code, out, err in results:
        assert code == 0, err[-3000:]
    run_ids = {out.strip().splitlines()[0] for _, out, _ in results}
    assert len(run_ids) == WRITERS

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["writer"] == run.data.tags["writer"]
        for key, expected in (("elbo", [-100.0 - s for s in range(POINTS)]), ("curve", list(map(float, range(POINTS)))),
                              ("step_seconds", [0.5] * POINTS)):
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            assert [m.step for m in history] == list(range(POINTS)), (run_id, key)
            assert [m.value for m in history] == expected, (run_id, key)
