"""A flow run's own workspace, recorded at its end as a DVC experiment.

A flow never writes the user's work tree. Each run:

1. **creates a workspace**: a git worktree of the repository at ``HEAD``, detached, under
   :data:`WORKSPACES` (``.dvc/tmp/flow-workspaces/<name>``, ignored by git and DVC alike), holding
   the work tree's uncommitted changes as they were when the run started (files git tracks or would
   track: edited, added, deleted), exactly what ``dvc exp run`` would take. Its DVC cache is the
   repository's own (``cache.dir`` in the worktree's ``.dvc/config.local``), and the work tree's
   outputs are brought in (``dvc checkout`` from that cache, the ``cache: false`` outputs copied),
   so stages that are up to date in the work tree are up to date there too;
2. **applies the run's parameter overrides** to the workspace's ``params.yaml`` (DVC's own
   Hydra-override code, as ``dvc exp run -S`` does), validated by :mod:`vae.config`;
3. lets the flow run the stages there (``dvc repro --single-item STAGE``, one Prefect task each),
   logging to the repository's MLflow store (``MLFLOW_TRACKING_URI`` set for the stages; a new
   experiment's artifacts go beside its database, :func:`vae.tracking.artifact_location`), every
   run tagged ``dvc.experiment`` (:data:`vae.tracking.EXPERIMENT_ENV`);
4. **records the result as a DVC experiment** named after the Prefect flow run
   (:func:`save_experiment`: ``dvc exp save``, with every ``cache: false`` output included): it
   shows in ``dvc exp show``, ``dvc exp apply NAME`` brings it into the work tree, and the MLflow
   runs get its commit as the tag ``dvc.experiment_commit``. A run whose stage fails records none;
5. **removes the workspace**, also when a stage fails or the run is stopped (:func:`remove`).

One flow runs per repository at a time (:func:`flows.dvc_repo.repository_lock`): flows share the
repository's MLflow SQLite store and model registry (the retraining flow's champion decision reads
and moves an alias) and its experiment refs. The user's own ``dvc repro`` in the work tree is not
held back: it shares only the DVC cache (content-addressed, written by atomic renames) and the
MLflow store (SQLite's own locking).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.dvc_repo import PARAMS_FILE, StageFailed, dvc, stage_env
from vae.errors import ConfigError, VaeError

WORKSPACES = Path(".dvc/tmp/flow-workspaces")
EXPERIMENT_COMMIT_TAG = "dvc.experiment_commit"


@dataclass(frozen=True)
class Workspace:
    """A flow run's workspace (see the module docstring).

    Attributes:
        root: the user's repository (its work tree is never written).
        path: the workspace, a git worktree of ``root`` under :data:`WORKSPACES`.
        name: the DVC experiment the run is recorded as.
        overrides: the run's parameter overrides, in ``dvc exp run -S`` syntax.
        params: the validated :class:`vae.config.Params` of the workspace's ``params.yaml``.
    """

    root: Path
    path: Path
    name: str
    overrides: tuple[str, ...]
    params: Any

    def env(self) -> dict[str, str]:
        """The environment the workspace's stages run in: :func:`workspace_env`."""
        return workspace_env(self.root, self.name)

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """For the block, this process's own MLflow calls go to the repository's store, tagged with the
        experiment's name, as the stages' do (``os.environ`` set, then restored)."""
        from vae import tracking

        saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", tracking.EXPERIMENT_ENV)}
        os.environ.update({"MLFLOW_TRACKING_URI": tracking.store_uri(self.root), tracking.EXPERIMENT_ENV: self.name})
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def workspace_env(root: str | Path, name: str) -> dict[str, str]:
    """The environment the stages of the workspace of experiment ``name`` of the repository ``root``
    run in: :func:`flows.dvc_repo.stage_env`, with the repository's MLflow store
    (``MLFLOW_TRACKING_URI``, :func:`vae.tracking.store_uri` of ``root``) and the experiment's name
    (:data:`vae.tracking.EXPERIMENT_ENV`).

    Returns:
        A new dict.
    """
    from vae import tracking

    return {**stage_env(), "MLFLOW_TRACKING_URI": tracking.store_uri(root), tracking.EXPERIMENT_ENV: name}


