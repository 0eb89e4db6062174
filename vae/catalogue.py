"""The MLflow run catalogue: which training runs the tracking store holds, their ELBO curves and models.

The figures over runs (AEVB Fig. 2 and 5, :mod:`vae.visualize`) and the latent-size sweep
(:mod:`vae.sweep`) draw :class:`RunCurves`: this execution's run (:func:`current_run`, from its
own files, so it works with tracking off) and the latest finished run of every other
(dataset, binarization, latent_dim, algorithm) in the store (:func:`tracked_runs`, read through
:mod:`vae.tracking`'s client). With tracking off the store is not read and this run stands alone.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from vae import tracking
from vae.errors import CheckpointError, TrackingError
from vae.model import VAE, load_model


@dataclass(frozen=True)
class TrainedRun:
    """A training run found in the tracking store (see :func:`trained_runs`)."""

    run_id: str
    name: str
    dataset: str
    binarization: str
    profile: str
    latent_dim: int
    start_time: int  # milliseconds since the epoch
    algorithm: str = "aevb"  # train.algorithm: aevb | wake-sleep


def trained_runs(experiment_prefix: str = "vae-", limit: int = 1000) -> list[TrainedRun]:
    """The runs of the experiments named ``<experiment_prefix>*`` whose training finished
    (the ``train`` stage logs ``train_seconds`` last), newest first; child runs (re-evaluations)
    and runs without dataset, binarization or latent_dim are left out. Empty when tracking is off.

    Raises:
        TrackingError: the tracking store cannot be read (names the URI).
    """
    if not tracking.enabled():
        return []
    client, uri = tracking.connect()
    experiments = tracking.call(uri, client.search_experiments, filter_string=f"name LIKE '{experiment_prefix}%'")
    if not experiments:
        return []
    runs = tracking.call(uri, client.search_runs, [e.experiment_id for e in experiments],
                 filter_string="metrics.train_seconds >= 0", order_by=["attributes.start_time DESC"],
                 max_results=limit)
    found = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if "mlflow.parentRunId" in tags or not {"dataset", "binarization"} <= set(tags):
            continue
        try:
            latent_dim = int(params["model.latent_dim"])
        except (KeyError, ValueError):
            continue
        found.append(TrainedRun(run.info.run_id, tags.get("mlflow.runName", run.info.run_id), tags["dataset"],
                                tags["binarization"], tags.get("profile", "?"), latent_dim,
                                int(run.info.start_time or 0), tags.get("algorithm", "aevb")))
    return found


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """The (step, value) points of metric ``key`` of run ``run_id``, by step (empty if never logged).

    Raises:
        TrackingError: the tracking store cannot be read.
    """
    client, uri = tracking.connect()
    points = tracking.call(uri, client.get_metric_history, run_id, key)
    return sorted((int(point.step), float(point.value)) for point in points)



@dataclass
class RunCurves:
    """One run's ELBO per evaluated pass (nats per example), for :func:`lower_bound_runs`.

    ``curves`` has columns examples_seen (int), train_elbo and ``held_out`` (float): test_elbo,
    or valid_elbo for runs trained before the per-pass test ELBO was recorded.
    """

    run_id: str | None
    name: str
    dataset: str
    binarization: str
    profile: str
    latent_dim: int
    current: bool = False
    curves: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    algorithm: str = "aevb"  # train.algorithm: aevb | wake-sleep

    @property
    def held_out(self) -> str:
        """``test_elbo``, ``valid_elbo`` or ``none``: the held-out curve it has."""
        for column in ("test_elbo", "valid_elbo"):
            if column in self.curves and self.curves[column].notna().any():
                return column
        return "none"

    def describe(self) -> dict:
        """Plain values for ``figure_runs.json`` and the report."""
        return {key: value for key, value in asdict(self).items() if key != "curves"} | {
            "held_out": {"test_elbo": "test", "valid_elbo": "validation"}.get(self.held_out, "none"),
            "points": len(self.curves)}


def current_run(summary: dict, epochs: pd.DataFrame) -> RunCurves:
    """This execution's run, from ``train_summary.json`` and ``elbo_curve.csv`` (works with tracking off)."""
    keep = [c for c in ("examples_seen", "train_elbo", "test_elbo", "valid_elbo") if c in epochs]
    return RunCurves(summary.get("mlflow_run_id"), "this run", summary["dataset"], summary["binarization"],
                     str(summary.get("profile", "?")), int(summary["latent_dim"]), current=True,
                     curves=epochs[keep].copy(), algorithm=str(summary.get("algorithm", "aevb")))


def tracked_runs(current: RunCurves) -> list[RunCurves]:
    """The latest run whose training finished for each (dataset, binarization, latent_dim, algorithm) in the
    MLflow tracking store, ``current`` in place of its own key; curves read from the metric
    histories ``train_elbo`` and ``test_elbo_curve`` (``valid_elbo`` for older runs).

    The tracking store is outside DVC: ``dvc repro`` does not re-run ``visualize`` when another
    pipeline adds a run; ``dvc repro -s -f visualize && dvc repro`` redraws (and re-reports).

    Raises:
        TrackingError: the store cannot be read.
    """
    chosen: dict[tuple[str, str, int, str], RunCurves] = {
        (current.dataset, current.binarization, current.latent_dim, current.algorithm): current}
    for found in trained_runs():
        key = (found.dataset, found.binarization, found.latent_dim, found.algorithm)
        if key in chosen or found.run_id == current.run_id:
            continue
        train = metric_history(found.run_id, "train_elbo")
        if not train:
            continue
        frame = pd.DataFrame(train, columns=["examples_seen", "train_elbo"])
        for metric, column in (("test_elbo_curve", "test_elbo"), ("valid_elbo", "valid_elbo")):
            points = metric_history(found.run_id, metric)
            if points:
                frame = frame.merge(pd.DataFrame(points, columns=["examples_seen", column]), on="examples_seen",
                                    how="left")
                break
        chosen[key] = RunCurves(found.run_id, found.name, found.dataset, found.binarization, found.profile,
                                found.latent_dim, curves=frame, algorithm=found.algorithm)
    return list(chosen.values())


def prior_models(runs: list[RunCurves], current_model: VAE, workdir: Path) -> list[tuple[RunCurves, VAE]]:
    """The model of each run of ``runs`` with the current run's dataset and binarization: the current
    run's ``current_model``, the others' ``checkpoint/model.pt`` artifacts downloaded to ``workdir``.
    A run whose checkpoint cannot be fetched or read is left out with a warning on stderr."""
    current = next(run for run in runs if run.current)
    models = []
    for run in runs:
        # AEVB Fig. 5 shows one algorithm's models: this run's.
        if (run.dataset, run.binarization, run.algorithm) != (current.dataset, current.binarization, current.algorithm):
            continue
        if run.current:
            models.append((run, current_model))
            continue
        try:
            path = tracking.download_artifact(run.run_id, "checkpoint/model.pt", workdir / run.run_id)
            models.append((run, load_model(path)))
        except (TrackingError, CheckpointError) as error:
            print(f"WARNING: run {run.name} ({run.run_id}) left out of the prior samples: {error}",
                  file=sys.stderr)
    return models


def run_order(run: RunCurves) -> tuple:
    """The order runs are listed in (``figure_runs.json``, the report): dataset, binarization, latent_dim, algorithm."""
    return (run.dataset, run.binarization, run.latent_dim, run.algorithm)
