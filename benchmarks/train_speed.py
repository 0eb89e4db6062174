"""Benchmark: training throughput of the aevb-mnist model, the project's step against a DataLoader loop.

Side by side in one process, on the same data (the processed MNIST training split
``data/processed/mnist/train.pt`` if present, else a synthetic uint8 (50000, 784) tensor), the same
model (784-500-20 tanh MLPs, Bernoulli decoder, N(0, 0.01^2) initialisation) and the same optimizer
(Adagrad, step size 0.02, weight decay 1 / N as the aevb-mnist profile's MAP prior), batch 100, L = 1:

- ``project step``: :func:`vae.train.run_pass` on :class:`vae.train.TrainingData`, the code path of
  the train stage (the split held as one tensor, minibatches by indexing a permutation, dynamic
  binarization of the whole minibatch with one ``torch.bernoulli``, no DataLoader);
- ``reference DataLoader loop``: written the way pytorch/examples' ``vae/main.py`` trains: a
  torchvision-style Dataset whose ``__getitem__`` makes a PIL image of one uint8 image and applies
  ``transforms.ToTensor()`` and a per-item Bernoulli binarization ``transforms.Lambda``, a
  ``DataLoader(batch_size=100, shuffle=True)`` with 0 and with 2 worker processes (a fresh iterator
  per timed run, as per epoch there), the example's ``loss_function`` (sigmoid outputs,
  ``F.binary_cross_entropy(reduction='sum')`` + the closed-form KLD) on the same VAE module,
  ``torch.optim.Adagrad`` with PyTorch's default implementation, and ``loss.item()`` each step as
  the example accumulates its ``train_loss``;
- ``torch.compile``: the project's loop with the loss (encoder, reparameterization, decoder,
  Bernoulli log-likelihood, KL) compiled; 'n/a' when compilation fails or exceeds ``--compile-timeout``;
- ``matmul floor``: the model's matrix-multiply FLOPs per example (forward + backward, below) over
  this machine's float32 ``torch.mm`` rate on the model's own shapes (batch 100).

FLOPs per example: a Linear(in, out) costs 2 * in * out forward, 2 * in * out for its weight gradient
and 2 * in * out for its input gradient, except the first encoder layer, whose input (the data) needs
no gradient: 6 * sum(in * out) - 2 * 784 * 500 = 4.10 MFLOP for 784-500-(20, 20)-500-784 (3 x the
forward would be 4.88; biases, activations, the loss and the optimizer are not counted).

Each method is timed ``--repeats`` times on ``--examples`` examples after a warm-up; within each
repeat the methods and the matmul measurement take turns in slices of ``--slice`` examples
(a, b, c, floor, a, b, c, floor, ...), so that load from other processes hits all alike. The
medians are reported, and the best runs (the least disturbed) beside them: on a machine shared
with other busy processes, multi-threaded kernels slow down far more than single-threaded Python
work (a thread descheduled at each parallel region), so even interleaved medians then favour the
reference; ``--threads 1`` avoids that. Prints a table and writes it, with the machine, to ``benchmarks/train_speed.results.md``
(or ``--output``), newest first, with the top operators of a ``torch.profiler`` profile of the
project's step.

    uv run python benchmarks/train_speed.py                          # CPU here, 20000 examples x 3
    uv run python benchmarks/train_speed.py --device cuda --examples 50000
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tabulate import tabulate
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae import objectives  # noqa: E402
from vae.config import TrainConfig  # noqa: E402
from vae.data.splits import Split, load_split  # noqa: E402
from vae.devices import resolve_device  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.train import TrainingData, make_optimizer, run_pass  # noqa: E402
from results_file import prepend_entry  # noqa: E402  (beside this script)

INPUT, HIDDEN, LATENT, BATCH = 784, 500, 20, 100
LEARNING_RATE, INIT_STD = 0.02, 0.01


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- data

def load_data(path: Path) -> tuple[Split, str]:
    """The processed training split, or synthetic grey digits-sized images when it is missing."""
    if path.is_file():
        split = load_split(path)
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        kind = "binary" if split.binary else "grey"
        return split, f"real MNIST, {name} ({len(split)} images, {kind}, binarization {split.binarization})"
    images = torch.randint(0, 256, (50000, INPUT), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = Split(images=images, labels=torch.full((50000,), -1), binary=False, binarization="dynamic")
    return split, f"synthetic: uniform uint8 (50000, {INPUT}) tensor ({path} not found), dynamic binarization"


def binarize(x: torch.Tensor) -> torch.Tensor:
    """The per-item Bernoulli binarization of the reference's transform (a module-level function, so
    that worker processes can pickle it under any start method)."""
    return torch.bernoulli(x)


class GreyDigits(Dataset):
    """A torchvision-style dataset (like ``torchvision.datasets.MNIST``): uint8 images held as one
    array; ``__getitem__`` makes one PIL image and applies the per-item transform to it."""

    def __init__(self, split: Split) -> None:
        images = split.images if not split.binary else split.images * 255  # {0, 1} -> {0, 255}
        self.images = images.numpy().reshape(-1, 28, INPUT // 28)
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Lambda(binarize)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index], mode="L")
        return self.transform(image), 0


# ------------------------------------------------------------------------------------------ methods

def train_config(device: torch.device) -> TrainConfig:
    return TrainConfig(optimizer="adagrad", learning_rate=LEARNING_RATE, objective="elbo", samples=1,
                       map_prior=True, batch_size=BATCH, epochs=1, device=device.type)


class Fresh:
    """A model and optimizer from the same initial parameters for each method and each run."""

    def __init__(self, device: torch.device, train_examples: int) -> None:
        self.device, self.train_examples = device, train_examples
        model = VAE(input_dim=INPUT, hidden_dim=HIDDEN, latent_dim=LATENT)
        model.initialize_normal_(INIT_STD, torch.Generator().manual_seed(0))
        self.initial = {k: v.clone() for k, v in model.state_dict().items()}

    def __call__(self) -> tuple[VAE, torch.optim.Optimizer]:
        model = VAE(input_dim=INPUT, hidden_dim=HIDDEN, latent_dim=LATENT)
        model.load_state_dict(self.initial)
        model.to(self.device).train()
        optimizer = make_optimizer(train_config(self.device), model.parameters(), LEARNING_RATE,
                                   self.train_examples)
        return model, optimizer


def project_method(fresh: Fresh, data: TrainingData, config: TrainConfig) -> Callable[[int], None]:
    """(a) the train stage's own pass: ``run_pass`` over ``count`` examples (several passes if needed)."""
    model, optimizer = fresh()
    generator = torch.Generator(device=fresh.device).manual_seed(0)

    def run(count: int) -> None:
        while count > 0:
            step = min(count, len(data))
            run_pass(model, optimizer, data, step, config, generator)
            count -= step
    return run


