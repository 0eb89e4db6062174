"""The ``report`` stage: ``reports/report.html`` (one self-contained file, images embedded) and
``reports/report.md``, laid out as a results section: set-up, results beside published numbers
of the same binarization, figures, the latent-size sweep (:mod:`vae.sweep`) when it has run,
provenance.

This module gathers the data (numbers, names, flags, lists: :func:`build_context`); the sentences
are the templates' (``vae/templates``): ``sentences.j2`` writes each sentence once,
``report_text.j2`` composes them, and ``report.html.j2`` and ``report.md.j2`` lay them out. Every
value is escaped (HTML by Jinja2's autoescape, Markdown by :func:`markdown_escape`), so a parameter
holding markup shows as text.
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

from vae import datasets, provenance, tracking
from vae.config import Params, data_params
from vae.errors import VaeError
from vae.io import read_json, write_text

# The figures of the visualize stage in the order of a results section (titles and captions:
# sentences.j2). A figure whose file is missing (e.g. the manifold when latent_dim != 2, Figure 5
# when the sweep has no member on the dataset) is left out. AEVB Figure 2 is the sweep section's.
FIGURES = ("elbo_curves", "bound_curve", "log_likelihood_histogram", "manifold", "samples",
           "prior_samples_by_latent_dim", "reconstructions", "latent_space")
# The figure whose sweep members figure_members.json (vae.visualize.FIGURE_MEMBERS) lists: AEVB Figure 5.
MEMBER_FIGURE = "prior_samples_by_latent_dim"


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


def stage_digests(lock_path: Path = Path("dvc.lock")) -> list[dict] | None:
    """Each stage of ``dvc.lock`` but ``report``: ``{"name", "lock", "path", "md5"}``, where
    ``lock`` is a 12-hex-digit digest of its recorded state (deps, params, outs) and ``path`` and
    ``md5`` are those of its main output (its ``metrics.json`` if it has one, else its first; None
    where the lock file records none), so a reader can tell exactly which state produced the
    report. None when there is no lock file (stages run outside ``dvc repro``)."""
    if not lock_path.is_file():
        return None
    stages = (yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}).get("stages", {})
    rows = []
    for name, entry in stages.items():
        if name == "report":  # its entry describes the previous report, not this one
            continue
        digest = hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:12]
        outs = entry.get("outs") or [{}]
        main = next((out for out in outs if str(out.get("path", "")).endswith("metrics.json")), outs[0])
        rows.append({"name": name, "lock": digest, "path": main.get("path"), "md5": main.get("md5")})
    return rows


def _environment() -> jinja2.Environment:
    loader = jinja2.PackageLoader("vae", "templates")
    # Only the page templates escape HTML: sentences.j2 and report_text.j2 give plain text.
    env = jinja2.Environment(loader=loader, autoescape=jinja2.select_autoescape(["html.j2"]),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["md"] = markdown_escape
    env.filters["thousands"] = lambda value: f"{int(value):,}"
    return env


def _training_data(summary: dict, params: Params) -> dict:
    """How the model was trained, from ``train_summary.json`` (``params`` where it records nothing):
    algorithm, objective, samples per example, MAP prior, optimizer, step size (and the trials it was
    chosen from: ``[(step size as written, train ELBO in nats)]``), epsilon, schedule, minibatch,
    initial weights' standard deviation and output bias, passes, examples evaluated, early stopping,
    resumptions."""
    train = params.train
    return {
        "algorithm": summary.get("algorithm", "aevb"), "objective": summary.get("objective", "elbo"),
        "stochastic_layers": summary.get("stochastic_layers", 1),
        "samples": summary.get("samples", 1), "map_prior": bool(summary.get("map_prior")),
        "optimizer": summary.get("optimizer", train.optimizer),
        "learning_rate": summary.get("learning_rate", train.learning_rate),
        "step_size_trials": list((summary.get("step_size_trials") or {}).items()),
        "step_size_selection_samples": train.step_size_selection_samples,
        "epsilon": train.epsilon, "schedule": train.schedule, "schedule_rounding": train.schedule_rounding,
        "batch_size": summary.get("batch_size", train.batch_size), "init_std": params.model.init_std,
        "output_bias_init": params.model.output_bias_init,
        "epochs": summary.get("epochs", train.epochs), "examples_seen": summary.get("examples_seen", 0),
        "stopped_early": bool(summary.get("stopped_early")), "best_pass": summary.get("best_pass"),
        "resumed_from_passes": list(summary.get("resumed_from_passes") or []),
    }


def _training(summary: dict, params: Params) -> tuple[str, str, str]:
    """(objective, optimizer, training length) as the set-up table states them (sentences.j2)."""
    say = _environment().get_template("sentences.j2").module
    data = _training_data(summary, params)
    return str(say.objective(data)), str(say.optimizer(data)), str(say.length(data))


# What the report shows of a member behind Figure 5 (vae.visualize.prior_sample_members).
MEMBER_KEYS = ("member", "stage", "dataset", "binarization", "latent_dim", "algorithm", "seed", "examples_seen",
               "train_examples")


def _figure_members(figures_dir: Path) -> dict | None:
    """The latent-size sweep's members behind AEVB Figure 5, from the visualize stage's
    ``figure_members.json`` (:func:`vae.visualize.prior_sample_members`): ``{"dataset",
    "algorithm", "declared": n, "not_run": [stage, ...], "shown": [member, ...]}``, each member
    with the keys :data:`MEMBER_KEYS` (None where the file has none); None when the file is absent.

    Raises:
        VaeError: the file is not the JSON object the visualize stage writes (names the file).
    """
    path = figures_dir / "figure_members.json"
    if not path.is_file():
        return None
    redo = "re-run `vae visualize`"
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise VaeError(f"{path}: not valid JSON ({error}); {redo}") from None
    entry = listed.get(MEMBER_FIGURE) if isinstance(listed, dict) else None
    lists = ("declared", "not_run", "shown")
    if not (isinstance(entry, dict) and all(isinstance(entry.get(key), list) for key in lists)
            and all(isinstance(member, dict) for member in entry["shown"])):
        raise VaeError(f"{path}: expected {{{MEMBER_FIGURE!r}: {{'declared': [...], 'not_run': [...], "
                       f"'shown': [member, ...], ...}}}} as the visualize stage writes; {redo}")
    return {"dataset": entry.get("dataset"), "algorithm": entry.get("algorithm"), "declared": len(entry["declared"]),
            "not_run": [str(stage) for stage in entry["not_run"]],
            "shown": [{key: member.get(key) for key in MEMBER_KEYS} for member in entry["shown"]]}


def _embedded(path: Path, relative: str, stage: str) -> dict:
    """A figure as the templates show it: its path relative to the reports folder, the PNG
    base64-encoded and its display width in CSS pixels (None: the PNG states no resolution).

    Raises:
        VaeError: the file is not a PNG (names it and the ``stage`` command that writes it).
    """
    data = path.read_bytes()
    try:
        width = display_width(data)
    except ValueError:
        raise VaeError(f"{path}: not a PNG file; re-run `{stage}`") from None
    return {"path": relative, "data": base64.b64encode(data).decode("ascii"), "width": width}


def _figures(figures_dir: Path) -> tuple[list[dict], dict | None]:
    """The figures present in ``figures_dir`` in :data:`FIGURES`' order, each ``{"name", "path",
    "data", "width", "members", "not_run"}`` (for Figure 5: the sweep members it shows, and the
    stages of those it would show that have not run; else empty); and the members behind Figure 5
    (:func:`_figure_members`; None without ``figure_members.json``).

    Raises:
        VaeError: a figure is not a PNG or ``figure_members.json`` is damaged (names the file).
    """
    listed = _figure_members(figures_dir)
    figures = []
    for name in FIGURES:
        path = figures_dir / f"{name}.png"
        if not path.is_file():
            continue
        members = listed if listed and name == MEMBER_FIGURE else {"shown": [], "not_run": []}
        figures.append({"name": name, **_embedded(path, f"figures/{name}.png", "vae visualize"),
                        "members": members["shown"], "not_run": members["not_run"]})
    return figures, listed


# Columns of sweep_results.csv (vae.sweep.RESULT_COLUMNS) the sweep section shows. The members' wall times
# are not in the file (no DVC output records one): the report reads them from their MLflow runs.
SWEEP_TEXT_COLUMNS = ("member", "dataset", "algorithm")
SWEEP_NUMBER_COLUMNS = ("latent_dim", "seed", "examples_seen", "train_elbo", "test_elbo", "importance_samples",
                        "test_log_likelihood", "test_log_likelihood_stderr", "active_units")


def read_sweep_results(path: Path) -> pd.DataFrame:
    """``sweep_results.csv`` of the sweep-report stage, one row per member, sorted by dataset (in
    the registry's order (:data:`vae.datasets.NAMES`), as the figure's panels), latent size, algorithm and seed; text
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
    order = {dataset: index for index, dataset in enumerate(datasets.NAMES)}
    frame["_dataset_order"] = frame["dataset"].map(lambda dataset: order.get(dataset, len(order)))
    frame = frame.sort_values(["_dataset_order", "dataset", "latent_dim", "algorithm", "seed"], kind="stable")
    return frame.drop(columns="_dataset_order").reset_index(drop=True)


