"""The MLflow calls of the stages: their runs, what they log, and the client that reaches the store.

No stage draws a figure or table from the store's history (DVC does not track it); the git
commit the runs are tagged with comes from :mod:`vae.provenance`.

One MLflow run per pipeline execution: the ``train`` stage creates it and tags it with the
SHA-256 of the checkpoint it wrote (:data:`MODEL_TAG`); ``evaluate`` finds it by the hash of its
``models/model.pt`` dependency (:func:`training_run_id`) and tags the run it logged to with the
hash of the ``metrics.json`` it wrote (:data:`METRICS_TAG`), by which ``visualize`` and ``report``
find it (:func:`evaluation_run_id`). So a run holds the model's parameters, ELBO curves, test
log-likelihood, figures and report together, while no DVC output holds a run id: the outputs of
two identical executions are identical byte for byte, and their hashes in ``dvc.lock`` say so.
Timings, hosts and run ids are the run's (metrics and tags), never a DVC output's. An interrupted
training reopens its run from the id in its resumable state file (``models/train_state.pt``,
not a DVC output).

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else MLflow's default (SQLite
``mlflow.db`` in the working directory, i.e. the repository root under ``dvc repro``).
``VAE_TRACKING=off`` turns tracking off (for machines without mlflow); stages then say so loudly.
mlflow is imported only when a tracker is created, so training runs without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vae.errors import TrackingError
from vae.io import file_sha256
from vae.provenance import git_commit

log = logging.getLogger(__name__)

TRACKING_ENV = "VAE_TRACKING"
# Set by the flows (flows/workspace.py) to the DVC experiment a flow run is recorded as; the runs the
# stages create then carry it as the tag EXPERIMENT_TAG.
EXPERIMENT_ENV = "VAE_DVC_EXPERIMENT"
EXPERIMENT_TAG = "dvc.experiment"
# The tags by which the stages find a pipeline execution's run from the files DVC tracks: the
# SHA-256 (64 hex digits) of the checkpoint the train stage wrote, and of the metrics.json the
# evaluate stage wrote (on the run it logged to: the training run, or a re-evaluation's child).
MODEL_TAG = "vae.model_sha256"
METRICS_TAG = "vae.metrics_sha256"
# On a re-evaluation's child run (:func:`resume_run`): the training run it belongs to.
TRAINED_RUN_TAG = "vae.trained_run_id"
# On a training run that resumed from checkpoints: the passes it resumed after, comma-separated.
RESUMED_TAG = "vae.resumed_from_passes"
METRICS_PER_BATCH = 1000  # MLflow's limit of metrics per log_batch request


def enabled() -> bool:
    """False when ``VAE_TRACKING`` is ``off``, ``0`` or ``false``."""
    return os.environ.get(TRACKING_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def experiment_tags() -> dict[str, str]:
    """The tags every run the stages create carries from the environment: ``{EXPERIMENT_TAG: name}``
    when :data:`EXPERIMENT_ENV` (``VAE_DVC_EXPERIMENT``) holds a DVC experiment's name (the flows
    set it), else empty."""
    name = os.environ.get(EXPERIMENT_ENV, "").strip()
    return {EXPERIMENT_TAG: name} if name else {}


def store_uri(root: str | Path | None = None) -> str:
    """The store the stages log to: ``MLFLOW_TRACKING_URI``, else MLflow's default as seen from
    ``root`` (default: the working directory), ``sqlite:///<root>/mlflow.db``."""
    return (os.environ.get("MLFLOW_TRACKING_URI", "").strip()
            or f"sqlite:///{Path(root or Path.cwd()).resolve() / 'mlflow.db'}")


def masked(text: str) -> str:
    """``text`` with the credentials of every URL in it (``scheme://user:password@host``) replaced
    by ``***``, so that it can go into logs, errors and reports."""
    return re.sub(r"//[^/@\s'\"]*@", "//***@", text)


def tracking_uri() -> str:
    """The tracking URI in use (:func:`store_uri`), with credentials masked (:func:`masked`),
    so it can go into reports and logs."""
    return masked(store_uri())


