"""Benchmark: annealed importance sampling, the project's AIS against a per-example autograd reference.

Side by side in one run, on the same model, data and settings (temperatures, chains, leapfrog
steps, initial distribution, step-size rule):

- ``floor``: the decoder's forward plus backward-to-input matrix products of one leapfrog step
  (:func:`leapfrog_flops`) over the measured float32 matrix-multiply rate, i.e. the time the
  matrix products alone would take. The rate is measured twice: as ``evaluate_speed.py`` does (a
  4096 x 4096 product) and at the shapes the decoder actually multiplies, (pairs x latent) @
  (latent x hidden) ... (pairs x hidden) @ (hidden x D) and back (:func:`decoder_matmul_rate`);
  the latter is the best of short bursts before and after the timed runs. The floor uses the
  decoder-shaped rate when it is below the 4096 one by more than ``RATE_MISMATCH`` (1.5x), since
  that is the rate attainable for this work, or above it (a floor the decoder's own products can
  beat is no floor); else the 4096 one. The ratio to the other rate's floor is printed beside;
- ``project``: :func:`vae.mcmc.ais`, all (example, chain) pairs of a chunk advanced together with
  the closed-form gradient ``VAE.decoder_log_prob_and_grad``, chunks sized by
  ``--memory-budget-mb`` (:func:`vae.mcmc.pairs_for_budget`);
- ``reference``: :func:`reference_ais`, written the way the public PyTorch BDMC code does it
  (lxuechen/BDMC, ``ais.py: ais_trajectory`` and ``hmc.py: hmc_trajectory, accept_reject``): one
  example's chains at a time (``--reference-batch`` examples; BDMC's own ``main`` batches 100),
  the example repeated once per chain, the gradient of log f_b by ``torch.autograd.grad`` through
  the model's ordinary forward (``model.decoder_log_prob`` with autograd on) at every leapfrog
  step, a plain leapfrog trajectory and Metropolis test, and the project's step-size rule
  (Wu et al. 2017's moving average; BDMC's own rule uses the cumulative acceptance instead).

Rates are leapfrog steps x chains per second: (T - 1) HMC transitions (none after the last
temperature) x leapfrog steps x chains x examples, over the wall-clock time. The two estimators
are the same algorithm in distribution, so on the same images their AIS estimates must agree
within Monte Carlo error; the run checks that too. Targets on the 2-core CPU: the project at
least ``TARGET_SPEEDUP`` (3x) the reference's rate and within ``TARGET_FLOOR`` (2x) of the
floor's time. Prints a table and writes it, with the machine, to
``benchmarks/ais_speed.results.md`` (or ``--output``).

    uv run python benchmarks/ais_speed.py                      # CPU, trained model if present (35-90 s)
    uv run python benchmarks/ais_speed.py --temperatures 1000 --examples 100 --reference-examples 2
    uv run python benchmarks/ais_speed.py --device cuda --examples 1000 --memory-budget-mb 256
    uv run python benchmarks/ais_speed.py --profile            # also: where the project's time goes
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae import mcmc  # noqa: E402
from vae.data.splits import load_split  # noqa: E402
from vae.model import VAE, load_model  # noqa: E402
from vae.objectives import gaussian_log_prob, standard_normal_log_prob  # noqa: E402
from evaluate_speed import matmul_rate, synchronize, timed  # noqa: E402  (beside this script)
from results_file import prepend_entry  # noqa: E402  (beside this script)

TARGET_SPEEDUP = 3.0  # the project's rate over the reference's, at least
TARGET_FLOOR = 2.0  # the project's time over the floor's, at most
RATE_MISMATCH = 1.5  # decoder-shaped rate below the 4096^2 one by more than this: the floor uses it
AGREEMENT_SE = 3.0  # the two estimates' mean difference is allowed 3 standard errors (about 0.3% by chance)


# --------------------------------------------------------------------------------------------
# The floor
# --------------------------------------------------------------------------------------------


def decoder_matrices(model: VAE) -> list[tuple[int, int]]:
    """(inputs, outputs) of each of the decoder's weight matrices, in forward order: the hidden
    layers', the means' head and, for the Gaussian decoder, the log-variance head."""
    sizes = [(model.latent_dim, model.hidden_dim)]
    sizes += [(model.hidden_dim, model.hidden_dim)] * (model.hidden_layers - 1)
    sizes += [(model.hidden_dim, model.input_dim)] * (2 if model.likelihood == "gaussian" else 1)
    return sizes


def leapfrog_flops(model: VAE) -> int:
    """Matrix-product FLOPs of one leapfrog step of one chain: log p(x|z) and its gradient in z.

    Forward, 2 x (multiply-adds) per matrix: 2 (latent hidden + (layers - 1) hidden^2 + hidden D),
    plus 2 hidden D for the Gaussian decoder's log-variance head; the backward to the input (not
    to the weights) multiplies by each matrix once more, the same count. For the 784-500-20
    Bernoulli decoder: 4 (20 x 500 + 500 x 784) = 1.61 MFLOP.
    """
    return 2 * sum(2 * inputs * outputs for inputs, outputs in decoder_matrices(model))


def decoder_matmul_rate(model: VAE, pairs: int, device: torch.device, repeats: int = 10, bursts: int = 5) -> float:
    """Measured FLOP/s of the decoder's own matrix products at ``pairs`` (example, chain) rows:
    for every weight matrix W (outputs x inputs), the forward (pairs x inputs) @ W^T and the
    backward-to-input (pairs x outputs) @ W, in the model's dtype, nothing else. The best of
    ``bursts`` bursts of ``repeats`` leapfrog steps' products: the attainable rate, not one
    that another process on the machine happened to interrupt."""
    dtype = next(model.parameters()).dtype
    weights = [torch.randn(outputs, inputs, device=device, dtype=dtype) / math.sqrt(inputs)
               for inputs, outputs in decoder_matrices(model)]
    forward_inputs = [torch.randn(pairs, w.shape[1], device=device, dtype=dtype) for w in weights]
    backward_inputs = [torch.randn(pairs, w.shape[0], device=device, dtype=dtype) for w in weights]

    def step() -> None:
        for w, a, g in zip(weights, forward_inputs, backward_inputs, strict=True):
            a @ w.t()
            g @ w

    for _ in range(3):
        step()
    best = math.inf
    for _ in range(bursts):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return leapfrog_flops(model) * pairs * repeats / best


# --------------------------------------------------------------------------------------------
# The reference: AIS the way the public PyTorch BDMC code does it
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_ais(model: VAE, x: torch.Tensor, betas: torch.Tensor, *, chains: int = 16, leapfrog_steps: int = 10,
                  initial: str = "encoder", target_acceptance: float = 0.65, seed: int = 0,
                  batch: int = 1) -> torch.Tensor:
    """AIS log-weights written like lxuechen/BDMC's ``ais_trajectory`` + ``hmc_trajectory`` +
    ``accept_reject``, ``batch`` examples at a time.

    Per batch: the examples repeated ``chains`` times (BDMC's ``safe_repeat``), z_0 ~ p0 (the prior,
    or q(z|x) for ``initial="encoder"``), per-chain step sizes from 0.01; for each pair of
    consecutive inverse temperatures (b_{t-1}, b_t): log w += log f_{b_t}(z) - log f_{b_{t-1}}(z)
    (two evaluations, as BDMC does), then, except after the last, one HMC trajectory on
    U = -log f_{b_t}: v -= eps/2 grad U(z); L times {z += eps v; v -= eps grad U(z), but eps/2 the
    last time}: L + 1 gradients by ``torch.autograd.grad`` (BDMC recomputes the one at the start;
    it also clamps them, a no-op kept here), then Metropolis on H = U + |v|^2 / 2 (U of both ends
    evaluated afresh) and the step-size update. Differences from BDMC, each in the reference's
    favour or for a like-for-like comparison: evaluations that need no gradient run under
    ``torch.no_grad`` (BDMC builds a graph for them); no transition after the last temperature
    (its weight is already final); f_b has the encoder's q(z|x) as p0 when asked; the step size
    moves by Wu et al.'s moving-average rule, the project's. Its own noise stream (seeded).

    Args:
        x: (N, D) data; betas: (T + 1,) inverse temperatures from 0 to 1.
    Returns:
        log-weights (chains, N), float64, nats.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    beta_values = betas.tolist()
    results = []
    for start in range(0, len(x), batch):
        rows = x[start : start + batch]
        n = len(rows)
        data = rows.repeat(chains, 1)  # (chains * n, D), row c * n + i is example i
        pairs = len(data)
        if initial == "encoder":
            mean, log_var = model.encode(data)
        else:
            mean = log_var = torch.zeros(pairs, model.latent_dim, device=x.device, dtype=x.dtype)

        def log_f(z: torch.Tensor, beta: float) -> torch.Tensor:
            """log f_b(z) = (1 - b) log p0(z) + b log p(x, z), (pairs,)."""
            log_prior = standard_normal_log_prob(z)
            log_initial = gaussian_log_prob(z, mean, log_var) if initial == "encoder" else log_prior
            return (1.0 - beta) * log_initial + beta * (log_prior + model.decoder_log_prob(data, z))

        def grad_U(z: torch.Tensor, beta: float) -> torch.Tensor:
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(-log_f(z, beta), z, grad_outputs=torch.ones_like(z[:, 0]))
            bound = pairs * model.latent_dim * 100  # BDMC's "clip by norm"
            return grad.clamp(-bound, bound)

        epsilon = torch.full((pairs,), mcmc.STEP_SIZE, device=x.device, dtype=x.dtype)
        average = torch.full((pairs,), target_acceptance, device=x.device, dtype=x.dtype)
        eps0 = torch.randn(pairs, model.latent_dim, generator=generator, device=x.device, dtype=x.dtype)
        current_z = mean + torch.exp(0.5 * log_var) * eps0
        logw = torch.zeros(pairs, device=x.device, dtype=torch.float64)
        for t in range(1, len(beta_values)):
            t0, t1 = beta_values[t - 1], beta_values[t]
            logw += (log_f(current_z, t1) - log_f(current_z, t0)).double()
            if t == len(beta_values) - 1:
                break
            current_v = torch.randn(current_z.shape, generator=generator, device=x.device, dtype=x.dtype)
            eps = epsilon.view(-1, 1)
            z = current_z
            v = current_v - 0.5 * eps * grad_U(z, t1)
            for i in range(1, leapfrog_steps + 1):
                z = z + eps * v
                if i < leapfrog_steps:
                    v = v - eps * grad_U(z, t1)
            v = v - 0.5 * eps * grad_U(z, t1)
            current_h = -log_f(current_z, t1) + 0.5 * current_v.pow(2).sum(1)
            proposed_h = -log_f(z, t1) + 0.5 * v.pow(2).sum(1)
            uniform = torch.rand(pairs, generator=generator, device=x.device, dtype=x.dtype)
            accept = torch.exp(current_h - proposed_h) > uniform
            current_z = torch.where(accept.view(-1, 1), z, current_z)
            average = mcmc.ACCEPTANCE_SLOWNESS * average + (1 - mcmc.ACCEPTANCE_SLOWNESS) * accept.to(x.dtype)
            adapt = torch.where(average > target_acceptance, mcmc.STEP_SIZE_INCREASE, mcmc.STEP_SIZE_DECREASE)
            epsilon = (epsilon * adapt).clamp(mcmc.STEP_SIZE_MIN, mcmc.STEP_SIZE_MAX)
        results.append(logw.view(chains, n))
    return torch.cat(results, dim=1)


