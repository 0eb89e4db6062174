"""The Prefect flows on a small DVC repository the test makes (three trivial stages), under
Prefect's test harness (one temporary server for the module); helpers through plain calls."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import REPO_ROOT
from flows import dvc_repo, pipeline, workspace
from flows.__main__ import build_parser
from vae.errors import ConfigError, VaeError

# Stages listed in dvc.yaml out of dependency order: the flow must take DVC's graph, not the file.
DVC_YAML = """\
stages:
  check:
    cmd: python stage.py check
    deps: [out/summary.txt]
    params: [train.epochs]
    outs: [out/checked.txt]
  summarize:
    cmd: python stage.py summarize
    deps: [out/latent.txt]
    outs: [out/summary.txt]
  write:
    cmd: python stage.py write
    params: [model.latent_dim]
    outs: [out/latent.txt]
"""
# With FLOW_TEST_MARKERS set, the write step records its pid there and waits for a file `go`.
STAGE_PY = """\
import os, pathlib, sys, time, yaml
params = yaml.safe_load(open("params.yaml"))
out = pathlib.Path("out")
out.mkdir(exist_ok=True)
step = sys.argv[1]
print(f"stage {step} running", flush=True)
if step == "write":
    markers = os.environ.get("FLOW_TEST_MARKERS")
    if markers:
        (pathlib.Path(markers) / "write.pid").write_text(str(os.getpid()))
        for _ in range(3000):
            if (pathlib.Path(markers) / "go").exists():
                break
            time.sleep(0.1)
    (out / "latent.txt").write_text(str(params["model"]["latent_dim"]))
elif step == "summarize":
    (out / "summary.txt").write_text("latent_dim " + (out / "latent.txt").read_text())
elif step == "check":
    if params["train"]["epochs"] == 13:
        print("epochs = 13 is refused by this stage", flush=True)
        sys.exit(3)
    (out / "checked.txt").write_text("ok")
"""
ORDER = ["write", "summarize", "check"]


def _run(cwd: Path, *args: str) -> str:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def make_repo(root: Path) -> Path:
    """A git + DVC repository with the project's params.yaml and the three stages above."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "stage.py").write_text(STAGE_PY)
    _run(root, "git", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "init", "-q")
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "repo")
    return root


@pytest.fixture(scope="module")
def harness(prefect_home):
    """Prefect's own test harness (a temporary server on a temporary SQLite database), its database
    a copy of the session's migrated one (conftest.py's ``prefect_home``): the harness keeps its
    database in a ``mkdtemp()`` folder as ``prefect-test.db``, and a migrated one there spares the
    server its 200 migrations at start-up (about 12 s of CPU)."""
    import prefect.testing.utilities as utilities

    home = prefect_home()
    (home / "prefect.db").rename(home / "prefect-test.db")
    with pytest.MonkeyPatch.context() as patch:
        if callable(getattr(utilities, "mkdtemp", None)):  # else the harness migrates a new database itself
            patch.setattr(utilities, "mkdtemp", lambda: str(home))
        with utilities.prefect_test_harness(server_startup_timeout=120):
            yield


def test_stage_order_follows_dvcs_graph(tmp_path) -> None:
    assert dvc_repo.stage_order(make_repo(tmp_path / "repo")) == ORDER
    order = dvc_repo.stage_order(REPO_ROOT)
    main = [stage for stage in order if not stage.startswith("sweep")]
    assert main == ["download", "binarize", "train", "evaluate", "visualize", "report"]
    members = [stage for stage in order if stage.startswith(("sweep-mnist@", "sweep-frey@"))]
    assert len(members) == 8
    for member in members:  # after its data, before the aggregate, which comes before the report
        data = "sweep-data@" + member.split("@")[0].removeprefix("sweep-")
        assert order.index(data) < order.index(member) < order.index("sweep-report") < order.index("report")


def test_overrides_in_dvc_exp_run_syntax() -> None:
    assert dvc_repo.overrides_for(None, epochs=3, latent_dim=2) == [
        "++train.epochs=3", "++train.training_samples=null", "++model.latent_dim=2"]
    assert dvc_repo.overrides_for(["train.batch_size=50"], dataset="frey", seed=None) == [
        '++data.dataset="frey"', "train.batch_size=50"]
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        dvc_repo.overrides_for(["train.batch_size"])
    with pytest.raises(ConfigError, match="unknown flow parameter 'batch'"):
        dvc_repo.overrides_for(None, batch=3)


def _git_state(root: Path) -> tuple[str, str]:
    """(``git status --porcelain``, ``git worktree list --porcelain``) of ``root``."""
    return (_run(root, "git", "status", "--porcelain", "--untracked-files=all"),
            _run(root, "git", "worktree", "list", "--porcelain"))


