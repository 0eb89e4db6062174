"""The whole DVC pipeline end to end, for real, on a small subset of MNIST, in a temporary git
copy of the repository; then, on 127.0.0.1 against the store the pipeline wrote, the README's
``mlflow ui`` (queried through the REST API the UI uses, and looked at in headless Chromium) and
``mlflow models serve`` of the registered champion (asked for every output over HTTP)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from html import unescape
from pathlib import Path

import pytest
import yaml

from support import (SMALL_AIS, Pipeline, free_port, git, running_mlflow_server, set_params, shared_pipeline,
                     wait_healthy)

pytestmark = pytest.mark.e2e

STAGES = ("download", "binarize", "train", "evaluate", "visualize", "sweep-data@mnist", "sweep-data@frey",
          "sweep-frey@2-aevb-0", "sweep-report", "report")
# The figures the report shows for this latent_dim = 2 MNIST run. support.SMALL's sweep has no MNIST
# member, so no Figure 5 (the module's last test adds one); Figure 2 is the sweep's.
FIGURES = ("elbo_curves", "bound_curve", "log_likelihood_histogram", "manifold", "samples", "reconstructions",
           "latent_space")


def tagged_run(pipeline: Pipeline, tag: str, relative: str) -> str | None:
    """The newest run of the pipeline's MLflow store tagged ``tag`` with the SHA-256 of its file
    ``relative``, as the stages find their run (vae.tracking.training_run_id, evaluation_run_id)."""
    from mlflow import MlflowClient

    from vae.io import file_sha256

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline.store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`{tag}` = '{file_sha256(pipeline.root / relative)}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def training_run(pipeline: Pipeline) -> str | None:
    """The run that trained the pipeline's models/model.pt."""
    from vae.tracking import MODEL_TAG

    return tagged_run(pipeline, MODEL_TAG, "models/model.pt")


def evaluation_run(pipeline: Pipeline) -> str | None:
    """The run the pipeline's reports/metrics.json was logged to."""
    from vae.tracking import METRICS_TAG

    return tagged_run(pipeline, METRICS_TAG, "reports/metrics.json")


@pytest.fixture(scope="module")
def pipeline(interrupted_pipeline: dict) -> Pipeline:
    """The pipeline on support.SMALL, run to the end through a kill -9 of each stage (tests/conftest.py's
    ``interrupted_pipeline``): what it left must be what an uninterrupted ``dvc repro`` leaves.
    ``first_output`` holds the output of every ``dvc repro`` it took."""
    return shared_pipeline(interrupted_pipeline)


