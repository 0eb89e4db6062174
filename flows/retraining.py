"""The ``scheduled-retraining`` flow: retrain, evaluate, register, and promote only a better model.

1. **Seed**: one above every seed a registered version of ``vae-<dataset>`` was trained with (and
   above ``train.seed`` in ``params.yaml``), so each retraining is a new draw.
2. **Retrain and evaluate**: the pipeline's stages, one task each as in ``vae-pipeline``, with
   that seed, in a workspace of the flow run's own (:mod:`flows.workspace`): the work tree is
   never written. New data comes in the same way: when a dataset's files change upstream (new
   checksums in ``vae/data/sources.py``), DVC re-runs ``download`` and everything after it.
3. **Register**: the ``evaluate`` stage registers the model as a new version of ``vae-<dataset>``;
   this flow looks the version up by the MLflow run the evaluation logged to, found by the
   hash of the workspace's ``reports/metrics.json`` (:func:`vae.tracking.evaluation_run_id`).
4. **Promote**: :func:`vae.registry.promote_if_better`: the alias ``champion`` moves to the new
   version only if its test log-likelihood beats the champion's by more than the paired standard
   error on the same test images (the champion is re-evaluated when the test images or k
   differ, e.g. after new data); the first model becomes champion. The decision and its numbers
   are tags on the version.
5. **Record**: the run is saved as a DVC experiment named after the flow run (``dvc exp show``;
   ``dvc exp apply NAME`` brings the retrained model into the work tree), and the workspace is
   removed.

Run it without any set-up: ``uv run python -m flows retrain --epochs 2``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dvc_repo import overrides_for, repository
from flows.pipeline import outcome_of, record_experiment, run_stages
from flows.workspace import flow_workspace
from vae.errors import TrackingError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download clutters the flow log


def model_name(dataset: str) -> str:
    """The registered model of a dataset: ``vae-<dataset>`` (as the evaluate stage registers it)."""
    return f"vae-{dataset}"


@task(name="choose-seed", cache_policy=NO_CACHE)
def choose_seed(root: str, dataset: str | None) -> tuple[int, str]:
    """A training seed no registered version of the dataset's model used; and the model's name."""
    from vae import tracking
    from vae.config import load_params

    params = load_params(Path(root) / "params.yaml")
    name = model_name(dataset or params.data.dataset)
    client = tracking.client_for(root)
    used = [params.train.seed]
    for version in client.search_model_versions(f"name='{name}'"):
        seed = version.tags.get("train_seed")
        if seed is not None and seed.lstrip("-").isdigit():
            used.append(int(seed))
    seed = max(used) + 1
    get_run_logger().info("retraining %s with seed %d (seeds used so far: %s)", name, seed, sorted(set(used)))
    return seed, name


@task(name="registered-version", cache_policy=NO_CACHE)
def registered_version(root: str, name: str, run_id: str | None) -> str:
    """The version of ``name`` the evaluate stage registered from MLflow run ``run_id``.

    Raises:
        TrackingError: no run id (no MLflow run evaluated the model: was tracking off?) or no
            version from that run.
    """
    from vae import tracking

    if not run_id:
        raise TrackingError("no MLflow run evaluated this model: was tracking off (VAE_TRACKING)?")
    versions = tracking.client_for(root).search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if not versions:
        raise TrackingError(f"MLflow run {run_id} registered no version of {name}")
    return str(max(int(v.version) for v in versions))


def champion_reevaluation(root: Path, workspace: Path, metrics: dict[str, Any],
                          logger: Any) -> Callable[[Any], np.ndarray]:
    """The ``reevaluate`` argument of :func:`vae.registry.promote_if_better` for this run.

    Args:
        root: the repository whose MLflow store (:func:`vae.tracking.store_uri`) is used.
        workspace: the flow run's workspace, whose ``params.yaml`` and processed test split (this
            run's test images) are used.
        metrics: this run's ``reports/metrics.json``; its ``dataset`` and ``importance_samples``
            (k) are used, with ``params.yaml``'s ``evaluate.seed`` and ``evaluate.memory_budget_mb``.
        logger: where to say what is re-evaluated (a ``logging.Logger``-like object).

    Returns:
        A function of a registered model version (``ModelVersion``: ``name``, ``version``) that
        downloads the version from the store and returns its per-example test L_k, float64 numpy
        array of shape (test examples,), in nats per example (IWAE bound, Burda et al. 2016, Eq. 8).
    """
    def reevaluate(champion: Any) -> np.ndarray:
        import tempfile

        import mlflow.artifacts
        import mlflow.pyfunc

        from vae import tracking
        from vae.config import load_params
        from vae.data.splits import load_split
        from vae.evaluate import evaluate_split

        # Not MLflow's process-wide URIs (set, they would outlive this task in a worker that runs
        # flows for other repositories), and not a models:/ URI (MLflow resolves those through
        # the process-wide registry whatever registry_uri it is given): this store's client says
        # where the version's files are, and they are downloaded with this store's tracking URI.
        client = tracking.client_for(root)
        source = client.get_model_version_download_uri(champion.name, champion.version)
        params = load_params(workspace / "params.yaml")
        with tempfile.TemporaryDirectory(prefix="vae-champion-") as scratch:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=scratch,
                                                        tracking_uri=client.tracking_uri)
            # The version's pyfunc (vae.serving) holds the checkpoint, read by vae.load_model (weights only).
            model = mlflow.pyfunc.load_model(local).unwrap_python_model().model
        test = load_split(workspace / params.paths.processed / metrics["dataset"] / "test.pt")
        logger.info("re-evaluating champion version %s on this run's %d test images with k = %d",
                    champion.version, len(test), metrics["importance_samples"])
        result = evaluate_split(model, test.values(), metrics["importance_samples"], [], params.evaluate.memory_budget_mb,
                                params.evaluate.seed, "champion test", progress=False)
        return result.log_likelihood.numpy()
    return reevaluate


@task(name="promote-if-better", cache_policy=NO_CACHE)
def promote(root: str, workspace: str, name: str, version: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """:func:`vae.registry.promote_if_better` for the new version (the champion re-evaluated on the
    test images of the flow run's ``workspace`` when needed); returns the decision as a dict."""
    from vae import registry, tracking

    logger = get_run_logger()
    client = tracking.client_for(root)
    champion = registry.current_champion(client, name)
    if champion is not None and str(champion.version) == str(version):
        # The evaluate stage made it champion when it registered it: the first version under this name.
        decision = registry.Decision(name, str(version), True, str(version), champion.tags.get("champion_reason", ""))
    else:
        decision = registry.promote_if_better(client, name, version,
                                              reevaluate=champion_reevaluation(Path(root), Path(workspace), metrics, logger))
    logger.info("%s version %s: %s (%s); champion is version %s", name, version,
                "promoted to champion" if decision.promoted else "not promoted", decision.reason,
                decision.champion_version)
    return {"name": name, "version": version, "promoted": decision.promoted,
            "champion_version": decision.champion_version, "reason": decision.reason}


@flow(name="scheduled-retraining", log_prints=True)
def scheduled_retraining(epochs: int | None = None, latent_dim: int | None = None, dataset: str | None = None,
                         seed: int | None = None, set_params: list[str] | None = None,
                         repo: str | None = None) -> dict[str, Any]:
    """Retrain with a new seed, evaluate, register, and promote to ``champion`` only if better.

    Args:
        epochs, latent_dim, dataset: as for ``vae-pipeline`` (default: params.yaml's).
        seed: the training seed (default: one above every seed used so far).
        set_params: more ``dvc exp run -S``-style overrides.
        repo: the repository (default: ``VAE_REPO``, else the working directory).

    Returns:
        The pipeline's stages and metrics, the seed, the promotion decision and the DVC experiment.

    Raises:
        ConfigError, StageFailed: from the pipeline; TrackingError: no registered version.
    """
    root = repository(repo)
    chosen, name = choose_seed(str(root), dataset)
    seed = chosen if seed is None else seed
    overrides = overrides_for(set_params, epochs=epochs, latent_dim=latent_dim, dataset=dataset, seed=seed)
    with flow_workspace(root, overrides, "scheduled-retraining") as workspace:
        print(f"retraining {name} with seed {seed} in workspace {workspace.path} (DVC experiment {workspace.name}); "
              "the work tree is not written")
        stages = run_stages(workspace)
        outcome = outcome_of(workspace)
        version = registered_version(str(root), name, outcome["evaluation_run_id"])
        decision = promote(str(root), str(workspace.path), name, version, outcome["metrics"])
        experiment = record_experiment(workspace)
    print(f"{name} version {version} (seed {seed}): "
          f"{'champion now' if decision['promoted'] else 'champion stays version ' + decision['champion_version']}; "
          f"DVC experiment {experiment['name']}")
    return {"stages": stages, "overrides": overrides, **outcome, "seed": seed, "decision": decision,
            "experiment": experiment}
