"""The ``report`` stage: ``reports/report.html`` (one self-contained file, images embedded) and
``reports/report.md``, laid out as a results section: set-up, results beside published numbers
of the same binarization, figures, the latent-size sweep (:mod:`vae.sweep`) when it has run,
provenance. Every value is escaped (HTML by Jinja2's autoescape, Markdown by
:func:`markdown_escape`), so a parameter holding markup shows as text.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import yaml

from vae import sweep as sweep_stage
from vae import tracking
from vae.config import DATASETS, Params
from vae.errors import VaeError
from vae.io import read_json, write_text
from vae.references import comparable

# (file name, title, caption) in the order of a results section; captions that depend on the
# run are completed by _figures(). A figure whose file is missing (e.g. the manifold when
# latent_dim != 2) is left out.
FIGURES = (
    ("lower_bound_runs", "Lower bound during training (cf. AEVB Figure 2)",
     "Train ELBO (solid) and test ELBO (dashed) per evaluated pass against the number of training "
     "examples evaluated (log axis from 10^5, as in the paper, or from just before the first evaluated "
     "pass when that comes earlier), in nats per example. One panel per dataset and binarization, one "
     "colour per run: the latest run whose training finished for each latent size N_z in the MLflow "
     "tracking store (listed under Provenance)."),
    ("elbo_curves", "This run's training curves",
     "Train, validation and test ELBO of this run per evaluated pass (log axis); grey: the minibatch "
     "bound, each point a mean over train.log_interval consecutive minibatches."),
    ("bound_curve", "Bound tightness",
     "L_k against the number of importance samples k (error bars: standard error over images), "
     "test and training images; L_1 is the ELBO in expectation and L_k rises towards log p(x)."),
    ("log_likelihood_histogram", "Per-image log-likelihood",
     "Histogram of L_k over test images and the evaluated training images; vertical lines: means."),
    ("manifold", "Learned 2-D manifold (cf. AEVB Figure 4)",
     "Decoder means over a regular grid of the unit square mapped through the inverse Gaussian CDF "
     "to z (z_1 rising left to right, z_2 rising bottom to top)."),
    ("prior_samples_by_latent_dim", "Samples from the prior (cf. AEVB Figure 5)",
     "Decoder means for random z ~ N(0, I), one grid per latent size N_z, each from the latest run "
     "with that latent size on this dataset and binarization."),
    ("samples", "Samples from the prior",
     "Decoder means for z ~ N(0, I) of this run's model."),
    ("reconstructions", "Reconstructions",
     "Top: binarized test images. Bottom: their decoder means at z = E_q[z|x]."),
    ("latent_space", "Latent space",
     "Posterior means E_q[z|x] of test images coloured by digit label."),
)
# samples.png shows the same draws as this run's panel of Figure 5: shown only without Figure 5.
SHOWN_ONLY_WITHOUT = {"samples": "prior_samples_by_latent_dim"}


# Figures show at 1.5 CSS inches per printed inch: a 6.5-inch figure fills most of the 980-px
# column, and text set in points reads the same size in every figure.
SCREEN_PX_PER_INCH = 144


def display_width(png: bytes) -> int | None:
    """The width in CSS pixels at which a PNG shows: its printed width (from its ``pHYs``
    resolution) at SCREEN_PX_PER_INCH, so text set in points reads the same in every figure; None
    when the file states no resolution (the browser then shows it at its pixel width, at most the
    column's).

    Raises:
        ValueError: ``png`` is not a PNG file.
    """
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width = int.from_bytes(png[16:20], "big")
    position = 8
    while position + 8 <= len(png):
        length, kind = int.from_bytes(png[position : position + 4], "big"), png[position + 4 : position + 8]
        if kind == b"pHYs" and length == 9:
            per_metre = int.from_bytes(png[position + 8 : position + 12], "big")
            unit = png[position + 16]
            if unit == 1 and per_metre > 0:  # pixels per metre
                return round(width / (per_metre * 0.0254) * SCREEN_PX_PER_INCH)
            return None
        if kind in (b"IDAT", b"IEND"):  # pHYs must come before the image data
            return None
        position += 12 + length
    return None


def markdown_escape(value: Any) -> str:
    """Text safe inside a Markdown table cell: HTML special characters, pipes and newlines escaped."""
    text = html.escape(str(value), quote=False)
    return re.sub(r"([|`*_\[\]])", r"\\\1", text).replace("\n", " ")


def stage_digests(lock_path: Path = Path("dvc.lock")) -> list[tuple[str, str]]:
    """Each stage of ``dvc.lock``: a digest of its recorded state (deps, params, outs) and the
    hash of its first output, so a reader can tell exactly which state produced the report."""
    if not lock_path.is_file():
        return [("dvc.lock", "not found (stages run outside `dvc repro`)")]
    stages = (yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}).get("stages", {})
    rows = []
    for name, entry in stages.items():
        if name == "report":  # its entry describes the previous report, not this one
            continue
        digest = hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:12]
        outs = entry.get("outs") or [{}]
        main = next((out for out in outs if str(out.get("path", "")).endswith("metrics.json")), outs[0])
        rows.append((f"stage {name}", f"lock {digest}; {main.get('path', '-')} md5 {main.get('md5', '-')}"))
    return rows


def _environment() -> jinja2.Environment:
    loader = jinja2.PackageLoader("vae", "templates")
    env = jinja2.Environment(loader=loader, autoescape=jinja2.select_autoescape(["html.j2"]),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["md"] = markdown_escape
    return env


def _architecture(m: dict, summary: dict) -> str:
    dims = [summary.get("input_dim", 784), *[m["hidden_dim"]] * (m.get("hidden_layers") or 1), m["latent_dim"]]
    return "-".join(str(d) for d in dims)


def _training(summary: dict, params: Params) -> tuple[str, str, str]:
    """(objective, optimizer, training length) as the set-up table states them."""
    train = params.train
    if summary.get("algorithm", "aevb") == "wake-sleep":
        samples = summary.get("samples", 1)
        objective = ("wake-sleep (Hinton et al. 1995, AEVB Sec. 5's baseline): wake phase fits the decoder to "
                     f"log p(x, z), z ~ q(z|x) ({samples} sample{'s' if samples != 1 else ''} per example); "
                     "sleep phase fits the encoder to log q(z|x), (z, x) ~ p(z) p(x|z); curves show the ELBO")
    elif summary.get("objective", "elbo") == "iwae":
        objective = (f"importance-weighted bound L_k, k = {summary['samples']} (IWAE, Burda et al. 2016 Eq. 8)")
    else:
        samples = summary.get("samples", 1)
        objective = f"SGVB ELBO, estimator B (analytic KL), L = {samples} sample{'s' if samples != 1 else ''} of z"
    if summary.get("map_prior"):
        objective += "; N(0, I) prior on the parameters (weight decay 1/N, approximate MAP)"
    rate = summary.get("learning_rate", train.learning_rate)
    optimizer = f"{summary.get('optimizer', train.optimizer)}, step size {rate:g}"
    trials = summary.get("step_size_trials") or {}
    if trials:
        optimizer += (" chosen from " + ", ".join(f"{k} (train ELBO {v:.2f})" for k, v in trials.items())
                      + f" after {train.step_size_selection_samples:,} examples each")
    if train.epsilon is not None:
        optimizer += f", eps {train.epsilon:g}"
    if train.schedule == "iwae":
        optimizer += ", divided by 10^(i/7) after 3^0 + ... + 3^(i-1) passes (IWAE schedule)"
    optimizer += f", minibatch {summary.get('batch_size', train.batch_size)}"
    if params.model.init_std is not None:
        optimizer += f"; parameters initialised ~ N(0, {params.model.init_std:g}^2)"
    length = (f"{summary.get('epochs', params.train.epochs)} passes = {summary.get('examples_seen', 0):,} "
              "training examples evaluated")
    if summary.get("stopped_early"):
        length += f" (early stopping; parameters of pass {summary['best_pass']})"
    if summary.get("resumed_from_passes"):
        length += f" (resumed from a checkpoint after pass {', '.join(map(str, summary['resumed_from_passes']))})"
    return objective, optimizer, length


def _figure_runs(figures_dir: Path) -> dict[str, list[dict]]:
    """``figure_runs.json`` of the visualize stage: the runs behind Figures 2 and 5 (empty if absent).

    Raises:
        VaeError: the file is not the JSON object the visualize stage writes (names the file).
    """
    path = figures_dir / "figure_runs.json"
    if not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise VaeError(f"{path}: not valid JSON ({error}); re-run `vae visualize`") from None
    if not (isinstance(runs, dict) and all(isinstance(v, list) and all(isinstance(r, dict) for r in v)
                                           for v in runs.values())):
        raise VaeError(f"{path}: expected {{figure: [run, ...]}} as the visualize stage writes; re-run `vae visualize`")
    return runs


def _embedded(path: Path, title: str, caption: str, relative: str, stage: str) -> dict:
    """A figure as the templates show it: title, caption, path relative to the reports folder,
    the PNG base64-encoded and its display width.

    Raises:
        VaeError: the file is not a PNG (names it and the ``stage`` command that writes it).
    """
    data = path.read_bytes()
    try:
        width = display_width(data)
    except ValueError:
        raise VaeError(f"{path}: not a PNG file; re-run `{stage}`") from None
    return {"title": title, "caption": caption, "path": relative, "data": base64.b64encode(data).decode("ascii"),
            "width": width}


def _run_label(run: dict) -> str:
    return f"N_z = {run.get('latent_dim')}" + (" (this run)" if run.get("current") else "")


def _figures(figures_dir: Path, m: dict, params: Params) -> tuple[list[dict], list[tuple]]:
    """The figures present in ``figures_dir``, base64-encoded, with captions completed for this run;
    and the rows (figure, N_z, dataset, binarization, profile, held-out curve, MLflow run) of the
    runs that Figures 2 and 5 show."""
    runs = _figure_runs(figures_dir)
    unlabelled = m["dataset"] == "frey" or m["binarization"] == "static"
    figures = []
    for name, title, caption in FIGURES:
        path = figures_dir / f"{name}.png"
        if not path.is_file() or (figures_dir / f"{SHOWN_ONLY_WITHOUT.get(name, '-')}.png").is_file():
            continue
        if unlabelled:
            caption = caption.replace("binarized test images", "test images").replace(
                " coloured by digit label", " (this data set has no labels)")
        if name == "latent_space" and m["latent_dim"] > 2:
            caption += (f" With latent_dim = {m['latent_dim']}, a 2-D {params.visualize.projection.upper()} "
                        "projection of them (scikit-learn; the title gives the method).")
        if name == "lower_bound_runs":
            shown = runs.get(name, [])
            caption += f" Runs shown: {len(shown)}."
            if any(run.get("held_out") == "validation" for run in shown):
                caption += (" Dotted: validation ELBO, for runs trained before the per-pass test ELBO was "
                            "recorded (labelled validation, not test).")
        if name == "prior_samples_by_latent_dim" and runs.get(name):
            caption += " Shown: " + ", ".join(_run_label(run) for run in runs[name]) + "."
        figures.append(_embedded(path, title, caption, f"figures/{name}.png", "vae visualize"))
    rows = []
    titles = {"lower_bound_runs": "Fig. 2", "prior_samples_by_latent_dim": "Fig. 5"}
    for name, label in titles.items():
        for run in runs.get(name, []):
            rows.append((label, run.get("latent_dim"), run.get("dataset"), run.get("binarization"), run.get("profile"),
                         run.get("held_out"), (run.get("run_id") or "not tracked")
                         + (" (this run)" if run.get("current") else f" ({run.get('name')})")))
    return figures, rows


# Columns of sweep_results.csv (vae.sweep.RESULT_COLUMNS) the sweep section shows; the others (times, host,
# MLflow run) are the sweep's provenance, not results.
SWEEP_TEXT_COLUMNS = ("member", "dataset", "algorithm")
SWEEP_NUMBER_COLUMNS = ("latent_dim", "seed", "examples_seen", "train_elbo", "test_elbo", "importance_samples",
                        "test_log_likelihood", "test_log_likelihood_stderr", "active_units", "train_seconds")
SWEEP_FIGURE_TITLE = "Latent-size sweep (cf. AEVB Figure 2)"


def read_sweep_results(path: Path) -> pd.DataFrame:
    """``sweep_results.csv`` of the sweep-report stage, one row per member, sorted by dataset (in
    ``vae.config.DATASETS``' order, as the figure's panels), latent size, algorithm and seed; text
    columns as strings, the numeric ones as numbers (an empty cell is NaN).

    Raises:
        FileNotFoundError: the file does not exist.
        VaeError: the file is empty, not CSV, lacks a column the report shows (names the file and
            every missing column), holds a non-numeric value in a numeric column, or has no row.
    """
    redo = "re-run `vae sweep-report`"
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise VaeError(f"{path}: not the CSV file `vae sweep-report` writes ({error}); {redo}") from None
    missing = [column for column in (*SWEEP_TEXT_COLUMNS, *SWEEP_NUMBER_COLUMNS) if column not in frame.columns]
    if missing:
        raise VaeError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                       f"(found: {', '.join(map(str, frame.columns))}); {redo}")
    if frame.empty:
        raise VaeError(f"{path}: no members; {redo}")
    for column in SWEEP_NUMBER_COLUMNS:
        text = frame[column].str.strip()
        numbers = pd.to_numeric(text.mask(text == ""), errors="coerce")
        bad = text[numbers.isna() & (text != "") & (text.str.lower() != "nan")]
        if not bad.empty:
            raise VaeError(f"{path}: column {column}: {bad.iloc[0]!r} is not a number; {redo}")
        frame[column] = numbers
    order = {dataset: index for index, dataset in enumerate(DATASETS)}
    frame["_dataset_order"] = frame["dataset"].map(lambda dataset: order.get(dataset, len(order)))
    frame = frame.sort_values(["_dataset_order", "dataset", "latent_dim", "algorithm", "seed"], kind="stable")
    return frame.drop(columns="_dataset_order").reset_index(drop=True)


def _number(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.2f}"


def _count(value: float) -> str:
    return "-" if pd.isna(value) else f"{int(value):,}"


def _values(column: pd.Series) -> list:
    return sorted({value for value in column if not pd.isna(value)})


def _sweep_rows(table: pd.DataFrame) -> list[tuple[str, ...]]:
    """The table's rows as the report shows them: (member, dataset, N_z, algorithm, seed, examples
    evaluated, train ELBO, test ELBO, test L_k ± s.e., active units, train seconds)."""
    rows = []
    for row in table.itertuples(index=False):
        likelihood = _number(row.test_log_likelihood)
        if not pd.isna(row.test_log_likelihood) and not pd.isna(row.test_log_likelihood_stderr):
            likelihood += f" ± {row.test_log_likelihood_stderr:.2f}"
        rows.append((row.member, row.dataset, _count(row.latent_dim), row.algorithm, _count(row.seed),
                     _count(row.examples_seen), _number(row.train_elbo), _number(row.test_elbo), likelihood,
                     f"{_count(row.active_units)} of {_count(row.latent_dim)}", _number(row.train_seconds)))
    return rows


def _sweep_note(params: Params, table: pd.DataFrame) -> str:
    """One sentence under the table: what training the numbers had, and whether they are the paper's."""
    seen = [int(value) for value in _values(table["examples_seen"])]
    length = (f"{seen[0]:,}" if len(seen) == 1 else f"{seen[0]:,} to {seen[-1]:,}" if seen
              else "an unrecorded number of")
    size = params.sweep.size
    if size == "full":
        return (f"Full sweep (params.sweep.size = full): the paper's set-up (Kingma & Welling 2014, Section 5), "
                f"{length} training examples evaluated per member.")
    subsets = []
    for dataset in dict.fromkeys(table["dataset"]):
        if dataset not in DATASETS or dataset not in params.sweep.settings:
            continue
        data = sweep_stage.data_params(params.sweep, dataset).data
        caps = [f"{data.train_subset:,} training" if data.train_subset else "",
                f"{data.eval_subset:,} validation and test" if data.eval_subset else ""]
        if any(caps):
            subsets.append(f"{dataset} {' and '.join(filter(None, caps))} images")
    return (f"{size.capitalize()} sweep (params.sweep.size = {size}): short training ({length} training examples "
            "evaluated per member"
            + (f") on subsets of the data ({'; '.join(subsets)})" if subsets else ")")
            + ", so these are not the paper's numbers (its Figure 2 runs to 10^8 examples): they show the trends "
              "across N_z and algorithms only.")


