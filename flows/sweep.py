"""The ``vae-sweep`` flow: AEVB Figure 2's latent-size sweep with its members in parallel on Dask.

DVC runs one ``repro`` per work tree at a time (its repository lock), so parallel members cannot
be parallel ``dvc repro`` processes. The flow therefore splits what ``dvc repro`` does for a
member stage into its two halves:

1. **run**: every member stage that ``dvc status`` reports as changed is one Prefect task on
   prefect-dask's ``DaskTaskRunner``; the task runs the stage's own command, read from
   ``dvc.yaml`` (``vae sweep-member mnist 3 aevb 0``), in the flow's workspace. Members write only
   their own folders, and torch uses ``sweep.threads`` threads in each, so they neither collide
   nor change each other's numbers.
2. **record**: once the members are done, one ``dvc commit --force`` of the finished member
   stages stores their outputs in the DVC cache and writes their ``dvc.lock`` entries: the
   hashes of the dependencies, parameters and outputs they were run with, exactly what
   ``dvc repro`` would have written. Then ``dvc status`` reports them up to date.

The flow runs in a workspace of its own and records its result as a DVC experiment, like the
``vae-pipeline`` flow (:mod:`flows.workspace`): the work tree is never written, and
``dvc exp apply NAME`` brings the members, the table and the figure into it.

Before the members, ``dvc repro`` runs the sweep's data stages; after them, it runs
``sweep-report`` (the Figure 2 replica and the table) and, unless ``report=False``, the main
``report``, which includes them. A member that fails is reported with its output; the others
are still recorded, in the DVC cache and its run cache (though no experiment is, and the
workspace is removed): a re-run restores them from there and runs only the failed ones.

The Dask cluster is a local one (``workers`` processes, one thread each) unless ``address``
names a running scheduler (``tcp://host:8786``): then members run on whatever workers joined it,
which must see the repository (and so its workspaces, under ``.dvc/tmp``) at the same path (a
shared file system) with the project's
environment installed. Only the flow's own process touches DVC.

Run it without any set-up (Prefect's temporary local server)::

    uv run python -m flows sweep --workers 2
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dvc_repo import (StageFailed, changed_stages, commit_stages, dvc_repro, overrides_for, repository,
                            restorable_stages, stage_commands, stream)
from flows.workspace import Workspace, doing, flow_workspace, save_experiment, stopped_by_sigterm, workspace_env
from vae.errors import ConfigError


def run_member_fn(root: str, stage: str, command: str, threads: int | None, repo: str,
                  experiment: str) -> dict[str, Any]:
    """Body of a member task (on a Dask worker): run the member stage's command in the flow's
    workspace ``root`` (in :func:`flows.workspace.workspace_env` of the repository ``repo`` and
    the DVC experiment ``experiment``).

    Returns:
        ``{"stage", "host", "pid", "started", "finished", "seconds"}`` (times in seconds since the epoch).

    Raises:
        StageFailed: the command failed (the message ends with its last output lines).
    """
    env = workspace_env(repo, experiment)
    if threads is not None:  # also for the BLAS libraries under torch
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    started = time.time()
    returncode, pid, tail = stream(shlex.split(command) + ["--no-progress"], root, env)
    finished = time.time()
    if returncode != 0:
        raise StageFailed(f"sweep member {stage} failed (`{command}` exit {returncode}) on "
                          f"{socket.gethostname()} in {root}:\n" + "\n".join(tail))
    return {"stage": stage, "host": socket.gethostname(), "pid": pid, "started": started,
            "finished": finished, "seconds": round(finished - started, 2)}


run_member = task(run_member_fn, name="sweep-member", cache_policy=NO_CACHE)


def task_runner(workers: int, address: str | None, api_url: str | None = None):
    """prefect-dask's ``DaskTaskRunner``: on the scheduler at ``address``, else on a local cluster of
    ``workers`` processes with one thread each (each member is a process of its own, whose torch
    uses ``sweep.threads`` threads). ``api_url``, the Prefect API this flow reports to, is given to
    the local workers, which otherwise would each start a temporary Prefect server of their own."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None,
                                          **({"env": {"PREFECT_API_URL": api_url}} if api_url else {})})