def _plain(value: Any) -> Any:
    """A table value as a plain Python one: NaN as None, numpy numbers as int or float."""
    if pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _values(column: pd.Series) -> list:
    return sorted({_plain(value) for value in column if not pd.isna(value)})


def _sweep_subsets(params: Params, table: pd.DataFrame) -> list[dict]:
    """``{"dataset", "train_subset", "eval_subset"}`` of each dataset in ``table`` whose sweep
    members train or evaluate on a subset of the data (``data.train_subset``, ``data.eval_subset``;
    None: the whole split), in the table's order."""
    subsets = []
    for dataset in dict.fromkeys(table["dataset"]):
        if dataset not in datasets.NAMES or dataset not in params.sweep.settings:
            continue
        data = data_params(params.sweep, dataset).data
        if data.train_subset or data.eval_subset:
            subsets.append({"dataset": dataset, "train_subset": data.train_subset or None,
                            "eval_subset": data.eval_subset or None})
    return subsets


def sweep_section(params: Params) -> tuple[dict | None, list[str]]:
    """The latent-size sweep's section (:mod:`vae.sweep`) from ``<paths.reports>/sweep``'s
    ``lower_bound_sweep.png`` and ``sweep_results.csv``: (section, []); or (None, the missing files)
    when either is missing (``vae report`` run outside ``dvc repro`` before the sweep: the report
    then says in one line how to run it).

    The section holds ``figure`` (path relative to ``paths.reports``, base64 PNG, display width),
    ``size`` (``sweep.size``), ``members`` and ``seeds`` (how many), ``importance_samples`` and
    ``examples_seen`` (the distinct values, ascending), ``subsets`` (:func:`_sweep_subsets`, for a
    sweep that is not ``full``) and ``rows``: one dict per member, sorted as
    :func:`read_sweep_results`, with the columns the report shows (missing values None; ELBOs and
    L_k in nats per example; the members' wall times are not among them: :func:`build_context`
    adds them from MLflow).

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
    figure = _embedded(figure_path, "sweep/lower_bound_sweep.png", "vae sweep-report")
    columns = (*SWEEP_TEXT_COLUMNS, *SWEEP_NUMBER_COLUMNS)
    rows = [{column: _plain(value) for column, value in zip(columns, row)}
            for row in table[list(columns)].itertuples(index=False)]
    return {"figure": figure, "size": params.sweep.size, "members": len(table), "seeds": len(_values(table["seed"])),
            "importance_samples": [int(k) for k in _values(table["importance_samples"])],
            "examples_seen": [int(n) for n in _values(table["examples_seen"])],
            "subsets": [] if params.sweep.size == "full" else _sweep_subsets(params, table),
            "rows": rows}, []


def tightness_context(m: dict, seconds: float | None = None) -> dict | None:
    """How tight the run's L_k is, from ``metrics.json`` (:func:`vae.evaluate.tightness`): None
    when the evaluate stage ran no AIS and no BDMC; else ``splits`` (per split with AIS: images,
    ELBO, L_k, AIS and its s.e., AIS - L_k and its s.e., App. D and its s.e. or None, acceptance
    rate), ``bdmc`` (images, lower, upper, gap, its s.e.; or None), the AIS settings, k,
    ``latent_dim``, ``seconds`` (the estimates' wall time, as given: :func:`execution_record`'s
    ``ais_seconds``; None when not recorded) and ``references`` (the registry's estimator references
    for the dataset). Nats per example."""
    splits = [{"split": split, "examples": m[f"{split}_ais_examples"], "elbo": m[f"{split}_ais_elbo"],
               "bound": m[f"{split}_ais_bound"], "ais": m[f"{split}_ais_log_likelihood"],
               "ais_stderr": m[f"{split}_ais_log_likelihood_stderr"], "gap": m[f"{split}_ais_gap"],
               "gap_stderr": m[f"{split}_ais_gap_stderr"],
               "appendix_d": m.get(f"{split}_appendix_d_log_likelihood"),
               "appendix_d_stderr": m.get(f"{split}_appendix_d_log_likelihood_stderr"),
               "acceptance_rate": m.get(f"{split}_ais_acceptance_rate")}
              for split in ("test", "train") if f"{split}_ais_log_likelihood" in m]
    bdmc = ({key: m[f"bdmc_{key}"] for key in ("examples", "lower", "upper", "gap", "gap_stderr")}
            if "bdmc_gap" in m else None)
    if not splits and bdmc is None:
        return None
    return {"splits": splits, "bdmc": bdmc, "importance_samples": m["importance_samples"],
            "latent_dim": m["latent_dim"] + (m.get("top_latent_dim") or 0), "seconds": seconds,
            "stochastic_layers": m.get("stochastic_layers", 1),
            **{key: m[f"ais_{key}"] for key in ("temperatures", "chains", "leapfrog_steps", "initial", "schedule")},
            "references": [vars(ref) for ref in datasets.estimator_references(m["dataset"])]}


# How the execution went, as far as the report knows when nothing is recorded (tracking off, or the runs
# are not in the store): the templates say "not recorded" (or "-", or leave the sentence out).
NOT_RECORDED = {"run_id": None, "training_run_id": None, "tracking_uri": None, "train_seconds": None,
                "evaluate_seconds": None, "ais_seconds": None, "resumed_from_passes": [], "sweep_train_seconds": {}}


def _metric(run: Any, key: str) -> float | None:
    value = run.data.metrics.get(key) if run is not None else None
    return float(value) if value is not None else None


def execution_record(params: Params) -> dict:
    """How the pipeline execution behind ``<paths.reports>/metrics.json`` went, read from its MLflow
    runs (no DVC output records it, so that two identical executions write identical files; the
    report's own files are the one exception): ``run_id`` (the run the evaluate stage logged that
    ``metrics.json`` to, :func:`vae.tracking.evaluation_run_id`), ``training_run_id`` (the run that
    trained the model: the same run, or its parent for a re-evaluation), ``tracking_uri``
    (credentials masked), the wall times in seconds ``train_seconds``, ``evaluate_seconds`` and
    ``ais_seconds`` (metrics of those runs), ``resumed_from_passes`` (the passes training resumed
    after, :data:`vae.tracking.RESUMED_TAG`) and ``sweep_train_seconds`` (``{member: seconds}`` of
    the latent-size sweep's members, :func:`vae.sweep.member_runs`). What is not recorded (tracking
    off, runs not in the store, no ``metrics.json``) is as in :data:`NOT_RECORDED`.

    Raises:
        TrackingError: the tracking store cannot be reached.
    """
    from vae import sweep as latent_sweep

    metrics_path = Path(params.paths.metrics)
    if not tracking.enabled() or not metrics_path.is_file():
        return dict(NOT_RECORDED)
    evaluated = tracking.read_run(tracking.evaluation_run_id(metrics_path))
    if evaluated is None:
        trained = None
    else:
        training_run_id = tracking.trained_run_of(evaluated)
        trained = evaluated if training_run_id == evaluated.info.run_id else tracking.read_run(training_run_id)
    resumed = (trained.data.tags.get(tracking.RESUMED_TAG) or "") if trained is not None else ""
    seconds = {}
    for member, run_id in latent_sweep.member_runs(params).items():
        seconds[member] = _metric(tracking.read_run(run_id), "train_seconds")
    return {**NOT_RECORDED,
            "run_id": evaluated.info.run_id if evaluated is not None else None,
            "training_run_id": trained.info.run_id if trained is not None else None,
            "tracking_uri": tracking.tracking_uri() if evaluated is not None else None,
            "train_seconds": _metric(trained, "train_seconds"),
            "evaluate_seconds": _metric(evaluated, "evaluate_seconds"),
            "ais_seconds": _metric(evaluated, "ais_seconds"),
            "resumed_from_passes": [int(p) for p in resumed.split(",") if p.strip().isdigit()],
            "sweep_train_seconds": {member: value for member, value in seconds.items() if value is not None}}


def build_context(params: Params, metrics: dict, summary: dict, figures_dir: Path,
                  execution: dict | None = None) -> dict:
    """Everything the templates show, as plain data (numbers, names, flags and lists of them; the
    sentences are the templates'): ``data`` (the dataset as the registry :mod:`vae.datasets`
    describes it, and this run's split sizes), ``model``, ``training`` (:func:`_training_data`),
    ``run``, ``evaluation``, ``results`` (nats per example), ``references`` (the registry's
    published numbers for this dataset and binarization), ``tightness`` (:func:`tightness_context`),
    ``figures`` and ``figure_members``
    (:func:`_figures`), ``projection``, ``sweep`` and ``sweep_missing`` (:func:`sweep_section`),
    ``provenance``, ``params_yaml`` and ``generated`` (UTC). How the execution went (wall times,
    resumptions, MLflow runs) comes from ``execution`` (:func:`execution_record`; None: not
    recorded, :data:`NOT_RECORDED`), never from the DVC-tracked inputs.

    Raises:
        VaeError: a figure, ``figure_members.json`` or ``sweep_results.csv`` is damaged (names the file).
        ConfigError: ``metrics.json`` names a dataset the registry does not know.
    """
    m = metrics
    execution = {**NOT_RECORDED, **(execution or {})}
    entry = datasets.get(m["dataset"])
    variant = entry.variants.get(m["binarization"])
    data = {
        "name": entry.name, "title": entry.title, "binarization": m["binarization"],
        "labelled": bool(variant and variant.labelled),
        "likelihood": variant.likelihood if variant else summary.get("likelihood", "bernoulli"),
        "fixed_test": entry.fixed_test, "train_examples": summary["train_examples"],
        "test_examples": m["test_examples"],
        # A test set drawn from the data (not the upstream one) depends on the split's seed.
        "split_seed": None if entry.fixed_test else params.data.split_seed,
        "split_order": params.data.split_order,
        "valid_examples": params.data.validation_size if params.data.validation_size is not None
        else entry.validation_size,
    }
    model = {"input_dim": summary.get("input_dim", entry.input_dim), "hidden_dim": m["hidden_dim"],
             "hidden_layers": m.get("hidden_layers") or 1, "latent_dim": m["latent_dim"],
             "likelihood": summary.get("likelihood", "bernoulli"), "stochastic_layers": m.get("stochastic_layers", 1),
             "top_latent_dim": m.get("top_latent_dim"), "top_hidden_dim": m.get("top_hidden_dim")}
    k = m["importance_samples"]
    results = {key: m[key] for key in ("test_log_likelihood", "test_log_likelihood_stderr", "train_log_likelihood",
                                       "train_log_likelihood_stderr", "train_test_gap", "test_elbo", "train_elbo",
                                       "valid_elbo", "active_units")}
    results["active_units_per_layer"] = m.get("active_units_per_layer")
    results["bound_curve"] = [(int(key), value) for key, value in m["bound_curve"].items() if int(key) != k]
    figures, figure_members = _figures(figures_dir)
    sweep, sweep_missing = sweep_section(params)
    if sweep:  # the members' wall times: their MLflow runs' ("-" where not recorded)
        sweep["rows"] = [{**row, "train_seconds": execution["sweep_train_seconds"].get(row["member"])}
                         for row in sweep["rows"]]
    commit = provenance.git_commit()
    return {
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "data": data, "model": model,
        "training": {**_training_data(summary, params), "resumed_from_passes": execution["resumed_from_passes"]},
        "run": {"profile": params.profile, "device": summary.get("device"),
                "software": summary.get("software"), "train_seconds": execution["train_seconds"]},
        "evaluation": {"importance_samples": k, "test_examples": m["test_examples"],
                       "train_examples": m["train_examples_evaluated"], "seconds": execution["evaluate_seconds"]},
        "results": results, "references": datasets.comparable(m["dataset"], m["binarization"]),
        "tightness": tightness_context(m, execution["ais_seconds"]),
        "figures": figures, "figure_members": figure_members, "projection": params.visualize.projection,
        "sweep": sweep, "sweep_missing": sweep_missing,
        "provenance": {
            # `dvc repro` rewrites dvc.lock stage by stage: that change is this run's record, not a change it used.
            "commit": commit, "dirty": provenance.git_dirty(ignore=("dvc.lock",)),
            "run_id": execution["run_id"], "training_run_id": execution["training_run_id"],
            "tracking_uri": execution["tracking_uri"],
            "stages": stage_digests(),
        },
        # The knobs that can change a result; not the operational ones, so that changing those re-runs nothing.
        "params_yaml": yaml.safe_dump(params.result_dict(), sort_keys=False).rstrip(),
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
    context = build_context(params, metrics, summary, paths.figures, execution_record(params))
    env = _environment()
    outputs = {"html": Path(paths.reports) / "report.html", "md": Path(paths.reports) / "report.md"}
    write_text(outputs["html"], env.get_template("report.html.j2").render(context))
    md_context = {**context, "figures": [{k: v for k, v in f.items() if k != "data"} for f in context["figures"]]}
    if context["sweep"]:
        figure = {k: v for k, v in context["sweep"]["figure"].items() if k != "data"}
        md_context["sweep"] = {**context["sweep"], "figure": figure}
    write_text(outputs["md"], env.get_template("report.md.j2").render(md_context))
    with tracking.run_of_output(paths.metrics, "report", tag=tracking.METRICS_TAG) as tracker:
        for path in outputs.values():
            tracker.log_artifact(path, "report")
    print(f"report: {outputs['html']}, {outputs['md']}", flush=True)
    return {name: str(path) for name, path in outputs.items()}
