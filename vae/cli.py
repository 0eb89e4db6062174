"""``vae <stage>``: the command-line entry point, one subcommand per DVC stage.

Each subcommand reads ``params.yaml`` (``--params`` to use another file), validates it, and
calls the stage's ``run`` function. The project's own errors print as one clear message without
a traceback and exit with status 1 (2 for bad parameters or usage).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator

from vae import __version__, datasets
from vae.errors import ConfigError, VaeError

STAGES = {  # name: (module, function, summary for `vae --help`, description for `vae STAGE --help`)
    # The data stages' descriptions name each dataset's files and splits: _data_help(), from the registry.
    "download": ("vae.stages", "download", "fetch and verify the dataset's files", None),
    "binarize": ("vae.stages", "binarize", "parse, split and binarize", None),
    "train": ("vae.train", "run", "train the VAE on the ELBO (or the IWAE bound)",
              "Train the VAE (maximise the SGVB ELBO, or the importance-weighted bound); write "
              "models/model.pt, the ELBO curves and train_summary.json; start the pipeline's MLflow run. "
              "Resumable: an interrupted run (Ctrl-C, kill) continues from models/train_state.pt when "
              "re-run with the same parameters and data."),
    "evaluate": ("vae.evaluate", "run", "importance-sampled test log-likelihood, ELBO, active units",
                 "Importance-sampled test log-likelihood L_k (k = evaluate.importance_samples), test "
                 "ELBO and active units into reports/metrics.json; register the model in MLflow."),
    "visualize": ("vae.visualize", "run", "draw the figures",
                  "Figures: prior samples, reconstructions, latent space, the 2-D manifold "
                  "(latent_dim = 2) and the ELBO curves, into reports/figures."),
    "report": ("vae.report", "run", "write the HTML and Markdown report",
               "reports/report.html (self-contained) and reports/report.md from the metrics and figures, "
               "with the latent-size sweep's figure and table (reports/sweep) once sweep-report has run."),
}

def _data_help() -> dict[str, str]:
    """The download and binarize stages' ``--help`` texts, from the dataset registry."""
    variants = [(entry, variant) for entry in datasets.DATASETS.values() for variant in entry.variants.values()]
    files = "; ".join(f"{entry.name} + {variant.binarization}: {', '.join(f.name for f in variant.source.files)}"
                      for entry, variant in variants)
    splits = "; ".join(f"{entry.title}: {entry.split}" for entry in datasets.DATASETS.values())
    kinds = "; ".join(f"{entry.name} + {variant.binarization}: {variant.description}" for entry, variant in variants)
    return {
        "download": f"Fetch the files of data.dataset and data.binarization ({files}) into paths.raw/<dataset>, "
                    "verified by the SHA-256 of their uncompressed content. Sources: the upstream hosts, or "
                    "$VAE_DATA_MIRROR (a folder or URL laid out as <mirror>/<source>/<file>, source being "
                    f"{', '.join(datasets.sources())}) when set. Verified files are not fetched again.",
        "binarize": "Parse the raw files and write train / valid / test splits to paths.processed/<dataset> "
                    f"({kinds}). Standard splits (data.validation_size and data.test_size null): {splits}.",
    }


