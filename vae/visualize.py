"""The ``visualize`` stage: the figures of the report, as PNG files in ``reports/figures``.

- ``samples.png``: decoder means of z ~ p(z) (AEVB Fig. 5 style).
- ``reconstructions.png``: test images (odd rows) above the decoder means at z = E_q[z|x] (even rows).
- ``latent_space.png``: E_q[z|x] of test images coloured by digit; the coordinates themselves when
  latent_dim = 2, else a scikit-learn PCA or t-SNE projection.
- ``manifold.png`` (latent_dim = 2 only): AEVB Fig. 4, a regular grid on the unit square mapped
  through the inverse Gaussian CDF to z, with the decoder mean drawn at each point.
- ``elbo_curves.png``: train and validation ELBO against training examples seen (log axis, as
  AEVB Fig. 2), with the per-minibatch estimates behind them.
- ``bound_curve.png``: L_k against k, test and train (IWAE's bound tightness).
- ``log_likelihood_histogram.png``: per-example L_k, test and train.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from vae import tracking  # noqa: E402
from vae.config import Params, VisualizeConfig  # noqa: E402
from vae.data.splits import load_split  # noqa: E402
from vae.io import atomic_path, read_json  # noqa: E402
from vae.model import VAE, load_model  # noqa: E402

DPI = 200
GRID_SCALE = 4  # image grids are upscaled (nearest neighbour) so each pixel stays sharp in print
IMAGE_SHAPE = {"mnist": (28, 28), "frey": (28, 20)}


def _save_grid(images: torch.Tensor, shape: tuple[int, int], nrow: int, path: Path) -> None:
    """Save (N, D) images in [0, 1] as one PNG grid (torchvision), upscaled, atomically."""
    grid = make_grid(images.reshape(-1, 1, *shape).cpu(), nrow=nrow, padding=2, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=GRID_SCALE, mode="nearest")[0]
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")


def _save_figure(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)


@torch.no_grad()
def prior_samples(model: VAE, config: VisualizeConfig, shape: tuple[int, int], path: Path) -> None:
    generator = torch.Generator().manual_seed(config.seed)
    _save_grid(model.sample(config.samples_grid**2, generator), shape, config.samples_grid, path)


@torch.no_grad()
def reconstructions(model: VAE, x: torch.Tensor, config: VisualizeConfig, shape: tuple[int, int],
                    path: Path) -> None:
    count = min(config.reconstructions, len(x))
    originals = x[:count]
    means = model.decoder_mean(model.encode(originals)[0])
    _save_grid(torch.cat([originals, means]), shape, count, path)


@torch.no_grad()
def latent_space(model: VAE, x: torch.Tensor, labels: torch.Tensor, config: VisualizeConfig,
                 path: Path) -> str:
    """Scatter E_q[z|x] coloured by label (one colour when unlabelled, label -1); returns how the
    2-D coordinates were obtained."""
    count = min(config.latent_points, len(x))
    mu = model.encode(x[:count])[0].numpy()
    if mu.shape[1] == 2:
        coords, how = mu, "z itself (latent_dim = 2)"
    elif mu.shape[1] == 1:
        coords, how = torch.cat([torch.from_numpy(mu), torch.zeros(count, 1)], 1).numpy(), "z (latent_dim = 1)"
    elif config.projection == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=config.seed).fit(mu)
        coords = pca.transform(mu)
        how = f"PCA of E_q[z|x] ({pca.explained_variance_ratio_.sum():.0%} of variance)"
    else:
        from sklearn.manifold import TSNE

        coords = TSNE(n_components=2, random_state=config.seed, init="pca").fit_transform(mu)
        how = "t-SNE of E_q[z|x]"
    figure, axes = plt.subplots(figsize=(6, 5.2))
    labels = labels[:count]
    if bool((labels >= 0).all()):
        points = axes.scatter(coords[:, 0], coords[:, 1], c=labels.numpy(), cmap="tab10",
                              s=3, alpha=0.7, vmin=-0.5, vmax=9.5, rasterized=True)
        figure.colorbar(points, ax=axes, ticks=range(10), label="digit")
    else:  # no labels (Frey Face, static MNIST's files)
        axes.scatter(coords[:, 0], coords[:, 1], color="C0", s=4, alpha=0.7, rasterized=True)
    axes.set_title(f"Latent space of {count} test images: {how}", fontsize=9)
    axes.set_xlabel("dimension 1")
    axes.set_ylabel("dimension 2")
    _save_figure(figure, path)
    return how


@torch.no_grad()
def manifold(model: VAE, config: VisualizeConfig, shape: tuple[int, int], path: Path) -> None:
    """AEVB Fig. 4: grid points (i + 0.5) / n of the unit square through the inverse Gaussian CDF."""
    steps = config.manifold_grid
    quantiles = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    values = torch.special.ndtri(quantiles)
    # Rows run from high z_2 (top) to low; columns from low z_1 (left) to high.
    z = torch.stack(torch.meshgrid(values, values.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)
    _save_grid(model.decoder_mean(z), shape, steps, path)


def elbo_curves(epochs: pd.DataFrame, steps: pd.DataFrame, path: Path, log_interval: int = 1) -> None:
    """Train and validation ELBO per evaluated pass, and the minibatch bound (each row of ``steps``
    already a mean over ``log_interval`` minibatches; no further smoothing, which would lag on a log axis)."""
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    if len(steps):
        axes.plot(steps["examples_seen"], steps["train_elbo"], color="0.7", lw=0.8,
                  label=f"train, minibatch (mean of {log_interval})")
    axes.plot(epochs["examples_seen"], epochs["train_elbo"], "o-", color="C0", ms=3, label="train")
    axes.plot(epochs["examples_seen"], epochs["valid_elbo"], "s--", color="C1", ms=3, label="validation")
    axes.set_xscale("log")
    # Start at the decade of the first epoch: earlier minibatch points are far below the y-range.
    first = float(epochs["examples_seen"].iloc[0])
    axes.set_xlim(left=10 ** math.floor(math.log10(first)), right=float(epochs["examples_seen"].iloc[-1]) * 1.5)
    axes.set_xlabel("training examples evaluated")
    axes.set_ylabel("ELBO (nats per example)")
    low = min(epochs["train_elbo"].min(), epochs["valid_elbo"].min())
    high = max(epochs["train_elbo"].max(), epochs["valid_elbo"].max())
    margin = max(5.0, 0.1 * (high - low))
    axes.set_ylim(low - margin, high + margin)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title("Lower bound during training (cf. AEVB Fig. 2)", fontsize=10)
    _save_figure(figure, path)


def log_likelihood_histogram(per_example: pd.DataFrame, k: int, path: Path) -> None:
    """Histogram of per-example L_k, test and train, with their means marked."""
    figure, axes = plt.subplots(figsize=(6.5, 4.0))
    for split, colour in (("test", "C0"), ("train", "C1")):
        values = per_example.loc[per_example["split"] == split, "log_likelihood"]
        if len(values):
            axes.hist(values, bins=80, density=True, alpha=0.5, color=colour,
                      label=f"{split} ({len(values)} images, mean {values.mean():.2f})")
            axes.axvline(values.mean(), color=colour, lw=1)
    axes.set_xlabel(f"L_{k} per example (nats)")
    axes.set_ylabel("density")
    axes.legend(loc="upper left")
    axes.set_title("Importance-sampled log-likelihood per image", fontsize=10)
    _save_figure(figure, path)


def bound_curve(curve: pd.DataFrame, test_elbo: float, path: Path) -> None:
    """L_k against k (log axis) with standard-error bars, test and train; the test ELBO for reference."""
    figure, axes = plt.subplots(figsize=(6.5, 4.0))
    for split, colour, marker in (("test", "C0", "o"), ("train", "C1", "s")):
        axes.errorbar(curve["k"], curve[f"{split}_log_likelihood"], yerr=curve[f"{split}_stderr"],
                      color=colour, marker=marker, ms=4, capsize=3, label=f"{split} L_k")
    axes.axhline(test_elbo, color="0.5", ls=":", label="test ELBO")
    axes.set_xscale("log")
    axes.set_xlabel("importance samples k")
    axes.set_ylabel("L_k (nats per example)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title("Bound tightness: L_k rises towards log p(x) as k grows", fontsize=10)
    _save_figure(figure, path)


def run(params: Params, progress: bool = True) -> dict[str, str]:
    """Stage entry point: draw every figure that applies to the trained model; log them to MLflow.

    Returns:
        ``{figure name: file path}``.
    """
    paths, config, dataset = params.paths, params.visualize, params.data.dataset
    shape = IMAGE_SHAPE[dataset]
    model = load_model(paths.checkpoint)
    test = load_split(paths.processed_dir(dataset) / "test.pt")
    x = test.values()
    out = paths.figures
    out.mkdir(parents=True, exist_ok=True)
    figures = {"samples": out / "samples.png", "reconstructions": out / "reconstructions.png",
               "latent_space": out / "latent_space.png", "elbo_curves": out / "elbo_curves.png"}
    prior_samples(model, config, shape, figures["samples"])
    reconstructions(model, x, config, shape, figures["reconstructions"])
    latent_space(model, x, test.labels, config, figures["latent_space"])
    elbo_curves(pd.read_csv(paths.elbo_curve), pd.read_csv(paths.train_steps), figures["elbo_curves"],
                params.train.log_interval)
    metrics = read_json(paths.metrics)
    figures["bound_curve"] = out / "bound_curve.png"
    bound_curve(pd.read_csv(paths.bound_curve), metrics["test_elbo"], figures["bound_curve"])
    figures["log_likelihood_histogram"] = out / "log_likelihood_histogram.png"
    log_likelihood_histogram(pd.read_csv(paths.per_example), metrics["importance_samples"],
                             figures["log_likelihood_histogram"])
    if model.latent_dim == 2:
        figures["manifold"] = out / "manifold.png"
        manifold(model, config, shape, figures["manifold"])
    else:
        (out / "manifold.png").unlink(missing_ok=True)  # a stale one from a 2-D run would mislead
    # The run this execution's evaluation logged to (the training run, or its child).
    with tracking.resume_run(metrics.get("mlflow_run_id"), "visualize") as tracker:
        for path in figures.values():
            tracker.log_artifact(path, "figures")
    print(f"figures: {', '.join(str(p) for p in figures.values())}", flush=True)
    return {name: str(path) for name, path in figures.items()}
