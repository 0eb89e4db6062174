"""AEVB Figure 2's latent-size sweep: datasets x latent sizes x algorithms x seeds.

``params.yaml``'s ``sweep`` section declares it (:class:`vae.config.SweepConfig`) and ``dvc.yaml``
expands it with ``matrix:`` into one stage per member (``sweep-mnist@3-aevb-0``): each member is a
complete, independent run of :func:`vae.train.run` and :func:`vae.evaluate.run` on its own
parameters (:func:`vae.config.member_params`) and its own folders:

- ``<paths.raw>/sweep/<dataset>``, ``<paths.processed>/sweep/<dataset>``: the sweep's data
  (stage ``sweep-data@<dataset>``; the main run's data stay the main run's);
- ``<paths.models>/sweep/<member>/model.pt`` (``train_state.pt`` beside it while training);
- ``<paths.reports>/sweep/members/<member>/``: ``train_summary.json``, ``elbo_curve.csv``,
  ``metrics.json``, ... and ``member.json`` (which member, on how many threads).

Stage ``sweep-report`` (:func:`run_report`) reads the members the sweep declares and writes
``<paths.reports>/sweep/lower_bound_sweep.png`` (the Figure 2 replica) and
``sweep_results.csv`` (one row per member: final ELBOs and L_k).

MLflow: every member's training run is a child (``mlflow.parentRunId``) of one run of the
experiment ``vae-sweep`` that stands for the sweep: the run tagged with the sweep's identity
(:func:`vae.config.sweep_id`, a digest of the ``sweep`` section), which ``sweep-report`` completes with the
figure, the table and the re-parenting of members trained under an earlier declaration. Members
register no model version (the registry's champion is the main run's business). No DVC output of
the sweep holds a run id, a time or a host: ``sweep-report`` finds each member's run by the hash of
its ``metrics.json`` (:func:`member_runs`), and when and where a member ran are tags of its
training run (:data:`HOST_TAG`, :data:`PID_TAG`, :data:`STARTED_TAG`, :data:`FINISHED_TAG`).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import time
from pathlib import Path

import pandas as pd

from vae import datasets, tracking
from vae.config import Member, Params, data_params, member_params, members, sweep_id, sweep_paths
from vae.errors import ConfigError, DataError
from vae.io import read_json, write_csv, write_json

EXPERIMENT = "vae-sweep"
SWEEP_TAG = "vae.sweep_id"
MEMBER_TAG = "vae.sweep_member"
# When and where a member ran (tags of its training run; UTC times in ISO 8601, to the millisecond).
HOST_TAG, PID_TAG = "vae.host", "vae.pid"
STARTED_TAG, FINISHED_TAG = "vae.started", "vae.finished"


def sweep_run(params: Params) -> str | None:
    """The MLflow run of this sweep declaration (created on first use); None with tracking off.

    Raises:
        TrackingError: the tracking store cannot be reached.
    """
    identity = sweep_id(params.sweep)
    return tracking.find_or_create_run(
        EXPERIMENT, SWEEP_TAG, identity, run_name=f"sweep-{params.sweep.size}-{identity}",
        tags={"sweep_size": params.sweep.size, "members": str(len(members(params.sweep)))})


def run_data(params: Params, dataset: str, progress: bool = True) -> dict[str, int]:
    """Stage ``sweep-data@<dataset>``: download and binarize the dataset into the sweep's folders.

    Raises:
        ConfigError, DownloadError, DataError: as :func:`vae.stages.download` and :func:`vae.stages.binarize`.
    """
    from vae import stages

    if dataset not in datasets.DATASETS:
        raise ConfigError(f"sweep-data: dataset {dataset!r}: expected one of {', '.join(datasets.NAMES)}")
    chosen = data_params(params.sweep, dataset, params.paths)
    stages.download(chosen, progress=progress)
    return stages.binarize(chosen, progress=progress)


def run_member(params: Params, member: Member, progress: bool = True) -> dict:
    """Stage ``sweep-<dataset>@<latent_dim>-<algorithm>-<seed>``: train and evaluate one member.

    torch runs on ``sweep.threads`` CPU threads, so that the member's numbers do not depend on
    how many members run beside it. Writes the member's folders (:func:`sweep_paths`) and
    ``member.json`` (the member and its thread count); when and where it ran (start and end
    time, host, process) go to its MLflow training run as tags (:data:`STARTED_TAG`, ...).

    Returns:
        The member's ``metrics.json``.

    Raises:
        ConfigError: the member is not declared; TrainingError, DataError, TrackingError as the stages.
    """
    import torch

    from vae import evaluate, train

    chosen = member_params(params.sweep, member, params.paths)
    if params.sweep.threads is not None:
        torch.set_num_threads(params.sweep.threads)
    reports = Path(chosen.paths.reports)
    if reports.exists():  # outputs of an earlier run of this member; `dvc repro` removes them itself
        shutil.rmtree(reports)
    started = time.time()
    parent = sweep_run(params)
    tags = {MEMBER_TAG: member.name, SWEEP_TAG: sweep_id(params.sweep), "seed": str(member.seed)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    train.run(chosen, progress=progress, experiment=EXPERIMENT, run_name=member.name, tags=tags)
    metrics = evaluate.run(chosen, progress=progress, register=False)
    write_json(reports / "member.json", {
        "member": member.name, "stage": member.stage, "dataset": member.dataset, "latent_dim": member.latent_dim,
        "algorithm": member.algorithm, "seed": member.seed, "threads": torch.get_num_threads()})
    tracking.set_run_tags(tracking.training_run_id(chosen.paths.checkpoint) if tracking.enabled() else None, {
        HOST_TAG: socket.gethostname(), PID_TAG: os.getpid(), STARTED_TAG: _timestamp(started),
        FINISHED_TAG: _timestamp(time.time())})
    return metrics


def _timestamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="milliseconds")


# What each member computed; how its execution went (times, host, MLflow run) is its MLflow run's.
RESULT_COLUMNS = ["member", "dataset", "latent_dim", "algorithm", "seed", "examples_seen", "train_elbo",
                  "test_elbo", "importance_samples", "test_log_likelihood", "test_log_likelihood_stderr",
                  "active_units"]


def read_member(params: Params, member: Member) -> tuple[dict, pd.DataFrame]:
    """A finished member's row of ``sweep_results.csv`` and its per-pass ELBO curve.

    Raises:
        DataError: the member has not run (names the missing file and the stage to run).
    """
    folder = Path(sweep_paths(params.paths, member).reports)
    for name in ("metrics.json", "train_summary.json", "member.json", "elbo_curve.csv"):
        # read_json's FileNotFoundError carries no filename: name the file here
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: missing; run the member first (`uv run dvc repro {member.stage}`)")
    metrics = read_json(folder / "metrics.json")
    curve = pd.read_csv(folder / "elbo_curve.csv")
    row = {"member": member.name, "dataset": member.dataset, "latent_dim": member.latent_dim,
           "algorithm": member.algorithm, "seed": member.seed,
           **{key: metrics.get(key) for key in RESULT_COLUMNS[5:] if key in metrics}}
    return {key: row.get(key) for key in RESULT_COLUMNS}, curve


def member_runs(params: Params) -> dict[str, str]:
    """``{member name: id of its MLflow training run}`` for each declared member whose
    ``metrics.json`` is there and whose evaluation a run of the store in use is tagged with
    (:func:`vae.tracking.evaluation_run_id`; the training run behind it,
    :func:`vae.tracking.trained_run_of`). Empty with tracking off.

    Raises:
        TrackingError: the tracking store cannot be reached.
    """
    if not tracking.enabled():
        return {}
    found = {}
    for member in members(params.sweep):
        path = Path(sweep_paths(params.paths, member).reports) / "metrics.json"
        run = tracking.read_run(tracking.evaluation_run_id(path)) if path.is_file() else None
        if run is not None:
            found[member.name] = tracking.trained_run_of(run)
    return found


def run_report(params: Params, progress: bool = True) -> dict[str, str]:
    """Stage ``sweep-report``: the Figure 2 replica and ``sweep_results.csv`` from the declared
    members; both logged to the sweep's MLflow run, of which every member's run is made a child.

    Raises:
        DataError: a declared member has not run.
        TrackingError: the tracking store cannot be reached.
    """
    from vae.visualize import SweepCurves, lower_bound_sweep

    out = Path(params.paths.reports) / "sweep"
    rows, curves = [], []
    for member in members(params.sweep):
        row, curve = read_member(params, member)
        rows.append(row)
        curves.append((member, row, curve))
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    binarization = {dataset: data_params(params.sweep, dataset).data.binarization for dataset in datasets.NAMES}
    runs = []
    for (dataset, latent_dim, algorithm), group in _groups(curves):
        # Seeds share their settings, hence their evaluated passes: the figure shows their mean.
        frames = [curve.set_index("examples_seen")[["train_elbo", "test_elbo"]] for _, _, curve in group]
        mean = pd.concat(frames).groupby(level=0).mean().reset_index()
        runs.append(SweepCurves(name=f"{dataset}-z{latent_dim}-{algorithm}", dataset=dataset,
                                binarization=binarization[dataset], latent_dim=latent_dim, curves=mean,
                                algorithm=algorithm))
    outputs = {"figure": out / "lower_bound_sweep.png", "table": out / "sweep_results.csv"}
    lower_bound_sweep(runs, outputs["figure"], seeds=len(params.sweep.seeds))
    write_csv(outputs["table"], table)
    parent = sweep_run(params)
    if parent:
        tracking.complete_parent_run(parent, list(member_runs(params).values()),
                                     artifacts=list(outputs.values()), artifact_path="sweep")
    print(f"sweep ({params.sweep.size}, {len(rows)} members): {outputs['figure']}, {outputs['table']}"
          + (f"; MLflow sweep run {parent}" if parent else ""), flush=True)
    print(table[["member", "examples_seen", "train_elbo", "test_elbo", "test_log_likelihood"]].to_string(index=False),
          flush=True)
    return {name: str(path) for name, path in outputs.items()}


def _groups(curves: list[tuple[Member, dict, pd.DataFrame]]):
    groups: dict[tuple, list] = {}
    for item in curves:
        member = item[0]
        groups.setdefault((member.dataset, member.latent_dim, member.algorithm), []).append(item)
    return groups.items()
