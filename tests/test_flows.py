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
from flows import dvc_repo, pipeline
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
STAGE_PY = """\
import pathlib, sys, yaml
params = yaml.safe_load(open("params.yaml"))
out = pathlib.Path("out")
out.mkdir(exist_ok=True)
step = sys.argv[1]
print(f"stage {step} running", flush=True)
if step == "write":
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
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
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


def test_overridden_params_restores_the_file_byte_for_byte(tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    original = (root / "params.yaml").read_bytes()
    with dvc_repo.overridden_params(root, ["++model.latent_dim=7", "++train.epochs=3"]) as params:
        assert params.model.latent_dim == 7 and params.train.epochs == 3
        on_disk = yaml.safe_load((root / "params.yaml").read_text())
        assert on_disk["model"]["latent_dim"] == 7
        assert (root / dvc_repo.BACKUP).read_bytes() == original
    assert (root / "params.yaml").read_bytes() == original
    assert not (root / dvc_repo.BACKUP).exists()

    with pytest.raises(RuntimeError, match="stage blew up"), dvc_repo.overridden_params(root, ["++model.latent_dim=9"]):
        raise RuntimeError("stage blew up")
    assert (root / "params.yaml").read_bytes() == original


def test_bad_overrides_are_refused_and_leave_params_as_they_were(tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    original = (root / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match="cannot be applied"), \
            dvc_repo.overridden_params(root, ["model.no_such_key=1"]):
        pass
    assert (root / "params.yaml").read_bytes() == original
    with pytest.raises(ConfigError, match="latent_dim"), dvc_repo.overridden_params(root, ["model.latent_dim=-1"]):
        pass
    assert (root / "params.yaml").read_bytes() == original


def test_params_left_edited_by_a_killed_flow_are_restored_first(tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    original = (root / "params.yaml").read_bytes()
    # What a flow killed inside overridden_params leaves behind: the edited file and the backup.
    (root / dvc_repo.BACKUP).write_bytes(original)
    (root / "params.yaml").write_text(original.decode().replace("latent_dim: 20", "latent_dim: 3"))
    with dvc_repo.overridden_params(root, []) as params:
        assert params.model.latent_dim == 20
    assert (root / "params.yaml").read_bytes() == original and not (root / dvc_repo.BACKUP).exists()


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


@pytest.mark.e2e
def test_flow_runs_each_stage_as_a_task_and_leaves_dvc_lock_as_dvc_repro_would(harness, tmp_path) -> None:
    root = make_repo(tmp_path / "flow")
    original = (root / "params.yaml").read_bytes()
    state = pipeline.vae_pipeline(latent_dim=7, repo=str(root), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["stages"] == {stage: "ran" for stage in ORDER}
    assert (root / "out/summary.txt").read_text() == "latent_dim 7"
    assert (root / "params.yaml").read_bytes() == original  # the override did not stay

    # The same change made by hand and `dvc repro` in a twin repository: the same dvc.lock.
    twin = make_repo(tmp_path / "twin")
    params = (twin / "params.yaml").read_text()
    (twin / "params.yaml").write_text(params.replace("latent_dim: 20", "latent_dim: 7"))
    _run(twin, sys.executable, "-m", "dvc", "repro")
    assert yaml.safe_load((root / "dvc.lock").read_text()) == yaml.safe_load((twin / "dvc.lock").read_text())

    # Nothing changed: DVC skips every stage and the tasks say so.
    again = pipeline.vae_pipeline(latent_dim=7, repo=str(root), return_state=True)
    assert again.result()["stages"] == {stage: "skipped" for stage in ORDER}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.state_details.flow_run_id])))
    assert sorted(run.name for run in runs) == sorted(ORDER)
    assert {run.state.name for run in runs} == {pipeline.SKIPPED} and all(run.state.is_completed() for run in runs)


@pytest.mark.e2e
def test_a_failing_stage_fails_the_flow_and_restores_params(harness, tmp_path) -> None:
    root = make_repo(tmp_path / "repo")
    original = (root / "params.yaml").read_bytes()
    state = pipeline.vae_pipeline(set_params=["train.epochs=13"], repo=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(dvc_repo.StageFailed, match=r"stage check failed[\s\S]*epochs = 13 is refused"):
        state.result()
    assert (root / "params.yaml").read_bytes() == original
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"write", "summarize"}  # completed stages stay recorded; check is not
    assert not (root / "out/checked.txt").exists()


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
