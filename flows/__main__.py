"""``python -m flows``: run a flow once, or serve both deployments from this process.

Without ``PREFECT_API_URL`` a run uses Prefect's temporary local server: nothing to set up.
With a server (``prefect server start``), runs and served deployments show in its UI.
A flow run never writes the work tree: it runs in a workspace of its own and is recorded as a DVC
experiment named after the flow run (:mod:`flows.workspace`).
"""

from __future__ import annotations

import argparse
import sys

from vae import datasets

DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00, as in prefect.yaml


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows",
        description="Prefect flows over the DVC pipeline. A flow run never writes the work tree: it runs in a "
                    "workspace of its own (a git worktree under .dvc/tmp/flow-workspaces, sharing the DVC cache) "
                    "and is recorded as a DVC experiment named after the flow run. `dvc exp show` lists them; "
                    "`dvc exp apply NAME` brings one into the work tree. SIGTERM or Ctrl-C stops a run at once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Deployments for a server and workers are declared in prefect.yaml: "
               "`prefect --no-prompt deploy --all` (see the README's Prefect section).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument("--epochs", type=int, help="train.epochs (clears train.training_samples)")
    overrides.add_argument("--latent-dim", type=int, help="model.latent_dim")
    overrides.add_argument("--dataset", choices=datasets.NAMES, help="data.dataset")
    overrides.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                           help="any other parameter, as `dvc exp run -S` takes it (repeatable)")
    overrides.add_argument("--repo", help="repository root (default: VAE_REPO, else the working directory)")
    pipeline = sub.add_parser("pipeline", parents=[overrides], help="run the vae-pipeline flow once",
                              description="Run every DVC stage as a Prefect task (up-to-date ones skipped).")
    pipeline.add_argument("--seed", type=int, help="train.seed")
    retrain = sub.add_parser("retrain", parents=[overrides], help="run the scheduled-retraining flow once",
                             description="Retrain with a new seed, evaluate, register, promote if better.")
    retrain.add_argument("--seed", type=int, help="train.seed (default: one above every seed used so far)")
    sweep = sub.add_parser(
        "sweep", help="run the vae-sweep flow once: the latent-size sweep's members in parallel on Dask",
        description="Run every changed member of params.yaml's sweep (AEVB Figure 2) as a task on Dask, "
                    "record them in dvc.lock with `dvc commit`, then the sweep-report stage and the report.",
        epilog="Sequentially, without Prefect or Dask: `uv run dvc repro sweep-report`.")
    sweep.add_argument("--workers", type=int, help="local Dask worker processes (default: CPU cores / sweep.threads)")
    sweep.add_argument("--address", help="a running Dask scheduler, e.g. tcp://host:8786 (its workers must see "
                                         "the repository at the same path)")
    sweep.add_argument("--no-report", action="store_true", help="stop after sweep-report (skip the main report)")
    sweep.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                       help="a parameter for this run, as `dvc exp run -S` takes it (repeatable)")
    sweep.add_argument("--repo", help="repository root (default: VAE_REPO, else the working directory)")
    serve = sub.add_parser("serve", help="serve both deployments from this process (needs a Prefect server)",
                           description="flow.serve alternative to prefect.yaml and a worker: registers "
                                       "vae-pipeline/manual and scheduled-retraining/weekly and runs them "
                                       "here until interrupted.")
    serve.add_argument("--cron", default=DEFAULT_CRON, help="retraining schedule (default: %(default)s)")
    serve.add_argument("--interval", type=float, help="retraining every this many seconds instead of --cron")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.pipeline import vae_pipeline
    from flows.retraining import scheduled_retraining

    if args.command == "serve":
        from prefect import serve

        schedule = {"interval": args.interval} if args.interval else {"cron": args.cron}
        serve(vae_pipeline.to_deployment(name="manual"),
              scheduled_retraining.to_deployment(name="weekly", **schedule),
              pause_on_shutdown=False)
        return 0
    if args.command == "sweep":
        from flows.sweep import vae_sweep

        return _run(vae_sweep, {"workers": args.workers, "address": args.address, "report": not args.no_report,
                                "set_params": args.set_param, "repo": args.repo},
                    lambda r: f"{len(r['ran'])} members ran, {len(r['restored'])} restored from DVC's run cache, "
                              f"{len(r['skipped'])} up to date in {r['seconds']} s; {r['results']} in DVC experiment "
                              f"{r['experiment']['name']}")
    common = {"epochs": args.epochs, "latent_dim": args.latent_dim, "dataset": args.dataset,
              "seed": args.seed, "set_params": args.set_param, "repo": args.repo}
    flow = vae_pipeline if args.command == "pipeline" else scheduled_retraining
    return _run(flow, common, lambda r: f"stages: {r['stages']}; recorded as DVC experiment {r['experiment']['name']} "
                                        f"(`dvc exp show`; `dvc exp apply {r['experiment']['name']}` brings it into "
                                        "the work tree)")


def _run(flow, parameters: dict, summary) -> int:
    """Run ``flow`` once; print its state and ``summary(result)``. Returns the exit status: 2 for
    bad parameters, 1 for another of the project's errors (printed without a traceback)."""
    from vae.errors import ConfigError, VaeError

    try:
        state = flow(**parameters, return_state=True)
        result = state.result()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except VaeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{flow.name}: {state.name}; {summary(result)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