def test_a_workspace_holds_the_work_trees_changes_and_the_overrides(tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("hidden_dim: 500", "hidden_dim: 123"))
    (root / "notes.txt").write_text("untracked, not ignored")
    (root / "stage.py").write_text((root / "stage.py").read_text() + "# edited, not committed\n")
    original = (root / "params.yaml").read_bytes()
    before = _git_state(root)
    space = workspace.create(root, "trial", ["++model.latent_dim=7"])
    try:
        assert space.path == root / workspace.WORKSPACES / "trial"
        assert space.params.model.latent_dim == 7 and space.params.model.hidden_dim == 123
        on_disk = yaml.safe_load((space.path / "params.yaml").read_text())["model"]
        assert (on_disk["latent_dim"], on_disk["hidden_dim"]) == (7, 123)
        assert (space.path / "notes.txt").read_text() == "untracked, not ignored"
        assert (space.path / "stage.py").read_text().endswith("# edited, not committed\n")
        cache = _run(space.path, sys.executable, "-m", "dvc", "cache", "dir").strip()
        assert Path(cache).resolve() == (root / ".dvc" / "cache").resolve()  # one cache for both
        assert str(space.path) in _run(root, "git", "worktree", "list")
        assert (root / "params.yaml").read_bytes() == original
        assert _git_state(root)[0] == before[0]  # the work tree is as it was
    finally:
        workspace.remove(space)
    assert not space.path.exists() and _git_state(root) == before