# --------------------------------------------------------------------------------------------
# Monte Carlo error, profile
# --------------------------------------------------------------------------------------------


def log_mean_exp_variance(log_weights: torch.Tensor) -> torch.Tensor:
    """Delta-method variance of each example's log-mean-exp of C chains' weights, (N,):
    Var[log mean w] ~= Var[w] / (C E[w]^2), from log_weights (C, N) (scaled by each max; C >= 2)."""
    weights = torch.exp(log_weights - log_weights.max(0).values).double()
    return weights.var(0) / (len(weights) * weights.mean(0) ** 2)


def profile_project(model: VAE, x: torch.Tensor, device: torch.device, temperatures: int, **settings) -> str:
    """torch.profiler's table of the operators taking the project's time in a short AIS run."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        mcmc.ais(model, x, temperatures, **settings)
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def load_inputs(args: argparse.Namespace, device: torch.device) -> tuple[VAE, str, torch.Tensor, str]:
    torch.manual_seed(0)
    if Path(args.checkpoint).is_file():
        model, model_name = load_model(args.checkpoint, device), Path(args.checkpoint).name
    else:
        model, model_name = VAE(784, 500, 20).to(device).eval(), "UNTRAINED 784-500-20 (no checkpoint found)"
    needed = max(args.examples, args.reference_examples)
    generator = torch.Generator().manual_seed(0)
    if Path(args.data).is_file():
        images = load_split(args.data).values(generator=generator)[:needed]
        data_name = Path(args.data).name
    else:
        images = (torch.rand(needed, model.input_dim, generator=generator) < 0.15).float()
        data_name = "random binary images (no test split found)"
    return model, model_name, images.to(device, next(model.parameters()).dtype), data_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models/model.pt"),
                        help="trained model (default: %(default)s; an untrained 784-500-20 model if missing)")
    parser.add_argument("--data", default=str(ROOT / "data/processed/mnist/test.pt"),
                        help="processed test split (default: %(default)s; random binary images if missing)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--temperatures", type=int, default=200,
                        help="T, intermediate distributions on the sigmoid schedule (default: %(default)s)")
    parser.add_argument("--chains", type=int, default=16, help="AIS chains per example (default: %(default)s)")
    parser.add_argument("--leapfrog-steps", type=int, default=10, help="per HMC trajectory (default: %(default)s)")
    parser.add_argument("--initial", default="encoder", choices=mcmc.INITIALS,
                        help="AIS's initial distribution p0 (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=32, help="images for the project's AIS (default: %(default)s)")
    parser.add_argument("--reference-examples", type=int, default=4,
                        help="images for the reference, the first of the project's (default: %(default)s)")
    parser.add_argument("--reference-batch", type=int, default=1,
                        help="examples the reference advances together (default: %(default)s, one example's chains)")
    parser.add_argument("--memory-budget-mb", type=float, default=16,
                        help="the project's chunk size, via vae.mcmc.pairs_for_budget (default: %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators of a short project run (not timed)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/ais_speed.results.md"),
                        help="results file, newest entry first (default: %(default)s)")
    args = parser.parse_args()
    if min(args.temperatures - 1, args.chains - 1, args.leapfrog_steps, args.examples, args.reference_examples,
           args.reference_batch) < 1:
        parser.error("--leapfrog-steps, --examples, --reference-examples and --reference-batch must be >= 1, "
                     "--temperatures and --chains >= 2")
    if args.reference_examples > args.examples:
        parser.error("--reference-examples: at most --examples (the reference runs on the project's first images)")

    device = torch.device(args.device)
    model, model_name, images, data_name = load_inputs(args, device)
    x, x_reference = images[: args.examples], images[: args.reference_examples]
    betas = mcmc.sigmoid_schedule(args.temperatures)
    settings = dict(chains=args.chains, leapfrog_steps=args.leapfrog_steps, initial=args.initial)
    max_pairs = mcmc.pairs_for_budget(model, args.memory_budget_mb)
    chunk_pairs = min(len(x), max(1, max_pairs // args.chains)) * args.chains
    steps_per_chain = (args.temperatures - 1) * args.leapfrog_steps

    load_before = os.getloadavg()[0]
    square_rate = matmul_rate(device)
    shaped_rate = decoder_matmul_rate(model, chunk_pairs, device)

    reference_seconds, reference_log_w = timed(lambda: reference_ais(
        model, x_reference, betas, seed=0, batch=args.reference_batch, **settings), device)
    reference_rate = len(x_reference) * args.chains * steps_per_chain / reference_seconds
    project_seconds, project = timed(lambda: mcmc.ais(model, x, betas, seed=0, max_pairs=max_pairs, **settings),
                                     device)
    assert project.leapfrog_steps == steps_per_chain
    project_rate = len(x) * args.chains * steps_per_chain / project_seconds

    # Same quantity: per image the two log-mean-exps estimate the same E[log mean w] (one algorithm,
    # independent noise), so their mean difference over the images is zero up to Monte Carlo error.
    shared = len(x_reference)
    project_log_w = project.log_weights[:, :shared].cpu()
    reference_log_w = reference_log_w.cpu()
    reference_ll = mcmc.log_mean_exp(reference_log_w, dim=0)
    project_ll = mcmc.log_mean_exp(project_log_w, dim=0)
    difference = float((project_ll - reference_ll).mean())
    # The mean difference's standard error by the delta method from each run's log-weights (the runs
    # are independent, so the per-image variances add). The spread of the per-image differences over
    # sqrt(images) is printed beside it as a cross-check, not used: with a few images it is crude,
    # and a real, image-dependent discrepancy inflates it (hiding itself).
    stderr = math.sqrt(float((log_mean_exp_variance(project_log_w)
                              + log_mean_exp_variance(reference_log_w)).sum())) / shared
    spread_stderr = float((project_ll - reference_ll).std()) / math.sqrt(shared) if shared > 1 else math.nan
    agrees = abs(difference) <= AGREEMENT_SE * stderr

    # Measured again after the runs, the better kept: the floor is the attainable rate's.
    shaped_rate = max(shaped_rate, decoder_matmul_rate(model, chunk_pairs, device))
    use_shaped = shaped_rate > square_rate or square_rate / shaped_rate > RATE_MISMATCH
    rate = shaped_rate if use_shaped else square_rate
    why = ("the decoder-shaped one is the higher" if shaped_rate > square_rate else
           f"the decoder-shaped one is lower by {'more' if use_shaped else 'less'} than {RATE_MISMATCH:g}x")
    floor = rate / leapfrog_flops(model)  # leapfrog steps x chains per second
    load_after = os.getloadavg()[0]
    speedup, floor_ratio = project_rate / reference_rate, floor / project_rate
    other_ratio = (square_rate if use_shaped else shaped_rate) / leapfrog_flops(model) / project_rate
    rows = [
        (f"floor: decoder matrix products at {rate / 1e9:.1f} GFLOP/s ({'decoder-shaped' if use_shaped else '4096^2'})",
         "", f"{chunk_pairs}", "", floor),
        (f"reference (BDMC-style, autograd, {args.reference_batch} example(s) x {args.chains} chains at a time)",
         len(x_reference), f"{args.reference_batch * args.chains}", f"{reference_seconds:.2f}", reference_rate),
        (f"project vae.mcmc.ais (memory budget {args.memory_budget_mb:g} MB: up to {max_pairs} pairs per chunk)",
         len(x), f"{chunk_pairs}", f"{project_seconds:.2f}", project_rate),
    ]
    processor = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else platform.processor() or platform.machine())
    lines = [
        f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {device.type}: {processor}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        f"Model {model_name} ({model.input_dim}-{'-'.join([str(model.hidden_dim)] * model.hidden_layers)}-"
        f"{model.latent_dim}, {model.likelihood}), data {data_name}. AIS: T = {args.temperatures} sigmoid "
        f"temperatures, {args.chains} chains, {args.leapfrog_steps} leapfrog steps, initial {args.initial}: "
        f"{steps_per_chain} leapfrog steps per chain.",
        "",
        f"Matrix-multiply rate: {square_rate / 1e9:.1f} GFLOP/s at 4096 x 4096, {shaped_rate / 1e9:.1f} GFLOP/s "
        f"at the decoder's shapes with {chunk_pairs} pairs (forward and backward-to-input products, best of "
        f"10 bursts before and after the runs); the floor "
        f"uses the {'decoder-shaped' if use_shaped else '4096 x 4096'} rate ({why}). Decoder "
        f"{leapfrog_flops(model) / 1e6:.2f} MFLOP per leapfrog step per chain.",
        "",
        "| method | images | pairs per batch | seconds | leapfrog steps x chains / s | x reference | x floor (time) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, count, pairs, seconds, steps_per_second in rows:
        lines.append(f"| {name} | {count} | {pairs} | {seconds} | {steps_per_second:,.0f} | "
                     f"{steps_per_second / reference_rate:.1f} | {floor / steps_per_second:.2f} |")
    lines += [
        "",
        f"- Target: project >= {TARGET_SPEEDUP:g}x the reference: {'met' if speedup >= TARGET_SPEEDUP else 'MISSED'} "
        f"({speedup:.1f}x).",
        f"- Target: project within {TARGET_FLOOR:g}x of the floor: "
        f"{'met' if floor_ratio <= TARGET_FLOOR else 'MISSED'} ({floor_ratio:.2f}x the floor's time; "
        f"{other_ratio:.2f}x the {'4096 x 4096' if use_shaped else 'decoder-shaped'} rate's).",
        f"- Same quantity: on the same {shared} images the AIS estimates average {float(project_ll.mean()):.3f} "
        f"(project) and {float(reference_ll.mean()):.3f} (reference) nats; difference {difference:+.3f}, "
        f"Monte Carlo standard error {stderr:.3f} (delta method on both runs' {args.chains} log-weights per "
        f"image; the per-image differences' spread over sqrt({shared}) gives {spread_stderr:.3f}): "
        f"{'agree' if agrees else 'DISAGREE'} within {AGREEMENT_SE:g} standard errors. Mean acceptance rate "
        f"(project) {float(project.acceptance_rate.mean()):.2f}.",
        f"- Work counted: {args.leapfrog_steps} leapfrog steps per transition for both; the reference, as BDMC "
        f"does, evaluates {args.leapfrog_steps + 1} gradients and 4 forward passes per transition, the project "
        f"{args.leapfrog_steps} gradients. 1-minute load average {load_before:.2f} before, {load_after:.2f} "
        f"after (other processes on the machine slow both, the reference's many small operations most).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    prepend_entry(args.output, "# AIS benchmark results (newest first)", text)
    if args.profile:
        print(profile_project(model, x, device, min(args.temperatures, 20), max_pairs=max_pairs, **settings))


if __name__ == "__main__":
    main()
