"""The figures of the visualize stage, on tiny models and data the tests make.

- AEVB Fig. 4 (the learned 2-D manifold) for MNIST (28x28) and Frey Face (28x20): each tile is
  the decoder mean at the grid point it stands for.
- AEVB Fig. 5 from the latent-size sweep's member files the tests write: the AEVB members of
  the run's dataset, the lowest seed per latent size, drawn from their checkpoints; left out
  (with the reason) without members; the same bytes whatever the MLflow store holds.
- The whole stage after real (tiny) train and evaluate stages, with tracking off, for both datasets.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from support import SMALL_AIS, small_model
from vae import datasets, evaluate, tracking, train, visualize
from vae.config import Member, PathsConfig, VisualizeConfig, params_from_dict, sweep_paths
from vae.data.splits import Split
from vae.errors import DataError
from vae.model import save_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


# Sharper than the default init (weights x 4): tiles differ visibly.
tiny_model = partial(small_model, hidden_dim=8, weight_scale=4.0, eval_mode=True)


@pytest.mark.parametrize(("dataset", "likelihood"), [("mnist", "bernoulli"), ("frey", "gaussian")])
def test_manifold_tiles_are_decoder_means_on_the_inverse_cdf_grid(tmp_path: Path, dataset: str,
                                                                  likelihood: str) -> None:
    height, width = datasets.get(dataset).image_shape
    model = tiny_model(input_dim=height * width, latent_dim=2, likelihood=likelihood)
    steps, scale, pad = 5, visualize.GRID_SCALE, 2
    path = tmp_path / "manifold.png"
    visualize.manifold(model, VisualizeConfig(manifold_grid=steps), (height, width), path)

    image = np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0
    assert image.shape == (scale * (steps * (height + pad) + pad), scale * (steps * (width + pad) + pad))
    quantiles = [(i + 0.5) / steps for i in range(steps)]
    for row in range(steps):
        for column in range(steps):
            # Left to right: z_1 rises through the quantiles; top to bottom: z_2 falls.
            z = torch.special.ndtri(torch.tensor([[quantiles[column], quantiles[steps - 1 - row]]]))
            expected = model.decoder_mean(z).reshape(height, width).detach().numpy()
            top, left = scale * (pad + row * (height + pad)), scale * (pad + column * (width + pad))
            tile = image[top : top + scale * height : scale, left : left + scale * width : scale]
            assert np.abs(tile - expected).max() <= 1 / 255 + 1e-9, (row, column)
    # The grid is not constant: the model maps different z to different images.
    assert image.std() > 0.05


# ----------------------------------------------------------- AEVB Fig. 5 from the sweep's members


def _write_member(reports: Path, models: Path, member: Member, model, binarization: str = "dynamic",
                  examples_seen: int = 4000, record: dict | None = None) -> None:
    """The files a sweep member's stage leaves (those visualize reads): member.json and
    train_summary.json in its reports folder, model.pt in its models folder."""
    paths = sweep_paths(PathsConfig(models=str(models), reports=str(reports)), member)
    folder = Path(paths.reports)
    folder.mkdir(parents=True)
    (folder / "member.json").write_text(json.dumps(record or {
        "member": member.name, "stage": member.stage, "dataset": member.dataset, "latent_dim": member.latent_dim,
        "algorithm": member.algorithm, "seed": member.seed, "host": "h", "pid": 1, "threads": 1,
        "started": "2024-01-01T00:00:00.000+00:00", "finished": "2024-01-01T00:00:10.000+00:00"}))
    (folder / "train_summary.json").write_text(json.dumps({
        "dataset": member.dataset, "binarization": binarization, "latent_dim": member.latent_dim,
        "train_examples": 600, "examples_seen": examples_seen, "mlflow_run_id": "not-read"}))
    save_checkpoint(model, paths.checkpoint)


def _main_run(root: Path, sweep: dict):
    """The inputs of the visualize stage for a tiny MNIST run, written directly (no training): its
    model (latent_dim 3), test images, curves and metrics; returns the parameters reading them."""
    params = params_from_dict({
        "paths": {"raw": str(root / "raw"), "processed": str(root / "processed"), "models": str(root / "models"),
                  "reports": str(root / "reports")},
        "data": {"dataset": "mnist", "binarization": "dynamic"}, "model": {"latent_dim": 3, "hidden_dim": 8},
        "train": {"log_interval": 2}, "visualize": {"samples_grid": 3, "reconstructions": 4, "latent_points": 40},
        "sweep": sweep})
    paths = params.paths
    _split(40, 784, 3, True, "dynamic", labels=True).save(paths.processed_dir("mnist") / "test.pt")
    save_checkpoint(tiny_model(input_dim=784, latent_dim=3, seed=11), paths.checkpoint)
    paths.metrics.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"epoch": [1, 2], "examples_seen": [300, 600], "train_elbo": [-150.0, -140.0],
                  "valid_elbo": [-152.0, -142.0], "test_elbo": [-151.0, -141.5]}).to_csv(paths.elbo_curve, index=False)
    pd.DataFrame({"examples_seen": [100, 200, 300], "train_elbo": [-200.0, -170.0, -150.0]}).to_csv(
        paths.train_steps, index=False)
    pd.DataFrame({"k": [1, 5], "test_log_likelihood": [-140.0, -138.0], "test_stderr": [1.0, 1.0],
                  "train_log_likelihood": [-139.0, -137.0], "train_stderr": [1.0, 1.0]}).to_csv(
        paths.bound_curve, index=False)
    pd.DataFrame({"split": ["test"] * 20 + ["train"] * 10,
                  "log_likelihood": np.linspace(-150, -130, 30)}).to_csv(paths.per_example, index=False)
    paths.metrics.write_text(json.dumps({"test_elbo": -141.5, "importance_samples": 5}))
    return params


# Declares, on MNIST: AEVB N_z 2 (seed 0 written, seed 1 written), AEVB N_z 4 (not written), wake-sleep N_z 2 and 4;
# on Frey Face: N_z 2 (written). Figure 5 must show exactly AEVB N_z 2 seed 0.
SWEEP = {"latent_dims": {"mnist": [4, 2], "frey": [2]}, "algorithms": ["aevb", "wake-sleep"], "seeds": [1, 0]}


def _sweep_members(params) -> dict:
    """Member files for :data:`SWEEP` (all but the N_z 4 ones); returns the models written, by member name."""
    written = {}
    for member, seed in ((Member("mnist", 2, "aevb", 0), 21), (Member("mnist", 2, "aevb", 1), 22),
                         (Member("mnist", 2, "wake-sleep", 0), 23), (Member("frey", 2, "aevb", 0), 24)):
        dim = 560 if member.dataset == "frey" else 784
        written[member.name] = tiny_model(input_dim=dim, latent_dim=member.latent_dim, seed=seed)
        _write_member(Path(params.paths.reports), Path(params.paths.models), member, written[member.name])
    return written


def _log_run(name: str, latent_dim: int, checkpoint: Path) -> str:
    """A finished training run of MNIST in the MLflow store, with curves and a checkpoint, as the train stage logs."""
    tags = {"dataset": "mnist", "binarization": "dynamic", "profile": "quick", "algorithm": "aevb"}
    curve = [(50000 * p, -200.0 + 10 * np.log(p)) for p in (1, 2, 4)]
    with tracking.start_run("vae-mnist", name, "train", tags) as tracker:
        tracker.log_params({"model.latent_dim": latent_dim})
        tracker.log_history({"train_elbo": curve, "test_elbo_curve": curve})
        tracker.log_metrics({"train_seconds": 1.5})
        tracker.log_artifact(checkpoint, "checkpoint")
    return tracker.run_id


def test_figure_5_is_drawn_from_the_sweep_members_files_whatever_the_store_holds(tmp_path: Path, monkeypatch) -> None:
    """Figure 5 shows the AEVB members of the run's dataset (lowest seed per latent size) from
    their files; with tracking off, and again with a store holding other finished runs of the
    dataset (every read of a run's curves or artifacts refused), the stage draws the same bytes."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("VAE_TRACKING", "off")
    params = _main_run(tmp_path / "off", SWEEP)
    written = _sweep_members(params)
    figures = visualize.run(params, progress=False)

    listed = json.loads((params.paths.figures / "figure_members.json").read_text())["prior_samples_by_latent_dim"]
    assert (listed["dataset"], listed["algorithm"]) == ("mnist", "aevb")
    assert listed["declared"] == ["sweep-mnist@2-aevb-0", "sweep-mnist@4-aevb-0"]  # by N_z, the lowest seed
    assert listed["not_run"] == ["sweep-mnist@4-aevb-0"]
    assert [(m["member"], m["latent_dim"], m["seed"], m["examples_seen"], m["train_examples"], m["binarization"])
            for m in listed["shown"]] == [("mnist-z2-aevb-s0", 2, 0, 4000, 600, "dynamic")]
    assert listed["shown"][0]["checkpoint"] == str(tmp_path / "off/models/sweep/mnist-z2-aevb-s0/model.pt")
    # The figure is that member's model's samples: what the function draws from it, byte for byte.
    config = params.visualize
    expected, other = tmp_path / "expected.png", tmp_path / "other.png"
    visualize.prior_samples_by_latent_dim([(2, written["mnist-z2-aevb-s0"])], config, (28, 28), expected)
    visualize.prior_samples_by_latent_dim([(2, written["mnist-z2-aevb-s1"])], config, (28, 28), other)
    drawn = Path(figures["prior_samples_by_latent_dim"]).read_bytes()
    assert drawn == expected.read_bytes() and drawn != other.read_bytes()
    assert "lower_bound_runs" not in figures and not (params.paths.figures / "lower_bound_runs.png").exists()
    names = ("prior_samples_by_latent_dim", "samples", "elbo_curves", "bound_curve")
    before = {name: Path(figures[name]).read_bytes() for name in names}

    monkeypatch.delenv("VAE_TRACKING")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for latent_dim, model in ((2, written["mnist-z2-aevb-s1"]), (5, tiny_model(input_dim=784, latent_dim=5))):
        save_checkpoint(model, tmp_path / f"elsewhere-z{latent_dim}.pt")
        _log_run(f"elsewhere-z{latent_dim}", latent_dim, tmp_path / f"elsewhere-z{latent_dim}.pt")
    on = _main_run(tmp_path / "on", SWEEP)
    _sweep_members(on)

    def refused(*args, **kwargs):
        raise AssertionError("the visualize stage read another run's curves or artifacts")

    for method in ("get_metric_history", "download_artifacts", "list_artifacts"):
        monkeypatch.setattr(MlflowClient, method, refused)
    figures = visualize.run(on, progress=False)
    assert {name: Path(figures[name]).read_bytes() for name in names} == before
    on_listed = json.loads((on.paths.figures / "figure_members.json").read_text())["prior_samples_by_latent_dim"]
    assert on_listed["shown"] == [{**listed["shown"][0],
                                   "checkpoint": str(tmp_path / "on/models/sweep/mnist-z2-aevb-s0/model.pt")}]


def test_figure_5_is_left_out_without_members_on_the_dataset(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("VAE_TRACKING", "off")
    params = _main_run(tmp_path, {"latent_dims": {"mnist": [], "frey": [2]}, "algorithms": ["aevb"], "seeds": [0]})
    _write_member(tmp_path / "reports", tmp_path / "models", Member("frey", 2, "aevb", 0),
                  tiny_model(input_dim=560, latent_dim=2))
    figure5 = params.paths.figures / "prior_samples_by_latent_dim.png"
    figure5.parent.mkdir(parents=True)
    figure5.write_bytes(PNG)  # a stale one from an earlier run
    figures = visualize.run(params, progress=False)
    assert "prior_samples_by_latent_dim" not in figures and not figure5.exists()
    listed = json.loads((params.paths.figures / "figure_members.json").read_text())["prior_samples_by_latent_dim"]
    assert listed == {"dataset": "mnist", "algorithm": "aevb", "declared": [], "not_run": [], "shown": []}
    assert "Figure 5 left out: the sweep declares no AEVB member on mnist" in capsys.readouterr().out

    # Declared but not run (their stages removed from dvc.yaml, or `vae visualize` before the sweep);
    # a wake-sleep member is not Figure 5's.
    sweep = params.sweep.replace(latent_dims={"mnist": [3], "frey": [2]}, algorithms=["wake-sleep", "aevb"])
    _write_member(tmp_path / "reports", tmp_path / "models", Member("mnist", 3, "wake-sleep", 0),
                  tiny_model(input_dim=784, latent_dim=3))
    listed = visualize.prior_sample_members(params.replace(sweep=sweep))
    assert (listed["declared"], listed["not_run"], listed["shown"]) == (
        ["sweep-mnist@3-aevb-0"], ["sweep-mnist@3-aevb-0"], [])


def test_damaged_member_files_are_named(tmp_path: Path) -> None:
    params = _main_run(tmp_path, {"latent_dims": {"mnist": [2], "frey": []}, "algorithms": ["aevb"], "seeds": [0]})
    member = Member("mnist", 2, "aevb", 0)
    _write_member(tmp_path / "reports", tmp_path / "models", member, tiny_model(input_dim=784, latent_dim=2),
                  record={"member": "mnist-z3-aevb-s0", "latent_dim": 3, "algorithm": "aevb", "seed": 0})
    folder = tmp_path / "reports/sweep/members/mnist-z2-aevb-s0"
    with pytest.raises(DataError, match=r"member\.json: member 'mnist-z3-aevb-s0' .*expected 'mnist-z2-aevb-s0'"):
        visualize.prior_sample_members(params)
    (folder / "member.json").write_text("{")
    with pytest.raises(DataError, match=r"member\.json: not valid JSON.*dvc repro -f sweep-mnist@2-aevb-0"):
        visualize.prior_sample_members(params)
    shutil.rmtree(folder)
    _write_member(tmp_path / "reports", tmp_path / "models", member, tiny_model(input_dim=784, latent_dim=5))
    (folder / "train_summary.json").write_text("{}")
    with pytest.raises(DataError, match=r"train_summary\.json: missing binarization, examples_seen, train_examples"):
        visualize.prior_sample_members(params)
    shutil.rmtree(folder)
    _write_member(tmp_path / "reports", tmp_path / "models", member, tiny_model(input_dim=784, latent_dim=5))
    with pytest.raises(DataError, match="a latent_dim 5 model, not 2 as member mnist-z2-aevb-s0"):
        visualize._member_models(visualize.prior_sample_members(params)["shown"])


def test_figures_reject_what_they_cannot_draw(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no models"):
        visualize.prior_samples_by_latent_dim([], VisualizeConfig(), (28, 28), tmp_path / "x.png")
    with pytest.raises(ValueError, match="784 pixels, not 28x20"):
        visualize.prior_samples_by_latent_dim([(2, tiny_model(input_dim=784, latent_dim=2))], VisualizeConfig(), (28, 20),
                                              tmp_path / "x.png")


def _split(count: int, dim: int, seed: int, binary: bool, binarization: str, labels: bool) -> Split:
    generator = torch.Generator().manual_seed(seed)
    images = (torch.rand(count, dim, generator=generator) * 255).round().to(torch.uint8)
    if binary:
        images = (images > 180).to(torch.uint8)
    label = torch.randint(0, 10, (count,), generator=generator) if labels else torch.full((count,), -1)
    return Split(images, label, binary=binary, binarization=binarization)


@pytest.mark.parametrize("dataset", ["mnist", "frey"])
def test_stage_draws_every_figure_after_tiny_train_and_evaluate(tmp_path: Path, monkeypatch, dataset: str) -> None:
    monkeypatch.setenv("VAE_TRACKING", "off")
    frey = dataset == "frey"
    dim = 560 if frey else 784
    processed = tmp_path / "processed"
    for name, count, seed in (("train", 300, 1), ("valid", 50, 2), ("test", 60, 3)):
        binary = not frey and name != "train"
        _split(count, dim, seed, binary, "none" if frey else "dynamic", labels=not frey).save(
            processed / dataset / f"{name}.pt")
    params = params_from_dict({
        "paths": {"raw": str(tmp_path / "raw"), "processed": str(processed), "models": str(tmp_path / "models"),
                  "reports": str(tmp_path / "reports")},
        "data": {"dataset": dataset, "binarization": "none" if frey else "dynamic"},
        "model": {"latent_dim": 2, "hidden_dim": 16},
        "train": {"epochs": 2, "batch_size": 50, "elbo_eval_size": 100, "device": "cpu", "log_interval": 2},
        "evaluate": {"importance_samples": 5, "bound_curve": [1, 5], "train_examples": 40, "device": "cpu",
                     **SMALL_AIS},
        "visualize": {"samples_grid": 3, "reconstructions": 4, "manifold_grid": 4, "latent_points": 60}})
    train.run(params, progress=False)
    evaluate.run(params, progress=False)
    figures = visualize.run(params, progress=False)

    # The default sweep declares members on both datasets; none has run here, so no Figure 5.
    assert set(figures) == {"samples", "reconstructions", "latent_space", "elbo_curves", "bound_curve",
                            "log_likelihood_histogram", "manifold"}
    for path in figures.values():
        assert Path(path).read_bytes()[:8] == PNG, path
    height, width = datasets.get(dataset).image_shape
    with Image.open(figures["manifold"]) as manifold:
        assert manifold.size == (visualize.GRID_SCALE * (4 * (width + 2) + 2),
                                 visualize.GRID_SCALE * (4 * (height + 2) + 2))
    curve = pd.read_csv(tmp_path / "reports" / "elbo_curve.csv")
    assert curve["test_elbo"].notna().all() and len(curve) == 2  # the per-pass test ELBO of Fig. 2
    listed = json.loads((tmp_path / "reports" / "figures" / "figure_members.json").read_text())
    assert listed["prior_samples_by_latent_dim"]["shown"] == []
    assert listed["prior_samples_by_latent_dim"]["not_run"] == [
        f"sweep-{dataset}@{n}-aevb-0" for n in params.sweep.latent_dims[dataset]]
