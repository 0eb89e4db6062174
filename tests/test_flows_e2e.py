"""Prefect for real, as the README runs it: `prefect server start` on 127.0.0.1 (temporary
PREFECT_HOME), the work pool, `prefect --no-prompt deploy --all` from prefect.yaml, a process
worker, a short interval schedule that creates and completes a retraining run by itself on small
data (the module's one run of the pipeline's stages), then `prefect deployment run ... --watch` with
the same parameters, which DVC's run cache completes without running a stage. Every process
started here is stopped by PID (with its children) at the end, also when a test fails."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from support import SMALL, Pipeline, free_port, wait_healthy
from vae.config import SWEEP_WITHOUT_AIS

pytestmark = pytest.mark.e2e
POOL = "vae-process"
# Smaller still than support.SMALL: the stages' start-up, not the data, is what this test times; no
# AIS, BDMC or App. D (tests/test_pipeline.py checks them in the pipeline).
TINY = {**SMALL, "data": {"train_subset": 600, "eval_subset": 200},
        "evaluate": {**SMALL["evaluate"], "importance_samples": 20, "train_examples": 200, **SWEEP_WITHOUT_AIS},
        "visualize": {**SMALL["visualize"], "latent_points": 200}}


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process and everything it started (flow runs live in their own sessions), then
    SIGKILL what is left after 5 s (the teardown waited 15 s on a member that outlives SIGTERM)."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=5)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=10)


class Stack:
    """The repository copy, its environment and the Prefect server's REST API."""

    def __init__(self, pipe: Pipeline, api: str, home: Path) -> None:
        self.pipe, self.api, self.home = pipe, api, home

    def prefect(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=self.pipe.root, env=self.pipe.env,
                                capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{output[-4000:]}"
        return output

    def request(self, endpoint: str, body: dict | None = None, method: str | None = None) -> dict | list | None:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.api}{endpoint}", data=data,
                                         method=method or ("GET" if body is None else "POST"),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = response.read()
        return json.loads(answer) if answer else None

    def flow_runs(self, flow: str, deployment: str) -> list[dict]:
        found = self.request(f"/deployments/name/{flow}/{deployment}")
        return self.request("/flow_runs/filter", {"deployments": {"id": {"any_": [found["id"]]}},
                                                  "sort": "EXPECTED_START_TIME_ASC"})

    def task_runs(self, flow_run_id: str) -> list[dict]:
        return self.request("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text()[-4000:] if path.is_file() else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, prefect_home):
    pipe = Pipeline.copy_of_repository(tmp_path_factory, TINY, sweep=False)
    root = pipe.root
    home = prefect_home()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    pipe.env.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_UI_ENABLED": "false", "DO_NOT_TRACK": "true"})
    pipe.env.pop("PREFECT_PROFILES_PATH", None)
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(home / f"{name}.log", "w")
        process = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=root, env=pipe.env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(process)
        return process

    stack = Stack(pipe, api, home)
    try:
        server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui")
        stack.server_seconds = wait_healthy(server, f"{api}/health", home / "server.log")
        print(f"Prefect server healthy after {stack.server_seconds:.1f} s", file=sys.stderr)
        stack.prefect("work-pool", "create", POOL, "--type", "process")
        stack.deploy_output = stack.prefect("--no-prompt", "deploy", "--all")
        start("worker", "worker", "start", "--pool", POOL, "--limit", "1")
        yield stack
    finally:
        for process in reversed(processes):
            _stop(process)
        for process in processes:
            assert process.poll() is not None


def test_deploy_registers_the_deployments_in_the_repository(stack: Stack) -> None:
    manual = stack.request("/deployments/name/vae-pipeline/manual")
    weekly = stack.request("/deployments/name/scheduled-retraining/weekly")
    sweep = stack.request("/deployments/name/vae-sweep/figure2")
    assert manual["work_pool_name"] == weekly["work_pool_name"] == sweep["work_pool_name"] == POOL
    assert sweep["entrypoint"] == "flows/sweep.py:vae_sweep"
    assert {"workers", "address", "report", "set_params"} <= set(sweep["parameter_openapi_schema"]["properties"])
    assert [s["schedule"]["cron"] for s in weekly["schedules"]] == ["0 3 * * 1"]
    directory = manual["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert Path(directory) == stack.pipe.root  # where `prefect deploy` ran


def test_an_interval_schedule_runs_retraining_by_itself(stack: Stack) -> None:
    """The schedule is a setting: replaced on the server by the CLI, no code involved. A 5-second
    interval, so that the first run is due at once; as soon as the worker has taken it the work
    pool is paused (`prefect work-pool pause`), so that no second retraining starts behind the
    first, and the schedule deleted. (Deleting the schedule alone is not enough: it deletes the
    runs it had scheduled, but a scheduler loop under way can still add some behind it, which the
    worker would run once the first is done; that happened in one suite run of 2026-12-07.)

    The retraining runs every stage for real (the pipeline's only run in this module: the manual
    run after it finds its stages in DVC's run cache). It is the first model of the store, so it
    becomes champion; tests/test_registry.py compares challengers with a champion."""
    seed = int(yaml.safe_load((stack.pipe.root / "params.yaml").read_text())["train"]["seed"])
    stack.prefect("deployment", "schedule", "create", "scheduled-retraining/weekly", "--interval", "5",
                  "--replace", "--accept-yes")
    started = time.monotonic()
    taken: list[dict] = []
    while not taken:  # the scheduler's loop is 5 s here and the worker asks every 2 s
        runs = stack.flow_runs("scheduled-retraining", "weekly")
        taken = [run for run in runs if run["state_type"] != "SCHEDULED"]
        assert time.monotonic() - started < 120, f"no scheduled run started:\n{stack.log('worker')}"
        time.sleep(0.5)
    assert len(taken) == 1, taken  # the worker runs one flow at a time (--limit 1)
    schedule = stack.request("/deployments/name/scheduled-retraining/weekly")["schedules"][0]
    assert schedule["schedule"]["interval"] == 5
    stack.prefect("work-pool", "pause", POOL)
    stack.prefect("deployment", "schedule", "delete", "scheduled-retraining/weekly", schedule["id"], "--accept-yes")
    run = taken[0]
    while run["state_type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert time.monotonic() - started < 480, f"the scheduled run did not finish:\n{stack.log('worker')}"
        time.sleep(2)
        run = stack.request(f"/flow_runs/{run['id']}")
    assert run["state_type"] == "COMPLETED", stack.log("worker")
    print(f"first scheduled retraining completed {time.monotonic() - started:.1f} s after the schedule was set",
          file=sys.stderr)
    assert run["auto_scheduled"] is True  # created by the scheduler, not by anyone calling it
    # This one was the only retraining: any other run of the deployment never left SCHEDULED.
    others = [other for other in stack.flow_runs("scheduled-retraining", "weekly") if other["id"] != run["id"]]
    assert [other["state_type"] for other in others if other["state_type"] != "SCHEDULED"] == []
    for other in others:  # so that none starts once the pool is resumed for the next test
        stack.request(f"/flow_runs/{other['id']}", method="DELETE")
    stack.prefect("work-pool", "resume", POOL)
    every = {task["name"] for task in stack.task_runs(run["id"])}
    assert {"download", "binarize", "train", "evaluate", "visualize", "report"} <= every, every

    import mlflow

    from vae import tracking

    store = f"sqlite:///{stack.pipe.store}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    # The retraining took the seed after params.yaml's; the first version, champion from its registration.
    [version] = client.search_model_versions("name='vae-mnist'")
    assert version.tags["train_seed"] == str(seed + 1) and str(version.version) == "1", version.tags
    assert version.tags["champion_decision"] == "promoted", version.tags
    assert str(client.get_model_version_by_alias("vae-mnist", "champion").version) == "1"
    # Recorded as a DVC experiment of its own, whose commit tags the MLflow runs it made; the work
    # tree untouched.
    shown = json.loads(stack.pipe.dvc("exp", "show", "--json", "--no-pager"))
    experiments = {rev.get("name"): rev for baseline in shown for experiment in baseline.get("experiments") or []
                   for rev in experiment.get("revs", [])}
    assert run["name"] in experiments, list(experiments)
    trained = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id],
                                 filter_string=f"tags.`{tracking.EXPERIMENT_TAG}` = '{run['name']}'")
    assert trained and {r.data.tags["dvc.experiment_commit"] for r in trained} == {experiments[run["name"]]["rev"]}
    assert version.run_id in {r.info.run_id for r in trained}
    stack.retrained = {"seed": seed + 1, "experiment": experiments[run["name"]],
                       "training_runs": len(client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id]))}