EPILOG = """\
The stages run in this order; `dvc repro` runs them all and skips those that are up to date.
The sweep-* commands are the stages of AEVB Figure 2's latent-size sweep (params.yaml's sweep;
`uv run python -m flows sweep` runs its members in parallel on Dask).
`vae profile NAME` switches params.yaml to a named configuration (a paper's set-up) first;
`vae params` checks params.yaml and prints what it resolves to (`vae params --schema`: its JSON schema).
Environment: VAE_DATA_MIRROR (dataset mirror), MLFLOW_TRACKING_URI (default sqlite:///mlflow.db),
VAE_TRACKING=off (log nothing to MLflow).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae", description="Reproducible Auto-Encoding Variational Bayes: the pipeline's stages.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="parameters file (default: %(default)s)")
    common.add_argument("--no-progress", action="store_true", help="print per-epoch lines instead of progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    data_help = _data_help()
    for name, (_, _, summary, text) in STAGES.items():
        sub.add_parser(name, parents=[common], help=summary, description=text or data_help[name])
    sweep_data = sub.add_parser(
        "sweep-data", parents=[common], help="the sweep's data: download and binarize one dataset",
        description="Download and binarize DATASET into paths.raw/sweep and paths.processed/sweep with the "
                    "sweep's data settings (params.yaml sweep.settings.DATASET.data); stage sweep-data@DATASET.")
    sweep_data.add_argument("dataset", help=" or ".join(datasets.NAMES))
    member = sub.add_parser(
        "sweep-member", parents=[common], help="train and evaluate one member of the latent-size sweep",
        description="Train and evaluate one member of params.yaml's sweep (AEVB Figure 2): the defaults "
                    "with sweep.settings.DATASET on top, at this latent size, algorithm and seed, on "
                    "sweep.threads CPU threads; into models/sweep/MEMBER and reports/sweep/members/MEMBER, "
                    "logged to MLflow as a child of the sweep's run. Stage sweep-DATASET@LATENT_DIM-ALGORITHM-SEED.")
    member.add_argument("dataset", help=" or ".join(datasets.NAMES))
    member.add_argument("latent_dim", type=int, help="latent size N_z")
    member.add_argument("algorithm", help="aevb or wake-sleep")
    member.add_argument("seed", type=int, help="train.seed of the member")
    sub.add_parser(
        "sweep-report", parents=[common], help="the sweep's Figure 2 replica and results table",
        description="Read every member params.yaml's sweep declares and write reports/sweep/lower_bound_sweep.png "
                    "(one panel per dataset, AEVB solid and wake-sleep dashed per latent size, train bold and "
                    "test pale) and reports/sweep/sweep_results.csv (final ELBOs and L_k per member).")
    profile = sub.add_parser(
        "profile", help="switch params.yaml to a named configuration (quick, aevb-mnist, ...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rewrite params.yaml as a named configuration: the defaults plus the profile's "
                    "values (vae/profiles/NAME.yaml), keeping the file's comments. Without NAME, list "
                    "the profiles.",
        epilog="Then run it with `uv run dvc repro`, or shortened with e.g.\n"
               "  uv run dvc exp run -S train.training_samples=3000000\n"
               "Go back to the default with `vae profile quick`.")
    profile.add_argument("name", nargs="?", help="profile to switch to")
    profile.add_argument("--params", default="params.yaml", metavar="PATH",
                         help="parameters file to rewrite (default: %(default)s)")
    profile.add_argument("--show", action="store_true", help="print the profile's values, change nothing")
    params = sub.add_parser(
        "params", help="check params.yaml and print the resolved parameters (--schema: its JSON schema)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate the parameters file as every stage does (all problems in one message, exit\n"
                    "status 2) and print the parameters it resolves to, every default filled in, as YAML.\n\n"
                    "With --schema, print the JSON schema of params.yaml instead, generated from the typed\n"
                    "models of vae/config.py: types, allowed values, ranges and each knob's documentation.\n"
                    "The rules that involve several knobs (exactly one of train.epochs and\n"
                    "train.training_samples, the binarizations a dataset allows, the sweep's members, ...)\n"
                    "are checked by `vae params` and the stages, not by the schema.",
        epilog="Examples:\n"
               "  uv run vae params                         # check params.yaml, print it resolved\n"
               "  uv run vae params --params other.yaml\n"
               "  uv run vae params --schema > params.schema.json")
    params.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="parameters file to check (default: %(default)s)")
    params.add_argument("--schema", action="store_true",
                        help="print the JSON schema of params.yaml (JSON Schema 2020-12) and read no file")
    return parser


def profile_command(args: argparse.Namespace) -> None:
    """``vae profile [NAME]``: list the profiles, show one, or switch params.yaml to it."""
    from vae import profile

    if args.name is None:
        current = None
        try:
            from vae.config import load_params

            current = load_params(args.params).profile
        except VaeError:
            pass
        for name in profile.available():
            marker = "*" if name == current else " "
            print(f"{marker} {name:12s} {profile.load_profile(name).description}")
        return
    chosen = profile.load_profile(args.name)
    if args.show:
        import yaml

        print(f"# {chosen.description}")
        print(yaml.safe_dump(chosen.params().to_dict(), sort_keys=False), end="")
        return
    changes = profile.apply(args.name, args.params)
    print(f"{args.params}: profile {args.name} ({len(changes)} values changed)")
    for key, (old, new) in changes.items():
        print(f"  {key}: {old!r} -> {new!r}")


def params_command(args: argparse.Namespace) -> None:
    """``vae params [--schema]``: the JSON schema of params.yaml, or the file validated and resolved.

    Raises:
        ConfigError: the parameters file is missing, unreadable or invalid (every problem named).
    """
    from vae.config import Params, load_params

    if args.schema:
        import json

        print(json.dumps(Params.model_json_schema(), indent=2))
        return
    import yaml

    print(yaml.safe_dump(load_params(args.params).to_dict(), sort_keys=False), end="")


def sweep_command(args: argparse.Namespace, params, progress: bool) -> None:
    """``vae sweep-data | sweep-member | sweep-report``: the sweep's stages (:mod:`vae.sweep`)."""
    from vae import sweep
    from vae.config import find_member

    if args.stage == "sweep-data":
        sweep.run_data(params, args.dataset, progress=progress)
    elif args.stage == "sweep-member":
        member = find_member(params.sweep, args.dataset, args.latent_dim, args.algorithm, args.seed)
        sweep.run_member(params, member, progress=progress)
    else:
        sweep.run_report(params, progress=progress)


class MaskedStream:
    """A text stream that writes through to ``stream`` with URL credentials masked
    (:func:`vae.tracking.masked`): libraries print the tracking URI too (MLflow writes
    "View run ... at: <tracking URI>/#/..." to stdout whenever a run ends)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        from vae.tracking import masked

        self._stream.write(masked(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def masked_output() -> Iterator[None]:
    """Route ``sys.stdout`` and ``sys.stderr`` through :class:`MaskedStream` for the block."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = MaskedStream(sys.stdout), MaskedStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams


def main(argv: list[str] | None = None) -> int:
    """Run one stage. Returns the process exit status."""
    with masked_output():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    progress = not getattr(args, "no_progress", False) and sys.stderr.isatty()
    try:
        if args.stage == "profile":
            profile_command(args)
            return 0
        if args.stage == "params":
            params_command(args)
            return 0
        from vae.config import load_params

        params = load_params(args.params)
        if args.stage.startswith("sweep-"):
            sweep_command(args, params, progress)
            return 0
        module_name, function_name, _, _ = STAGES[args.stage]
        stage = getattr(importlib.import_module(module_name), function_name)
        stage(params, progress=progress)
    except ConfigError as error:
        print(f"vae {args.stage}: error: {error}", file=sys.stderr)
        return 2
    except VaeError as error:
        print(f"vae {args.stage}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vae {args.stage}: interrupted; no partial output was left at a final path", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