def reference_method(fresh: Fresh, dataset: GreyDigits, workers: int) -> Callable[[int], None]:
    """(b) pytorch/examples' loop: DataLoader over per-item transforms (a new iterator, with its
    worker processes, per pass over the data, as per epoch there), the batch moved to the device,
    summed loss, ``loss.item()`` every step. Successive calls continue the same pass."""
    model, _ = fresh()
    # The optimizer as a user writes it (PyTorch's default implementation), same algorithm and settings.
    optimizer = torch.optim.Adagrad(model.parameters(), lr=LEARNING_RATE, weight_decay=1.0 / fresh.train_examples)
    device = fresh.device
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)
    state = {"batches": iter(loader), "train_loss": 0.0}

    def run(count: int) -> None:
        while count > 0:
            try:
                data, _ = next(state["batches"])
            except StopIteration:  # end of the epoch
                state["batches"], state["train_loss"] = iter(loader), 0.0
                continue
            data = data.to(device).view(-1, INPUT)
            optimizer.zero_grad()
            # pytorch/examples' forward and loss_function: sigmoid outputs, BCE(sum) + KLD.
            mu, logvar = model.encode(data)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            recon = torch.sigmoid(model.decode(z))
            bce = F.binary_cross_entropy(recon, data, reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = bce + kld
            loss.backward()
            state["train_loss"] += loss.item()
            optimizer.step()
            count -= len(data)
    return run


def compiled_loss(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Minus the mean single-sample ELBO with the noise given (the body of ``objectives.elbo``)."""
    mu, log_var = model.encode(x)
    z = mu + torch.exp(0.5 * log_var) * eps
    bound = objectives.bernoulli_log_prob(x, model.decode(z)) - objectives.gaussian_kl_divergence(mu, log_var)
    return -bound.mean()


def compiled_method(fresh: Fresh, data: TrainingData, config: TrainConfig) -> Callable[[int], None]:
    """(c) the project's loop (permutation, indexing, one Bernoulli draw per minibatch, Adagrad)
    with the loss compiled by ``torch.compile`` (its backward through AOTAutograd)."""
    model, optimizer = fresh()
    generator = torch.Generator(device=fresh.device).manual_seed(0)
    loss_fn = torch.compile(compiled_loss, dynamic=False)

    def run(count: int) -> None:
        while count > 0:
            n = min(count, len(data))
            order = torch.randperm(len(data), generator=generator, device=data.values.device)
            for start in range(0, n, config.batch_size):
                x = data.minibatch(order[start : min(start + config.batch_size, n)], generator)
                eps = torch.randn(x.shape[0], LATENT, generator=generator, device=x.device)
                loss = loss_fn(model, x, eps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            count -= n
    return run


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (Unix; no limit elsewhere)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"over {seconds:g} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------- floor

def layer_shapes() -> list[tuple[int, int]]:
    """(in, out) of every Linear of the 784-500-20 model: encoder, mean and log-variance heads, decoder."""
    return [(INPUT, HIDDEN), (HIDDEN, LATENT), (HIDDEN, LATENT), (LATENT, HIDDEN), (HIDDEN, INPUT)]


def flops_per_example() -> tuple[int, int]:
    """(forward, forward + backward) matrix-multiply FLOPs per example; see the module docstring."""
    forward = sum(2 * i * o for i, o in layer_shapes())
    first_input_grad = 2 * INPUT * HIDDEN  # the data needs no gradient
    return forward, 3 * forward - first_input_grad


class MatmulRate:
    """float32 ``torch.mm`` rate on the products of one training step of the two large layers
    (784 x 500 and 500 x 784) at batch 100: forward, weight gradient and input gradient."""

    def __init__(self, device: torch.device, repeats: int = 50) -> None:
        self.device, self.repeats = device, repeats
        g = torch.Generator().manual_seed(1)

        def r(*shape):
            return torch.randn(*shape, generator=g).to(device)
        x, h, w1, w2 = r(BATCH, INPUT), r(BATCH, HIDDEN), r(HIDDEN, INPUT), r(INPUT, HIDDEN)
        g1, g2 = r(BATCH, HIDDEN), r(BATCH, INPUT)
        self.products = [
            (x, w1.t()),    # encoder forward  (100, 784) x (784, 500)
            (g1.t(), x),    # encoder weight gradient  (500, 100) x (100, 784)
            (h, w2.t()),    # decoder forward  (100, 500) x (500, 784)
            (g2.t(), h),    # decoder weight gradient  (784, 100) x (100, 500)
            (g2, w2),       # decoder input gradient  (100, 784) x (784, 500)
        ]
        self.flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in self.products)
        self.measure()  # warm-up

    def measure(self, repeats: int | None = None) -> tuple[float, float]:
        """(FLOPs, seconds) of ``repeats`` rounds of the five products (default: about as long
        as the project's step takes for 2000 examples)."""
        repeats = repeats or self.repeats
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(repeats):
            for a, b in self.products:
                torch.mm(a, b)
        synchronize(self.device)
        return self.flops * repeats, time.perf_counter() - started


# -------------------------------------------------------------------------------------------- main

def timed(function: Callable[[int], None], count: int, device: torch.device) -> float:
    """Seconds taken by ``function(count)``."""
    synchronize(device)
    started = time.perf_counter()
    function(count)
    synchronize(device)
    return time.perf_counter() - started


def profile_project(fresh: Fresh, data: TrainingData, config: TrainConfig, device: torch.device,
                    steps: int = 50, top: int = 8, tries: int = 3) -> tuple[pd.DataFrame, float]:
    """Top operators by self time in ``steps`` project steps (per step, microseconds) and the
    profiled wall time per step, from the fastest of ``tries`` profiles."""
    from torch.profiler import ProfilerActivity, profile
    run = project_method(fresh, data, config)
    run(10 * BATCH)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    best = None
    for _ in range(tries):  # the least disturbed of a few profiles (other processes may load the machine)
        synchronize(device)
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            run(steps * BATCH)
            synchronize(device)
        wall = (time.perf_counter() - started) / steps * 1e6
        if best is None or wall < best[1]:
            best = prof, wall
    prof, wall = best
    use_cuda = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if use_cuda else event.self_cpu_time_total
        rows.append((event.key, event.count / steps, self_us / steps))
    frame = pd.DataFrame(rows, columns=["operator", "calls per step", "self us per step"])
    frame = frame.sort_values("self us per step", ascending=False)
    frame["share"] = frame["self us per step"] / frame["self us per step"].sum()
    return frame.head(top).reset_index(drop=True), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when available (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=20000,
                        help="training examples per timed run, a multiple of 100 (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (default: %(default)s)")
    parser.add_argument("--slice", type=int, default=2000,
                        help="examples per turn when interleaving the methods within a run, a multiple "
                             "of 100 (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2000, help="warm-up examples per method (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op threads (default: torch's own, {torch.get_num_threads()} here)")
    parser.add_argument("--data", default=str(ROOT / "data/processed/mnist/train.pt"),
                        help="processed training split (default: %(default)s; synthetic if missing)")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts of the reference (default: %(default)s)")
    parser.add_argument("--compile-timeout", type=float, default=120.0,
                        help="seconds allowed for torch.compile's warm-up; 0 skips it (default: %(default)s)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/train_speed.results.md"),
                        help="results file, newest first (default: %(default)s)")
    args = parser.parse_args()
    for option in ("examples", "slice"):
        if getattr(args, option) < BATCH or getattr(args, option) % BATCH:
            parser.error(f"--{option} {getattr(args, option)}: expected a positive multiple of {BATCH}")

    begun = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    split, data_name = load_data(Path(args.data))
    data = TrainingData(split, device)
    config = train_config(device)
    fresh = Fresh(device, len(data))
    dataset = GreyDigits(split)
    print(f"data: {data_name}; device {device}, {_threads()}, torch {torch.__version__}",
          flush=True)

    methods: dict[str, Callable[[int], None] | None] = {"project step (vae.train.run_pass)": project_method(
        fresh, data, config)}
    for workers in (int(w) for w in args.workers.split(",") if w.strip()):
        name = f"reference DataLoader loop (workers {workers})"
        try:
            method = reference_method(fresh, dataset, workers)
            method(args.warmup)
            methods[name] = method
        except Exception as error:  # e.g. worker processes not allowed here
            print(f"{name}: n/a ({type(error).__name__}: {error})", file=sys.stderr)
            methods[name] = None
    notes = []
    compile_name = "torch.compile (project loop, compiled loss)"
    if args.compile_timeout > 0:
        try:
            started = time.perf_counter()
            with time_limit(args.compile_timeout):
                method = compiled_method(fresh, data, config)
                method(args.warmup)
            compile_seconds = time.perf_counter() - started
            methods[compile_name] = method
            notes.append(f"torch.compile warm-up (compilation included) took {compile_seconds:.0f} s.")
        except Exception as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"{compile_name}: n/a ({reason})", file=sys.stderr)
            methods[compile_name] = None
            notes.append(f"torch.compile: n/a ({reason[:200]}).")
    else:
        methods[compile_name] = None
        notes.append("torch.compile: skipped (--compile-timeout 0).")
    for name, method in methods.items():
        if method is not None and not name.startswith(("reference", "torch.compile")):
            method(args.warmup)

    forward_flops, step_flops = flops_per_example()
    matmul = MatmulRate(device)
    # Each repeat times every method on --examples examples, in slices of --slice examples taken
    # in turn (a, b, c, floor, a, b, c, floor, ...), so that a burst of load from another process
    # falls on all of them.
    slices = [args.slice] * (args.examples // args.slice) + ([args.examples % args.slice] if args.examples % args.slice else [])
    rates: dict[str, list[float]] = {name: [] for name in methods}
    matmul_rates: list[float] = []
    for round_index in range(args.repeats):
        seconds = dict.fromkeys(methods, 0.0)
        flops = matmul_seconds = 0.0
        for size in slices:
            for name, method in methods.items():
                if method is not None:
                    seconds[name] += timed(method, size, device)
            done, took = matmul.measure(max(1, round(matmul.repeats * size / 2000)))
            flops, matmul_seconds = flops + done, matmul_seconds + took
        for name, method in methods.items():
            if method is not None:
                rates[name].append(args.examples / seconds[name])
        matmul_rates.append(flops / matmul_seconds)
        print(f"round {round_index + 1}/{args.repeats}: " + ", ".join(
            f"{name.split(' (')[0]}{' ' + name.split('(')[1].rstrip(')') if 'workers' in name else ''} "
            f"{values[-1]:,.0f}" for name, values in rates.items() if values)
            + f" examples/s, matmul {matmul_rates[-1] / 1e9:.0f} GFLOP/s", flush=True)

    rate = statistics.median(matmul_rates)
    floor = rate / step_flops
    medians = {name: statistics.median(values) if values else None for name, values in rates.items()}
    project_name = next(iter(methods))
    reference = medians.get("reference DataLoader loop (workers 0)") or next(
        (v for k, v in medians.items() if k.startswith("reference") and v), None)
    best = {name: max(values) if values else None for name, values in rates.items()}
    best_floor = max(matmul_rates) / step_flops
    best_reference = best.get("reference DataLoader loop (workers 0)")
    rows = []
    for name, value, top in [*((n, medians[n], best[n]) for n in medians),
                             ("matmul floor (FLOPs / torch.mm rate)", floor, best_floor)]:
        if value is None:
            rows.append((name, "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"))
            continue
        rows.append((name, f"{value:,.0f}", f"{value / reference:.2f}" if reference else "n/a",
                     f"{floor / value:.2f}", f"{top:,.0f}",
                     f"{top / best_reference:.2f}" if best_reference else "n/a", f"{best_floor / top:.2f}"))
    table = tabulate(rows, headers=["method", "examples/s (median)", "x reference (workers 0)", "floor / this",
                                    "best run: examples/s", "x reference", "floor / this"],
                     tablefmt="github", colalign=("left",) + ("right",) * 6)
    project = medians[project_name]
    speedup = project / reference if reference else float("nan")
    floor_ratio = floor / project

    profile_lines: list[str] = []
    if not args.no_profile:
        top, wall = profile_project(fresh, data, config, device)
        profile_lines = [
            f"torch.profiler, 50 project steps ({wall:,.0f} us per step under the profiler; "
            f"the floor is {BATCH * step_flops / rate * 1e6:,.0f} us): top operators by self "
            f"{'CUDA' if device.type == 'cuda' else 'CPU'} time per step:", "",
            tabulate([(r.operator, f"{r['calls per step']:g}", f"{r['self us per step']:,.0f}", f"{r.share:.0%}")
                      for _, r in top.iterrows()], headers=["operator", "calls/step", "self us/step", "share"],
                     tablefmt="github", colalign=("left", "right", "right", "right")), ""]

    elapsed = time.perf_counter() - begun
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} ({_cpu_model()})"
    lines = [
        f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {device.type}: {hardware}, "
        f"{_threads()}, torch {torch.__version__}",
        "",
        f"`{shlex.join(['uv', 'run', 'python', 'benchmarks/train_speed.py', *sys.argv[1:]])}` "
        f"({elapsed:.0f} s in all; 1-minute load average {load_before:.1f} at the start, {load_after:.1f} "
        f"at the end, on {os.cpu_count()} CPUs). Data: {data_name}. Model 784-500-20 tanh, Bernoulli decoder, Adagrad "
        f"lr {LEARNING_RATE:g}, weight decay 1/{len(data)}, batch {BATCH}, L = 1. Median of {args.repeats} "
        f"runs of {args.examples} examples each, the methods interleaved in slices of {args.slice}. Matrix-multiply FLOPs per example: forward "
        f"{forward_flops / 1e6:.2f} M, forward + backward {step_flops / 1e6:.2f} M; torch.mm rate on the "
        f"model's shapes {rate / 1e9:.0f} GFLOP/s (runs: {', '.join(f'{r / 1e9:.0f}' for r in matmul_rates)}).",
        "",
        table,
        "",
        f"Medians: project / reference (workers 0) {speedup:.2f}x (target >= 3); floor / project "
        f"{floor_ratio:.2f} (target <= 2). Best runs: "
        f"{best[project_name] / best_reference if best_reference else float('nan'):.2f}x and "
        f"{best_floor / best[project_name]:.2f}. Runs (examples/s): " + "; ".join(
            f"{name.split(' (')[0]}{' ' + name.split('(')[1].rstrip(')') if 'workers' in name else ''}: "
            + ", ".join(f"{v:,.0f}" for v in values) for name, values in rates.items() if values) + ".",
        *(["", " ".join(notes)] if notes else []),
        "",
        *profile_lines,
    ]
    text = "\n".join(lines)
    print(text)
    output = prepend_entry(args.output, "# Training benchmark results (newest first)", text)
    print(f"written to {output}")


def _threads() -> str:
    count = torch.get_num_threads()
    return f"{count} thread{'' if count == 1 else 's'}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
