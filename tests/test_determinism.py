"""Determinism shows in the hashes: two executions of the pipeline on the same inputs write the same
bytes, so DVC records the same ``dvc.lock``.

No output a later stage depends on holds a wall time, host, process or MLflow run id; those go to
MLflow (metrics such as ``train_seconds``, tags), and the stages find their run by the hash of the
files DVC tracks (:func:`vae.tracking.training_run_id`, :func:`vae.tracking.evaluation_run_id`).
The one exception is the report's own output (``report.html``, ``report.md``): it shows the wall
times and run ids, read from MLflow, and the time it was generated.

The end-to-end test compares the ``dvc.lock`` of two fresh copies of the repository on small data
(tests/support.py's ``SMALL``, with its one-member sweep): the session's pipeline, logging to its
own MLflow store and reached through a kill of each stage and resumptions (tests/conftest.py's
``interrupted_pipeline``; tests/test_interruptions.py checks it equals an uninterrupted twin), and a
plain ``dvc repro`` with MLflow off (``VAE_TRACKING=off``). So a hashed output that held anything of
the store (a run id, an experiment id, a count of runs) would differ between the two. The other
tests check the parts in one process, in seconds.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from support import SMALL, Pipeline, git, one_thread, write_processed
from vae import evaluate, report, tracking, train
from vae.config import params_from_dict
from vae.io import file_sha256

# The report stage's own outputs: the one stated exception (wall times, run ids, generation time).
REPORT_OUTPUTS = ("reports/report.html", "reports/report.md")


def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.store_uri())


def new_run(experiment: str = "vae-determinism-test", tags: dict | None = None) -> str:
    """A run in the session's store (tests/conftest.py) with ``tags``; returns its id."""
    client = mlflow_client()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    return client.create_run(experiment_id, tags=tags or {}).info.run_id


# --------------------------------------------------------------------------------------------
# How the stages find their MLflow run without a run id in any output
# --------------------------------------------------------------------------------------------


def test_a_checkpoint_leads_to_the_newest_run_tagged_with_its_hash(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights " + tmp_path.name.encode())
    assert tracking.training_run_id(checkpoint) is None  # nothing trained it in this store
    digest = file_sha256(checkpoint)
    older = new_run(tags={tracking.MODEL_TAG: digest})
    time.sleep(0.01)  # start times in milliseconds
    newer = new_run(tags={tracking.MODEL_TAG: digest})
    new_run(tags={tracking.MODEL_TAG: "0" * 64})  # another checkpoint's run
    assert older != newer
    assert tracking.training_run_id(checkpoint) == newer  # two trainings wrote the same bytes: the newest
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"test_log_likelihood": -90.5}')
    child = new_run(tags={tracking.METRICS_TAG: file_sha256(metrics), tracking.TRAINED_RUN_TAG: newer})
    assert tracking.evaluation_run_id(metrics) == child
    assert tracking.trained_run_of(tracking.read_run(child)) == newer
    assert tracking.trained_run_of(tracking.read_run(newer)) == newer


