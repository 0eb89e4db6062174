"""The ``evaluate`` stage: importance-sampled log-likelihood on the test set and on training
images, the bound-tightness curve, the test ELBO and the active units.

Writes (paths under ``paths.reports``):

- ``metrics.json`` (DVC metrics): the training summary merged with L_k (``test_log_likelihood``,
  k = ``importance_samples``; Burda et al. 2016, Eq. 8) and its standard error over examples, the
  test ELBO (estimator B, averaged over the same k samples), L_k on ``train_examples`` training
  images (binarized once with a fixed seed) so that overfitting shows as a number, L_k' at each
  k' of the curve, and the number of active units (Burda et al. 2016, Sec. 5.2).
- ``bound_curve.csv`` (DVC plot): k, L_k and its standard error, test and train.
- ``log_likelihood_per_example.csv``: each evaluated example's L_k and ELBO (for the histogram).
- ``active_units.json``: the per-unit variances A_u.

All values in nats per example. Then logs them to the pipeline's MLflow run and registers the
model as a new version of ``vae-<dataset>``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from vae import objectives, registry, tracking
from vae.config import Params
from vae.data.splits import load_split
from vae.devices import describe, resolve_device
from vae.io import read_json, write_csv, write_json
from vae.model import VAE, load_model


@dataclass(frozen=True)
class SplitEvaluation:
    """One split's estimates: per-example tensors (N,) and the curve {k: (N,)}, nats."""

    log_likelihood: torch.Tensor
    elbo: torch.Tensor
    curve: dict[int, torch.Tensor]

    @staticmethod
    def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
        """Mean over examples and its standard error (sample std / sqrt(N); NaN for N = 1)."""
        values = values.double()
        stderr = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        return float(values.mean()), stderr


def evaluate_split(model: VAE, x: torch.Tensor, importance_samples: int, curve: list[int],
                   memory_budget_mb: float, seed: int, name: str, progress: bool = True) -> SplitEvaluation:
    """L_k, the ELBO and the curve for binary data ``x`` (N, D) on the model's device."""
    with tqdm(total=len(x), desc=f"{name} L_{importance_samples}", unit="example", disable=not progress) as bar:
        estimate = objectives.importance_sampled_log_likelihood(
            model, x, importance_samples, model.pairs_for_budget(memory_budget_mb), seed, curve, bar.update)
    return SplitEvaluation(estimate.log_likelihood.cpu(), estimate.elbo.cpu(),
                           {k: v.cpu() for k, v in estimate.curve.items()})


def _encode_means(model: VAE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.encode(x[i : i + 10000])[0] for i in range(0, len(x), 10000)])