@dataclass(frozen=True)
class Experiment:
    """A flow run recorded as a DVC experiment: its ``name``, ``commit`` and the ``baseline`` commit."""

    name: str
    commit: str
    baseline: str


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``git ARGS`` in ``root``, its output captured as text.

    Raises:
        VaeError: ``check`` and the command failed (names it, with git's message).
    """
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise VaeError(f"git {' '.join(args)} failed in {root}: {(result.stderr or result.stdout).strip()}")
    return result


def baseline(root: Path) -> str:
    """The commit a flow run starts from: ``HEAD`` of ``root``.

    Raises:
        ConfigError: ``root`` is not a git repository with a commit (DVC experiments need one).
    """
    result = git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
    if result.returncode != 0:
        raise ConfigError(f"{root}: flow runs are recorded as DVC experiments, which need a git repository with "
                          "at least one commit (git init; git add -A; git commit)")
    return result.stdout.strip()


def experiment_refs(root: Path) -> dict[str, str]:
    """Every DVC experiment of the repository: ``{ref: commit}`` under ``refs/exps/``."""
    result = git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/")
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.strip())


def experiment_name(root: Path, flow_run_name: str | None, flow_run_id: str | None) -> str:
    """The DVC experiment name of a flow run: its Prefect name (``witty-otter``), made a valid git
    ref component; followed by the first 8 characters of the flow run's id when an experiment of
    that name exists already; ``flow-<8 characters>`` when there is no name (a random id when no
    flow run either)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", (flow_run_name or "").lower()).strip(".-_")
    taken = {ref.rsplit("/", 1)[-1] for ref in experiment_refs(root) if not ref.startswith("refs/exps/stash")}
    suffix = re.sub(r"[^a-z0-9]", "", (flow_run_id or uuid.uuid4().hex).lower())[:8]
    if not name:
        return f"flow-{suffix}"
    return f"{name}-{suffix}" if name in taken else name


def _changed_files(root: Path) -> tuple[list[str], list[str]]:
    """The work tree's uncommitted changes against ``HEAD``: (files to copy, files deleted)."""
    changed = git(root, "diff", "--name-only", "-z", "--no-renames", "HEAD").stdout.split("\0")
    untracked = git(root, "ls-files", "-z", "--others", "--exclude-standard").stdout.split("\0")
    present, deleted = [], []
    for name in filter(None, changed + untracked):
        (present if (root / name).is_file() or (root / name).is_symlink() else deleted).append(name)
    return present, deleted


def _cache_dir(root: Path) -> str:
    """The absolute path of the repository's DVC cache (``dvc cache dir``).

    Raises:
        StageFailed: DVC cannot say.
    """
    result = dvc(root, "cache", "dir")
    if result.returncode != 0:
        raise StageFailed(f"dvc cache dir failed in {root}:\n{result.stderr.strip()[-2000:]}")
    return str((root / result.stdout.strip()).resolve())


def _uncached_outputs(path: Path) -> list[str]:
    """The ``cache: false`` outputs of the stages of ``path/dvc.yaml``, relative to ``path``."""
    from dvc.repo import Repo

    with Repo(str(path)) as repo:
        return sorted({os.path.relpath(out.fs_path, str(path)) for out in repo.index.outs if not out.use_cache})


def apply_params_overrides(path: Path, overrides: Sequence[str]) -> Any:
    """Apply ``overrides`` to the ``params.yaml`` at ``path`` (DVC's own Hydra-override code, as
    ``dvc exp run -S`` does) and validate the result.

    Returns:
        The validated :class:`vae.config.Params`.

    Raises:
        ConfigError: an override DVC cannot parse or apply, or values :mod:`vae.config` rejects.
    """
    from dvc.utils.hydra import apply_overrides

    from vae.config import load_params

    if overrides:
        try:
            apply_overrides(path, list(overrides))
        except Exception as error:  # DVC's InvalidArgumentError, Hydra's parse and composition errors
            cause = f": {error.__cause__}" if error.__cause__ else ""
            raise ConfigError(f"parameter overrides {list(overrides)} cannot be applied to {PARAMS_FILE}: "
                              f"{error}{cause}") from None
    return load_params(path)


def create(root: Path, name: str, overrides: Sequence[str]) -> Workspace:
    """Create the workspace ``name`` of the repository ``root`` (steps 1 and 2 of the module docstring).

    Raises:
        ConfigError: ``root`` has no commit, or the overrides are bad (the workspace is removed first).
        StageFailed, VaeError: git or DVC failed (the workspace is removed first).
    """
    commit = baseline(root)
    path = root / WORKSPACES / name
    remove_path(root, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    git(root, "worktree", "add", "--detach", "-q", str(path), commit)
    workspace = None
    try:
        present, deleted = _changed_files(root)
        for relative in present:
            (path / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / relative, path / relative, follow_symlinks=False)
        for relative in deleted:
            (path / relative).unlink(missing_ok=True)
        local = root / ".dvc" / "config.local"  # the user's local settings (remotes' credentials, ...)
        if local.is_file():
            shutil.copy2(local, path / ".dvc" / "config.local")
        configured = dvc(path, "config", "--local", "cache.dir", _cache_dir(root))
        if configured.returncode != 0:
            raise StageFailed(f"dvc config cache.dir failed in {path}:\n{configured.stderr.strip()[-2000:]}")
        # The work tree's outputs: cached ones from the shared cache (those missing from it are
        # simply produced again by their stages), `cache: false` ones copied.
        dvc(path, "checkout", "--quiet")
        for relative in _uncached_outputs(path):
            source, target = root / relative, path / relative
            if source.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        params = apply_params_overrides(path / PARAMS_FILE, overrides)
        workspace = Workspace(root=root, path=path, name=name, overrides=tuple(overrides), params=params)
        return workspace
    finally:
        if workspace is None:
            remove_path(root, path)


def save_experiment(workspace: Workspace) -> Experiment:
    """Record the workspace as the DVC experiment ``workspace.name`` (``dvc exp save`` of the stages
    that are up to date, its ``cache: false`` outputs included, ``-I``), and tag the MLflow runs of the experiment
    (``dvc.experiment``) with its commit (:data:`EXPERIMENT_COMMIT_TAG`).

    Returns:
        The experiment.

    Raises:
        StageFailed: ``dvc exp save`` failed.
        TrackingError: the MLflow store cannot be reached (the experiment is saved by then).
    """
    from flows.dvc_repo import changed_stages, stage_order

    path = workspace.path
    included = [name for name in _uncached_outputs(path) if (path / name).exists()]
    # Only the stages DVC finds up to date are committed: a stage this run did not bring up to
    # date (the sweep flow runs part of the graph) keeps the dvc.lock entry it had, if any.
    stages = stage_order(path)
    changed = changed_stages(path, stages)
    current = [stage for stage in stages if stage not in changed]
    if not current:
        raise StageFailed(f"no stage of {path} is up to date: nothing to record as experiment {workspace.name}")
    arguments = ["exp", "save", "--name", workspace.name, "--force", *current]
    for name in included:
        arguments += ["--include-untracked", name]
    result = dvc(path, *arguments)
    if result.returncode != 0:
        raise StageFailed(f"dvc exp save of {workspace.name} failed in {path}:\n"
                          f"{(result.stdout + result.stderr).strip()[-3000:]}")
    base = baseline(path)
    commit = experiment_refs(workspace.root).get(f"refs/exps/{base[:2]}/{base[2:]}/{workspace.name}")
    if commit is None:
        raise StageFailed(f"dvc exp save reported success but no experiment ref {workspace.name} exists:\n"
                          f"{(result.stdout + result.stderr).strip()[-2000:]}")
    experiment = Experiment(name=workspace.name, commit=commit, baseline=base)
    tag_runs(workspace.root, experiment)
    return experiment


def tag_runs(root: Path, experiment: Experiment) -> list[str]:
    """Tag every MLflow run of the repository's store tagged ``dvc.experiment = experiment.name``
    with the experiment's commit (:data:`EXPERIMENT_COMMIT_TAG`).

    Returns:
        The ids of the runs tagged (none when tracking is off).

    Raises:
        TrackingError: the store cannot be reached.
    """
    from vae import tracking

    uri = tracking.store_uri(root)
    database = uri.split("///", 1)[-1].split("?", 1)[0]
    if not tracking.enabled() or (uri.startswith("sqlite:") and not Path(database).is_file()):
        return []  # tracking off, or no stage logged anything (the SQLite store was never made)
    client = tracking.client_for(root)
    experiments = [e.experiment_id for e in tracking.call(uri, client.search_experiments)]
    if not experiments:
        return []
    runs = tracking.call(uri, client.search_runs, experiments,
                         filter_string=f"tags.`{tracking.EXPERIMENT_TAG}` = '{experiment.name}'")
    for run in runs:
        tracking.call(uri, client.set_tag, run.info.run_id, EXPERIMENT_COMMIT_TAG, experiment.commit)
    return [run.info.run_id for run in runs]


def remove_path(root: Path, path: Path) -> None:
    """Remove the worktree at ``path`` of the repository ``root`` (``git worktree remove --force``,
    else the folder itself), and prune git's record of it. Nothing there is kept."""
    if path.exists():
        if git(root, "worktree", "remove", "--force", str(path), check=False).returncode != 0:
            shutil.rmtree(path, ignore_errors=True)
    git(root, "worktree", "prune", check=False)


def remove(workspace: Workspace) -> None:
    """Remove the workspace (:func:`remove_path`)."""
    remove_path(workspace.root, workspace.path)


def remove_stale(root: Path) -> list[str]:
    """Remove the workspaces of earlier flow runs that were killed before they could (a flow run
    removes its own, also when it fails or is stopped by SIGTERM; only SIGKILL leaves one).

    Call it holding the repository lock, so that no running flow's workspace is taken.

    Returns:
        The names of the workspaces removed (said on stderr).
    """
    folder = root / WORKSPACES
    stale = sorted(path for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
    for path in stale:
        remove_path(root, path)
    if stale:
        print(f"removed the workspaces of {len(stale)} flow run(s) killed earlier: "
              f"{', '.join(path.name for path in stale)}", file=sys.stderr)
    return [path.name for path in stale]


# Stopping on SIGTERM.

# What the flow is doing, for the message a SIGTERM leaves: set by the stage tasks (`doing`).
_DOING: list[str] = []


@contextlib.contextmanager
def doing(what: str) -> Iterator[None]:
    """Say, for the block, what the flow is doing (``"stage train"``): a SIGTERM's message names it."""
    _DOING.append(what)
    try:
        yield
    finally:
        _DOING.remove(what)


@contextlib.contextmanager
def stopped_by_sigterm(root: Path, path: Path, flow: str) -> Iterator[None]:
    """While the block runs, a SIGTERM (or SIGINT, Ctrl-C) stops the flow at once (:func:`stop`),
    removing the workspace at ``path`` of the repository ``root``.

    Prefect's own handler turns a SIGTERM into an exception that its engine then reports to the
    API; with the temporary local server gone (it gets the signal too), that is minutes of
    retries against a dead server while the stage's processes run on. This handler replaces it
    for the block (Prefect's comes back after), in the main thread only: elsewhere signals cannot
    be handled, and Prefect's handling stays.
    """
    def handler(signum: int, frame: Any) -> None:
        stop(root, path, flow, signum)

    try:
        previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


def stop(root: Path, path: Path, flow: str, signum: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Stop the flow process now: terminate every process it started (the stage's ``dvc repro``
    and its command, Dask workers, Prefect's temporary server), killing those still there after
    ``grace`` seconds; remove the workspace; say so on stderr; exit with status 128 + ``signum``.
    The user's work tree was never written, so it is as it was; no experiment is recorded.

    Does not return.
    """
    import psutil

    for number in (signal.SIGTERM, signal.SIGINT):  # a second signal does not interrupt the clean-up
        signal.signal(number, signal.SIG_IGN)
    what = _DOING[-1] if _DOING else "between stages"
    try:
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, alive = psutil.wait_procs(children, timeout=grace)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        remove_path(root, path)
        print(f"{flow}: stopped by {signal.Signals(signum).name} ({what}): its processes are ended, its "
              f"workspace {path} is removed, no experiment is recorded, and the work tree {root} is as it "
              "was", file=sys.stderr, flush=True)
    finally:
        os._exit(128 + signum)


@contextlib.contextmanager
def flow_workspace(root: Path, overrides: Sequence[str], flow: str) -> Iterator[Workspace]:
    """The whole life of a flow run's workspace (steps 1, 2 and 5 of the module docstring): hold the
    repository lock, remove workspaces that killed runs left, create this run's (named after the
    current Prefect flow run, :func:`experiment_name`), yield it, and remove it; while the block
    runs, a SIGTERM stops the flow at once (:func:`stopped_by_sigterm`). Recording the experiment
    (:func:`save_experiment`) is the block's to do.

    Raises:
        ConfigError: bad overrides or parameters, or no commit to start from.
        VaeError: another flow runs in this repository.
        StageFailed: git or DVC failed while the workspace was made.
    """
    from prefect.runtime import flow_run

    from flows.dvc_repo import repository_lock

    with repository_lock(root):
        remove_stale(root)
        name = experiment_name(root, flow_run.get_name(), flow_run.get_id())
        path = root / WORKSPACES / name
        with stopped_by_sigterm(root, path, flow):
            try:
                workspace = create(root, name, overrides)
                yield workspace
            finally:
                remove_path(root, path)