def test_with_tracking_off_no_run_is_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    new_run(tags={tracking.MODEL_TAG: file_sha256(checkpoint)})
    monkeypatch.setenv(tracking.TRACKING_ENV, "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # would fail if it were reached
    assert tracking.training_run_id(checkpoint) is None
    assert tracking.evaluation_run_id(checkpoint) is None
    assert tracking.read_run("any") is None
    with tracking.run_of_output(checkpoint, "evaluate", tag=tracking.MODEL_TAG) as tracker:
        assert not tracker.active


def test_every_run_the_stages_create_carries_the_dvc_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With VAE_DVC_EXPERIMENT set (the flows set it), the runs train creates (start_run), the
    sweep's run (find_or_create_run) and a re-evaluation's child run (resume_run) are tagged
    dvc.experiment with its value; without it, none is."""
    assert tracking.EXPERIMENT_ENV == "VAE_DVC_EXPERIMENT" and tracking.EXPERIMENT_TAG == "dvc.experiment"
    client = mlflow_client()
    monkeypatch.delenv(tracking.EXPERIMENT_ENV, raising=False)
    with tracking.start_run("vae-determinism-test", "plain", "train") as tracker:
        tracker.log_params({"evaluate.importance_samples": 10})
    assert tracking.EXPERIMENT_TAG not in client.get_run(tracker.run_id).data.tags

    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "witty-otter")
    with tracking.start_run("vae-determinism-test", "in-a-flow", "train") as trained:
        trained.log_params({"evaluate.importance_samples": 10})
    with tracking.resume_run(trained.run_id, "evaluate", {"evaluate.importance_samples": 20}) as child:
        pass
    sweep = tracking.find_or_create_run("vae-determinism-test", "vae.sweep_id", f"id-{time.time_ns()}", "sweep")
    assert child.run_id != trained.run_id
    for run_id in (trained.run_id, child.run_id, sweep):
        assert client.get_run(run_id).data.tags[tracking.EXPERIMENT_TAG] == "witty-otter", run_id


# --------------------------------------------------------------------------------------------
# The train and evaluate stages, twice, in this process
# --------------------------------------------------------------------------------------------


def stage_params(root: Path, processed: Path):
    """A tiny train and evaluate set-up whose models and reports go under ``root``."""
    return params_from_dict({
        "paths": {"raw": str(root / "raw"), "processed": str(processed), "models": str(root / "models"),
                  "reports": str(root / "reports")},
        "model": {"hidden_dim": 16, "latent_dim": 2},
        "train": {"epochs": 2, "batch_size": 100, "elbo_eval_size": 100, "device": "cpu", "log_interval": 4},
        "evaluate": {"importance_samples": 10, "bound_curve": [1, 10], "train_examples": 100, "device": "cpu",
                     "ais_test_examples": 4, "ais_train_examples": 2, "ais_temperatures": 5, "bdmc_examples": 2,
                     "appendix_d_samples": 10}})


TRAIN_AND_EVALUATE_OUTPUTS = ("models/model.pt", "reports/train_summary.json", "reports/elbo_curve.csv",
                              "reports/train_steps.csv", "reports/metrics.json", "reports/bound_curve.csv",
                              "reports/log_likelihood_per_example.csv", "reports/ais_per_example.csv",
                              "reports/active_units.json")


def test_training_and_evaluating_twice_writes_the_same_bytes_and_logs_the_times(tmp_path: Path) -> None:
    """Two executions of train and evaluate (MLflow on) write identical files; each logged to its
    own run, found by the checkpoint's hash (the newest), with its wall times there and nowhere else."""
    processed = write_processed(tmp_path / "data", train_count=400, dim=64)
    roots, runs = [tmp_path / "first", tmp_path / "second"], []
    for root in roots:
        params = stage_params(root, processed)
        with one_thread():
            train.run(params, progress=False)
            evaluate.run(params, progress=False, register=False)
        runs.append(tracking.training_run_id(root / "models/model.pt"))
    outputs = [{name: (root / name).read_bytes() for name in TRAIN_AND_EVALUATE_OUTPUTS} for root in roots]
    assert [name for name in TRAIN_AND_EVALUATE_OUTPUTS if outputs[0][name] != outputs[1][name]] == []
    first, second = runs
    assert None not in runs and first != second and second == tracking.training_run_id(roots[0] / "models/model.pt")
    assert tracking.evaluation_run_id(roots[1] / "reports/metrics.json") == second
    client = mlflow_client()
    for run_id in runs:
        run = client.get_run(run_id)
        assert run.data.tags[tracking.MODEL_TAG] == file_sha256(roots[0] / "models/model.pt")
        assert run.data.tags[tracking.METRICS_TAG] == file_sha256(roots[0] / "reports/metrics.json")
        assert {"train_seconds", "evaluate_seconds", "ais_seconds"} <= set(run.data.metrics)
        assert tracking.RESUMED_TAG not in run.data.tags
    metrics = json.loads(outputs[0]["reports/metrics.json"])
    summary = json.loads(outputs[0]["reports/train_summary.json"])
    volatile = {"train_seconds", "evaluate_seconds", "ais_seconds", "mlflow_run_id", "resumed_from_passes"}
    assert not volatile & (set(metrics) | set(summary))
    assert "seconds" not in outputs[0]["reports/elbo_curve.csv"].decode().splitlines()[0].split(",")


def test_the_report_reads_wall_times_and_runs_from_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """execution_record follows metrics.json's hash to the run evaluate logged to (here a
    re-evaluation's child) and from there to the training run; with tracking off it records nothing."""
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "metrics.json").write_text(json.dumps({"test_log_likelihood": -91.25, "where": str(tmp_path)}))
    params = params_from_dict({"paths": {"reports": str(reports)}})
    assert report.execution_record(params) == report.NOT_RECORDED  # no run logged this metrics.json
    client = mlflow_client()
    trained = new_run(tags={tracking.RESUMED_TAG: "1,3"})
    client.log_metric(trained, "train_seconds", 12.5)
    evaluated = new_run(tags={tracking.TRAINED_RUN_TAG: trained,
                              tracking.METRICS_TAG: file_sha256(reports / "metrics.json")})
    client.log_metric(evaluated, "evaluate_seconds", 3.25)
    client.log_metric(evaluated, "ais_seconds", 4.5)
    record = report.execution_record(params)
    assert record == {**report.NOT_RECORDED, "run_id": evaluated, "training_run_id": trained,
                      "tracking_uri": tracking.tracking_uri(), "train_seconds": 12.5, "evaluate_seconds": 3.25,
                      "ais_seconds": 4.5, "resumed_from_passes": [1, 3]}
    monkeypatch.setenv(tracking.TRACKING_ENV, "off")
    assert report.execution_record(params) == report.NOT_RECORDED


