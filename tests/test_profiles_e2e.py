"""A paper configuration end to end, the way the README runs one: ``vae profile aevb-frey`` then
``dvc exp run -S ...`` (shortened), in a temporary git copy, on the real Frey Face file of the
mirror. Exercises the Frey download and split, the Gaussian decoder, Adagrad's step-size
selection, the parameter prior, log-spaced evaluation, and a report without MNIST references."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from support import Pipeline, dataset_mirror

pytestmark = pytest.mark.e2e

SHORT = ["train.training_samples=15000", "train.step_size_selection_samples=1500", "train.curve_points=10",
         "train.device=cpu", "evaluate.importance_samples=50", "evaluate.train_examples=200",
         "evaluate.device=cpu", "evaluate.ais_test_examples=4", "evaluate.ais_train_examples=2",
         "evaluate.ais_temperatures=20", "evaluate.bdmc_examples=4", "evaluate.appendix_d_samples=10",
         "visualize.manifold_grid=6"]


@pytest.fixture(scope="module")
def frey(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    if not dataset_mirror():
        pytest.skip("no dataset mirror (set VAE_DATA_MIRROR or place ../shared/datasets beside the repo)")
    pipe = Pipeline.copy_of_repository(tmp_path_factory, sweep=False)
    root = pipe.root
    switched = subprocess.run([sys.executable, "-m", "vae", "profile", "aevb-frey"], cwd=root, env=pipe.env,
                              capture_output=True, text=True, timeout=120)
    assert switched.returncode == 0, switched.stderr
    pipe.profile_output = switched.stdout
    args = [item for value in SHORT for item in ("-S", value)]
    pipe.first_output = pipe.dvc("exp", "run", *args)
    return pipe


def test_profile_switch_reports_what_changed(frey: Pipeline) -> None:
    assert "profile aevb-frey" in frey.profile_output
    assert "data.dataset: 'mnist' -> 'frey'" in frey.profile_output
    params = yaml.safe_load((frey.root / "params.yaml").read_text())
    assert params["profile"] == "aevb-frey" and params["data"]["binarization"] == "none"
    assert params["train"]["training_samples"] == 15000  # the -S override, on top of the profile


def test_frey_data_split_and_metrics(frey: Pipeline) -> None:
    root = frey.root
    assert (root / "data/raw/frey/frey_rawface.mat").stat().st_size > 0
    sizes = {name: torch.load(root / f"data/processed/frey/{name}.pt", weights_only=True)["images"].shape
             for name in ("train", "valid", "test")}
    assert sizes == {"train": (1565, 560), "valid": (200, 560), "test": (200, 560)}
    metrics = frey.json("reports/metrics.json")
    assert (metrics["dataset"], metrics["binarization"], metrics["likelihood"]) == ("frey", "none", "gaussian")
    # The profile is a label (vae/config.py): the report shows it, no result records it.
    assert "profile" not in metrics and metrics["input_dim"] == 560 and metrics["latent_dim"] == 2
    assert metrics["examples_seen"] == 15000
    # A density of grey values: finite, and L_50 above the ELBO on average over 200 faces.
    assert metrics["test_log_likelihood"] > metrics["test_elbo"]
    # AIS, BDMC and App. D (latent_dim 2) ran through the Gaussian decoder's closed-form gradient.
    assert metrics["test_ais_examples"] == 4 and metrics["bdmc_examples"] == 4
    for key in ("test_ais_log_likelihood", "test_appendix_d_log_likelihood", "bdmc_lower", "bdmc_upper"):
        assert abs(metrics[key]) < 1e4, (key, metrics[key])


def test_step_size_selection_and_prior_recorded(frey: Pipeline) -> None:
    summary = frey.json("reports/train_summary.json")
    assert set(summary["step_size_trials"]) == {"0.01", "0.02", "0.1"}
    best = max(summary["step_size_trials"], key=summary["step_size_trials"].get)
    assert summary["learning_rate"] == float(best)
    assert summary["optimizer"] == "adagrad" and summary["map_prior"] is True
    assert summary["hidden_dim"] == 200 and summary["likelihood"] == "gaussian"
    curve = (frey.root / "reports/elbo_curve.csv").read_text().splitlines()
    assert 2 <= len(curve) - 1 <= 11  # at most curve_points (+ the last) evaluated passes


def test_frey_figures_and_report(frey: Pipeline) -> None:
    from PIL import Image

    figures = frey.root / "reports/figures"
    width, height = Image.open(figures / "manifold.png").size
    # 6 x 6 faces of 20 x 28 pixels (+ 2-pixel padding), upscaled 4x: wider than tall would mean rotated faces.
    assert (width, height) == (4 * (6 * 22 + 2), 4 * (6 * 30 + 2))
    report = (frey.root / "reports/report.md").read_text()
    assert "| profile | aevb-frey |" in report
    assert "Gaussian p(x\\|z)" in report
    assert "Burda" not in report  # no MNIST reference numbers beside a Frey Face run
    assert "not comparable with MNIST" in report


def test_pipeline_up_to_date_afterwards(frey: Pipeline) -> None:
    assert frey.status() == {}  # `dvc status --json`: every stage up to date