def run(params: Params, progress: bool = True, *, register: bool = True) -> dict:
    """Stage entry point: evaluate the checkpoint; write the files listed in the module docstring.
    ``register=False`` (sweep members) logs the numbers but adds no model version to the registry."""
    paths, config = params.paths, params.evaluate
    device = resolve_device(config.device)
    summary = read_json(paths.train_summary)
    model = load_model(paths.checkpoint, device)
    folder = paths.processed_dir(params.data.dataset)
    test, train = load_split(folder / "test.pt"), load_split(folder / "train.pt")
    test_x = test.values(device=device)
    train_count = len(train) if config.train_examples is None else min(config.train_examples, len(train))
    fixed = torch.Generator(device=device).manual_seed(config.seed)
    train_x = train.values(generator=fixed, device=device)[:train_count]
    k, curve = config.importance_samples, config.curve

    started = time.perf_counter()
    results = {"test": evaluate_split(model, test_x, k, curve, config.memory_budget_mb, config.seed, "test", progress),
               "train": evaluate_split(model, train_x, k, curve, config.memory_budget_mb, config.seed + 1,
                                       "train", progress)}
    seconds = time.perf_counter() - started
    active, variances = objectives.active_units(_encode_means(model, test_x), config.active_unit_threshold)

    test_ll, test_se = SplitEvaluation.mean_and_stderr(results["test"].log_likelihood)
    train_ll, train_se = SplitEvaluation.mean_and_stderr(results["train"].log_likelihood)
    rows = []
    for value in curve:
        row = {"k": value}
        for split, result in results.items():
            mean, stderr = SplitEvaluation.mean_and_stderr(result.curve[value])
            row.update({f"{split}_log_likelihood": mean, f"{split}_stderr": stderr})
        rows.append(row)
    curve_frame = pd.DataFrame(rows)
    metrics = {
        **{key: summary.get(key) for key in ("profile", "dataset", "binarization", "likelihood", "input_dim", "latent_dim",
                                             "hidden_dim", "hidden_layers", "algorithm", "objective", "samples",
                                             "optimizer", "learning_rate", "batch_size", "epochs",
                                             "examples_seen")},
        "importance_samples": k, "test_examples": len(test_x),
        "test_log_likelihood": round(test_ll, 4), "test_log_likelihood_stderr": round(test_se, 4),
        "test_elbo": round(float(results["test"].elbo.double().mean()), 4),
        "train_examples_evaluated": train_count,
        "train_log_likelihood": round(train_ll, 4), "train_log_likelihood_stderr": round(train_se, 4),
        "train_test_gap": round(train_ll - test_ll, 4),
        "train_elbo": round(summary["train_elbo"], 4), "valid_elbo": round(summary["valid_elbo"], 4),
        "active_units": active,
        "bound_curve": {str(r["k"]): round(r["test_log_likelihood"], 4) for r in rows},
        "train_seconds": summary["train_seconds"], "evaluate_seconds": round(seconds, 2),
    }
    per_example = pd.concat([
        pd.DataFrame({"split": split, "index": range(len(result.log_likelihood)),
                      "log_likelihood": result.log_likelihood.numpy(), "elbo": result.elbo.numpy()})
        for split, result in results.items()])
    settings = {f"evaluate.{key}": value for key, value in vars(config).items()}
    with tracking.resume_run(summary.get("mlflow_run_id"), "evaluate", settings) as tracker:
        metrics["mlflow_run_id"] = tracker.run_id
        write_json(paths.metrics, metrics)
        write_csv(paths.bound_curve, curve_frame)
        write_csv(paths.per_example, per_example)
        write_json(paths.unit_variances, {"threshold": config.active_unit_threshold,
                                          "unit_variances": [round(float(v), 6) for v in variances]})
        pairs = (len(test_x) + train_count) * k
        print(f"test L_{k} = {test_ll:.2f} +- {test_se:.2f} nats, test ELBO {metrics['test_elbo']:.2f}; "
              f"train L_{k} = {train_ll:.2f} +- {train_se:.2f} on {train_count} images "
              f"(gap {train_ll - test_ll:.2f}); {active} active units; "
              f"{pairs / seconds:,.0f} importance samples/s on {describe(device)}", flush=True)
        numbers = {key: value for key, value in metrics.items()
                   if key.startswith(("test_", "train_log", "train_test")) or key in ("active_units", "evaluate_seconds")}
        tracker.log_metrics(numbers)
        tracker.log_history({f"{split}_log_likelihood_curve": [(int(r["k"]), r[f"{split}_log_likelihood"]) for r in rows]
                             for split in results})
        for path in (paths.metrics, paths.bound_curve, paths.per_example):
            tracker.log_artifact(path, "evaluation")
        version = None if not register else tracker.log_model(
            model.cpu(), f"vae-{summary['dataset']}",
            {"test_log_likelihood": metrics["test_log_likelihood"],
             "test_log_likelihood_stderr": metrics["test_log_likelihood_stderr"],
             "importance_samples": k, "binarization": summary["binarization"], "latent_dim": summary["latent_dim"],
             "train_seed": params.train.seed, registry.TEST_SET_TAG: registry.test_set_fingerprint(test_x)})
        if version:
            print(f"MLflow: registered vae-{summary['dataset']} version {version}", flush=True)
    return metrics
