"""The ``vae-pipeline`` flow: the DVC stages as Prefect tasks.

One task per stage of ``dvc.yaml``, in the order of DVC's own stage graph (read from the repo,
not restated here). Each task asks DVC whether its stage is up to date (``dvc status STAGE``)
and, if not, runs ``dvc repro --single-item STAGE``, streaming the stage's output into the
task's log; an up-to-date stage ends in a ``Completed`` state named ``Skipped``. So DVC's cache
decides what runs, and ``dvc.lock`` ends as ``dvc repro`` would leave it.

The flow never writes the user's work tree. It runs in a workspace of its own, a git worktree
that shares the repository's DVC cache (:mod:`flows.workspace`), with the run's parameter
overrides (``latent_dim``, ``epochs``, ... or any ``set_params`` in ``dvc exp run -S`` syntax)
applied to the workspace's ``params.yaml``. When every stage has run, the result is recorded as
a DVC experiment named after the Prefect flow run (``dvc exp show``; ``dvc exp apply NAME``
brings it into the work tree), and the workspace is removed, also when a stage fails or the flow
is stopped (SIGTERM ends the stage's processes and exits within seconds). One flow runs per
repository at a time. What the flow asks of DVC and the repository is in :mod:`flows.dvc_repo`.

Run it without any set-up (Prefect's temporary local server)::

    uv run python -m flows pipeline --epochs 2 --latent-dim 2
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from flows.dvc_repo import (StageFailed, describe_status, dvc_command, overrides_for, repository, stage_order,
                            stage_status, stream)
from flows.workspace import Workspace, doing, flow_workspace, save_experiment, workspace_env

SKIPPED = "Skipped"


def run_stage_fn(workspace: str, stage: str, repo: str, experiment: str) -> State | dict[str, Any]:
    """Body of a stage task: skip when DVC says the stage is up to date in the flow's workspace,
    else ``dvc repro --single-item`` there (in :func:`flows.workspace.workspace_env` of the
    repository ``repo`` and the DVC experiment ``experiment``).

    Returns a ``Completed`` state named ``Skipped`` for an up-to-date stage, else
    ``{"stage", "ran": True, "reason"}``.

    Raises:
        StageFailed: the stage's command failed (the message ends with its last output lines).
    """
    logger = get_run_logger()
    path = Path(workspace)
    status = stage_status(path, stage)
    if not status:
        logger.info("stage %s is up to date: skipped (DVC cache)", stage)
        return Completed(message=f"stage {stage} is up to date", name=SKIPPED, data={"stage": stage, "ran": False})
    reason = describe_status(status, stage)
    logger.info("stage %s runs: %s", stage, reason)
    with doing(f"stage {stage}"):
        returncode, _, tail = stream(dvc_command("repro", "--single-item", stage), path,
                                     workspace_env(repo, experiment))
    if returncode != 0:
        raise StageFailed(f"stage {stage} failed (dvc repro exit {returncode}) in {path}:\n" + "\n".join(tail))
    return {"stage": stage, "ran": True, "reason": reason}


_COMMON = {"cache_policy": NO_CACHE, "log_prints": True}
run_stage = task(run_stage_fn, name="dvc-stage", **_COMMON)
# The only stage that talks to the network: retried with back-off (10 s, 20 s, 40 s).
download_stage = task(run_stage_fn, name="download", retries=3, retry_delay_seconds=exponential_backoff(10),
                      **_COMMON)


def run_stages(workspace: Workspace) -> dict[str, str]:
    """Run every stage as a task in the flow's workspace, in DVC's order; returns
    ``{stage: "ran" | "skipped"}``.

    Raises:
        StageFailed: a stage failed (later stages are not started).
    """
    outcome = {}
    for stage in stage_order(workspace.path):
        base = download_stage if stage == "download" else run_stage
        state = base.with_options(name=stage, task_run_name=stage)(str(workspace.path), stage, str(workspace.root),
                                                                   workspace.name, return_state=True)
        state.result()  # raises the stage's error when the task failed
        outcome[stage] = "skipped" if state.name == SKIPPED else "ran"
    return outcome


@task(name="record-experiment", cache_policy=NO_CACHE)
def record_experiment(workspace: Workspace) -> dict[str, str]:
    """Record the workspace as its DVC experiment (:func:`flows.workspace.save_experiment`);
    returns ``{"name", "commit", "baseline"}``."""
    experiment = save_experiment(workspace)
    get_run_logger().info("recorded as DVC experiment %s (commit %s on %s): `dvc exp show`, "
                          "`dvc exp apply %s`", experiment.name, experiment.commit[:7], experiment.baseline[:7],
                          experiment.name)
    return {"name": experiment.name, "commit": experiment.commit, "baseline": experiment.baseline}


def outcome_of(workspace: Workspace) -> dict[str, Any]:
    """What the workspace's pipeline produced: its ``reports/metrics.json`` (``{}`` if absent), the
    MLflow run that trained its ``models/model.pt`` and the one its evaluation logged to (and
    registered the model version under: the training run, or its child when only the evaluation
    settings differ); None where there is none (tracking off, or the stage did not run)."""
    from vae import tracking

    params = workspace.params
    metrics_path = workspace.path / params.paths.reports / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    model = workspace.path / params.paths.models / "model.pt"
    trained = evaluated = None
    if tracking.enabled():
        with workspace.tracking():
            trained = tracking.training_run_id(model) if model.is_file() else None
            evaluated = tracking.evaluation_run_id(metrics_path) if metrics_path.is_file() else None
    return {"metrics": metrics, "mlflow_run_id": trained, "evaluation_run_id": evaluated}


@flow(name="vae-pipeline", log_prints=True)
def vae_pipeline(epochs: int | None = None, latent_dim: int | None = None, seed: int | None = None,
                 dataset: str | None = None, hidden_dim: int | None = None,
                 training_samples: int | None = None, importance_samples: int | None = None,
                 set_params: list[str] | None = None, repo: str | None = None) -> dict[str, Any]:
    """Run the DVC pipeline stage by stage in a workspace of its own, with optional parameter
    overrides, and record the result as a DVC experiment named after this flow run.

    Args:
        epochs, latent_dim, seed, dataset, hidden_dim, training_samples, importance_samples:
            shortcuts for ``train.epochs``, ``model.latent_dim``, ``train.seed``, ``data.dataset``,
            ``model.hidden_dim``, ``train.training_samples``, ``evaluate.importance_samples``.
        set_params: more overrides, as ``dvc exp run -S`` takes them (``["train.batch_size=50"]``).
        repo: the repository (default: ``VAE_REPO``, else the working directory).

    Returns:
        ``{"stages": {stage: "ran" | "skipped"}, "metrics": reports/metrics.json, "overrides": [...],
        "experiment": {"name", "commit", "baseline"}, "mlflow_run_id" (training),
        "evaluation_run_id"}``.

    Raises:
        ConfigError: bad overrides or parameters (nothing is run).
        StageFailed: a stage failed (no experiment is recorded; the work tree is as it was).
    """
    root = repository(repo)
    overrides = overrides_for(set_params, epochs=epochs, latent_dim=latent_dim, seed=seed, dataset=dataset,
                              hidden_dim=hidden_dim, training_samples=training_samples,
                              importance_samples=importance_samples)
    with flow_workspace(root, overrides, "vae-pipeline") as workspace:
        print(f"workspace {workspace.path} (DVC experiment {workspace.name})"
              + (f", parameters {' '.join(overrides)}" if overrides else "") + "; the work tree is not written")
        stages = run_stages(workspace)
        outcome = outcome_of(workspace)
        experiment = record_experiment(workspace)
    ran = [name for name, what in stages.items() if what == "ran"]
    print(f"stages run: {', '.join(ran) or 'none (all up to date)'}; test log-likelihood "
          f"{outcome['metrics'].get('test_log_likelihood')} nats per example; DVC experiment {experiment['name']} "
          f"(`dvc exp apply {experiment['name']}` brings it into the work tree)")
    return {"stages": stages, "overrides": overrides, "experiment": experiment, **outcome}
