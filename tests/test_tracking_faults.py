"""Tracking faults: an MLflow server that is down, or that refuses, stops the stage with a message
naming the tracking URI (credentials masked) and no traceback; nothing is half-registered; no
credential from the URI or the environment reaches the outputs, the logs or the MLflow store.

A real ``mlflow server`` runs on 127.0.0.1 behind a small forwarding proxy that this module
starts too; the proxy refuses the requests a test names (HTTP 503), as a failing server would.
"""

from __future__ import annotations

import http.server
import os
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from support import SMALL_AIS, free_port, running_mlflow_server, write_processed

pytestmark = pytest.mark.e2e

SECRET = "s3cret-Pa55"
VAE = str(Path(sys.executable).parent / "vae")
PARAMS = {
    "model": {"hidden_dim": 32, "latent_dim": 2},
    "train": {"epochs": 2, "batch_size": 50, "elbo_eval_size": 100, "device": "cpu", "checkpoint_interval": 0},
    "evaluate": {"importance_samples": 10, "bound_curve": [1, 10], "train_examples": 100, "device": "cpu",
                 **SMALL_AIS},
}


class Proxy(http.server.ThreadingHTTPServer):
    """Forwards every request to ``upstream``; answers 503 to those whose path holds one of ``refuse``."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream, self.refuse, self.refused = upstream, set(), []


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if any(part in self.path for part in self.server.refuse):
            self.server.refused.append(f"{self.command} {self.path}")
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            message = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "refused by the test proxy"}'
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            self.wfile.write(message)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        request = urllib.request.Request(self.server.upstream + self.path, data=body or None, method=self.command,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload, reply_headers = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, payload, reply_headers = error.code, error.read(), error.headers
        self.send_response(status)
        for key, value in reply_headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow server (SQLite store, served artifacts) on 127.0.0.1 and the proxy before it."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(folder / "mlflow.db", folder, dict(os.environ),
                               "--artifacts-destination", str(folder / "artifacts")) as base:
        proxy = Proxy(base)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            yield {"folder": folder, "proxy": proxy,
                   "uri": f"http://alice:{SECRET}@127.0.0.1:{proxy.server_address[1]}"}
        finally:
            proxy.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    write_processed(root, train_count=400)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return root


def vae(workspace: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    """A ``vae`` stage in ``workspace`` logging to ``uri``, with credentials in the environment too,
    and MLflow's HTTP retries off (a down server fails at once instead of after its backoff)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "alice",
           "MLFLOW_TRACKING_PASSWORD": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([VAE, *args, "--no-progress"], cwd=workspace, env=env, capture_output=True, text=True,
                            timeout=600)
    workspace.joinpath("commands.log").open("a").write(result.stdout + result.stderr)
    return result


def outputs(workspace: Path) -> list[str]:
    return sorted(str(p.relative_to(workspace)) for folder in ("models", "reports") if (workspace / folder).exists()
                  for p in (workspace / folder).rglob("*") if p.is_file())


def assert_clear_tracking_error(result: subprocess.CompletedProcess, port: int) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"MLflow tracking at http://***@127.0.0.1:{port}" in result.stderr, result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_a_server_that_is_down_stops_training_before_any_work(workspace: Path) -> None:
    port = free_port()  # nothing listens there
    result = vae(workspace, f"http://alice:{SECRET}@127.0.0.1:{port}", "train")
    assert_clear_tracking_error(result, port)
    assert "Connection refused" in result.stderr
    assert outputs(workspace) == []  # no checkpoint, no summary: nothing a later stage could mistake for a result


def test_a_server_that_refuses_everything_stops_training_before_any_work(server: dict, workspace: Path) -> None:
    proxy = server["proxy"]
    proxy.refuse = {"/api/"}
    try:
        result = vae(workspace, server["uri"], "train")
    finally:
        proxy.refuse = set()
    assert_clear_tracking_error(result, proxy.server_address[1])
    assert "503" in result.stderr  # MLflow's words: "too many 503 error responses"
    assert proxy.refused, "the request never reached the proxy"
    assert outputs(workspace) == []


