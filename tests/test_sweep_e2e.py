"""The latent-size sweep end to end, on two tiny Frey Face members (AEVB and wake-sleep):

- the ``vae-sweep`` flow (``python -m flows sweep``, Prefect's temporary server) on a real local
  Dask cluster of 2 worker processes, in a temporary git copy of the repository;
- ``dvc repro`` of the same member stages in a twin copy, one after the other, without Prefect.

The members must have run at the same time in the flow (their recorded time spans overlap, in
different processes), give the same numbers and weights as the sequential run, be recorded so
that ``dvc status`` reports the sweep up to date, and be MLflow children of one sweep run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from support import Pipeline, dataset_mirror

pytestmark = pytest.mark.e2e

MEMBERS = ("frey-z2-aevb-s0", "frey-z2-wake-sleep-s0")
TINY_SWEEP = {"sweep": {
    "size": "quick", "algorithms": ["aevb", "wake-sleep"], "seeds": [0], "latent_dims": {"mnist": [], "frey": [2]},
    "threads": 1,
    "settings": {
        "mnist": {"data": {"binarization": "dynamic", "train_subset": 600, "eval_subset": 200}},
        "frey": {"data": {"binarization": "none"}, "model": {"hidden_dim": 32},
                 "train": {"epochs": None, "training_samples": 30000, "curve_points": 8, "elbo_eval_size": 500,
                           "checkpoint_interval": 0, "device": "cpu"},
                 "evaluate": {"importance_samples": 10, "bound_curve": [1, 10], "train_examples": 200,
                              "device": "cpu"}}}}}
# Written by the run itself (wall-clock times, MLflow ids), so not compared between the two runs.
VOLATILE = {"train_seconds", "evaluate_seconds", "mlflow_run_id"}


def _members(root: Path) -> dict[str, Path]:
    return {name: root / "reports/sweep/members" / name for name in MEMBERS}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    if not dataset_mirror():
        pytest.skip("no dataset mirror (set VAE_DATA_MIRROR or place ../shared/datasets beside the repo)")
    pipe = Pipeline.copy_of_repository(tmp_path_factory, TINY_SWEEP)
    pipe.env.update({"PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"})
    for name in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH"):
        pipe.env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "flows", "sweep", "--workers", "2", "--no-report"],
                            cwd=pipe.root, env=pipe.env, capture_output=True, text=True, timeout=900)
    pipe.flow_output = result.stdout + result.stderr
    assert result.returncode == 0, pipe.flow_output[-6000:]
    return pipe


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory: pytest.TempPathFactory, flow_run: Pipeline) -> Pipeline:
    pipe = Pipeline.copy_of_repository(tmp_path_factory, TINY_SWEEP)
    pipe.output = pipe.dvc("repro", "sweep-frey@2-aevb-0", "sweep-frey@2-wake-sleep-0")  # and their data
    return pipe


def test_the_flow_ran_the_members_in_parallel_on_two_dask_workers(flow_run: Pipeline) -> None:
    assert "sweep: 2 members on a local Dask cluster of 2 workers" in flow_run.flow_output
    assert "2 members ran, 0 up to date" in flow_run.flow_output
    records = [json.loads((folder / "member.json").read_text()) for folder in _members(flow_run.root).values()]
    spans = [(pd.Timestamp(r["started"]), pd.Timestamp(r["finished"])) for r in records]
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a, f"the members ran one after the other: {spans}"
    assert records[0]["pid"] != records[1]["pid"]
    assert all(r["threads"] == 1 for r in records)
    table = pd.read_csv(flow_run.root / "reports/sweep/sweep_results.csv")
    assert list(table["member"]) == list(MEMBERS)
    assert list(table["started"]) == [r["started"] for r in records]  # the overlap is in the table too
    assert (flow_run.root / "reports/sweep/lower_bound_sweep.png").stat().st_size > 10000


def test_dvc_status_reports_the_sweep_up_to_date_after_the_flow(flow_run: Pipeline) -> None:
    status = json.loads(flow_run.dvc("status", "sweep-report", "--json"))
    assert status == {}, status  # the members, their data and the aggregate, as `dvc repro` leaves them
    lock = yaml.safe_load((flow_run.root / "dvc.lock").read_text())["stages"]
    for stage in ("sweep-frey@2-aevb-0", "sweep-frey@2-wake-sleep-0", "sweep-data@frey", "sweep-report"):
        assert stage in lock, stage
    # The recorded outputs are in the DVC cache: removing the checkpoint and checking out restores it.
    checkpoint = flow_run.root / "models/sweep/frey-z2-aevb-s0/model.pt"
    data = checkpoint.read_bytes()
    checkpoint.unlink()
    flow_run.dvc("checkout", "sweep-frey@2-aevb-0")
    assert checkpoint.read_bytes() == data


def test_parallel_members_equal_the_sequential_dvc_repro(flow_run: Pipeline, sequential_run: Pipeline) -> None:
    from vae.model import load_model

    assert "Running stage 'sweep-frey@2-aevb-0'" in sequential_run.output
    for name in MEMBERS:
        parallel, sequential = _members(flow_run.root)[name], _members(sequential_run.root)[name]
        one, two = (json.loads((folder / "metrics.json").read_text()) for folder in (parallel, sequential))
        assert {k: v for k, v in one.items() if k not in VOLATILE} == {k: v for k, v in two.items() if k not in VOLATILE}
        curves = [pd.read_csv(folder / "elbo_curve.csv").drop(columns="seconds") for folder in (parallel, sequential)]
        pd.testing.assert_frame_equal(*curves)
        for file in ("bound_curve.csv", "log_likelihood_per_example.csv", "train_steps.csv"):
            assert (parallel / file).read_bytes() == (sequential / file).read_bytes(), f"{name}/{file}"
        models = [load_model(root / f"models/sweep/{name}/model.pt") for root in (flow_run.root, sequential_run.root)]
        for (key, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
            assert torch.equal(a, b), f"{name}: {key} differs"
    # Both record the same inputs in dvc.lock (dependencies and parameters) for every sweep stage.
    locks = [yaml.safe_load((pipe.root / "dvc.lock").read_text())["stages"] for pipe in (flow_run, sequential_run)]
    for stage in ("sweep-frey@2-aevb-0", "sweep-frey@2-wake-sleep-0", "sweep-data@frey"):
        assert locks[0][stage]["deps"] == locks[1][stage]["deps"], stage
        assert locks[0][stage]["params"] == locks[1][stage]["params"], stage


def test_members_are_mlflow_children_of_one_sweep_run(flow_run: Pipeline) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{flow_run.store}")
    experiment = client.get_experiment_by_name("vae-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "vae.sweep_member" not in run.data.tags]
    children = [run for run in runs if "vae.sweep_member" in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(run.data.tags["vae.sweep_member"] for run in children) == sorted(MEMBERS)
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parents[0].info.run_id}
    assert {run.data.tags["algorithm"] for run in children} == {"aevb", "wake-sleep"}
    artifacts = {item.path for item in client.list_artifacts(parents[0].info.run_id, "sweep")}
    assert artifacts == {"sweep/lower_bound_sweep.png", "sweep/sweep_results.csv"}
    # Members register no model version: the registry's champion is the main run's.
    assert not client.search_model_versions("name = 'vae-frey'")