def sweep_section(params: Params) -> tuple[dict | None, list[str]]:
    """The latent-size sweep's section (:mod:`vae.sweep`) from ``<paths.reports>/sweep``'s
    ``lower_bound_sweep.png`` and ``sweep_results.csv``: (section, []); or (None, the missing files)
    when either is missing (``vae report`` run outside ``dvc repro`` before the sweep: the report
    then says in one line how to run it).

    The section holds the figure (base64 PNG, display width, title, caption, path relative to
    ``paths.reports``), the table's header of L_k, its rows (sorted as :func:`read_sweep_results`,
    values formatted as text) and the note on training length.

    Raises:
        VaeError: the CSV is not as ``vae sweep-report`` writes it (see :func:`read_sweep_results`)
            or the figure is not a PNG file (names the file).
    """
    folder = Path(params.paths.reports) / "sweep"
    figure_path, table_path = folder / "lower_bound_sweep.png", folder / "sweep_results.csv"
    missing = [str(path) for path in (figure_path, table_path) if not path.is_file()]
    if missing:
        return None, missing
    table = read_sweep_results(table_path)
    ks = [f"{int(k)}" for k in _values(table["importance_samples"])]
    seeds = len(_values(table["seed"]))
    caption = ("Lower bound (ELBO, nats per example) against the number of training examples evaluated (log axis), "
               "one panel per dataset, one colour per latent size N_z: AEVB solid, wake-sleep dashed; train ELBO "
               "bold, test ELBO pale" + (f"; each curve the mean of {seeds} seeds" if seeds > 1 else "") + ". "
               f"The {params.sweep.size} sweep (params.sweep.size) with {len(table)} member"
               f"{'s' if len(table) != 1 else ''}; the table gives each member's final values and the test "
               f"log-likelihood L_k with k = {', '.join(ks) or '-'} importance samples.")
    figure = _embedded(figure_path, SWEEP_FIGURE_TITLE, caption, "sweep/lower_bound_sweep.png", "vae sweep-report")
    likelihood = f"test L_{ks[0]} ± s.e." if len(ks) == 1 else "test L_k ± s.e."
    return {"figure": figure, "likelihood_header": likelihood, "rows": _sweep_rows(table),
            "note": _sweep_note(params, table)}, []