class Tracker:
    """Logs into one MLflow run through ``MlflowClient`` (explicit run id, no global state)."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri

    @property
    def active(self) -> bool:
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._call(self.client.log_batch, self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, self.run_id,
                   tags=[RunTag(key, str(value)) for key, value in tags.items() if value is not None])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_history({name: [(step, value)] for name, value in metrics.items()})

    def log_history(self, series: Mapping[str, Sequence[tuple[int, float]]]) -> None:
        """Log many (step, value) points per metric in as few requests as MLflow allows."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, int(step))
                   for name, points in series.items() for step, value in points]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self._call(self.client.log_batch, self.run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    def last_steps(self, keys: Sequence[str]) -> dict[str, int]:
        """The highest step logged so far for each of ``keys`` that the run holds (a resumed run
        skips what it logged before it was interrupted, so that no point appears twice)."""
        last = {}
        for key in keys:
            points = self._call(self.client.get_metric_history, self.run_id, key)
            if points:
                last[key] = max(int(point.step) for point in points)
        return last

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_model(self, checkpoint: str | Path, registered_model_name: str, tags: Mapping[str, Any],
                  input_example: Any) -> str:
        """Log the checkpoint at ``checkpoint`` as the run's MLflow model (the pyfunc of
        :mod:`vae.serving`: its signature, ``input_example`` (a few rows of test images, float32
        numpy (n, D)), this package as code) and register it as a new version of
        ``registered_model_name`` carrying ``tags``. Returns the version number.

        The version is created with its tags in one registry request, so a store that fails or
        refuses part-way leaves either no version of this run or a complete one, never a version
        without its tags. When this run already registered a version (the stage re-ran), that
        version's tags are updated instead of adding a duplicate.

        Raises:
            TrackingError: the store cannot be reached or refuses a request (names the URI).
        """
        import mlflow

        existing = self._call(self.client.search_model_versions,
                              f"name='{registered_model_name}' and run_id='{self.run_id}'")
        if existing:
            version = str(max(int(v.version) for v in existing))
        else:
            import torch

            from vae import serving

            package_dir = Path(__file__).resolve().parent
            with mlflow.start_run(run_id=self.run_id):
                info = self._call(
                    mlflow.pyfunc.log_model, name="model", python_model=serving.VAEModel(),
                    artifacts={serving.CHECKPOINT_ARTIFACT: str(checkpoint)}, code_paths=[str(package_dir)],
                    signature=serving.signature(int(input_example.shape[1])), input_example=input_example,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
            registered = self._call(mlflow.register_model, info.model_uri, registered_model_name,
                                    tags={key: str(value) for key, value in tags.items()})
            return str(registered.version)
        for key, value in tags.items():
            self._call(self.client.set_model_version_tag, registered_model_name, version, key, str(value))
        return version

    def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        return call(self.uri, function, *args, **kwargs)


class NullTracker:
    """Stands in for :class:`Tracker` when tracking is off: every call does nothing."""

    run_id = None
    uri = None

    @property
    def active(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


_READY: set[str] = set()


def _open_client(uri: str, **kwargs: Any) -> Any:
    """An ``MlflowClient`` on the store at ``uri`` (``kwargs``: e.g. ``registry_uri``).

    MLflow creates (or upgrades) a SQLite store's schema when a process first opens it; two
    processes doing so at once both run the migration and fail (``table ... already exists``).
    So each process opens a SQLite store the first time under an exclusive lock (a file in the
    temporary folder named after the database's path, released if the process dies), and the
    others wait for it. Other stores are opened directly.

    Raises:
        TrackingError: mlflow is not installed, or the store cannot be opened (names the URI).
    """
    try:
        from mlflow import MlflowClient
    except ImportError as error:
        raise TrackingError(f"mlflow is not installed ({error}); install it or set {TRACKING_ENV}=off") from None
    if uri in _READY or not uri.startswith("sqlite:"):
        return call(uri, MlflowClient, tracking_uri=uri, **kwargs)
    database = uri.split("///", 1)[-1].split("?", 1)[0]
    digest = hashlib.sha256(str(Path(database).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"vae-mlflow-{digest}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            client = call(uri, MlflowClient, tracking_uri=uri, **kwargs)
            call(uri, client.search_registered_models, max_results=1)  # the registry's tables too
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    _READY.add(uri)
    return client


def connect() -> tuple[Any, str]:
    """(``MlflowClient``, URI) of the tracking store in use (MLflow's tracking URI: ``MLFLOW_TRACKING_URI``,
    else its default), for reads outside a run; wrap its calls in :func:`call`.

    Raises:
        TrackingError: mlflow is not installed, or the store cannot be opened (names the URI).
    """
    try:
        import mlflow
    except ImportError as error:
        raise TrackingError(f"mlflow is not installed ({error}); install it or set {TRACKING_ENV}=off") from None
    uri = mlflow.get_tracking_uri()
    return _open_client(uri), uri


def client_for(root: str | Path) -> Any:
    """An ``MlflowClient`` on the store the stages of the repository at ``root`` log to
    (:func:`store_uri` of ``root``, where ``dvc repro`` runs the stages).

    Raises:
        TrackingError: mlflow is not installed, or the store cannot be opened.
    """
    uri = store_uri(root)
    return _open_client(uri, registry_uri=uri)


def call(uri: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` (a call on the store at ``uri``), its failures raised as
    :class:`~vae.errors.TrackingError` naming the store, credentials masked."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # MlflowException, connection and database errors alike
        raise TrackingError(masked(f"MLflow tracking at {uri} failed in {function.__name__}: {error}")) from error


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of the store at ``uri`` keeps its artifacts: for a SQLite store, the
    folder ``mlruns`` beside the database file (as a ``file://`` URI), whatever the working directory;
    None (the store's own default) for any other store.

    MLflow's default for a SQLite store is ``./mlruns`` of the process that first creates the
    experiment. A stage run in a flow's workspace (a temporary git worktree, see ``flows/workspace.py``)
    would otherwise put the artifacts of a new experiment inside that worktree, which is deleted
    when the flow ends.
    """
    if not uri.startswith("sqlite:"):
        return None
    database = Path(uri.split("///", 1)[-1].split("?", 1)[0]).resolve()
    return (database.parent / "mlruns").as_uri()


# MLflow's mark of an experiment's kind: model training here, not GenAI (its UI's experiment-type
# selector shows it). MLflow 3.17's UI still opens experiments in the view the browser last chose,
# GenAI by default; the README says how to open the Model training view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def create_experiment(client: Any, uri: str, name: str) -> str:
    """Create the experiment ``name`` in the store at ``uri`` (artifacts at :func:`artifact_location`,
    tagged as model training for MLflow's UI: :data:`EXPERIMENT_KIND_TAG`).

    Returns:
        Its id.

    Raises:
        TrackingError: the store refuses (names the URI).
    """
    return call(uri, client.create_experiment, name, artifact_location=artifact_location(uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of the experiment ``name`` in the store at ``uri``, created when missing
    (:func:`create_experiment`); an existing one without :data:`EXPERIMENT_KIND_TAG` (made by an
    older version of this project) gets it.

    Raises:
        TrackingError: the store cannot be reached or refuses (names the URI).
    """
    found = call(uri, client.get_experiment_by_name, name)
    if found is None:
        return create_experiment(client, uri, name)
    if EXPERIMENT_KIND_TAG not in (found.tags or {}):
        call(uri, client.set_experiment_tag, found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def find_or_create_run(experiment: str, tag: str, value: str, run_name: str,
                       tags: Mapping[str, str] | None = None) -> str | None:
    """The id of the oldest run of ``experiment`` tagged ``tag = value``, created (with ``run_name``
    and ``tags``, status RUNNING) when there is none; None when tracking is off.

    Raises:
        TrackingError: the tracking store cannot be reached or refuses the request (names the URI).
    """
    if not enabled():
        return None
    client, uri = connect()
    experiment_key = experiment_id(client, uri, experiment)
    runs = call(uri, client.search_runs, [experiment_key], filter_string=f"tags.`{tag}` = '{value}'",
                 order_by=["attributes.start_time ASC"], max_results=1)
    if runs:
        return runs[0].info.run_id
    run = call(uri, client.create_run, experiment_key, run_name=run_name,
                tags={"mlflow.runName": run_name, tag: value, "mlflow.source.git.commit": git_commit() or "",
                      **experiment_tags(), **(tags or {})})
    return run.info.run_id


def find_run(tag: str, value: str) -> str | None:
    """The id of the newest run (by start time), in any active experiment of the store in use
    (:func:`connect`), tagged ``tag = value``; None when tracking is off or no run is.

    Raises:
        TrackingError: the tracking store cannot be reached or refuses the request (names the URI).
    """
    if not enabled():
        return None
    client, uri = connect()
    experiments = [experiment.experiment_id for experiment in call(uri, client.search_experiments)]
    if not experiments:
        return None
    runs = call(uri, client.search_runs, experiments, filter_string=f"tags.`{tag}` = '{value}'",
                order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def training_run_id(model_path: str | Path) -> str | None:
    """The MLflow run that trained the checkpoint at ``model_path`` (e.g. ``models/model.pt``):
    the newest run tagged :data:`MODEL_TAG` with the SHA-256 of the file's bytes, which the
    ``train`` stage sets once the checkpoint is written. Two trainings that wrote the same bytes
    (a reproduction) are told apart by start time only: the newest is returned.

    This is how the stages after ``train`` (and the flows, for the run behind a registered
    version) find the pipeline execution's run; no DVC output holds its id.

    Returns:
        The run id; None when tracking is off (:func:`enabled`) or no run in the store carries
        the tag (trained with tracking off, or into another store).

    Raises:
        FileNotFoundError: there is no file at ``model_path``.
        TrackingError: the tracking store cannot be reached or refuses the request (names the URI).
    """
    digest = file_sha256(model_path)
    return find_run(MODEL_TAG, digest)


def evaluation_run_id(metrics_path: str | Path) -> str | None:
    """The MLflow run the ``evaluate`` stage logged the ``metrics.json`` at ``metrics_path`` to:
    the newest run tagged :data:`METRICS_TAG` with the SHA-256 of the file's bytes. It is the
    training run, or its child run when only the evaluation settings changed
    (:func:`resume_run`; :func:`trained_run_of` gives the training run either way).

    Returns:
        The run id; None when tracking is off or no run in the store carries the tag.

    Raises:
        FileNotFoundError: there is no file at ``metrics_path``.
        TrackingError: the tracking store cannot be reached or refuses the request (names the URI).
    """
    digest = file_sha256(metrics_path)
    return find_run(METRICS_TAG, digest)


def read_run(run_id: str | None) -> Any | None:
    """The MLflow ``Run`` ``run_id`` (its ``info``, and ``data.metrics``, ``data.tags``,
    ``data.params``), or None when ``run_id`` is None, tracking is off or the store does not hold it.

    Raises:
        TrackingError: the tracking store cannot be reached or fails otherwise (names the URI).
    """
    if not run_id or not enabled():
        return None
    from mlflow.exceptions import MlflowException

    client, uri = connect()
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise TrackingError(masked(f"MLflow tracking at {uri} failed in get_run: {error}")) from error
    except Exception as error:
        raise TrackingError(masked(f"MLflow tracking at {uri} failed in get_run: {error}")) from error


def trained_run_of(run: Any) -> str:
    """The training run behind ``run`` (an MLflow ``Run``): its :data:`TRAINED_RUN_TAG` (a
    re-evaluation's child run), else its own id."""
    return run.data.tags.get(TRAINED_RUN_TAG) or run.info.run_id


def set_run_tags(run_id: str | None, tags: Mapping[str, Any]) -> None:
    """Set ``tags`` (values as strings; None values left out) on run ``run_id``; nothing when
    ``run_id`` is None or tracking is off.

    Raises:
        TrackingError: the tracking store cannot be reached or refuses the request (names the URI).
    """
    if not run_id or not enabled():
        return
    client, uri = connect()
    Tracker(client, run_id, uri).set_tags(tags)


def complete_parent_run(run_id: str, children: Sequence[str], artifacts: Sequence[str | Path],
                        artifact_path: str) -> None:
    """Make every run in ``children`` a child of ``run_id`` (``mlflow.parentRunId``), log
    ``artifacts`` to it under ``artifact_path`` and mark it FINISHED.

    Raises:
        TrackingError: the tracking store cannot be reached or refuses the request (names the URI).
    """
    client, uri = connect()
    for child in children:
        call(uri, client.set_tag, child, "mlflow.parentRunId", run_id)
    for path in artifacts:
        call(uri, client.log_artifact, run_id, str(path), artifact_path)
    call(uri, client.set_terminated, run_id, status="FINISHED")


def _warn_off(stage: str) -> None:
    print(f"WARNING: {TRACKING_ENV}=off: the {stage} stage logs nothing to MLflow", file=sys.stderr)


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, stage: str, tags: Mapping[str, Any] | None = None,
              resume_run_id: str | None = None) -> Iterator[Tracker | NullTracker]:
    """Create the pipeline execution's run in ``experiment`` (created if missing) and yield a tracker.

    ``resume_run_id`` (an interrupted training run resuming from its checkpoint) reopens that
    run instead when the store still holds it. The run is marked FINISHED when the block
    succeeds and FAILED when it raises.

    Raises:
        TrackingError: the tracking store cannot be reached or refuses the request (names the URI).
    """
    if not enabled():
        _warn_off(stage)
        yield NullTracker()
        return
    client, uri = connect()
    tracker = Tracker(client, "", uri)
    if resume_run_id:
        try:
            client.get_run(resume_run_id)
            tracker.run_id = resume_run_id
        except Exception:  # deleted, or another store: start a new run
            print(f"MLflow: run {resume_run_id} of the interrupted training is not in {masked(uri)}; "
                  "starting a new run", file=sys.stderr)
    if tracker.run_id:
        with _run_status(tracker, stage):
            yield tracker
        return
    experiment_key = experiment_id(client, tracker.uri, experiment)
    all_tags = {"mlflow.runName": run_name, "mlflow.source.git.commit": git_commit(), **experiment_tags(),
                **(tags or {})}
    run = tracker._call(client.create_run, experiment_key, run_name=run_name,
                        tags={k: str(v) for k, v in all_tags.items() if v is not None})
    tracker.run_id = run.info.run_id
    with _run_status(tracker, stage):
        yield tracker


@contextlib.contextmanager
def run_of_output(path: str | Path, stage: str, params: Mapping[str, Any] | None = None, *,
                  tag: str = MODEL_TAG) -> Iterator[Tracker | NullTracker]:
    """:func:`resume_run` on the run whose ``tag`` is the SHA-256 of the file at ``path``: with
    ``tag=MODEL_TAG`` (``models/model.pt``) the run that trained the checkpoint
    (:func:`training_run_id`); with ``tag=METRICS_TAG`` (``reports/metrics.json``) the run the
    ``evaluate`` stage logged to (:func:`evaluation_run_id`: the training run or a re-evaluation's
    child). None found: reported on stderr, nothing logged.

    Raises:
        FileNotFoundError: there is no file at ``path`` (with tracking on).
        TrackingError: the tracking store cannot be reached or refuses the request.
    """
    run_id = find_run(tag, file_sha256(path)) if enabled() else None
    with resume_run(run_id, stage, params,
                    missing=f"no MLflow run is tagged with the SHA-256 of {path} ({tag})") as tracker:
        yield tracker


@contextlib.contextmanager
def resume_run(run_id: str | None, stage: str, params: Mapping[str, Any] | None = None, *,
               missing: str = "training recorded no MLflow run") -> Iterator[Tracker | NullTracker]:
    """Reopen the run the ``train`` stage created and yield a tracker for it, with ``params`` logged.

    MLflow params cannot change, so when ``params`` differ from values the run already holds
    (the stage re-ran with new settings on the same trained model), a child run is created
    under it (``mlflow.parentRunId``, tag :data:`TRAINED_RUN_TAG`) and the stage logs there; the
    tracker's ``run_id`` says which. A missing ``run_id`` (training ran with tracking off; ``missing``
    says what was looked for) or a run the store no longer holds is reported on stderr and
    nothing is logged.

    Raises:
        TrackingError: the tracking store cannot be reached or refuses the request.
    """
    if not enabled():
        _warn_off(stage)
        yield NullTracker()
        return
    if not run_id:
        print(f"WARNING: {missing}; the {stage} stage logs nothing "
              "(re-run `vae train` with tracking on)", file=sys.stderr)
        yield NullTracker()
        return
    client, uri = connect()
    tracker = Tracker(client, run_id, uri)
    try:
        run = client.get_run(run_id)
    except Exception as error:
        from mlflow.exceptions import MlflowException

        if isinstance(error, MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST":
            print(f"WARNING: MLflow run {run_id} is not in {masked(uri)}; the {stage} stage logs nothing "
                  "(re-run `vae train` to start a new run)", file=sys.stderr)
            yield NullTracker()
            return
        raise TrackingError(masked(f"MLflow tracking at {uri} failed in get_run: {error}")) from error
    params = {key: str(value) for key, value in (params or {}).items()}
    held = run.data.params
    if any(key in held and held[key] != value for key, value in params.items()):
        name = f"{run.data.tags.get('mlflow.runName', run_id)}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        child = tracker._call(client.create_run, run.info.experiment_id, run_name=name,
                              tags={"mlflow.parentRunId": run_id, TRAINED_RUN_TAG: run_id,
                                    "mlflow.runName": name, **{k: v for k, v in run.data.tags.items()
                                                               if k in ("dataset", "binarization", "device")},
                                    **experiment_tags()})
        tracker.run_id = child.info.run_id
        print(f"MLflow: {stage} settings differ from those of run {run_id}; logging to its child run "
              f"{tracker.run_id}", flush=True)
    with _run_status(tracker, stage):
        tracker.log_params({key: value for key, value in params.items() if key not in held
                            or tracker.run_id != run_id})
        yield tracker


@contextlib.contextmanager
def _run_status(tracker: Tracker, stage: str) -> Iterator[Tracker]:
    tracker._call(tracker.client.update_run, tracker.run_id, status="RUNNING")
    try:
        yield tracker
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.client.set_tag(tracker.run_id, "failed_stage", stage)
            tracker.client.set_terminated(tracker.run_id, status="FAILED")
        raise
    tracker._call(tracker.client.set_terminated, tracker.run_id, status="FINISHED")
    print(f"MLflow: {stage} logged to run {tracker.run_id} at {masked(tracker.uri)}", flush=True)