def _run_sweep(workspace: Workspace, report: bool) -> dict[str, Any]:
    from vae import sweep

    logger = get_run_logger()
    root, params = workspace.path, workspace.params
    declared = sweep.members(params.sweep)
    datasets = sorted({member.dataset for member in declared})
    with doing("the sweep's data stages"):
        output = dvc_repro(root, "--single-item", *[f"sweep-data@{dataset}" for dataset in datasets],
                           env=workspace.env())
    logger.info("sweep data: %s", output.splitlines()[-1] if output else "up to date")
    stages = [member.stage for member in declared]
    changed = changed_stages(root, stages)
    restorable = restorable_stages(root, list(changed))
    if restorable:  # run before (e.g. by a sweep that failed later): restored from DVC's run cache
        with doing("restoring members from DVC's run cache"):
            dvc_repro(root, "--single-item", *restorable, env=workspace.env())
        logger.info("%d members restored from DVC's run cache: %s", len(restorable), ", ".join(restorable))
        changed = {stage: why for stage, why in changed.items() if stage not in restorable}
    if changed:
        # Here, before the members start: the sweep's MLflow run, which two members looking for it
        # at once would each create.
        with workspace.tracking():  # the store the stages use, and the experiment's tag
            parent = sweep.sweep_run(params)
        logger.info("MLflow sweep run: %s", parent or "none (tracking off)")
    commands = stage_commands(root, list(changed))
    logger.info("%d of %d members to run: %s", len(changed), len(stages), ", ".join(changed) or "none")
    futures = {stage: run_member.with_options(task_run_name=stage).submit(str(root), stage, commands[stage],
                                                                        params.sweep.threads, str(workspace.root),
                                                                        workspace.name)
               for stage in changed}
    records, failures = [], []
    for stage, future in futures.items():
        try:
            records.append(future.result())
        except Exception as error:  # every member is waited for before anything is recorded
            failures.append(f"{stage}: {error}")
    finished = [record["stage"] for record in records]
    if finished:  # record in dvc.lock (and the DVC cache) what the members wrote, as `dvc repro` would
        commit_stages(root, finished)
    if failures:
        raise StageFailed(f"{len(failures)} of {len(changed)} sweep members failed (the {len(finished)} that "
                          "finished are in DVC's run cache: a re-run restores them and repeats only the failed "
                          "ones):\n"
                          + "\n".join(failures))
    env = workspace.env()
    with doing("stage sweep-report"):
        dvc_repro(root, "--single-item", "sweep-report", env=env)
    if report:
        with doing("stage report and those before it"):
            dvc_repro(root, "report", env=env)
    results = root / params.paths.reports / "sweep" / "sweep_results.csv"
    return {"members": len(stages), "ran": records, "restored": restorable,
            "skipped": [s for s in stages if s not in changed and s not in restorable], "results": str(results)}


@flow(name="vae-sweep-members", log_prints=True)
def sweep_members(workspace: Workspace, report: bool = True) -> dict[str, Any]:
    """The sweep in ``workspace`` with this flow's task runner (set by :func:`vae_sweep`): see the
    module docstring. (A subflow gets Prefect's SIGTERM handling back; the flow's own is set again.)"""
    with stopped_by_sigterm(workspace.root, workspace.path, "vae-sweep"):
        return _run_sweep(workspace, report)


@flow(name="vae-sweep", log_prints=True)
def vae_sweep(workers: int | None = None, address: str | None = None, report: bool = True,
              set_params: list[str] | None = None, repo: str | None = None) -> dict[str, Any]:
    """Run every changed member of ``params.yaml``'s sweep in parallel on Dask, record them in
    ``dvc.lock``, then the sweep's report stage (and the main report).

    Args:
        workers: local Dask worker processes (default: as many as the CPU's cores allow at
            ``sweep.threads`` threads per member, at most the number of members); ignored with ``address``.
        address: a running Dask scheduler (``tcp://host:8786``) instead of a local cluster; its
            workers must see the repository at the same path.
        report: also bring the main ``report`` stage up to date (it includes the sweep's figure).
        set_params: overrides in ``dvc exp run -S`` syntax (``["sweep.seeds=[0,1]"]``), for this run only.
        repo: the repository (default: ``VAE_REPO``, else the working directory).

    Returns:
        ``{"members", "ran": [{stage, host, pid, started, finished, seconds}], "restored" (from DVC's
        run cache), "skipped", "results" (the table's path in the experiment), "seconds",
        "experiment": {"name", "commit", "baseline"}}``.

    Raises:
        ConfigError: bad parameters or overrides; StageFailed: a stage or member failed.
    """
    root = repository(repo)
    overrides = overrides_for(set_params)
    with flow_workspace(root, overrides, "vae-sweep") as workspace:
        from vae import sweep

        count = len(sweep.members(workspace.params.sweep))
        if workers is not None and workers < 1:
            raise ConfigError(f"workers = {workers}: expected a number of Dask worker processes >= 1")
        if workers is None:
            workers = max(1, min(count, (os.cpu_count() or 1) // (workspace.params.sweep.threads or 1)))
        where = f"the Dask scheduler at {address}" if address else f"a local Dask cluster of {workers} workers"
        print(f"sweep: {count} members on {where}, in workspace {workspace.path} (DVC experiment "
              f"{workspace.name}); the work tree is not written")
        started = time.perf_counter()
        from prefect.context import get_run_context

        runner = task_runner(workers, address, str(get_run_context().client.api_url))
        result = sweep_members.with_options(task_runner=runner)(workspace, report)
        result["seconds"] = round(time.perf_counter() - started, 1)
        experiment = save_experiment(workspace)
        result["experiment"] = {"name": experiment.name, "commit": experiment.commit, "baseline": experiment.baseline}
        result["results"] = str(Path(result["results"]).relative_to(workspace.path))
    print(f"sweep: {len(result['ran'])} members ran, {len(result['skipped'])} up to date, in "
          f"{result['seconds']} s; DVC experiment {experiment.name} (`dvc exp apply {experiment.name}` brings "
          f"its table {result['results']} and figures into the work tree)")
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as `python -m flows sweep`")