# --------------------------------------------------------------------------------------------
# Two fresh copies of the repository, dvc repro in each
# --------------------------------------------------------------------------------------------


def without_report_outputs(lock: dict) -> dict:
    """``dvc.lock`` (parsed) with the hashes of the report stage's own outputs left out (its
    dependencies, parameters and the paths of its outputs stay)."""
    stages = {**lock["stages"]}
    entry = stages["report"]
    assert sorted(out["path"] for out in entry["outs"]) == sorted(REPORT_OUTPUTS)
    stages["report"] = {**entry, "outs": [{"path": out["path"]} for out in entry["outs"]]}
    return {**lock, "stages": stages}


@pytest.mark.e2e
def test_two_fresh_copies_write_the_same_dvc_lock(interrupted_pipeline: dict,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """The first copy: the session's pipeline on SMALL (with the one-member sweep), reached through
    a kill -9 of each stage and resumptions, logging to its MLflow store. The second: a fresh copy
    whose git commit holds the first copy's dvc.lock, run by plain ``dvc repro`` with MLflow off
    (nothing of a store can reach its outputs; and no stage pays for MLflow's start-up).

    Every stage but the report re-runs there and rewrites its dvc.lock entry byte for byte (git
    status stays empty); then the report runs, and the two lock files are equal except for the
    hashes of the report's own outputs (report.html, report.md: they show the wall times and
    MLflow run ids, read from the first copy's MLflow store, and when they were generated)."""
    first_lock = interrupted_pipeline["lock"]
    second = Pipeline.copy_of_repository(tmp_path_factory, SMALL)
    second.env[tracking.TRACKING_ENV] = "off"
    (second.root / "dvc.lock").write_text(first_lock)
    git(second.root, "add", "dvc.lock")
    git(second.root, "commit", "-qm", "dvc.lock of the first copy")
    started = time.monotonic()

    # Every stage but the report: its outputs are not there, so each runs, and writes the lock entry
    # the first copy wrote.
    stages = second.dvc("stage", "list", "--name-only").split()  # SMALL's: one sweep member
    assert "report" in stages and "sweep-frey@2-aevb-0" in stages, stages
    output = second.dvc("repro", *[name for name in stages if name != "report"])
    ran = {name for name in stages if f"Running stage '{name}'" in output}
    assert ran == set(stages) - {"report"}, output[-3000:]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=second.root, capture_output=True, text=True,
                            check=True).stdout
    assert status == "", status + subprocess.run(["git", "diff"], cwd=second.root, capture_output=True,
                                                 text=True).stdout[-4000:]

    # Then the report: the one stage whose own outputs differ between the two executions.
    output = second.dvc("repro")
    assert "Running stage 'report'" in output, output[-3000:]
    second_lock = (second.root / "dvc.lock").read_text()
    assert without_report_outputs(yaml.safe_load(second_lock)) == without_report_outputs(yaml.safe_load(first_lock))
    status = subprocess.run(["git", "status", "--porcelain"], cwd=second.root, capture_output=True, text=True,
                            check=True).stdout
    assert status in ("", " M dvc.lock\n"), status
    assert second.status() == {}
    print(f"second copy's dvc repro: {time.monotonic() - started:.0f} s")