@pytest.fixture(scope="module")
def registration(server: dict, workspace: Path) -> dict:
    """Train through the proxy; evaluate once with the registry's version creation refused, then again."""
    proxy = server["proxy"]
    trained = vae(workspace, server["uri"], "train")
    assert trained.returncode == 0, trained.stderr
    proxy.refuse = {"model-versions/create"}
    try:
        refused = vae(workspace, server["uri"], "evaluate")
    finally:
        proxy.refuse = set()
    client = _client(server)
    # The training run, as the evaluate stage finds it: tagged with the checkpoint's SHA-256.
    from vae.io import file_sha256
    from vae.tracking import MODEL_TAG

    digest = file_sha256(workspace / "models/model.pt")
    (trained_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                        filter_string=f"tags.`{MODEL_TAG}` = '{digest}'")
    run_id = trained_run.info.run_id
    versions_after_refusal = client.search_model_versions(f"run_id='{run_id}'")
    status_after_refusal = client.get_run(run_id).info.status
    evaluated = vae(workspace, server["uri"], "evaluate")
    return {"refused": refused, "evaluated": evaluated, "run_id": run_id, "client": client,
            "versions_after_refusal": versions_after_refusal, "status_after_refusal": status_after_refusal,
            "proxy_refused": list(proxy.refused)}


def _client(server: dict):
    from mlflow import MlflowClient

    uri = f"http://127.0.0.1:{server['proxy'].server_address[1]}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_refused_registration_fails_the_stage_and_registers_nothing(registration: dict, server: dict) -> None:
    assert any("model-versions/create" in request for request in registration["proxy_refused"])
    assert_clear_tracking_error(registration["refused"], server["proxy"].server_address[1])
    assert "register_model" in registration["refused"].stderr
    assert registration["versions_after_refusal"] == []
    assert registration["status_after_refusal"] == "FAILED"


def test_the_rerun_registers_one_complete_version(registration: dict) -> None:
    evaluated = registration["evaluated"]
    assert evaluated.returncode == 0, evaluated.stderr
    client = registration["client"]
    (version,) = client.search_model_versions(f"run_id='{registration['run_id']}'")
    assert {"test_log_likelihood", "test_log_likelihood_stderr", "importance_samples", "latent_dim",
            "test_set_sha256"} <= set(version.tags)
    assert client.get_run(registration["run_id"]).info.status == "FINISHED"


def test_no_credential_reaches_outputs_logs_or_the_store(registration: dict, server: dict, workspace: Path) -> None:
    assert registration["evaluated"].returncode == 0
    looked_at = []
    for path in [workspace / "commands.log", *(workspace / p for p in outputs(workspace)),
                 *(p for p in (server["folder"] / "artifacts").rglob("*") if p.is_file())]:
        assert SECRET.encode() not in path.read_bytes(), path
        looked_at.append(path)
    assert len(looked_at) > 10
    with sqlite3.connect(server["folder"] / "mlflow.db") as db:
        tables = [row[0] for row in db.execute("select name from sqlite_master where type = 'table'")]
        rows = 0
        for table in tables:
            for row in db.execute(f'select * from "{table}"'):
                assert SECRET not in " ".join(map(str, row)), (table, row)
                rows += 1
    assert rows > 100


@pytest.mark.parametrize(("text", "shown"), [
    ("http://alice:pw@host:5000/", "http://***@host:5000/"),
    ("https://token@example.org/api and s3://key:secret@bucket/x", "https://***@example.org/api and s3://***@bucket/x"),
    ("'http://a:b@h/x' failed", "'http://***@h/x' failed"),
    ("sqlite:////tmp/store/mlflow.db", "sqlite:////tmp/store/mlflow.db"),
    ("mail me at alice@example.org", "mail me at alice@example.org"),
])
def test_masked_hides_the_credentials_of_every_url(text: str, shown: str) -> None:
    from vae.tracking import masked

    assert masked(text) == shown


def test_the_uri_reports_show_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    from vae.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://alice:{SECRET}@mlflow.example.org")
    assert tracking_uri() == "https://***@mlflow.example.org"