def build_context(params: Params, metrics: dict, summary: dict, figures_dir: Path) -> dict:
    """Everything the templates show, as plain values; the sweep's section from ``<paths.reports>/sweep``.

    Raises:
        VaeError: a figure, ``figure_runs.json`` or ``sweep_results.csv`` is damaged (names the file).
    """
    m = metrics
    k = m["importance_samples"]
    gaussian = summary.get("likelihood", "bernoulli") == "gaussian"
    decoder = "Gaussian p(x|z) (sigmoid means, learned log-variance)" if gaussian else "Bernoulli p(x|z)"
    objective, optimizer, length = _training(summary, params)
    arch = _architecture(m, summary)
    architecture = f"{arch} tanh encoder, mirrored {decoder.split(' p(')[0]} decoder; {optimizer}; {length}"
    binarization = {"dynamic": "dynamic (training images resampled ~ Bernoulli(intensity) per minibatch; "
                               "validation and test binarized once, seeded)",
                    "static": "static (the fixed Larochelle binarization, binarized_mnist_*.amat)",
                    "none": "none (grey values / 256, in [0, 1); real-valued data, Gaussian decoder)"}
    setup = [
        ("profile", summary.get("profile", params.profile)),
        ("dataset", f"{m['dataset']} ({summary['train_examples']} train / "
                    f"{m['test_examples']} test examples"
                    + (f", split by a permutation seeded with {params.data.split_seed}" if m["dataset"] == "frey" else "")
                    + ")"),
        ("binarization", binarization.get(m["binarization"], m["binarization"])),
        ("architecture", f"{arch} ({m.get('hidden_layers') or 1} tanh hidden layer"
                         f"{'s' if (m.get('hidden_layers') or 1) > 1 else ''} on each side), decoder mirrored, "
                         f"Gaussian q(z|x), {decoder}, prior N(0, I)"),
        ("objective", objective),
        ("optimizer", optimizer),
        ("training length", length),
        ("hardware", summary.get("device", "unknown")),
        ("software", summary.get("software", "not recorded")),
        ("training wall time", f"{m['train_seconds']:.1f} s"),
        ("evaluation", f"L_{k} with k = {k} importance samples on {m['test_examples']} test and "
                       f"{m['train_examples_evaluated']} training images ({m['evaluate_seconds']:.1f} s)"),
    ]
    results = [
        (f"test log-likelihood L_{k}", f"{m['test_log_likelihood']:.2f} ± {m['test_log_likelihood_stderr']:.2f}"),
        (f"train log-likelihood L_{k} ({m['train_examples_evaluated']} images)",
         f"{m['train_log_likelihood']:.2f} ± {m['train_log_likelihood_stderr']:.2f}"),
        ("train - test gap (overfitting)", f"{m['train_test_gap']:.2f}"),
        *[(f"test L_{key}", f"{value:.2f}") for key, value in m["bound_curve"].items() if int(key) != k],
        ("test ELBO", f"{m['test_elbo']:.2f}"),
        ("train ELBO (last pass)", f"{m['train_elbo']:.2f}"),
        ("validation ELBO (last pass)", f"{m['valid_elbo']:.2f}"),
        ("active units (A_u > 0.01)", f"{m['active_units']} of {m['latent_dim']}"),
    ]
    our_model = ("wake-sleep (VAE's encoder and decoder), 1 stochastic layer"
                 if summary.get("algorithm") == "wake-sleep"
                 else f"IWAE (k = {summary['samples']}), 1 stochastic layer" if summary.get("objective") == "iwae"
                 else "VAE, 1 stochastic layer")
    if m["dataset"] == "frey":
        no_references = ("Frey Face has no standard split and no published importance-sampled "
                         "log-likelihood; its bound is a continuous density in nats per image (it can be "
                         "positive) and is not comparable with MNIST's.")
    else:
        no_references = "No published numbers use this dataset and binarization."
    figures, figure_runs = _figures(figures_dir, m, params)
    sweep, sweep_missing = sweep_section(params)
    commit = tracking.git_commit()
    # `dvc repro` rewrites dvc.lock stage by stage: that change is this run's record, not a change it used.
    dirty = tracking.git_dirty(ignore=("dvc.lock",))
    provenance = [
        ("git commit", (commit or "not a git work tree") + (" + uncommitted changes" if dirty else "")),
        ("MLflow run", metrics.get("mlflow_run_id") or "not tracked"),
        ("MLflow training run", summary.get("mlflow_run_id") or "not tracked"),
        ("MLflow tracking URI", tracking.tracking_uri() if metrics.get("mlflow_run_id") else "-"),
        *stage_digests(),
        ("reproduce", f"git checkout {commit or '<commit>'} && uv run dvc repro"
                      + ("  (first commit the uncommitted changes this run used)" if dirty else "")),
    ]
    return {
        "title": (f"VAE on Frey Face (Gaussian decoder), latent_dim = {m['latent_dim']}" if m["dataset"] == "frey"
                  else f"VAE on {m['dataset'].upper()} ({m['binarization']} binarization), "
                       f"latent_dim = {m['latent_dim']}"),
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "setup": setup, "results": results, "binarization": m["binarization"],
        "references": comparable(m["dataset"], m["binarization"]),
        "our_architecture": architecture, "importance_samples": k, "our_model": our_model,
        "no_references": no_references,
        "our_log_likelihood": f"{m['test_log_likelihood']:.2f}",
        "figures": figures, "provenance": provenance, "figure_runs": figure_runs,
        "sweep": sweep, "sweep_missing": sweep_missing,
        "params_yaml": yaml.safe_dump(params.to_dict(), sort_keys=False).rstrip(),
    }


