"""The ``evaluate`` stage: importance-sampled test log-likelihood, test ELBO and active units.

Writes ``metrics.json`` (the pipeline's DVC metrics): the training summary merged with
L_k (``test_log_likelihood``, k = ``importance_samples``; Burda et al. 2016, Eq. 8), its standard
error over test examples, the test ELBO (estimator B, averaged over the same k samples) and the
number of active units (Burda et al. 2016, Sec. 5.2). All in nats per example. Then logs them to
the pipeline's MLflow run and registers the model as a new version of ``vae-<dataset>``.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from vae import objectives, tracking
from vae.config import Params
from vae.data.splits import load_split
from vae.devices import describe, resolve_device
from vae.io import read_json, write_json
from vae.model import VAE, load_model


def evaluate_model(model: VAE, x: torch.Tensor, importance_samples: int, memory_budget_mb: float,
                   seed: int, threshold: float = 1e-2, progress: bool = True) -> dict:
    """Evaluate ``model`` on binary data ``x`` (N, D) float on the model's device.

    Returns:
        ``log_likelihood`` (mean L_k), ``log_likelihood_stderr`` (standard error of that mean over
        examples), ``elbo``, ``active_units`` and ``unit_variances`` (list of A_u), in nats per example.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with tqdm(total=len(x), desc=f"evaluate (k={importance_samples})", unit="example",
              disable=not progress) as bar:
        estimate = objectives.importance_sampled_log_likelihood(
            model, x, importance_samples, model.pairs_for_budget(memory_budget_mb), generator, bar.update)
    with torch.no_grad():
        mu = torch.cat([model.encode(x[i : i + 10000])[0] for i in range(0, len(x), 10000)])
    active, variances = objectives.active_units(mu, threshold)
    ll = estimate.log_likelihood.double()
    stderr = float(ll.std(unbiased=True) / math.sqrt(len(ll))) if len(ll) > 1 else float("nan")
    return {"log_likelihood": float(ll.mean()), "log_likelihood_stderr": stderr,
            "elbo": float(estimate.elbo.double().mean()), "active_units": active,
            "unit_variances": [round(float(v), 6) for v in variances]}


def run(params: Params, progress: bool = True) -> dict:
    """Stage entry point: evaluate the checkpoint on the test split and write ``metrics.json``."""
    paths, config = params.paths, params.evaluate
    device = resolve_device(config.device)
    summary = read_json(paths.train_summary)
    model = load_model(paths.checkpoint, device)
    test = load_split(paths.processed_dir(params.data.dataset) / "test.pt")
    x = test.binarized(device=device)
    started = time.perf_counter()
    result = evaluate_model(model, x, config.importance_samples, config.memory_budget_mb, config.seed,
                            config.active_unit_threshold, progress)
    seconds = time.perf_counter() - started
    metrics = {
        "dataset": summary["dataset"], "binarization": summary["binarization"],
        "latent_dim": summary["latent_dim"], "hidden_dim": summary["hidden_dim"],
        "epochs": summary["epochs"], "importance_samples": config.importance_samples,
        "test_examples": len(x),
        "test_log_likelihood": round(result["log_likelihood"], 4),
        "test_log_likelihood_stderr": round(result["log_likelihood_stderr"], 4),
        "test_elbo": round(result["elbo"], 4),
        "train_elbo": round(summary["train_elbo"], 4), "valid_elbo": round(summary["valid_elbo"], 4),
        "active_units": result["active_units"],
        "train_seconds": summary["train_seconds"], "evaluate_seconds": round(seconds, 2),
    }
    write_json(paths.metrics, metrics)
    write_json(paths.unit_variances, {"threshold": config.active_unit_threshold,
                                      "unit_variances": result["unit_variances"]})
    print(f"test log-likelihood L_{config.importance_samples} = {metrics['test_log_likelihood']:.2f} "
          f"+- {metrics['test_log_likelihood_stderr']:.2f} nats, test ELBO {metrics['test_elbo']:.2f}, "
          f"{metrics['active_units']} active units ({seconds:.1f} s on {describe(device)})", flush=True)

    with tracking.resume_run(summary.get("mlflow_run_id"), "evaluate") as tracker:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in
                   ("latent_dim", "hidden_dim", "epochs", "importance_samples", "train_elbo", "valid_elbo",
                    "train_seconds")}
        tracker.log_metrics(numbers)
        tracker.log_params({"evaluate.importance_samples": config.importance_samples,
                            "evaluate.seed": config.seed, "evaluate.memory_budget_mb": config.memory_budget_mb})
        tracker.log_artifact(paths.metrics)
        version = tracker.log_model(
            model.cpu(), f"vae-{summary['dataset']}",
            {"test_log_likelihood": metrics["test_log_likelihood"],
             "test_log_likelihood_stderr": metrics["test_log_likelihood_stderr"],
             "importance_samples": config.importance_samples, "binarization": summary["binarization"],
             "latent_dim": summary["latent_dim"]})
        if version:
            print(f"MLflow: registered vae-{summary['dataset']} version {version}", flush=True)
    return metrics
