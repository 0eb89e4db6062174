"""Benchmark: importance-sampled log-likelihood, the project's evaluator against a per-example loop.

Side by side in one run, on the same model and data:

- ``floor``: decoder FLOPs per importance sample over the measured float32 matrix-multiply rate
  (a 4096 x 4096 product), i.e. the time the decoder's two matrix products alone would take;
- ``project``: :func:`vae.objectives.importance_sampled_log_likelihood` at several memory budgets;
- ``per-example loop``: written like vae_vampprior's ``calculate_likelihood``: each test image
  expanded to chunks of 100 copies, the whole model run on each chunk (encoder included), the
  per-sample log-weights moved to the host and reduced with log-sum-exp at the end.

Rates are importance samples per second. Prints a table and writes it, with the machine, to
``benchmarks/evaluate_speed.results.md`` (or ``--output``).

    uv run python benchmarks/evaluate_speed.py                       # CPU, trained model if present
    uv run python benchmarks/evaluate_speed.py --device cuda --examples 2000 --loop-examples 50
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae import objectives  # noqa: E402
from vae.model import VAE, load_model  # noqa: E402
from results_file import prepend_entry  # noqa: E402  (beside this script)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, size: int = 4096, repeats: int = 5) -> float:
    """Measured float32 matrix-multiply rate in FLOP/s."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def decoder_flops(model: VAE) -> int:
    """Multiply-adds x 2 of the decoder's two matrix products, per importance sample."""
    return 2 * (model.latent_dim * model.hidden_dim + model.hidden_dim * model.input_dim)


@torch.no_grad()
def per_example_loop(model: VAE, x: torch.Tensor, k: int, chunk: int = 100) -> torch.Tensor:
    """L_k the way vae_vampprior's calculate_likelihood computes it: one image at a time."""
    results = []
    for j in range(len(x)):
        single = x[j : j + 1]
        weights = []
        for _ in range(max(1, k // chunk)):
            copies = single.expand(chunk, single.shape[1]).contiguous()
            mu, log_var = model.encode(copies)
            z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
            logits = model.decode(z)
            log_px = -F.binary_cross_entropy_with_logits(logits, copies, reduction="none").sum(1)
            log_w = log_px + objectives.standard_normal_log_prob(z) - objectives.gaussian_log_prob(z, mu, log_var)
            weights.append(log_w.cpu())
        weights = torch.cat(weights)
        results.append(torch.logsumexp(weights, 0) - math.log(len(weights)))
    return torch.stack(results)


def timed(function, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    started = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models/model.pt"),
                        help="trained model (default: %(default)s; a fresh 784-500-20 model if missing)")
    parser.add_argument("--data", default=str(ROOT / "data/processed/mnist/test.pt"),
                        help="binary test split (default: %(default)s; random binary images if missing)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--importance-samples", "-k", type=int, default=5000)
    parser.add_argument("--examples", type=int, default=200, help="images for the project's evaluator")
    parser.add_argument("--loop-examples", type=int, default=20, help="images for the per-example loop")
    parser.add_argument("--budgets", default="4,16,64,256", help="memory budgets (MB) to compare")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/evaluate_speed.results.md"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    if Path(args.checkpoint).is_file():
        model, model_name = load_model(args.checkpoint, device), Path(args.checkpoint).name
    else:
        model, model_name = VAE(784, 500, 20).to(device).eval(), "untrained 784-500-20"
    if Path(args.data).is_file():
        images = torch.load(args.data, weights_only=True)["images"].float()
        data_name = Path(args.data).name
    else:
        images = (torch.rand(max(args.examples, args.loop_examples), 784) < 0.15).float()
        data_name = "random binary images"
    x = images[: args.examples].to(device)
    k = args.importance_samples

    rate = matmul_rate(device)
    floor = rate / decoder_flops(model)  # importance samples per second
    rows = []
    loop_seconds, loop_values = timed(lambda: per_example_loop(model, x[: args.loop_examples], k), device)
    loop_rate = args.loop_examples * k / loop_seconds
    rows.append(("per-example loop (vae_vampprior style, 100 per chunk)", args.loop_examples, loop_seconds, loop_rate))
    project = {}
    for budget in sorted(float(b) for b in args.budgets.split(",")):
        pairs = model.pairs_for_budget(budget)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, estimate = timed(lambda: objectives.importance_sampled_log_likelihood(model, x, k, pairs, 0), device)
        # CUDA: peak allocated by torch; CPU: the process's peak resident memory so far
        # (budgets run in increasing order, so a rise shows that budget's working set).
        peak = (f", peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated"
                if device.type == "cuda" else
                f", process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
        project[budget] = estimate.log_likelihood
        rows.append((f"project, memory budget {budget:g} MB ({pairs} pairs per chunk{peak})",
                     len(x), seconds, len(x) * k / seconds))

    same = project[max(project)][: args.loop_examples].cpu()
    agreement = float((same - loop_values).abs().mean())
    reseeded = objectives.importance_sampled_log_likelihood(
        model, x[: args.loop_examples], k, model.pairs_for_budget(16), 1).log_likelihood.cpu()
    spread = float((same - reseeded).abs().mean())
    lines = [
        f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {device.type}: "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}"
        f", {torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        f"Model {model_name} ({model.input_dim}-{model.hidden_dim}-{model.latent_dim}), data {data_name}, "
        f"k = {k}. Matrix-multiply rate {rate / 1e9:.0f} GFLOP/s; decoder {decoder_flops(model) / 1e6:.2f} MFLOP "
        f"per sample; floor {floor:,.0f} samples/s.",
        "",
        "| method | images | seconds | samples/s | x per-example loop | x floor (time) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, count, seconds, samples_per_second in rows:
        lines.append(f"| {name} | {count} | {seconds:.2f} | {samples_per_second:,.0f} | "
                     f"{samples_per_second / loop_rate:.1f} | {floor / samples_per_second:.2f} |")
    lines += ["", f"Same quantity: on the same {args.loop_examples} images the loop's and the project's "
                  f"L_{k} differ by {agreement:.3f} nats on average (mean {float(loop_values.mean()):.2f} against "
                  f"{float(same.mean()):.2f}), while the project against itself with another seed differs by "
                  f"{spread:.3f}: Monte Carlo noise of per-image estimates.", ""]
    text = "\n".join(lines)
    print(text)
    prepend_entry(args.output, "# Evaluation benchmark results (newest first)", text)


if __name__ == "__main__":
    main()