def run(params: Params, progress: bool = True) -> dict[str, str]:
    """Stage entry point: write ``report.html`` and ``report.md``; log both to the MLflow run (the
    sweep's figure and table are not logged again: the sweep-report stage logs them to the sweep's run).

    Raises:
        FileNotFoundError: ``metrics.json`` or ``train_summary.json`` is missing.
        VaeError: an input is damaged (names the file); TrackingError: the tracking store cannot be reached.
    """
    paths = params.paths
    metrics = read_json(paths.metrics)
    summary = read_json(paths.train_summary)
    context = build_context(params, metrics, summary, paths.figures)
    env = _environment()
    outputs = {"html": Path(paths.reports) / "report.html", "md": Path(paths.reports) / "report.md"}
    write_text(outputs["html"], env.get_template("report.html.j2").render(context))
    md_context = {**context, "figures": [{k: v for k, v in f.items() if k != "data"} for f in context["figures"]]}
    if context["sweep"]:
        figure = {k: v for k, v in context["sweep"]["figure"].items() if k != "data"}
        md_context["sweep"] = {**context["sweep"], "figure": figure}
    write_text(outputs["md"], env.get_template("report.md.j2").render(md_context))
    with tracking.resume_run(metrics.get("mlflow_run_id"), "report") as tracker:
        for path in outputs.values():
            tracker.log_artifact(path, "report")
    print(f"report: {outputs['html']}, {outputs['md']}", flush=True)
    return {name: str(path) for name, path in outputs.items()}
