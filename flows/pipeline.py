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
interleaving their stages.

Run it without any set-up (Prefect's temporary local server)::

    uv run python -m flows pipeline --epochs 2 --latent-dim 2
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from vae.errors import ConfigError, VaeError

PARAMS_FILE = "params.yaml"
BACKUP = Path(".dvc/tmp/params.yaml.flow-backup")
LOCK = Path(".dvc/tmp/vae-flow.lock")
SKIPPED = "Skipped"
# Named flow parameters and the params.yaml key each sets; anything else goes through set_params.
SHORTCUTS = {"dataset": "data.dataset", "latent_dim": "model.latent_dim", "hidden_dim": "model.hidden_dim",
             "epochs": "train.epochs", "training_samples": "train.training_samples", "seed": "train.seed",
             "importance_samples": "evaluate.importance_samples"}
# Training length is `epochs` or `training_samples`: setting one clears the other.
EXCLUSIVE = {"train.epochs": "train.training_samples", "train.training_samples": "train.epochs"}


class StageFailed(VaeError):
    """A DVC stage exited with an error; the message names the stage and ends with its last lines."""


def repository(repo: str | os.PathLike[str] | None = None) -> Path:
    """The DVC repository to run in: ``repo``, else ``VAE_REPO``, else the working directory.

    Raises:
        ConfigError: the folder holds no ``dvc.yaml`` and ``params.yaml``.
    """
    root = Path(repo or os.environ.get("VAE_REPO") or Path.cwd()).resolve()
    missing = [name for name in ("dvc.yaml", PARAMS_FILE) if not (root / name).is_file()]
    if missing:
        raise ConfigError(f"{root}: not the pipeline's repository (no {', '.join(missing)}); run from the "
                          "repository root, set VAE_REPO, or pass repo=")
    return root


def stage_order(root: Path) -> list[str]:
    """The stages of ``root/dvc.yaml`` in an order DVC would run them (a topological order of
    DVC's stage graph, dependencies first)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = reversed(list(nx.topological_sort(graph)))
        # Stages of the top-level dvc.yaml by name; any other file's as "path/dvc.yaml:name".
        return [stage.name if Path(stage.path) == root / "dvc.yaml" else f"{Path(stage.path).relative_to(root)}:{stage.name}"
                for stage in order]


def overrides_for(set_params: Sequence[str] | None = None, **shortcuts: Any) -> list[str]:
    """``dvc exp run -S``-style overrides from the named flow parameters and ``set_params``.

    ``overrides_for(epochs=3, latent_dim=2)`` gives ``["++train.epochs=3",
    "++train.training_samples=null", "++model.latent_dim=2"]``. None values are left out.

    Raises:
        ConfigError: an unknown shortcut, or a ``set_params`` entry without ``=``.
    """
    overrides: list[str] = []
    for name, value in shortcuts.items():
        if name not in SHORTCUTS:
            raise ConfigError(f"unknown flow parameter {name!r}; known: {', '.join(SHORTCUTS)} (or set_params)")
        if value is None:
            continue
        key = SHORTCUTS[name]
        overrides.append(f"++{key}={json.dumps(value)}")
        if key in EXCLUSIVE:
            overrides.append(f"++{EXCLUSIVE[key]}=null")
    for entry in set_params or []:
        if "=" not in str(entry):
            raise ConfigError(f"set_params entry {entry!r} is not KEY=VALUE (e.g. train.batch_size=50)")
        overrides.append(str(entry))
    return overrides


def _restore(root: Path, original: bytes) -> None:
    from vae.io import atomic_path

    with atomic_path(root / PARAMS_FILE) as tmp:
        tmp.write_bytes(original)
    (root / BACKUP).unlink(missing_ok=True)


def recover_params(root: Path) -> bool:
    """Put back ``params.yaml`` from the copy a killed flow left behind; True if it did."""
    backup = root / BACKUP
    if not backup.is_file():
        return False
    _restore(root, backup.read_bytes())
    print(f"restored {root / PARAMS_FILE} from {backup}, left by a flow that was stopped mid-run", file=sys.stderr)
    return True


@contextlib.contextmanager
def repository_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the repository for a flow's duration (released if the process dies).

    Raises:
        VaeError: another flow holds it.
    """
    path = root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VaeError(f"{root}: another vae flow is running in this repository ({path} is locked); "
                           "wait for it, or run in another clone") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def overridden_params(root: Path, overrides: Sequence[str]) -> Iterator[Any]:
    """Apply ``overrides`` to ``root/params.yaml`` for the block; restore the original bytes after.

    Yields the validated :class:`vae.config.Params` in force.

    Raises:
        ConfigError: an override DVC cannot parse or apply, or values ``vae.config`` rejects (the
            file is restored before the error propagates).
    """
    from dvc.utils.hydra import apply_overrides

    from vae.config import load_params

    path = root / PARAMS_FILE
    recover_params(root)
    if not overrides:
        yield load_params(path)
        return
    original = path.read_bytes()
    backup = root / BACKUP
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_bytes(original)
    try:
        try:
            apply_overrides(path, list(overrides))
        except Exception as error:  # DVC's InvalidArgumentError, Hydra's parse and composition errors
            cause = f": {error.__cause__}" if error.__cause__ else ""
            raise ConfigError(f"parameter overrides {list(overrides)} cannot be applied to {path}: {error}{cause}") from None
        params = load_params(path)
        yield params
    finally:
        _restore(root, original)


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          env=_stage_env())


def _stage_env() -> dict[str, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    # Put this interpreter's scripts (`vae`, `dvc`) first, as `uv run` does.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def stage_status(root: Path, stage: str) -> dict[str, Any]:
    """DVC's view of one stage: ``{}`` when up to date, else what changed (``dvc status STAGE --json``).

    Raises:
        StageFailed: ``dvc status`` itself failed.
    """
    result = _dvc(root, "status", stage, "--json")
    if result.returncode != 0:
        raise StageFailed(f"dvc status {stage} failed in {root}:\n{result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout or "{}")


def _describe(status: dict[str, Any], stage: str) -> str:
    changes = []
    for entry in status.get(stage, []):
        if isinstance(entry, dict):
            for kind, items in entry.items():
                changes.append(f"{kind}: {', '.join(items) if isinstance(items, dict) else items}")
        else:
            changes.append(str(entry))
    return "; ".join(changes) or "not run yet"


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
    reason = _describe(status, stage)
    logger.info("stage %s runs: %s", stage, reason)
    returncode, _, tail = stream([sys.executable, "-m", "dvc", "repro", "--single-item", stage], path, _stage_env())
    if returncode != 0:
        raise StageFailed(f"stage {stage} failed (dvc repro exit {returncode}) in {path}:\n" + "\n".join(tail))
    return {"stage": stage, "ran": True, "reason": reason}


def stream(command: list[str], cwd: Path | str, env: dict[str, str]) -> tuple[int, int, list[str]]:
    """Run ``command`` in ``cwd``, each line of its output (stdout and stderr; a progress bar's
    carriage-return updates reduced to their last state) into the current Prefect run's log.

    Returns:
        (exit status, process id, its last 30 non-empty lines).
    """
    logger = get_run_logger()
    tail: list[str] = []
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n").split("\r")[-1].rstrip()
            if line:
                logger.info("%s", line)
                tail = (tail + [line])[-30:]
    return process.returncode, process.pid, tail


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
