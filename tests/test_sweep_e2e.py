"""The latent-size sweep end to end, on two tiny Frey Face members (AEVB and wake-sleep):

- the ``vae-sweep`` flow (``python -m flows sweep``, Prefect's temporary server) on a real local
  Dask cluster of 2 worker processes, in a temporary git copy of the repository;
- ``dvc repro`` of the same member stages in a twin copy, one after the other, without Prefect.

The members must have run at the same time in the flow (the time spans their MLflow runs record
overlap, in different processes), write the same files byte for byte as the sequential run (so
the same hashes in ``dvc.lock``), be recorded so that ``dvc status`` reports the sweep up to
date, and be MLflow children of one sweep run.
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

from support import Pipeline, dataset_mirror, git

pytestmark = pytest.mark.e2e

MEMBERS = ("frey-z2-aevb-s0", "frey-z2-wake-sleep-s0")
TINY_SWEEP = {"sweep": {
    "size": "quick", "algorithms": ["aevb", "wake-sleep"], "seeds": [0], "latent_dims": {"mnist": [], "frey": [2]},
    "threads": 1,
    "settings": {
        "mnist": {"data": {"binarization": "dynamic", "train_subset": 600, "eval_subset": 200}},
        "frey": {"data": {"binarization": "none"}, "model": {"hidden_dim": 32},
                 "train": {"epochs": None, "training_samples": 30000, "curve_points": 8, "elbo_eval_size": 500,
                           "device": "cpu"},
                 "evaluate": {"importance_samples": 10, "bound_curve": [1, 10], "train_examples": 200,
                              "device": "cpu"}}}}}


def _members(root: Path) -> dict[str, Path]:
    return {name: root / "reports/sweep/members" / name for name in MEMBERS}


def _member_runs(pipe: Pipeline) -> dict[str, dict[str, str]]:
    """The tags of each member's MLflow training run, by member name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pipe.store}")
    experiment = client.get_experiment_by_name("vae-sweep")
    return {run.data.tags["vae.sweep_member"]: dict(run.data.tags)
            for run in client.search_runs([experiment.experiment_id]) if "vae.sweep_member" in run.data.tags}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory: pytest.TempPathFactory, prefect_home) -> Pipeline:
    if not dataset_mirror():
        pytest.skip("no dataset mirror (set VAE_DATA_MIRROR or place ../shared/datasets beside the repo)")
    pipe = Pipeline.copy_of_repository(tmp_path_factory, TINY_SWEEP)
    pipe.env.update({"PREFECT_HOME": str(prefect_home()),
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"})
    for name in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH"):
        pipe.env.pop(name, None)
    # Without the repository's dvc.lock, whose outputs (the real MNIST run's) are in no cache here:
    # `dvc exp apply` checks out every output its experiment's dvc.lock names.
    git(pipe.root, "rm", "-q", "dvc.lock")
    git(pipe.root, "commit", "-qm", "no dvc.lock")
    result = subprocess.run([sys.executable, "-m", "flows", "sweep", "--workers", "2", "--no-report"],
                            cwd=pipe.root, env=pipe.env, capture_output=True, text=True, timeout=900)
    pipe.flow_output = result.stdout + result.stderr
    assert result.returncode == 0, pipe.flow_output[-6000:]
    # The flow wrote nothing in the work tree; its result is a DVC experiment, applied here.
    status = subprocess.run(["git", "status", "--porcelain"], cwd=pipe.root, capture_output=True, text=True)
    assert status.stdout == "" and not (pipe.root / "dvc.lock").exists(), status.stdout
    assert not (pipe.root / "reports/sweep").exists()
    shown = json.loads(pipe.dvc("exp", "show", "--json", "--no-pager"))
    [name] = [rev["name"] for baseline in shown for experiment in baseline.get("experiments") or []
              for rev in experiment.get("revs", [])]
    assert f"DVC experiment {name}" in pipe.flow_output
    # The experiment's dvc.lock has the sweep's stages only (the flow ran no other): `dvc exp apply`
    # checks out their outputs, and says that the main pipeline's, never run, cannot be.
    applied = subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", name], cwd=pipe.root, env=pipe.env,
                             capture_output=True, text=True, timeout=300)
    missing = applied.stderr.split("Checkout failed for following targets:")[-1].split("Is your cache")[0].split()
    assert applied.returncode == 0 or not any("sweep/frey" in target for target in missing), applied.stderr
    return pipe


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory: pytest.TempPathFactory, flow_run: Pipeline) -> Pipeline:
    pipe = Pipeline.copy_of_repository(tmp_path_factory, TINY_SWEEP)
    pipe.output = pipe.dvc("repro", "sweep-frey@2-aevb-0", "sweep-frey@2-wake-sleep-0")  # and their data
    return pipe


def test_the_flow_ran_the_members_in_parallel_on_two_dask_workers(flow_run: Pipeline) -> None:
    assert "sweep: 2 members on a local Dask cluster of 2 workers" in flow_run.flow_output
    assert "2 members ran, 0 up to date" in flow_run.flow_output
    from vae import sweep

    # When and in which process each member ran: tags of its MLflow run (no DVC output holds them).
    tags = _member_runs(flow_run)
    records = [tags[name] for name in MEMBERS]
    spans = [(pd.Timestamp(r[sweep.STARTED_TAG]), pd.Timestamp(r[sweep.FINISHED_TAG])) for r in records]
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a, f"the members ran one after the other: {spans}"
    assert records[0][sweep.PID_TAG] != records[1][sweep.PID_TAG]
    assert all(r[sweep.HOST_TAG] for r in records)
    members = [json.loads((folder / "member.json").read_text()) for folder in _members(flow_run.root).values()]
    assert all(m["threads"] == 1 for m in members)
    table = pd.read_csv(flow_run.root / "reports/sweep/sweep_results.csv")
    assert list(table["member"]) == list(MEMBERS)
    assert not {"started", "finished", "host", "mlflow_run_id", "train_seconds"} & set(table.columns)
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
        files = sorted(path.name for path in parallel.iterdir())
        assert {"metrics.json", "train_summary.json", "member.json", "elbo_curve.csv"} <= set(files)
        assert files == sorted(path.name for path in sequential.iterdir())
        for file in files:  # every output, byte for byte: no time, host or run id in any of them
            assert (parallel / file).read_bytes() == (sequential / file).read_bytes(), f"{name}/{file}"
        models = [load_model(root / f"models/sweep/{name}/model.pt") for root in (flow_run.root, sequential_run.root)]
        for (key, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
            assert torch.equal(a, b), f"{name}: {key} differs"
        assert len({(root / f"models/sweep/{name}/model.pt").read_bytes()
                    for root in (flow_run.root, sequential_run.root)}) == 1, f"{name}: model.pt differs"
    # Both record the same dvc.lock entry (dependencies, parameters and outputs' hashes) for every sweep stage.
    locks = [yaml.safe_load((pipe.root / "dvc.lock").read_text())["stages"] for pipe in (flow_run, sequential_run)]
    for stage in ("sweep-frey@2-aevb-0", "sweep-frey@2-wake-sleep-0", "sweep-data@frey"):
        assert locks[0][stage] == locks[1][stage], stage


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
