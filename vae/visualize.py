"""The ``visualize`` stage: the figures of the report, as PNG files in ``reports/figures``.

Every figure is drawn from DVC-tracked files (the stage's ``deps:`` in ``dvc.yaml``), none from
the MLflow tracking store: the stage only logs the figures to this execution's run there.

From the latent-size sweep's members (:mod:`vae.sweep`; DVC outputs of the ``sweep-<dataset>@...``
stages), for this run's dataset:

- ``prior_samples_by_latent_dim.png`` (AEVB Fig. 5): decoder means of z ~ p(z), one grid per
  latent size, side by side, each from an AEVB member's ``<paths.models>/sweep/<member>/model.pt``
  (the lowest seed of each latent size); left out when the sweep has no such member.
- ``figure_members.json``: which members that figure shows (:func:`prior_sample_members`).

AEVB Fig. 2 (the lower bound against training examples evaluated, per latent size) is the
``sweep-report`` stage's ``lower_bound_sweep.png`` (:func:`lower_bound_sweep`), which the report
shows; this stage does not draw it again.

Figures of this run alone:

- ``samples.png``: decoder means of z ~ p(z), a larger grid of this model alone.
- ``reconstructions.png``: test images (odd rows) above the decoder means at z = E_q[z|x] (even rows).
- ``latent_space.png``: E_q[z|x] of test images coloured by digit; the coordinates themselves when
  latent_dim = 2, else a scikit-learn PCA or t-SNE projection.
- ``manifold.png`` (latent_dim = 2, one stochastic layer, only): AEVB Fig. 4, a regular grid on the unit square mapped
  through the inverse Gaussian CDF to z, with the decoder mean drawn at each point.
- ``elbo_curves.png``: train, validation and test ELBO of this run against training examples seen
  (log axis), with the per-minibatch estimates behind them.
- ``bound_curve.png``: L_k against k, test and train (IWAE's bound tightness).
- ``log_likelihood_histogram.png``: per-example L_k, test and train.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from vae import datasets, tracking  # noqa: E402
from vae.config import Params, VisualizeConfig, members, sweep_paths  # noqa: E402
from vae.data.splits import load_split  # noqa: E402
from vae.errors import DataError  # noqa: E402
from vae.io import atomic_path, read_json, write_json  # noqa: E402
from vae.model import VAE, load_model  # noqa: E402

DPI = 300  # print quality
GRID_SCALE = 4  # image grids are upscaled (nearest neighbour) so each pixel stays sharp in print


def _save_grid(images: torch.Tensor, shape: tuple[int, int], nrow: int, path: Path) -> None:
    """Save (N, D) images in [0, 1] as one PNG grid (torchvision ``make_grid``), each pixel upscaled
    to GRID_SCALE x GRID_SCALE, stamped with DPI (a 10-image row of MNIST prints 4 inches wide), atomically."""
    # torchvision on use: importing it costs seconds (it loads torch._dynamo), which sweep-report does not need.
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    grid = make_grid(images.reshape(-1, 1, *shape).cpu(), nrow=nrow, padding=2, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=GRID_SCALE, mode="nearest")[0]
    with atomic_path(path) as tmp:
        # torchvision's save_image minus the DPI it cannot pass on (the report sizes images by it).
        to_pil_image(grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)).save(tmp, format="png", dpi=(DPI, DPI))


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
    axis_names = ("z_1", "z_2")
    if mu.shape[1] == 2:
        coords, how = mu, "z itself (latent_dim = 2)"
    elif mu.shape[1] == 1:
        coords, how = torch.cat([torch.from_numpy(mu), torch.zeros(count, 1)], 1).numpy(), "z (latent_dim = 1)"
        axis_names = ("z_1", "(none)")
    elif config.projection == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=config.seed).fit(mu)
        coords = pca.transform(mu)
        how = f"PCA of E_q[z|x] ({pca.explained_variance_ratio_.sum():.0%} of variance)"
        axis_names = tuple(f"principal component {i + 1} ({share:.0%})"
                           for i, share in enumerate(pca.explained_variance_ratio_))
    else:
        from sklearn.manifold import TSNE

        coords = TSNE(n_components=2, random_state=config.seed, init="pca").fit_transform(mu)
        how = "t-SNE of E_q[z|x]"
        axis_names = ("t-SNE 1", "t-SNE 2")
    figure, axes = plt.subplots(figsize=(6, 5.2))
    labels = labels[:count]
    if bool((labels >= 0).all()):
        points = axes.scatter(coords[:, 0], coords[:, 1], c=labels.numpy(), cmap="tab10",
                              s=3, alpha=0.7, vmin=-0.5, vmax=9.5, rasterized=True)
        figure.colorbar(points, ax=axes, ticks=range(10), label="digit")
    else:  # no labels (Frey Face, static MNIST's files)
        axes.scatter(coords[:, 0], coords[:, 1], color="C0", s=4, alpha=0.7, rasterized=True)
    axes.set_title(f"Latent space of {count} test images: {how}", fontsize=9)
    axes.set_xlabel(axis_names[0])
    axes.set_ylabel(axis_names[1])
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
    """This run's ELBO per evaluated pass (train, validation and, when recorded, test) and the
    minibatch bound (each row of ``steps`` already a mean over ``log_interval`` minibatches; no
    further smoothing, which would lag on a log axis). ELBOs in nats per example.

    Args:
        epochs: ``elbo_curve.csv``: examples_seen, train_elbo, valid_elbo[, test_elbo].
        steps: ``train_steps.csv``: examples_seen, train_elbo.
    """
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    if len(steps):
        axes.plot(steps["examples_seen"], steps["train_elbo"], color="0.7", lw=0.8,
                  label=f"train, minibatch (mean of {log_interval})")
    lines = [("train_elbo", "o-", "C0", "train"), ("valid_elbo", "s--", "C1", "validation"),
             ("test_elbo", "^:", "C2", "test")]
    shown = [column for column, *_ in lines if column in epochs and epochs[column].notna().any()]
    for column, style, colour, label in lines:
        if column in shown:
            axes.plot(epochs["examples_seen"], epochs[column], style, color=colour, ms=3, label=label)
    axes.set_xscale("log")
    # Start at the decade of the first epoch: earlier minibatch points are far below the y-range.
    first = float(epochs["examples_seen"].iloc[0])
    axes.set_xlim(left=10 ** math.floor(math.log10(first)), right=float(epochs["examples_seen"].iloc[-1]) * 1.5)
    axes.set_xlabel("training examples evaluated")
    axes.set_ylabel("ELBO (nats per example)")
    low = min(float(epochs[column].min()) for column in shown)
    high = max(float(epochs[column].max()) for column in shown)
    margin = max(5.0, 0.1 * (high - low))
    axes.set_ylim(low - margin, high + margin)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title("This run: lower bound per evaluated pass and per minibatch", fontsize=10)
    _save_figure(figure, path)


# ------------------------------------------------------------------------------------------
# Figures over latent sizes, from the latent-size sweep's members: AEVB Fig. 2 (the sweep-report
# stage's) and Fig. 5 (this stage's)
# ------------------------------------------------------------------------------------------


def _text(value: object) -> str:
    """A value as literal text in a matplotlib label (``$`` would start mathtext)."""
    return str(value).replace("$", r"\$")


@dataclass
class SweepCurves:
    """One line pair of :func:`lower_bound_sweep`: the ELBO per evaluated pass (nats per example)
    of one (dataset, latent size, algorithm) of the sweep, averaged over its seeds.

    ``curves`` has columns examples_seen (int, training examples evaluated), train_elbo and
    test_elbo (float).
    """

    name: str  # e.g. mnist-z3-aevb
    dataset: str
    binarization: str
    latent_dim: int
    curves: pd.DataFrame
    algorithm: str = "aevb"  # train.algorithm: aevb | wake-sleep


def _check_runs(runs: list[SweepCurves], figure: str) -> None:
    if not runs:
        raise ValueError(f"{figure}: no runs to draw")
    for run in runs:
        if run.curves.empty:
            raise ValueError(f"{figure}: {run.name} has no evaluated pass")


def _bound_axes(axes: plt.Axes, values: list[pd.Series], margin: float, ylabel: str, dataset: str,
                binarization: str) -> None:
    """A Figure 2 panel's y-range (the drawn values, ``margin`` of their span, at least 2 nats, either
    side), grid, axis labels and title."""
    joined = pd.concat(values).dropna()
    low, high = float(joined.min()), float(joined.max())
    pad = max(2.0, margin * (high - low))
    axes.set_ylim(low - pad, high + pad)
    axes.grid(True, which="both", alpha=0.3)
    axes.set_xlabel("training examples evaluated")
    axes.set_ylabel(ylabel)
    axes.set_title(_text(datasets.panel_title(dataset, binarization)), fontsize=10)


ALGORITHM_STYLES = {"aevb": ("-", "AEVB"), "wake-sleep": ("--", "wake-sleep")}


def lower_bound_sweep(runs: list[SweepCurves], path: Path, seeds: int = 1) -> None:
    """The Figure 2 replica of the latent-size sweep (:mod:`vae.sweep`): the lower bound (ELBO, nats
    per example) against training examples evaluated, log x-axis, one panel per dataset; one colour
    per latent size N_z, AEVB solid and wake-sleep dashed, the train bound drawn bold and the test
    bound thin and pale in the same colour and style (cf. Kingma & Welling 2014, Figure 2).

    Args:
        runs: one per (dataset, latent size, algorithm); ``curves`` with columns examples_seen,
            train_elbo and test_elbo (the mean over ``seeds`` seeds).

    Raises:
        ValueError: ``runs`` is empty or a run has no evaluated pass.
    """
    _check_runs(runs, "lower_bound_sweep")
    panels: dict[str, list[SweepCurves]] = {}
    for run in sorted(runs, key=lambda r: (datasets.NAMES.index(r.dataset) if r.dataset in datasets.NAMES
                                           else len(datasets.NAMES), r.dataset)):
        panels.setdefault(run.dataset, []).append(run)
    figure, grid = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.8), squeeze=False,
                                layout="constrained")
    for axes, (dataset, members) in zip(grid.flat, panels.items()):
        sizes = sorted({r.latent_dim for r in members})
        colours = {size: plt.get_cmap("tab10")(i % 10) for i, size in enumerate(sizes)}
        values = []
        for run in sorted(members, key=lambda r: (r.latent_dim, r.algorithm)):
            style, _ = ALGORITHM_STYLES.get(run.algorithm, (":", run.algorithm))
            frame = run.curves.sort_values("examples_seen")
            colour = colours[run.latent_dim]
            axes.plot(frame["examples_seen"], frame["train_elbo"], style, color=colour, lw=2.0)
            axes.plot(frame["examples_seen"], frame["test_elbo"], style, color=colour, lw=1.0, alpha=0.5)
            values += [frame["train_elbo"], frame["test_elbo"]]
        axes.set_xscale("log")
        _bound_axes(axes, values, 0.05, "lower bound (ELBO, nats per example)", dataset, members[0].binarization)
        handles = [Line2D([], [], color=colours[size], lw=2.0) for size in sizes]
        labels = [f"N_z = {size}" for size in sizes]
        for algorithm in sorted({r.algorithm for r in members}, key=list(ALGORITHM_STYLES).index):
            handles.append(Line2D([], [], color="0.2", ls=ALGORITHM_STYLES[algorithm][0], lw=1.6))
            labels.append(ALGORITHM_STYLES[algorithm][1])
        handles += [Line2D([], [], color="0.2", lw=2.0), Line2D([], [], color="0.2", lw=1.0, alpha=0.5)]
        labels += ["train", "test"]
        axes.legend(handles, labels, loc="lower right", fontsize=8, ncol=2)
    title = "Latent-size sweep: AEVB against wake-sleep (cf. AEVB Figure 2)"
    figure.suptitle(title + (f", mean of {seeds} seeds" if seeds > 1 else ""), fontsize=11)
    _save_figure(figure, path)


@torch.no_grad()
def prior_samples_by_latent_dim(models: list[tuple[int, VAE]], config: VisualizeConfig, shape: tuple[int, int],
                                path: Path) -> None:
    """AEVB Fig. 5: a ``samples_grid`` x ``samples_grid`` grid (torchvision ``make_grid``) of decoder
    means for z ~ N(0, I) per model, one panel per latent_dim, side by side (smallest first).

    Args:
        models: (latent_dim, model) pairs; each model maps z (n, latent_dim) to means (n, H*W).
        shape: (H, W) of an image.

    Raises:
        ValueError: ``models`` is empty or a model's images are not H*W pixels.
    """
    if not models:
        raise ValueError("prior_samples_by_latent_dim: no models")
    models = sorted(models, key=lambda pair: pair[0])
    count = config.samples_grid**2
    columns = min(len(models), 5)
    rows = -(-len(models) // columns)
    height, width = shape
    panel_width = 3.0 * min(1.0, width / height)
    figure, grid = plt.subplots(rows, columns, figsize=(panel_width * columns + 0.2, 3.35 * rows), squeeze=False,
                                layout="constrained")
    for axes, (latent_dim, model) in zip(grid.flat, models):
        images = model.sample(count, torch.Generator().manual_seed(config.seed)).cpu()
        if images.shape[1] != height * width:
            raise ValueError(f"prior_samples_by_latent_dim: the latent_dim {latent_dim} model draws "
                             f"{images.shape[1]} pixels, not {height}x{width}")
        from torchvision.utils import make_grid

        tiles = make_grid(images.reshape(-1, 1, height, width), nrow=config.samples_grid, padding=2, pad_value=1.0)
        axes.imshow(tiles[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes.set_title(f"N_z = {latent_dim}" if len(models) > 1
                       else f"Random samples from the prior\nN_z = {latent_dim} (cf. AEVB Figure 5)", fontsize=9)
        axes.set_axis_off()
    for axes in list(grid.flat)[len(models):]:
        axes.set_visible(False)
    if len(models) > 1:
        figure.suptitle("Random samples from the prior p(z), decoder means (cf. AEVB Figure 5)", fontsize=10)
    _save_figure(figure, path)


FIGURE5_ALGORITHM = "aevb"  # AEVB Fig. 5 shows AEVB's models
FIGURE_MEMBERS = "figure_members.json"  # in the figures folder: the members Figure 5 shows


def _member_file(path: Path, keys: tuple[str, ...], stage: str) -> dict:
    """A member's JSON file (``member.json`` or ``train_summary.json``) with at least ``keys``.

    Raises:
        DataError: the file is not JSON or lacks a key (names the file and the stage that writes it).
    """
    redo = f"re-run `uv run dvc repro -f {stage}`"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); {redo}") from None
    missing = [key for key in keys if not isinstance(record, dict) or key not in record]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; {redo}")
    return record


def prior_sample_members(params: Params) -> dict:
    """Which members of the latent-size sweep AEVB Figure 5 shows, read from their DVC outputs: of
    the members ``params.sweep`` declares on this run's dataset (``params.data.dataset``) with the
    algorithm aevb, the one with the lowest seed of each latent size. A member has run when its
    ``member.json`` and ``train_summary.json`` (in ``<paths.reports>/sweep/members/<member>/``) and
    its ``model.pt`` (in ``<paths.models>/sweep/<member>/``) exist; ``dvc repro`` runs the members
    before this stage (they are its dependencies), so a member that has not run is one whose stage
    is not in ``dvc.yaml`` (or a ``vae visualize`` run outside ``dvc repro``).

    Returns:
        ``{"dataset", "algorithm", "declared": [stage, ...] (the members chosen, by latent size),
        "not_run": [stage, ...], "shown": [member, ...]}``, each shown member ``{"member", "stage",
        "dataset", "binarization", "latent_dim", "algorithm", "seed", "examples_seen" (training
        examples evaluated), "train_examples" (training set size), "checkpoint" (path)}``.

    Raises:
        DataError: a member's file is damaged, or its ``member.json`` names another member (names
            the file and the stage to re-run).
    """
    dataset = params.data.dataset
    chosen = {}
    for member in sorted(members(params.sweep), key=lambda m: (m.latent_dim, m.seed)):
        if member.dataset == dataset and member.algorithm == FIGURE5_ALGORITHM:
            chosen.setdefault(member.latent_dim, member)
    selection: dict = {"dataset": dataset, "algorithm": FIGURE5_ALGORITHM,
                       "declared": [m.stage for m in chosen.values()], "not_run": [], "shown": []}
    for member in chosen.values():
        where = sweep_paths(params.paths, member)
        folder, checkpoint = Path(where.reports), where.checkpoint
        files = (folder / "member.json", folder / "train_summary.json", checkpoint)
        if not all(path.is_file() for path in files):
            selection["not_run"].append(member.stage)
            continue
        record = _member_file(files[0], ("member", "latent_dim", "algorithm", "seed"), member.stage)
        if (record["member"], record["latent_dim"], record["algorithm"], record["seed"]) != (
                member.name, member.latent_dim, member.algorithm, member.seed):
            raise DataError(f"{files[0]}: member {record['member']!r} (N_z {record['latent_dim']}, "
                            f"{record['algorithm']}, seed {record['seed']}), expected {member.name!r}; "
                            f"re-run `uv run dvc repro -f {member.stage}`")
        summary = _member_file(files[1], ("binarization", "examples_seen", "train_examples"), member.stage)
        selection["shown"].append({
            "member": member.name, "stage": member.stage, "dataset": member.dataset,
            "binarization": summary["binarization"], "latent_dim": member.latent_dim,
            "algorithm": member.algorithm, "seed": member.seed, "examples_seen": int(summary["examples_seen"]),
            "train_examples": int(summary["train_examples"]), "checkpoint": str(checkpoint)})
    return selection


def _member_models(shown: list[dict]) -> list[tuple[int, VAE]]:
    """(latent_dim, model) of each member :func:`prior_sample_members` shows, loaded from its checkpoint.

    Raises:
        CheckpointError: a checkpoint is damaged. DataError: its latent size is not the member's.
    """
    models = []
    for member in shown:
        model = load_model(member["checkpoint"])
        if model.latent_dim != member["latent_dim"]:
            raise DataError(f"{member['checkpoint']}: a latent_dim {model.latent_dim} model, not "
                            f"{member['latent_dim']} as member {member['member']}; re-run "
                            f"`uv run dvc repro -f {member['stage']}`")
        models.append((member["latent_dim"], model))
    return models


def log_likelihood_histogram(per_example: pd.DataFrame, k: int, path: Path) -> None:
    """Histogram of per-example L_k, test and train, with their means marked. Both splits share the
    bins: 2 sqrt(n) of them for n images (10 to 80), so 200 Frey faces are not spread over 80 bins."""
    figure, axes = plt.subplots(figsize=(6.5, 4.0))
    count = len(per_example)
    edges = np.histogram_bin_edges(per_example["log_likelihood"], bins=int(np.clip(2 * math.sqrt(count), 10, 80)))
    for split, colour in (("test", "C0"), ("train", "C1")):
        values = per_example.loc[per_example["split"] == split, "log_likelihood"]
        if len(values):
            axes.hist(values, bins=edges, density=True, alpha=0.5, color=colour,
                      label=f"{split} ({len(values)} images, mean {values.mean():.2f})")
            axes.axvline(values.mean(), color=colour, lw=1)
    axes.set_xlabel(f"L_{k} per example (nats)")
    axes.set_ylabel("density")
    axes.legend(loc="best")
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
    # Below the axes: inside, it covers an error bar or the ELBO line whatever the corner.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    axes.set_title("Bound tightness: L_k rises towards log p(x) as k grows", fontsize=10)
    _save_figure(figure, path)


def run(params: Params, progress: bool = True) -> dict[str, str]:
    """Stage entry point: draw every figure that applies to the trained model and, for Figure 5,
    to the latent-size sweep's members on its dataset (:func:`prior_sample_members`); write
    ``figure_members.json``; log the figures to this execution's run (no figure reads the MLflow store).

    Returns:
        ``{figure name: file path}``.

    Raises:
        DataError: a sweep member's file is damaged. CheckpointError: a checkpoint is damaged.
        TrackingError: the figures cannot be logged.
    """
    paths, config, dataset = params.paths, params.visualize, params.data.dataset
    shape = datasets.get(dataset).image_shape
    model = load_model(paths.checkpoint)
    test = load_split(paths.processed_dir(dataset) / "test.pt")
    x = test.values()
    out = paths.figures
    out.mkdir(parents=True, exist_ok=True)
    epochs = pd.read_csv(paths.elbo_curve)
    figures = {"samples": out / "samples.png", "reconstructions": out / "reconstructions.png",
               "latent_space": out / "latent_space.png", "elbo_curves": out / "elbo_curves.png"}
    prior_samples(model, config, shape, figures["samples"])
    reconstructions(model, x, config, shape, figures["reconstructions"])
    latent_space(model, x, test.labels, config, figures["latent_space"])
    elbo_curves(epochs, pd.read_csv(paths.train_steps), figures["elbo_curves"], params.train.log_interval)

    # Figure 5 from the sweep's members (DVC outputs this stage depends on), not from MLflow.
    selection = prior_sample_members(params)
    figure5 = out / "prior_samples_by_latent_dim.png"
    if selection["shown"]:
        figures["prior_samples_by_latent_dim"] = figure5
        prior_samples_by_latent_dim(_member_models(selection["shown"]), config, shape, figure5)
        said = f"Figure 5 shows {', '.join(m['member'] for m in selection['shown'])}"
        if selection["not_run"]:
            said += f" (not run: {', '.join(selection['not_run'])})"
    else:
        figure5.unlink(missing_ok=True)  # a stale one would show members no longer declared
        said = "Figure 5 left out: " + (
            f"the sweep's AEVB members on {dataset} have not run ({', '.join(selection['not_run'])})"
            if selection["declared"] else
            f"the sweep declares no AEVB member on {dataset} (sweep.latent_dims.{dataset})")
    write_json(out / FIGURE_MEMBERS, {"prior_samples_by_latent_dim": selection})

    metrics = read_json(paths.metrics)
    figures["bound_curve"] = out / "bound_curve.png"
    bound_curve(pd.read_csv(paths.bound_curve), metrics["test_elbo"], figures["bound_curve"])
    figures["log_likelihood_histogram"] = out / "log_likelihood_histogram.png"
    log_likelihood_histogram(pd.read_csv(paths.per_example), metrics["importance_samples"],
                             figures["log_likelihood_histogram"])
    if model.latent_dim == 2 and model.stochastic_layers == 1:  # z1's prior is no N(0, I) grid's
        figures["manifold"] = out / "manifold.png"
        manifold(model, config, shape, figures["manifold"])
    else:
        (out / "manifold.png").unlink(missing_ok=True)  # a stale one from a 2-D run would mislead
    # The run this execution's evaluation logged to (the training run, or its child).
    with tracking.run_of_output(paths.metrics, "visualize", tag=tracking.METRICS_TAG) as tracker:
        for path in figures.values():
            tracker.log_artifact(path, "figures")
        tracker.log_artifact(out / FIGURE_MEMBERS, "figures")
    print(f"figures: {', '.join(str(p) for p in figures.values())}; {said}", flush=True)
    return {name: str(path) for name, path in figures.items()}
