"""Benchmark: what AEVB's Figure 3 costs, per algorithm, on the model of the experiment.

The Figure 3 model (AEVB Sec. 5 "Marginal likelihood"): 784-100-3 encoder and decoder (tanh),
N(0, 0.01) initialisation, Adagrad at 0.02, minibatches of 100. Side by side in one run, each
method timed in turns on the same data, so that a burst of load from another process falls on all:

- ``aevb``: :func:`vae.loop.run_pass` (estimator B, L = 1);
- ``wake-sleep``: the same with ``train.algorithm = wake-sleep``;
- ``mcem``: :func:`vae.mcem.mcem_round` per minibatch (App. E: 10 leapfrog steps, 5 weight updates);
- ``appendix D``: :func:`vae.mcmc.appendix_d_log_likelihood` per example, at its defaults (50
  samples: 10 chains, every 5th of 50 steps after 100 of burn-in, 4 leapfrog steps) and at a
  cheaper setting (``CHEAP``: 5 chains, burn-in 30, every 2nd step), the evaluation App. E runs
  at each point of the curve on 1000 training and 1000 test images.

Rates are training examples per second (a minibatch round counts its 100 examples once, for MCEM
too) and evaluated images per second. The table gives the time of 10^5 training examples and of
one curve point on 1000 + 1000 images, to size the quick and full runs of Figure 3. Prints the
table and writes it, with the machine, to ``benchmarks/figure3_costs.results.md`` (or ``--output``).

    uv run python benchmarks/figure3_costs.py            # about a minute on the 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae import mcem, mcmc  # noqa: E402
from vae.config import TrainConfig  # noqa: E402
from vae.data.splits import Split, load_split  # noqa: E402
from vae.loop import TrainingData, run_pass  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.train import make_optimizer  # noqa: E402
from results_file import prepend_entry  # noqa: E402  (beside this script)

HIDDEN, LATENT, BATCH, LEARNING_RATE, INIT_STD = 100, 3, 100, 0.02, 0.01
CHEAP = {"chains": 5, "burn_in": 30, "thin": 2}


def load_data(path: Path) -> tuple[Split, str]:
    """The processed MNIST training split, or binary images drawn from a fixed random mean image."""
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if path.is_file():
        return load_split(path), f"real MNIST ({name})"
    g = torch.Generator().manual_seed(0)
    means = torch.rand(784, generator=g) ** 3
    images = (torch.rand(20000, 784, generator=g) < means).to(torch.uint8)
    return (Split(images=images, labels=torch.full((20000,), -1), binary=True, binarization="static"),
            f"synthetic binary images ({name} not found)")


def fresh_model(seed: int = 0) -> VAE:
    model = VAE(784, HIDDEN, LATENT)
    model.initialize_normal_(INIT_STD, torch.Generator().manual_seed(seed))
    return model


def training_method(algorithm: str, data: TrainingData) -> Callable[[int], None]:
    """A function training one fresh model ``count`` more examples per call."""
    config = TrainConfig(algorithm="wake-sleep" if algorithm == "wake-sleep" else "aevb", optimizer="adagrad",
                         learning_rate=LEARNING_RATE, batch_size=BATCH, device="cpu")
    model = fresh_model()
    optimizer = make_optimizer(config, model.parameters(), LEARNING_RATE, len(data))
    generator = torch.Generator().manual_seed(1)
    if algorithm != "mcem":
        return lambda count: run_pass(model, optimizer, data, count, config, generator)
    chains = mcem.PersistentChains.start(len(data), LATENT, torch.Generator().manual_seed(2))

    def mcem_examples(count: int) -> None:
        order = torch.randperm(len(data), generator=generator)[:count]
        for start in range(0, count, BATCH):
            index = order[start : start + BATCH]
            mcem.mcem_round(model, optimizer, data.minibatch(index, generator), chains, index, generator)
    return mcem_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4000, help="training examples per timed turn (default: %(default)s)")
    parser.add_argument("--images", type=int, default=40, help="images per timed App. D turn (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="turns per method (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--data", default=str(ROOT / "data/processed/mnist/train.pt"),
                        help="processed training split (default: %(default)s; synthetic if missing)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/figure3_costs.results.md"),
                        help="results file, newest first (default: %(default)s)")
    args = parser.parse_args()
    if args.examples < BATCH or args.examples % BATCH:
        parser.error(f"--examples {args.examples}: expected a positive multiple of {BATCH}")
    if args.threads:
        torch.set_num_threads(args.threads)
    split, data_name = load_data(Path(args.data))
    data = TrainingData(split, torch.device("cpu"))
    images = split.values(torch.Generator().manual_seed(3))[: args.images]
    trained = fresh_model()  # App. D's cost hardly depends on the weights; an untrained decoder will do
    methods: dict[str, tuple[Callable[[], None], int, str]] = {}
    for algorithm in ("aevb", "wake-sleep", "mcem"):
        train = training_method(algorithm, data)
        train(BATCH)  # warm-up
        methods[algorithm] = ((lambda train=train: train(args.examples)), args.examples, "train")
    for name, options in (("appendix D (defaults)", {}), ("appendix D (cheaper)", CHEAP)):
        def evaluate(options=options) -> None:
            mcmc.appendix_d_log_likelihood(trained, images, 50, **options)
        methods[name] = (evaluate, args.images, "evaluate")
    seconds = dict.fromkeys(methods, 0.0)
    for _ in range(args.repeats):
        for name, (method, _, _) in methods.items():
            started = time.perf_counter()
            method()
            seconds[name] += time.perf_counter() - started
    rows = []
    aevb_rate = args.repeats * args.examples / seconds["aevb"]
    for name, (_, count, kind) in methods.items():
        rate = args.repeats * count / seconds[name]
        if kind == "train":
            rows.append([name, f"{rate:,.0f} examples/s", f"{1e5 / rate:,.1f} s per 10^5 examples",
                         f"{aevb_rate / rate:.1f}x aevb's time"])
        else:
            rows.append([name, f"{rate:,.1f} images/s", f"{2000 / rate:,.0f} s per curve point (1000 + 1000 images)",
                         ""])
    table = tabulate(rows, headers=["method", "rate", "what it costs", "ratio"], tablefmt="github")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    print(f"data: {data_name}; {machine}\n{table}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = (f"## {stamp}\n\n{machine}; data: {data_name}; {args.repeats} turns of {args.examples} examples "
             f"and {args.images} images per method.\n\n{table}\n")
    path = prepend_entry(args.output, "# AEVB Figure 3: costs per algorithm (benchmarks/figure3_costs.py)", entry)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