def test_bad_overrides_are_refused_and_leave_no_workspace(tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    original = (root / "params.yaml").read_bytes()
    before = _git_state(root)
    with pytest.raises(ConfigError, match="cannot be applied"):
        workspace.create(root, "bad", ["model.no_such_key=1"])
    with pytest.raises(ConfigError, match="latent_dim"):
        workspace.create(root, "bad", ["model.latent_dim=-1"])
    assert (root / "params.yaml").read_bytes() == original and _git_state(root) == before
    assert not (root / workspace.WORKSPACES / "bad").exists()


def test_a_repository_without_a_commit_is_refused(tmp_path) -> None:
    root = tmp_path / "new"
    root.mkdir()
    _run(root, "git", "init", "-q")
    with pytest.raises(ConfigError, match="at least one commit"):
        workspace.baseline(root)


def test_workspaces_left_by_killed_flows_are_removed(tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    before = _git_state(root)
    left = workspace.create(root, "killed-run", [])  # what a SIGKILLed flow leaves behind
    assert left.path.is_dir() and _git_state(root) != before
    assert workspace.remove_stale(root) == ["killed-run"]
    assert not left.path.exists() and _git_state(root) == before
    assert workspace.remove_stale(root) == []


def test_experiment_names_follow_the_flow_run_and_never_collide(tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    assert workspace.experiment_name(root, "Witty Otter", "0b1c2d3e-aaaa") == "witty-otter"
    assert workspace.experiment_name(root, None, "0b1c2d3e-aaaa") == "flow-0b1c2d3e"
    commit = _run(root, "git", "rev-parse", "HEAD").strip()
    _run(root, "git", "update-ref", f"refs/exps/{commit[:2]}/{commit[2:]}/witty-otter", commit)
    assert workspace.experiment_name(root, "witty-otter", "0b1c2d3e-aaaa") == "witty-otter-0b1c2d3e"


def test_one_flow_at_a_time_per_repository(tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    with dvc_repo.repository_lock(root):
        with pytest.raises(VaeError, match="another vae flow is running"), dvc_repo.repository_lock(root):
            pass
    with dvc_repo.repository_lock(root):  # released
        pass


def test_repository_must_hold_the_pipeline(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no dvc.yaml, params.yaml"):
        dvc_repo.repository(tmp_path)


def test_only_the_download_task_retries() -> None:
    assert pipeline.download_stage.retries == 3 and pipeline.run_stage.retries == 0
    delays = pipeline.download_stage.retry_delay_seconds
    assert list(delays) == [10, 20, 40]


def test_command_line_help_and_arguments() -> None:
    parser = build_parser()
    args = parser.parse_args(["pipeline", "--epochs", "2", "--latent-dim", "2", "-S", "train.batch_size=50"])
    assert (args.command, args.epochs, args.latent_dim, args.set_param) == ("pipeline", 2, 2, ["train.batch_size=50"])
    assert "serve" in parser.format_help()


def _dvc(root: Path, *args: str) -> str:
    return _run(root, sys.executable, "-m", "dvc", *args)


def _experiments(root: Path) -> dict[str, dict]:
    """``dvc exp show --json``: {experiment name: its data (params, metrics, rev)}, every baseline."""
    import json

    found = {}
    for baseline in json.loads(_dvc(root, "exp", "show", "--json")):
        for experiment in baseline.get("experiments") or []:
            for revision in experiment.get("revs", []):
                found[revision.get("name") or experiment.get("name")] = revision
    return found


@pytest.mark.e2e
def test_flow_runs_each_stage_as_a_task_in_its_workspace_and_records_a_dvc_experiment(harness, tmp_path) -> None:
    root = make_repo(tmp_path / "flow")
    original = (root / "params.yaml").read_bytes()
    before, status_before = _git_state(root), _dvc(root, "status", "--json")
    state = pipeline.vae_pipeline(latent_dim=7, repo=str(root), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["stages"] == {stage: "ran" for stage in ORDER}
    # The work tree is as it was: params.yaml, git's view, DVC's view; no output, no workspace left.
    assert (root / "params.yaml").read_bytes() == original
    assert _git_state(root) == before and _dvc(root, "status", "--json") == status_before
    assert not (root / "out").exists() and not (root / "dvc.lock").exists()
    assert not any((root / workspace.WORKSPACES).iterdir())

    # Recorded as a DVC experiment named after the flow run, with its parameters.
    name = result["experiment"]["name"]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert name == flow_run.name
    listed = _experiments(root)
    assert name in listed, listed
    assert listed[name]["data"]["params"]["params.yaml"]["data"]["model"]["latent_dim"] == 7
    assert listed[name]["data"]["rev"] == result["experiment"]["commit"]

    # `dvc exp apply` brings it into the work tree: the same dvc.lock as the change made by hand
    # and `dvc repro` in a twin repository, and DVC finds everything up to date.
    _dvc(root, "exp", "apply", name)
    assert (root / "out/summary.txt").read_text() == "latent_dim 7"
    twin = make_repo(tmp_path / "twin")
    (twin / "params.yaml").write_text((twin / "params.yaml").read_text().replace("latent_dim: 20", "latent_dim: 7"))
    _dvc(twin, "repro")
    assert yaml.safe_load((root / "dvc.lock").read_text()) == yaml.safe_load((twin / "dvc.lock").read_text())
    assert _dvc(root, "status", "--json").strip() == "{}"

    # Nothing changed since: DVC skips every stage in the next run's workspace and the tasks say so.
    again = pipeline.vae_pipeline(latent_dim=7, repo=str(root), return_state=True)
    assert again.result()["stages"] == {stage: "skipped" for stage in ORDER}
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.state_details.flow_run_id])))
    stages = [run for run in runs if run.name in ORDER]
    assert sorted(run.name for run in stages) == sorted(ORDER)
    assert {run.state.name for run in stages} == {pipeline.SKIPPED} and all(run.state.is_completed() for run in stages)
    assert [run.name for run in runs if run.name not in ORDER] == [f"record-experiment-{run.name.split('-')[-1]}"
                                                                  for run in runs if run.name not in ORDER]


@pytest.mark.e2e
def test_a_failing_stage_fails_the_flow_and_leaves_the_work_tree_as_it_was(harness, tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    original = (root / "params.yaml").read_bytes()
    before = _git_state(root)
    state = pipeline.vae_pipeline(set_params=["train.epochs=13"], repo=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(dvc_repo.StageFailed, match=r"stage check failed[\s\S]*epochs = 13 is refused"):
        state.result()
    assert (root / "params.yaml").read_bytes() == original and _git_state(root) == before
    assert not (root / "dvc.lock").exists() and not (root / "out").exists()
    assert _experiments(root) == {}  # a failed run records no experiment


def _flow_process(root: Path, markers: Path, tmp_path: Path, home: Path, *args: str):
    """``python -m flows pipeline ARGS`` on ``root`` (Prefect's temporary server, PREFECT_HOME
    ``home``) in the background, its stage ``write`` waiting for ``markers/go``; returns the
    process once that stage waits."""
    import os

    env = {**os.environ, "FLOW_TEST_MARKERS": str(markers), "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "flow.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "flows", "pipeline", "--repo", str(root), *args],
                               cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    _wait_for_stage(markers, lambda: process.poll() is None, lambda: (tmp_path / "flow.log").read_text()[-4000:])
    return process


def _wait_for_stage(markers: Path, alive, log) -> None:
    """Wait until the stage ``write`` records its pid in ``markers`` (``alive()`` false: the flow ended first)."""
    import time

    deadline = time.monotonic() + 240
    while not (markers / "write.pid").exists():
        assert alive(), log()
        assert time.monotonic() < deadline, "the stage never started:\n" + log()
        time.sleep(0.2)


@pytest.mark.e2e
def test_an_edit_to_params_made_during_a_flow_run_survives_it(harness, tmp_path, monkeypatch) -> None:
    import threading

    root = make_repo(tmp_path / "repo")
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("FLOW_TEST_MARKERS", str(markers))
    outcome = {}
    flow = threading.Thread(target=lambda: outcome.update(state=pipeline.vae_pipeline(
        epochs=3, set_params=["data.train_subset=5000"], repo=str(root), return_state=True)))
    flow.start()
    _wait_for_stage(markers, flow.is_alive, lambda: str(outcome))
    # While the flow's stage runs: the work tree shows the user's values only; the user edits them.
    params = (root / "params.yaml").read_text()
    assert "train_subset: null" in params and "epochs: 30" in params
    edited = params.replace("seed: 0", "seed: 7") + "# a note the user added while the flow ran\n"
    (root / "params.yaml").write_text(edited)
    (markers / "go").write_text("")
    flow.join(timeout=300)
    assert not flow.is_alive() and outcome["state"].is_completed(), outcome
    assert (root / "params.yaml").read_text() == edited  # the edit survived
    assert _run(root, "git", "status", "--porcelain") == " M params.yaml\n"  # and is the only change
    (name, recorded), = _experiments(root).items()
    assert name == outcome["state"].result()["experiment"]["name"]
    values = recorded["data"]["params"]["params.yaml"]["data"]
    assert (values["train"]["epochs"], values["data"]["train_subset"]) == (3, 5000)
    assert values["train"]["seed"] == 0  # the flow's copy was taken before the edit


@pytest.mark.e2e
def test_a_flow_sent_sigterm_mid_stage_stops_within_seconds_and_leaves_the_work_tree(tmp_path, prefect_home) -> None:
    import os
    import signal
    import time

    import psutil

    root = make_repo(tmp_path / "repo")
    markers = tmp_path / "markers"
    markers.mkdir()
    before, original = _git_state(root), (root / "params.yaml").read_bytes()
    process = _flow_process(root, markers, tmp_path, prefect_home(), "--latent-dim", "3")
    stage = psutil.Process(int((markers / "write.pid").read_text()))
    assert stage.is_running()
    sent = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    code = process.wait(timeout=60)
    took = time.monotonic() - sent
    log = (tmp_path / "flow.log").read_text()
    assert code == 128 + signal.SIGTERM, log[-4000:]
    assert took < 15, f"the flow took {took:.1f} s to stop:\n{log[-4000:]}"
    assert "stopped by SIGTERM (stage write)" in log and "the work tree" in log
    assert not stage.is_running() or stage.status() == psutil.STATUS_ZOMBIE  # the stage's process is ended
    assert (root / "params.yaml").read_bytes() == original and _git_state(root) == before
    assert not (root / workspace.WORKSPACES).exists() or not any((root / workspace.WORKSPACES).iterdir())
    assert _experiments(root) == {}
    print(f"stopped {took:.2f} s after SIGTERM")


def test_scheduled_retraining_is_declared_with_a_weekly_cron() -> None:
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert deployments["manual"]["entrypoint"] == "flows/pipeline.py:vae_pipeline"
    assert deployments["weekly"]["entrypoint"] == "flows/retraining.py:scheduled_retraining"
    assert [s["cron"] for s in deployments["weekly"]["schedules"]] == ["0 3 * * 1"]
    assert "pull" not in config  # Prefect's default: the folder `prefect deploy` ran in (test_flows_e2e)
    for name, entry in deployments.items():
        module, function = entry["entrypoint"].split(":")
        loaded = __import__(module.removesuffix(".py").replace("/", "."), fromlist=[function])
        assert getattr(loaded, function).name == {"manual": "vae-pipeline", "weekly": "scheduled-retraining",
                                                       "figure2": "vae-sweep"}[name]


def _listening(processes) -> list[tuple[str, str, int]]:
    import psutil

    found = []
    for process in processes:
        try:
            found += [(process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return found


def test_servers_the_flows_start_listen_on_loopback_only(harness) -> None:
    """The temporary Prefect server a flow starts without PREFECT_API_URL (the harness starts the
    same one) and the sweep's local Dask cluster, workers included, listen on 127.0.0.1 only."""
    import psutil
    from distributed import LocalCluster

    from flows.sweep import task_runner

    prefect_side = _listening([psutil.Process(), *psutil.Process().children(recursive=True)])
    assert prefect_side, "the harness's Prefect server was not found listening"
    kwargs = task_runner(workers=2, address=None).cluster_kwargs
    with LocalCluster(**kwargs) as cluster:
        dask_side = _listening([psutil.Process(), *psutil.Process().children(recursive=True)])
        assert len(cluster.workers) == 2
    assert len(dask_side) >= len(prefect_side) + 3, dask_side  # the scheduler and two workers at least
    assert {ip for _, ip, _ in dask_side} <= {"127.0.0.1", "::1"}, dask_side


def test_flows_modules_import_no_private_names() -> None:
    """What flows share goes through public names (DVC and the repository: flows.dvc_repo)."""
    import ast

    for path in sorted((REPO_ROOT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("flows", "vae")):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