def test_repro_runs_every_stage_and_writes_the_outputs(pipeline: Pipeline) -> None:
    # The copy started without outputs (they are not in git): every stage's are there now.
    stamps = pipeline.output_stamps()
    assert [stage for stage in STAGES if not stamps.get(stage)] == []
    root = pipeline.root
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert (root / "data/raw/mnist" / name).stat().st_size > 0
    assert not list((root / "data/raw/mnist").glob(".*tmp")), "temporary download files left behind"
    for name in FIGURES:
        assert (root / "reports/figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (root / "reports/figures/prior_samples_by_latent_dim.png").exists()
    assert pipeline.json("reports/figures/figure_members.json") == {"prior_samples_by_latent_dim": {
        "dataset": "mnist", "algorithm": "aevb", "declared": [], "not_run": [], "shown": []}}


def test_metrics_hold_the_required_fields(pipeline: Pipeline) -> None:
    metrics = pipeline.json("reports/metrics.json")
    assert metrics["dataset"] == "mnist" and metrics["binarization"] == "dynamic"
    assert metrics["latent_dim"] == 2 and metrics["epochs"] == 2 and metrics["importance_samples"] == 50
    assert metrics["test_examples"] == 500
    for key in ("test_log_likelihood", "test_elbo", "train_elbo", "valid_elbo"):
        assert -400 < metrics[key] < 0, (key, metrics[key])
    assert 0 < metrics["test_log_likelihood_stderr"] < 10
    # L_50 is a tighter bound than the ELBO; with 500 examples the mean gap is far above noise.
    assert metrics["test_log_likelihood"] > metrics["test_elbo"]
    assert metrics["active_units"] in (0, 1, 2)
    assert metrics["train_examples_evaluated"] == 2000
    assert -400 < metrics["train_log_likelihood"] < 0
    assert metrics["train_test_gap"] == pytest.approx(
        metrics["train_log_likelihood"] - metrics["test_log_likelihood"], abs=1e-3)
    curve = metrics["bound_curve"]
    assert list(curve) == ["1", "5", "50"]  # bound_curve values <= k = 50
    assert curve["50"] == metrics["test_log_likelihood"]
    assert curve["1"] < curve["5"] < curve["50"]
    assert abs(curve["1"] - metrics["test_elbo"]) < 4 * metrics["test_log_likelihood_stderr"] + 1.0
    rows = (pipeline.root / "reports/bound_curve.csv").read_text().splitlines()
    assert rows[0] == "k,test_log_likelihood,test_stderr,train_log_likelihood,train_stderr" and len(rows) == 4
    per_example = (pipeline.root / "reports/log_likelihood_per_example.csv").read_text().splitlines()
    assert len(per_example) == 1 + 500 + 2000
    curve = (pipeline.root / "reports/elbo_curve.csv").read_text().splitlines()
    assert curve[0] == "epoch,examples_seen,train_elbo,valid_elbo,test_elbo,learning_rate" and len(curve) == 3
    assert curve[-1].split(",")[1] == str(2 * 2000)
    # How the execution went is MLflow's (tests/test_determinism.py: two executions, one dvc.lock).
    summary = pipeline.json("reports/train_summary.json")
    volatile = {"train_seconds", "evaluate_seconds", "ais_seconds", "mlflow_run_id", "resumed_from_passes"}
    assert not volatile & (set(metrics) | set(summary))
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{pipeline.store}").get_run(evaluation_run(pipeline))
    assert run.info.run_id == training_run(pipeline)  # the evaluation logged to the training run
    assert {"train_seconds", "evaluate_seconds", "ais_seconds"} <= set(run.data.metrics)
    assert all(run.data.metrics[key] > 0 for key in ("train_seconds", "evaluate_seconds", "ais_seconds"))


def test_metrics_say_how_tight_the_bound_is(pipeline: Pipeline) -> None:
    """AIS, BDMC and (latent_dim 2) App. D ran on SMALL's images; their per-image numbers add up
    to the means in metrics.json, AIS sits beside L_k of the same images, and BDMC's bounds come
    in the right order on average."""
    import pandas as pd

    metrics = pipeline.json("reports/metrics.json")
    frame = pd.read_csv(pipeline.root / "reports/ais_per_example.csv")
    per_example = pd.read_csv(pipeline.root / "reports/log_likelihood_per_example.csv")
    for split, count in (("test", SMALL_AIS["ais_test_examples"]), ("train", SMALL_AIS["ais_train_examples"])):
        rows = frame[frame["split"] == split]
        assert metrics[f"{split}_ais_examples"] == count == len(rows)
        assert metrics[f"{split}_ais_log_likelihood"] == pytest.approx(rows["ais_log_likelihood"].mean(), abs=1e-3)
        # L_k beside AIS is the evaluate stage's own L_k of the same (first) images.
        same = per_example[per_example["split"] == split]["log_likelihood"].to_numpy()[:count]
        assert rows["log_likelihood"].to_numpy() == pytest.approx(same, abs=1e-4)
        assert metrics[f"{split}_ais_gap"] == pytest.approx(
            (rows["ais_log_likelihood"] - rows["log_likelihood"]).mean(), abs=1e-3)
        assert metrics[f"{split}_appendix_d_log_likelihood"] == pytest.approx(
            rows["appendix_d_log_likelihood"].mean(), abs=1e-3)
        assert -400 < metrics[f"{split}_ais_log_likelihood"] < 0
        assert 0 < metrics[f"{split}_ais_acceptance_rate"] <= 1
    simulated = frame[frame["split"] == "simulated"]
    assert len(simulated) == metrics["bdmc_examples"] == 4
    assert metrics["bdmc_gap"] == pytest.approx((simulated["bdmc_upper"] - simulated["bdmc_lower"]).mean(), abs=1e-3)
    # Reverse AIS bounds log p(x) from above and forward AIS from below, each in expectation.
    assert metrics["bdmc_upper"] >= metrics["bdmc_lower"] - 3 * metrics["bdmc_gap_stderr"]
    assert metrics["ais_temperatures"] == 20 and metrics["ais_initial"] == "encoder"


def test_checkpoint_loads_through_the_public_api(pipeline: Pipeline) -> None:
    import torch

    import vae

    model = vae.load_model(pipeline.root / "models/model.pt")
    assert model.latent_dim == 2 and not model.training
    test = torch.load(pipeline.root / "data/processed/mnist/test.pt", weights_only=True)
    x = test["images"][:8].float()
    mu, log_var = model.encode(x)
    assert mu.shape == log_var.shape == (8, 2)
    assert model.decode(mu).shape == (8, 784)
    assert model.elbo(x).shape == (8,)
    assert model.log_likelihood(x, importance_samples=10).shape == (8,)


def test_retraining_reevaluates_the_registered_champion_without_setting_mlflow_globals(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The scheduled-retraining flow's re-evaluation of a champion (flows/retraining.py), on the
    version the evaluate stage registered: downloaded from the repository's own store while
    MLflow's process-wide default is another (empty) one, it gives the stage's own per-example
    test L_k, and MLflow's process-wide URIs are left as they were."""
    import logging

    import mlflow
    import numpy as np
    import pandas as pd

    from flows.retraining import champion_reevaluation
    from vae import tracking

    # The repository with its store where the stages' default puts it (<root>/mlflow.db), found
    # only through the root; MLflow's own default is a store in this test's empty folder.
    root = tmp_path / "repository"
    root.mkdir()
    for name in ("params.yaml", "data"):
        (root / name).symlink_to(pipeline.root / name)
    (root / "mlflow.db").symlink_to(pipeline.store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    defaults = mlflow.get_tracking_uri(), mlflow.get_registry_uri()

    [champion] = tracking.client_for(root).search_model_versions("name='vae-mnist'")
    metrics = pipeline.json("reports/metrics.json")
    assert champion.run_id == training_run(pipeline)
    reevaluated = champion_reevaluation(root, root, metrics, logging.getLogger(__name__))(champion)

    table = pd.read_csv(pipeline.root / "reports/log_likelihood_per_example.csv")
    stage = table[table["split"] == "test"].sort_values("index")["log_likelihood"].to_numpy()
    assert reevaluated.shape == stage.shape == (metrics["test_examples"],)
    np.testing.assert_allclose(reevaluated, stage, rtol=0, atol=1e-3)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == defaults


def test_report_embeds_figures_and_shows_the_metrics(pipeline: Pipeline) -> None:
    html = (pipeline.root / "reports/report.html").read_text()
    metrics = pipeline.json("reports/metrics.json")
    assert html.count("data:image/png;base64,") == len(FIGURES) + 1  # and the sweep's Figure 2 replica
    assert "frey-z2-aevb-s0" in html  # the sweep's one member, in its table
    assert "src=\"http" not in html and "src='http" not in html, "report must not need the network"
    assert f"{metrics['test_log_likelihood']:.2f}" in html
    assert "dynamic" in html and "static" not in html.split("Provenance")[0].lower()
    lock = yaml.safe_load((pipeline.root / "dvc.lock").read_text())["stages"]
    model_md5 = next(out["md5"] for out in lock["train"]["outs"] if out["path"].endswith("model.pt"))
    assert f"models/model.pt md5 {model_md5}" in html
    assert training_run(pipeline) in html  # the report's provenance: read from MLflow, not from a DVC output
    markdown = (pipeline.root / "reports/report.md").read_text()
    wall = re.search(r"\| training wall time \| ([^|]+) \|", markdown).group(1).strip()
    assert re.fullmatch(r"\d+\.\d s", wall), wall  # the run's train_seconds, not "not recorded"
    assert f"{metrics['test_log_likelihood']:.2f}" in markdown
    assert "(figures/manifold.png)" in markdown
    for text in (html, markdown):  # the tightness table: AIS beside L_k, BDMC, App. D, Wu et al.
        assert "How tight is the bound?" in text and "AIS (T = 20)" in text
        assert f"{metrics['test_ais_log_likelihood']:.2f} ± {metrics['test_ais_log_likelihood_stderr']:.2f}" in text
        assert f"{metrics['test_ais_gap']:.2f} ± {metrics['test_ais_gap_stderr']:.2f}" in text
        assert f"{metrics['test_appendix_d_log_likelihood']:.2f}" in text
        assert f"their gap, {metrics['bdmc_gap']:.2f} ± {metrics['bdmc_gap_stderr']:.2f} nats" in text
        assert "Wu, Burda, Salakhutdinov" in text and "-85.62" in text


def _keys(tree: object) -> set[str]:
    """Every key of every mapping nested in ``tree`` (parsed JSON)."""
    if isinstance(tree, dict):
        return set(tree) | {key for value in tree.values() for key in _keys(value)}
    if isinstance(tree, list):
        return {key for value in tree for key in _keys(value)}
    return set()


def test_dvc_metrics_and_plots_render(pipeline: Pipeline) -> None:
    shown = json.loads(pipeline.dvc("metrics", "show", "--json"))
    assert "test_log_likelihood" in _keys(shown)
    plots = json.loads(pipeline.dvc("plots", "show", "--json"))["data"]
    assert set(plots) == {"ELBO per epoch", "ELBO per minibatch", "Bound tightness (L_k against k)"}, list(plots)
    rows = plots["ELBO per epoch"][0]["content"]["data"]["values"]
    assert {row["field"] for row in rows} == {"train_elbo", "valid_elbo", "test_elbo"}
    assert len(rows) == 3 * pipeline.json("reports/metrics.json")["epochs"]
    curve = (pipeline.root / "reports/elbo_curve.csv").read_text().splitlines()
    header = curve[0].split(",")
    test_elbos = {round(float(line.split(",")[header.index("test_elbo")]), 4) for line in curve[1:]}
    assert {round(float(row["test_elbo"]), 4) for row in rows if row["field"] == "test_elbo"} == test_elbos
    bound = json.loads(pipeline.dvc("plots", "show", "--json"))["data"]["Bound tightness (L_k against k)"]
    assert {row["k"] for row in bound[0]["content"]["data"]["values"]} == {"1", "5", "50"}


def test_second_repro_does_nothing_and_an_epochs_change_reruns_from_train(pipeline: Pipeline) -> None:
    before = pipeline.output_stamps()
    pipeline.dvc("repro")
    assert pipeline.stages_rerun(before) == set()
    assert pipeline.status() == {}

    git(pipeline.root, "add", "dvc.lock")
    git(pipeline.root, "commit", "-qm", "two passes")
    before = pipeline.json("reports/metrics.json")
    stamps = pipeline.output_stamps()
    set_params(pipeline.root / "params.yaml", {"train": {"epochs": 3}})
    pipeline.dvc("repro")
    rerun = pipeline.stages_rerun(stamps)
    assert not rerun & {"download", "binarize"}, rerun
    assert {"train", "evaluate", "visualize", "report"} <= rerun, rerun
    after = pipeline.json("reports/metrics.json")
    assert after["epochs"] == 3
    assert pipeline.status() == {}
    # `dvc metrics diff`: the committed run's metrics (from the cache, through HEAD's dvc.lock) beside these.
    diff = json.loads(pipeline.dvc("metrics", "diff", "--json"))["reports/metrics.json"]
    assert diff["epochs"] == {"old": 2, "new": 3, "diff": 1}
    assert diff["test_log_likelihood"]["old"] == before["test_log_likelihood"]
    assert diff["test_log_likelihood"]["new"] == after["test_log_likelihood"]


def _get(base: str, endpoint: str, **query: str) -> dict:
    url = f"{base}{endpoint}?{urllib.parse.urlencode(query)}" if query else f"{base}{endpoint}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(pipeline: Pipeline):
    """The README's ``mlflow ui`` (MLflow's server: UI and REST API) on 127.0.0.1 over the store the pipeline wrote."""
    with running_mlflow_server(pipeline.store, pipeline.root, pipeline.env, command="ui") as base:
        yield base


def test_mlflow_server_shows_runs_curves_and_registered_model(pipeline: Pipeline, mlflow_server: str) -> None:
    # The latest run is the one train_summary.json names (after the epochs change, if that ran).
    experiment = _get(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="vae-mnist")
    experiment_id = experiment["experiment"]["experiment_id"]
    runs = _post(mlflow_server, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [experiment_id], "order_by": ["attributes.start_time DESC"]})["runs"]
    latest = next(run for run in runs if run["info"]["run_id"] == training_run(pipeline))
    assert latest["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in latest["data"]["params"]}
    assert params["model.latent_dim"] == "2" and params["evaluate.importance_samples"] == "50"
    metrics = {m["key"]: m["value"] for m in latest["data"]["metrics"]}
    on_disk = pipeline.json("reports/metrics.json")
    assert metrics["test_log_likelihood"] == pytest.approx(on_disk["test_log_likelihood"], abs=1e-3)

    run_id = latest["info"]["run_id"]
    history = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                   metric_key="valid_elbo")["metrics"]
    epochs = on_disk["epochs"]
    assert [point["step"] for point in sorted(history, key=lambda p: p["step"])] == [
        2000 * (e + 1) for e in range(epochs)]
    steps = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                 metric_key="train_elbo_step", max_results="100000")["metrics"]
    # One point per log_interval = 5 minibatches of 100: 4 per pass over the 2000 training images.
    assert sorted(point["step"] for point in steps) == [500 * (i + 1) for i in range(epochs * 4)]

    curve = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                 metric_key="test_log_likelihood_curve")["metrics"]
    assert sorted(point["step"] for point in curve) == [1, 5, 50]

    test_curve = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                      metric_key="test_elbo_curve")["metrics"]
    assert sorted(point["step"] for point in test_curve) == [2000 * (e + 1) for e in range(epochs)]

    artifacts = _get(mlflow_server, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="figures")
    assert {Path(f["path"]).name for f in artifacts["files"]} >= {f"{name}.png" for name in FIGURES} | {
        "figure_members.json"}

    versions = _get(mlflow_server, "/api/2.0/mlflow/model-versions/search", filter="name='vae-mnist'")
    mine = [v for v in versions["model_versions"] if v["run_id"] == run_id]
    assert len(mine) == 1
    tags = {t["key"]: t["value"] for t in mine[0].get("tags", [])}
    assert float(tags["test_log_likelihood"]) == pytest.approx(on_disk["test_log_likelihood"], abs=1e-3)
    model = _get(mlflow_server, "/api/2.0/mlflow/registered-models/get", name="vae-mnist")
    assert model["registered_model"]["name"] == "vae-mnist"


