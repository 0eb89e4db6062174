"""The flows' view of the pipeline's repository and of DVC: everything they run through ``dvc``.

- the repository: :func:`repository` (its root), :func:`stage_order` (DVC's stage graph),
  :func:`stage_commands` (a stage's command as ``dvc.yaml`` defines it);
- ``dvc`` commands: :func:`dvc_command`, :func:`dvc`, :func:`dvc_repro`, :func:`commit_stages`,
  in the environment :func:`stage_env` that stages run in; :func:`stream` runs a command with its
  output in the current Prefect run's log;
- stage status: :func:`stage_status`, :func:`changed_stages`, :func:`restorable_stages` (those DVC's
  run cache can restore), :func:`describe_status`;
- parameter overrides for one run, in ``dvc exp run -S`` syntax: :func:`overrides_for` (applied
  to a flow run's own workspace, never to the work tree: :mod:`flows.workspace`), and
  :func:`repository_lock` (one flow per repository at a time).

What writes the repository (``dvc repro``, ``dvc commit``, ``dvc exp save``, ...) runs as
``python -m dvc`` with this interpreter, in a subprocess: DVC's own repository lock, cache and
``dvc.lock`` bookkeeping are then exactly those of the command line. What only reads it (the stage
graph, a stage's command, the stages' status, the run cache) uses DVC's Python API in this process,
the same code those commands call: a ``dvc status`` subprocess cost a second of CPU time per stage,
most of it importing DVC again.
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

from vae.errors import ConfigError, VaeError

PARAMS_FILE = "params.yaml"
LOCK = Path(".dvc/tmp/vae-flow.lock")
# Named flow parameters and the params.yaml key each sets; anything else goes through set_params.
SHORTCUTS = {"dataset": "data.dataset", "latent_dim": "model.latent_dim", "hidden_dim": "model.hidden_dim",
             "epochs": "train.epochs", "training_samples": "train.training_samples", "seed": "train.seed",
             "importance_samples": "evaluate.importance_samples"}
# Training length is `epochs` or `training_samples`: setting one clears the other.
EXCLUSIVE = {"train.epochs": "train.training_samples", "train.training_samples": "train.epochs"}


class StageFailed(VaeError):
    """A DVC stage or ``dvc`` command exited with an error; the message names it and ends with its
    last output lines."""


# The repository and its stages.

def repository(repo: str | os.PathLike[str] | None = None) -> Path:
    """The DVC repository to run in: ``repo``, else ``VAE_REPO``, else the working directory.

    Returns:
        Its resolved absolute path.

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
    DVC's stage graph, dependencies first), read through DVC's Python API.

    Returns:
        Stage names; a matrix stage's members as ``name@key``, a stage of another ``dvc.yaml``
        as ``path/dvc.yaml:name``.

    Raises:
        dvc.exceptions.DvcException: DVC cannot read the repository's stages.
    """
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = reversed(list(nx.topological_sort(graph)))
        # Stages of the top-level dvc.yaml by name; any other file's as "path/dvc.yaml:name".
        return [stage.name if Path(stage.path) == root / "dvc.yaml" else f"{Path(stage.path).relative_to(root)}:{stage.name}"
                for stage in order]


def _target(root: Path, stage: str) -> str:
    """``stage`` as a DVC target that names its ``dvc.yaml`` by absolute path: DVC's Python API
    resolves a bare stage name against the working directory, which need not be ``root`` (a
    flow's workspace is not)."""
    return stage if ":" in stage else f"{root / 'dvc.yaml'}:{stage}"


def stage_commands(root: Path, stages: list[str]) -> dict[str, str]:
    """The command of each of ``stages``, as ``root/dvc.yaml`` (its matrix expanded) defines it.

    Returns:
        ``{stage: command}``, e.g. ``{"sweep-mnist@3-aevb-0": "vae sweep-member mnist 3 aevb 0"}``.

    Raises:
        dvc.exceptions.DvcException: a stage that ``dvc.yaml`` does not define.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {name: repo.stage.collect(_target(root, name))[0].cmd for name in stages}


# `dvc` commands.

def stage_env() -> dict[str, str]:
    """The environment stages and ``dvc`` commands run in: this process's, with DVC's and MLflow's
    telemetry off and this interpreter's scripts (``vae``, ``dvc``) first on ``PATH``, as
    ``uv run`` puts them.

    Returns:
        A new dict (the caller may add to it).
    """
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    # Put this interpreter's scripts (`vae`, `dvc`) first, as `uv run` does.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc_command(*args: str) -> list[str]:
    """The command line of ``dvc ARGS`` with this interpreter's DVC: ``[python, "-m", "dvc", *args]``."""
    return [sys.executable, "-m", "dvc", *args]


def dvc(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``root`` (environment ``env``, default :func:`stage_env`) and wait for it.

    Returns:
        The finished process, its stdout and stderr captured as text; a failure is not raised
        but left in its ``returncode`` for the caller to report.
    """
    return subprocess.run(dvc_command(*args), cwd=root, capture_output=True, text=True, env=env or stage_env())


def dvc_repro(root: Path, *targets: str, env: dict[str, str] | None = None) -> str:
    """Run ``dvc repro TARGETS`` in ``root`` (environment ``env``, default :func:`stage_env`).

    Returns:
        Its output (stdout then stderr, stripped).

    Raises:
        StageFailed: the command failed (the message ends with its last 3000 characters).
    """
    result = dvc(root, "repro", *targets, env=env)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise StageFailed(f"dvc repro {' '.join(targets)} failed in {root}:\n{output[-3000:]}")
    return output


def commit_stages(root: Path, stages: Sequence[str]) -> None:
    """Record in ``dvc.lock`` and the DVC cache what ``stages`` wrote, as ``dvc repro`` would have
    (``dvc commit --force STAGES``), for stages whose commands were run outside ``dvc repro``.

    Raises:
        StageFailed: ``dvc commit`` failed.
    """
    result = dvc(root, "commit", "--force", *stages)
    if result.returncode != 0:
        raise StageFailed(f"dvc commit of {', '.join(stages)} failed in {root}:\n{result.stderr[-3000:]}")


def stream(command: list[str], cwd: Path | str, env: dict[str, str]) -> tuple[int, int, list[str]]:
    """Run ``command`` in ``cwd`` with environment ``env``, each line of its output (stdout and
    stderr; a progress bar's carriage-return updates reduced to their last state) into the current
    Prefect run's log, and wait for it.

    Returns:
        (exit status, process id, its last 30 non-empty lines).

    Raises:
        prefect.exceptions.MissingContextError: called outside a Prefect flow or task run.
        OSError: the command cannot be started.
    """
    from prefect import get_run_logger

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


# Stage status.

def _statuses(root: Path, stages: Sequence[str]) -> dict[str, Any]:
    """DVC's status of each of ``stages`` of the repository at ``root``, through ``Repo.status``
    (the code ``dvc status --json STAGE`` runs), in this process.

    Returns:
        ``{stage: [what changed, ...]}`` for the stages that are not up to date, in the order given.

    Raises:
        StageFailed: DVC cannot tell (a stage it does not know, an unreadable ``dvc.yaml``, its
            repository lock held too long by another process).
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    found: dict[str, Any] = {}
    try:
        with Repo(str(root)) as repo:
            for stage in stages:
                # Keyed by the stage's address relative to the working directory, which need not be root.
                status = repo.status(targets=[_target(root, stage)])
                if status:
                    found[stage] = next(iter(status.values()))
    except DvcException as error:
        cause = f": {error.__cause__}" if error.__cause__ else ""
        raise StageFailed(f"dvc status {' '.join(stages)} failed in {root}: {error}{cause}") from None
    return found


def stage_status(root: Path, stage: str) -> dict[str, Any]:
    """DVC's view of one stage (what ``dvc status STAGE --json`` prints).

    Returns:
        ``{}`` when the stage is up to date, else ``{stage: [what changed, ...]}`` as DVC prints it.

    Raises:
        StageFailed: DVC cannot tell (see :func:`_statuses`).
    """
    return _statuses(root, [stage])


def changed_stages(root: Path, stages: list[str]) -> dict[str, Any]:
    """Which of ``stages`` DVC would run (none for no stages).

    Returns:
        ``{stage: what changed}`` for the stages that are not up to date, in the order given.

    Raises:
        StageFailed: DVC cannot tell (see :func:`_statuses`).
    """
    return _statuses(root, stages) if stages else {}


def restorable_stages(root: Path, stages: Sequence[str]) -> list[str]:
    """Of ``stages``, those whose outputs DVC's run cache holds for their current dependencies and
    parameters (run before, in this or another workspace sharing the cache): ``dvc repro`` restores
    them without running their commands.

    Raises:
        dvc.exceptions.DvcException: DVC cannot read the repository's stages.
    """
    from dvc.repo import Repo
    from dvc.stage.cache import RunCacheNotFoundError

    found = []
    with Repo(str(root)) as repo:
        for name in stages:
            try:
                repo.stage_cache.restore(repo.stage.collect(_target(root, name))[0], dry=True)
            except (RunCacheNotFoundError, FileNotFoundError):  # not run before; a dependency is missing
                continue
            found.append(name)
    return found


def describe_status(status: dict[str, Any], stage: str) -> str:
    """One line saying why ``stage`` runs, from :func:`stage_status`'s answer: its changed
    dependencies, parameters and outputs (``"changed deps: ..."``), or ``"not run yet"``."""
    changes = []
    for entry in status.get(stage, []):
        if isinstance(entry, dict):
            for kind, items in entry.items():
                changes.append(f"{kind}: {', '.join(items) if isinstance(items, dict) else items}")
        else:
            changes.append(str(entry))
    return "; ".join(changes) or "not run yet"


# Parameter overrides for one run.

def overrides_for(set_params: Sequence[str] | None = None, **shortcuts: Any) -> list[str]:
    """``dvc exp run -S``-style overrides from the named flow parameters and ``set_params``.

    ``overrides_for(epochs=3, latent_dim=2)`` gives ``["++train.epochs=3",
    "++train.training_samples=null", "++model.latent_dim=2"]``. None values are left out; the
    ``set_params`` entries follow, unchanged.

    Raises:
        ConfigError: an unknown shortcut (not in :data:`SHORTCUTS`), or a ``set_params`` entry
            without ``=``.
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


@contextlib.contextmanager
def repository_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock (:data:`LOCK`, ``flock``) on the repository for the block; the
    operating system releases it should the process die.

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