def test_deployment_run_completes_every_stage(stack: Stack) -> None:
    """`prefect deployment run vae-pipeline/manual --watch` with the retraining's seed: the same
    parameters as the previous test's run, so DVC restores every stage's outputs from its run
    cache (shared by the flows' workspaces) instead of running it, and the run is recorded as a
    DVC experiment of its own that `dvc exp apply` brings into the work tree."""
    retrained = getattr(stack, "retrained", None)
    assert retrained, "runs after test_an_interval_schedule_runs_retraining_by_itself, whose pipeline it reuses"
    params_before = (stack.pipe.root / "params.yaml").read_bytes()
    lock_before = (stack.pipe.root / "dvc.lock").read_bytes()
    started = time.monotonic()
    output = stack.prefect("deployment", "run", "vae-pipeline/manual", "-p", f"seed={retrained['seed']}", "--watch",
                           "--watch-timeout", "600", timeout=660)
    seconds = time.monotonic() - started
    print(f"deployment run from DVC's run cache: {seconds:.1f} s", file=sys.stderr)
    runs = stack.flow_runs("vae-pipeline", "manual")
    assert [run["state_type"] for run in runs] == ["COMPLETED"], output[-3000:] + stack.log("worker")
    every = {task["name"]: task for task in stack.task_runs(runs[0]["id"])}
    tasks = {name: task for name, task in every.items() if not name.startswith("record-experiment")}
    assert len(every) == len(tasks) + 1  # and the task that records the DVC experiment
    assert set(tasks) == {"download", "binarize", "train", "evaluate", "visualize", "report"}
    assert all(task["state_type"] == "COMPLETED" and task["state_name"] in ("Completed", "Skipped")
               for task in tasks.values()), {name: task["state_name"] for name, task in tasks.items()}

    root = stack.pipe.root
    # The run wrote nothing in the work tree: it is a DVC experiment, named after the flow run.
    assert (root / "params.yaml").read_bytes() == params_before
    assert subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout == ""
    assert (root / "dvc.lock").read_bytes() == lock_before and not (root / "reports/metrics.json").exists()
    name = runs[0]["name"]
    shown = json.loads(stack.pipe.dvc("exp", "show", "--json", "--no-pager"))
    experiments = {rev.get("name"): rev for baseline in shown for experiment in baseline.get("experiments") or []
                   for rev in experiment.get("revs", [])}
    assert name in experiments, list(experiments)
    recorded = experiments[name]["data"]
    assert recorded["params"]["params.yaml"]["data"]["train"]["seed"] == retrained["seed"]
    # The retraining's results, restored: the same metrics, and no stage command ran (no new MLflow run).
    assert recorded["metrics"] == retrained["experiment"]["data"]["metrics"]
    assert recorded["metrics"]["reports/metrics.json"]["data"]["test_log_likelihood"] < 0

    import mlflow

    store = f"sqlite:///{stack.pipe.store}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    experiment_id = client.get_experiment_by_name("vae-mnist").experiment_id
    assert len(client.search_runs([experiment_id])) == retrained["training_runs"]
    assert len(client.search_model_versions("name='vae-mnist'")) == 1

    # `dvc exp apply` brings its outputs into the work tree, where DVC then finds every stage up to date.
    stack.pipe.dvc("exp", "apply", name)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(tasks) and lock["train"]["params"]["params.yaml"]["train.seed"] == retrained["seed"]
    metrics = stack.pipe.json("reports/metrics.json")
    assert metrics["test_log_likelihood"] < 0
    assert stack.pipe.status() == {}
    assert (root / "models/model.pt").is_file() and (root / "reports/report.html").is_file()
    # The run the restored model.pt leads to (by its hash) is the retraining's.
    from vae import tracking

    [version] = client.search_model_versions("name='vae-mnist'")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        assert tracking.training_run_id(root / "models/model.pt") == version.run_id