PROBE = """<script>window.addEventListener("load", () => {
  for (const img of document.images) img.setAttribute("data-natural-width", img.naturalWidth);
  document.body.setAttribute("data-height", document.documentElement.scrollHeight);
  document.body.setAttribute("data-probed", "yes");
});</script>"""
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
WIDTH = 1100


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_browser(pipeline: Pipeline, tmp_path: Path) -> None:
    """Headless Chromium opens report.html as a reader would: every image decodes (naturalWidth > 0),
    every number the tables show from metrics.json is there as the report formats it, and a
    full-page screenshot is saved under this test's tmp dir (its path is printed)."""
    browser = _browser()
    report = pipeline.root / "reports/report.html"
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text() + PROBE)
    dom = _chromium(browser, tmp_path / "profile", f"--window-size={WIDTH},1000", "--virtual-time-budget=10000",
                    "--dump-dom", probe.as_uri()).stdout
    assert 'data-probed="yes"' in dom, "the page did not finish loading"
    images = re.findall(r"<img\b[^>]*>", dom)
    widths = {re.search(r'alt="([^"]*)"', tag).group(1): int(re.search(r'data-natural-width="(\d+)"', tag).group(1))
              for tag in images}
    assert len(images) == len(FIGURES) + 1 == len(widths), list(widths)  # + the sweep's figure
    assert all(width > 0 for width in widths.values()), widths
    assert "Samples from the prior" in widths
    assert "Samples from the prior by latent size (cf. AEVB Figure 5)" not in widths  # no MNIST member
    assert "Learned 2-D manifold (cf. AEVB Figure 4)" in widths
    assert "Latent-size sweep (cf. AEVB Figure 2)" in widths

    m = pipeline.json("reports/metrics.json")
    k = m["importance_samples"]
    rows = [[unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", dom, flags=re.S)]
    results = {row[0]: row[1] for row in rows if len(row) == 2}  # the (quantity, value) table
    expected = {
        f"test log-likelihood L_{k}": f"{m['test_log_likelihood']:.2f} ± {m['test_log_likelihood_stderr']:.2f}",
        f"train log-likelihood L_{k} ({m['train_examples_evaluated']} images)":
            f"{m['train_log_likelihood']:.2f} ± {m['train_log_likelihood_stderr']:.2f}",
        "train - test gap (overfitting)": f"{m['train_test_gap']:.2f}",
        "test ELBO": f"{m['test_elbo']:.2f}", "train ELBO (last pass)": f"{m['train_elbo']:.2f}",
        "validation ELBO (last pass)": f"{m['valid_elbo']:.2f}",
        "active units (A_u > 0.01)": f"{m['active_units']} of {m['latent_dim']}",
        **{f"test L_{key}": f"{value:.2f}" for key, value in m["bound_curve"].items() if int(key) != k}}
    for quantity, value in expected.items():
        assert results.get(quantity) == value, (quantity, results.get(quantity), value)
    ours = [row for row in rows if row and row[0] == "this run"]  # beside the published numbers
    assert len(ours) == 1 and ours[0][-1] == f"{m['test_log_likelihood']:.2f}", ours

    height = int(re.search(r'data-height="(\d+)"', dom).group(1))
    assert height > 2000  # eight figures and four tables
    screenshot = tmp_path / "report_screenshot.png"
    _chromium(browser, tmp_path / "profile", f"--window-size={WIDTH},{min(height, 16000)}",
              "--virtual-time-budget=10000", f"--screenshot={screenshot}", report.as_uri())
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(screenshot) as shot:
        assert shot.width == WIDTH and shot.height == min(height, 16000)
    print(f"report screenshot: {screenshot}")


def _browser() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here: install Debian's chromium package (.ci/run does when it can)")
    return browser


def test_the_experiment_opens_on_its_training_runs_and_the_run_page_shows_the_elbo_curves(
        pipeline: Pipeline, mlflow_server: str, tmp_path: Path) -> None:
    """The experiment carries MLflow's kind tag for model training. Headless Chromium (driven by
    Playwright, which waits for what the page draws) on the README's ``mlflow ui`` finds the run in
    the experiment's run list and, on the run's page, the ELBO curves as line charts over training
    examples (a chart whose legend names the metric: a single value is drawn as a bar without it).
    A screenshot of the run page is kept (path printed)."""
    browser = _browser()
    from playwright.sync_api import sync_playwright

    from vae.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    experiment = _get(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="vae-mnist")["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    run_id, experiment_id = training_run(pipeline), experiment["experiment_id"]
    run_name = _get(mlflow_server, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]["info"]["run_name"]
    view = "workflowType=machine_learning"  # MLflow's "Model training" view (the README says why)
    screenshot = tmp_path / "mlflow_run_page.png"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{mlflow_server}/#/experiments/{experiment_id}?{view}")
            link = page.locator(f'a[href="#/experiments/{experiment_id}/runs/{run_id}"]')
            link.first.wait_for(timeout=60_000)
            assert link.first.inner_text() == run_name
            page.goto(f"{mlflow_server}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{view}")
            page.get_by_placeholder("Search metric charts").fill("elbo")
            for metric in ("train_elbo", "valid_elbo", "train_elbo_step"):
                page.locator(f'h4[title="{metric}"]').wait_for(timeout=60_000)  # the chart's heading
                page.get_by_text(f"{run_name} ({metric})").wait_for(timeout=60_000)  # its legend: a curve
            page.screenshot(path=str(screenshot))
        finally:
            chromium.close()
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"MLflow run page screenshot: {screenshot}")


def _invoke(base: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_mlflow_models_serve_answers_as_the_champions_checkpoint(pipeline: Pipeline, tmp_path: Path) -> None:
    """The first version registered is ``champion`` (no retraining flow has run); ``mlflow models
    serve`` of ``models:/vae-mnist@champion`` (``--env-manager local``, 127.0.0.1) answers JSON
    requests for every output as ``vae.load_model`` of that version's checkpoint does on the same
    images and seed, and refuses bad input with HTTP 400 naming the problem."""
    import os
    import signal
    import time

    import mlflow
    import numpy as np
    import torch

    import vae
    from vae import serving, tracking
    from vae.data.splits import load_split
    from vae.io import file_sha256

    store = f"sqlite:///{pipeline.store}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    champion = client.get_model_version_by_alias("vae-mnist", "champion")
    assert str(champion.version) == "1" and champion.tags["champion_decision"] == "promoted", champion.tags
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("vae-mnist", "1"), dst_path=str(tmp_path),
        tracking_uri=store))
    [checkpoint] = local.rglob("model.pt")
    run = client.get_run(champion.run_id)
    trained = client.get_run(run.data.tags.get(tracking.TRAINED_RUN_TAG, champion.run_id))
    assert file_sha256(checkpoint) == trained.data.tags[tracking.MODEL_TAG]  # the model that run trained
    model = vae.load_model(checkpoint)

    port = free_port()
    log_path = tmp_path / "serve.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/vae-mnist@champion",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  cwd=pipeline.root, env={**pipeline.env, "MLFLOW_TRACKING_URI": store}, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, f"{base}/ping", log_path)
        print(f"mlflow models serve answered /ping after {time.monotonic() - started:.1f} s")
        x = load_split(pipeline.root / "data/processed/mnist/test.pt").values()[:20]
        rows = x.to(torch.int64).tolist()  # JSON integers: the server reads them as float32
        params = {"importance_samples": 200, "samples": 3, "seed": 5, "count": 4}
        for output in serving.OUTPUTS:
            code, answer = _invoke(base, {"inputs": rows, "params": {**params, "output": output}})
            assert code == 200, (output, answer)
            expected = serving.predict(model, x.numpy(), {**params, "output": output})
            # The same computation in another process: equal but for float rounding.
            np.testing.assert_allclose(np.asarray(answer["predictions"], np.float32), expected, rtol=1e-5,
                                       atol=1e-5, err_msg=output)
        code, answer = _invoke(base, {"inputs": rows})  # the defaults: L_1000, seed 0
        np.testing.assert_allclose(answer["predictions"], model.log_likelihood(x, 1000, seed=0).numpy(), rtol=1e-5)
        refused = {
            "wrong width": ({"inputs": [row[:100] for row in rows[:2]]}, "does not match expected shape"),
            "grey values": ({"inputs": [[0.5] * 784]}, "Bernoulli and takes binary pixels"),
            "NaN": ({"inputs": [[float("nan")] * 784]}, "NaN or infinite"),
            "unknown output": ({"inputs": rows[:1], "params": {"output": "logits"}}, "params.output = 'logits'"),
        }
        for what, (body, message) in refused.items():
            code, answer = _invoke(base, body)
            assert code == 400 and message in answer["message"], (what, code, answer.get("message", "")[-500:])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_an_evaluation_change_logs_to_a_child_run_and_a_new_member_joins_figure_5(pipeline: Pipeline) -> None:
    """Last in the module, since it changes the evaluation and the sweep the other tests look at.
    Two changes, one ``dvc repro``:

    - only the evaluation settings (k): MLflow params are final, so the re-evaluation must not
      fail on the training run's params; it logs to a child run, which visualize and report follow;
    - an AEVB sweep member declared on the main run's dataset: it runs before visualize, whose
      dependencies its outputs are, and Figure 5 shows it from those files.

    The main run is not retrained, and `dvc status` is clean afterwards. (That adding a member
    alone re-runs neither train nor evaluate is tests/test_params_tracking.py's knob test.)"""
    before = evaluation_run(pipeline)
    stamps = pipeline.output_stamps()
    sweep = yaml.safe_load((pipeline.root / "params.yaml").read_text())["sweep"]
    small = {**sweep["settings"]["frey"], "data": sweep["settings"]["mnist"]["data"]}  # a tiny MNIST member
    set_params(pipeline.root / "params.yaml", {
        "evaluate": {"importance_samples": 20},
        "sweep": {"latent_dims": {**sweep["latent_dims"], "mnist": [3]}, "settings": {**sweep["settings"], "mnist": small}}})
    pipeline.dvc("repro")
    rerun = pipeline.stages_rerun(stamps)
    assert not rerun & {"download", "binarize", "train"}, rerun
    assert {"evaluate", "sweep-mnist@3-aevb-0", "visualize", "sweep-report", "report"} <= rerun, rerun
    assert pipeline.status() == {}

    # The re-evaluation: a child run of the training run, which visualize and the report follow.
    after = pipeline.json("reports/metrics.json")
    trained, evaluated = training_run(pipeline), evaluation_run(pipeline)
    assert after["importance_samples"] == 20 and evaluated not in (None, trained)
    assert evaluated != before
    assert evaluated in (pipeline.root / "reports/report.html").read_text()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pipeline.store}")
    child = client.get_run(evaluated)
    assert child.data.tags["mlflow.parentRunId"] == trained
    assert child.data.params["evaluate.importance_samples"] == "20"
    assert child.data.metrics["test_log_likelihood"] == pytest.approx(after["test_log_likelihood"], abs=1e-3)
    assert client.get_run(trained).data.params["evaluate.importance_samples"] == "50"
    assert {"samples.png", "bound_curve.png"} <= {
        Path(f.path).name for f in client.list_artifacts(child.info.run_id, "figures")}

    # The new member, in Figure 5, read from its DVC-tracked files.
    lock = yaml.safe_load((pipeline.root / "dvc.lock").read_text())["stages"]
    assert {"reports/sweep/members", "models/sweep"} <= {dep["path"] for dep in lock["visualize"]["deps"]}
    [shown] = pipeline.json("reports/figures/figure_members.json")["prior_samples_by_latent_dim"]["shown"]
    member = pipeline.json("reports/sweep/members/mnist-z3-aevb-s0/train_summary.json")
    assert (shown["member"], shown["latent_dim"], shown["seed"]) == ("mnist-z3-aevb-s0", 3, 0)
    assert shown["examples_seen"] == member["examples_seen"] == 6000
    html = (pipeline.root / "reports/report.html").read_text()
    assert "Shown: mnist-z3-aevb-s0 (N_z = 3, seed 0, 6,000 training examples evaluated)." in html
    assert (pipeline.root / "reports/figures/prior_samples_by_latent_dim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
