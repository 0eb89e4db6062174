"""The ``vae-pipeline`` flow: the DVC stages as Prefect tasks.

One task per stage of ``dvc.yaml``, in the order of DVC's own stage graph (read from the repo,
not restated here). Each task asks DVC whether its stage is up to date (``dvc status STAGE``)
and, if not, runs ``dvc repro --single-item STAGE``, streaming the stage's output into the
task's log; an up-to-date stage ends in a ``Completed`` state named ``Skipped``. So DVC's cache
decides what runs, and ``dvc.lock`` ends as ``dvc repro`` would leave it.

Parameter overrides (``latent_dim``, ``epochs``, ... or any ``set_params`` in ``dvc exp run -S``
syntax, applied by DVC's own Hydra-override code) are written to ``params.yaml`` for the run and
the file is restored byte for byte afterwards, also when a stage fails. A copy kept under
``.dvc/tmp`` restores it should the flow process itself be killed mid-run: the next flow in the
repository puts it back first. An exclusive lock on the repository keeps two flows from
interleaving their stages. What the flow asks of DVC and the repository is in :mod:`flows.dvc_repo`.

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

from flows.dvc_repo import (StageFailed, describe_status, dvc_command, overridden_params, overrides_for, repository,
                            repository_lock, stage_env, stage_order, stage_status, stream)

SKIPPED = "Skipped"


def run_stage_fn(root: str, stage: str) -> State | dict[str, Any]:
    """Body of a stage task: skip when DVC says the stage is up to date, else ``dvc repro --single-item``.

    Returns a ``Completed`` state named ``Skipped`` for an up-to-date stage, else
    ``{"stage", "ran": True, "reason"}``.

    Raises:
        StageFailed: the stage's command failed (the message ends with its last output lines).
    """
    logger = get_run_logger()
    path = Path(root)
    status = stage_status(path, stage)
    if not status:
        logger.info("stage %s is up to date: skipped (DVC cache)", stage)
        return Completed(message=f"stage {stage} is up to date", name=SKIPPED, data={"stage": stage, "ran": False})
    reason = describe_status(status, stage)
    logger.info("stage %s runs: %s", stage, reason)
    returncode, _, tail = stream(dvc_command("repro", "--single-item", stage), path, stage_env())
    if returncode != 0:
        raise StageFailed(f"stage {stage} failed (dvc repro exit {returncode}) in {path}:\n" + "\n".join(tail))
    return {"stage": stage, "ran": True, "reason": reason}


_COMMON = {"cache_policy": NO_CACHE, "log_prints": True}
run_stage = task(run_stage_fn, name="dvc-stage", **_COMMON)
# The only stage that talks to the network: retried with back-off (10 s, 20 s, 40 s).
download_stage = task(run_stage_fn, name="download", retries=3, retry_delay_seconds=exponential_backoff(10),
                      **_COMMON)


def run_stages(root: Path) -> dict[str, str]:
    """Run every stage as a task, in DVC's order; returns ``{stage: "ran" | "skipped"}``.

    Raises:
        StageFailed: a stage failed (later stages are not started).
    """
    outcome = {}
    for stage in stage_order(root):
        base = download_stage if stage == "download" else run_stage
        state = base.with_options(name=stage, task_run_name=stage)(str(root), stage, return_state=True)
        state.result()  # raises the stage's error when the task failed
        outcome[stage] = "skipped" if state.name == SKIPPED else "ran"
    return outcome


@flow(name="vae-pipeline", log_prints=True)
def vae_pipeline(epochs: int | None = None, latent_dim: int | None = None, seed: int | None = None,
                 dataset: str | None = None, hidden_dim: int | None = None,
                 training_samples: int | None = None, importance_samples: int | None = None,
                 set_params: list[str] | None = None, repo: str | None = None) -> dict[str, Any]:
    """Run the DVC pipeline stage by stage, with optional parameter overrides.

    Args:
        epochs, latent_dim, seed, dataset, hidden_dim, training_samples, importance_samples:
            shortcuts for ``train.epochs``, ``model.latent_dim``, ``train.seed``, ``data.dataset``,
            ``model.hidden_dim``, ``train.training_samples``, ``evaluate.importance_samples``.
        set_params: more overrides, as ``dvc exp run -S`` takes them (``["train.batch_size=50"]``).
        repo: the repository (default: ``VAE_REPO``, else the working directory).

    Returns:
        ``{"stages": {stage: "ran" | "skipped"}, "metrics": reports/metrics.json, "overrides": [...]}``.

    Raises:
        ConfigError: bad overrides or parameters (``params.yaml`` left as it was).
        StageFailed: a stage failed (``params.yaml`` restored; completed stages stay in ``dvc.lock``).
    """
    root = repository(repo)
    overrides = overrides_for(set_params, epochs=epochs, latent_dim=latent_dim, seed=seed, dataset=dataset,
                              hidden_dim=hidden_dim, training_samples=training_samples,
                              importance_samples=importance_samples)
    with repository_lock(root), overridden_params(root, overrides) as params:
        if overrides:
            print(f"parameters for this run: {' '.join(overrides)} (params.yaml is restored afterwards)")
        stages = run_stages(root)
        metrics_path = root / params.paths.reports / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    ran = [name for name, what in stages.items() if what == "ran"]
    print(f"stages run: {', '.join(ran) or 'none (all up to date)'}; "
          f"test log-likelihood {metrics.get('test_log_likelihood')} nats per example")
    return {"stages": stages, "metrics": metrics, "overrides": overrides}
