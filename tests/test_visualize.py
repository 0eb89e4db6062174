"""The figures of the visualize stage, on tiny models and data the tests make.

- AEVB Fig. 4 (the learned 2-D manifold) for MNIST (28x28) and Frey Face (28x20): each tile is
  the decoder mean at the grid point it stands for.
- The runs behind AEVB Figs. 2 and 5, gathered from a temporary MLflow store: the latest run per
  (dataset, binarization, latent_dim), this run in place of its own, unfinished and child runs
  left out, checkpoints loaded from the runs' artifacts.
- The whole stage after real (tiny) train and evaluate stages, with tracking off, for both datasets.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from support import SMALL_AIS, small_model
from vae import datasets, evaluate, tracking, train, visualize
from vae.config import VisualizeConfig, params_from_dict
from vae.data.splits import Split
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


def _log_run(name: str, dataset: str, binarization: str, latent_dim: int, curves: dict[str, list],
             checkpoint: Path | None, finished: bool = True, parent: str | None = None,
             algorithm: str | None = None) -> str:
    tags = {"dataset": dataset, "binarization": binarization, "profile": "quick", "algorithm": algorithm}
    if parent:
        tags["mlflow.parentRunId"] = parent
    with tracking.start_run(f"vae-{dataset}", name, "train", tags) as tracker:
        tracker.log_params({"model.latent_dim": latent_dim})
        tracker.log_history(curves)
        if finished:
            tracker.log_metrics({"train_seconds": 1.5})
        if checkpoint is not None:
            tracker.log_artifact(checkpoint, "checkpoint")
    time.sleep(0.01)  # distinct start times
    return tracker.run_id


def _curve(offset: float) -> list[tuple[int, float]]:
    return [(50000 * p, -200.0 + offset + 10 * np.log(p)) for p in (1, 2, 4, 8)]


def test_runs_for_figures_2_and_5_come_from_the_tracking_store(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    models, checkpoints = {}, {}
    for latent_dim, seed, input_dim in ((2, 1, 784), (5, 2, 784), (4, 3, 784), (2, 4, 560)):
        models[latent_dim, input_dim] = tiny_model(input_dim=input_dim, latent_dim=latent_dim, seed=seed)
        checkpoints[latent_dim, input_dim] = tmp_path / f"z{latent_dim}-{input_dim}" / "model.pt"
        save_checkpoint(models[latent_dim, input_dim], checkpoints[latent_dim, input_dim])
    both = lambda offset: {"train_elbo": _curve(offset), "test_elbo_curve": _curve(offset - 3)}  # noqa: E731
    old_z2 = _log_run("old-z2", "mnist", "dynamic", 2, both(0), checkpoints[2, 784])
    new_z2 = _log_run("new-z2", "mnist", "dynamic", 2, both(5), checkpoints[2, 784])
    z5 = _log_run("z5-valid-only", "mnist", "dynamic", 5, {"train_elbo": _curve(8), "valid_elbo": _curve(6)},
                  checkpoints[5, 784])
    z4 = _log_run("z4-no-checkpoint", "mnist", "dynamic", 4, both(9), None)
    frey = _log_run("frey-z2", "frey", "none", 2, both(300), checkpoints[2, 560])
    _log_run("unfinished-z3", "mnist", "dynamic", 3, both(1), checkpoints[2, 784], finished=False)
    _log_run("child-z7", "mnist", "dynamic", 7, both(1), checkpoints[2, 784], parent=new_z2)
    _log_run("static-z2", "mnist", "static", 2, both(2), checkpoints[2, 784])
    superseded = _log_run("tracked-z10", "mnist", "dynamic", 10, both(4), checkpoints[2, 784])
    # Logged last, so the newest with latent_dim 2: a line of its own, not in place of AEVB's.
    wake_sleep = _log_run("wake-sleep-z2", "mnist", "dynamic", 2, both(-20), checkpoints[2, 784],
                          algorithm="wake-sleep")

    epochs = pd.DataFrame({"examples_seen": [50000, 100000], "train_elbo": [-150.0, -140.0],
                           "valid_elbo": [-152.0, -142.0], "test_elbo": [-151.0, -141.5]})
    summary = {"dataset": "mnist", "binarization": "dynamic", "latent_dim": 10, "profile": "quick",
               "mlflow_run_id": None}
    current = visualize.current_run(summary, epochs)
    runs = visualize.tracked_runs(current)
    assert [r.run_id for r in runs if r.algorithm == "wake-sleep"] == [wake_sleep]
    runs_aevb = [r for r in runs if r.algorithm == "aevb"]
    by_key = {(r.dataset, r.binarization, r.latent_dim): r for r in runs_aevb}
    assert {key: r.run_id for key, r in by_key.items()} == {
        ("mnist", "dynamic", 10): None, ("mnist", "dynamic", 2): new_z2, ("mnist", "dynamic", 5): z5,
        ("mnist", "dynamic", 4): z4, ("frey", "none", 2): frey,
        ("mnist", "static", 2): by_key["mnist", "static", 2].run_id}
    assert old_z2 not in {r.run_id for r in runs} and superseded not in {r.run_id for r in runs}
    assert len(runs) == len(runs_aevb) + 1
    assert by_key["mnist", "dynamic", 10] is current
    assert by_key["mnist", "dynamic", 5].held_out == "valid_elbo"  # labelled validation, not test
    new = by_key["mnist", "dynamic", 2]
    assert new.held_out == "test_elbo"
    assert new.curves["examples_seen"].tolist() == [s for s, _ in _curve(0)]
    assert new.curves["train_elbo"].tolist() == pytest.approx([v for _, v in _curve(5)])
    assert new.curves["test_elbo"].tolist() == pytest.approx([v for _, v in _curve(2)])

    current_model = tiny_model(input_dim=784, latent_dim=10, seed=9)
    with_models = visualize.prior_models(runs, current_model, tmp_path / "downloads")
    assert "z4-no-checkpoint" in capsys.readouterr().err  # left out, with the reason
    loaded = {run.latent_dim: model for run, model in with_models}
    assert sorted(loaded) == [2, 5, 10]  # MNIST dynamic AEVB only: not Frey's, static's or wake-sleep's
    assert wake_sleep not in {run.run_id for run, _ in with_models}
    assert loaded[10] is current_model
    for latent_dim in (2, 5):
        for name, tensor in models[latent_dim, 784].state_dict().items():
            assert torch.equal(loaded[latent_dim].state_dict()[name], tensor), (latent_dim, name)

    visualize.lower_bound_runs(runs, tmp_path / "fig2.png")
    visualize.prior_samples_by_latent_dim([(d, m) for d, m in loaded.items()], VisualizeConfig(samples_grid=4),
                                          (28, 28), tmp_path / "fig5.png")
    for name in ("fig2.png", "fig5.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width > 1000 and image.height > 500, (name, image.size)


def test_runs_with_tracking_off_are_this_run_alone(monkeypatch) -> None:
    monkeypatch.setenv("VAE_TRACKING", "off")
    epochs = pd.DataFrame({"examples_seen": [100], "train_elbo": [-1.0], "valid_elbo": [-2.0]})
    current = visualize.current_run({"dataset": "frey", "binarization": "none", "latent_dim": 2}, epochs)
    assert visualize.tracked_runs(current) == [current]
    assert current.held_out == "valid_elbo"


def test_figures_reject_what_they_cannot_draw(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no runs"):
        visualize.lower_bound_runs([], tmp_path / "x.png")
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

    assert set(figures) == {"samples", "reconstructions", "latent_space", "elbo_curves", "lower_bound_runs",
                            "prior_samples_by_latent_dim", "bound_curve", "log_likelihood_histogram", "manifold"}
    for path in figures.values():
        assert Path(path).read_bytes()[:8] == PNG, path
    height, width = datasets.get(dataset).image_shape
    with Image.open(figures["manifold"]) as manifold:
        assert manifold.size == (visualize.GRID_SCALE * (4 * (width + 2) + 2),
                                 visualize.GRID_SCALE * (4 * (height + 2) + 2))
    curve = pd.read_csv(tmp_path / "reports" / "elbo_curve.csv")
    assert curve["test_elbo"].notna().all() and len(curve) == 2  # the per-pass test ELBO of Fig. 2
    runs = json.loads((tmp_path / "reports" / "figures" / "figure_runs.json").read_text())
    assert [(r["name"], r["latent_dim"], r["held_out"], r["current"]) for r in runs["lower_bound_runs"]] == [
        ("this run", 2, "test", True)]
    assert runs["prior_samples_by_latent_dim"] == runs["lower_bound_runs"]
