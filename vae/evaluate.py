"""The ``evaluate`` stage: importance-sampled log-likelihood on the test set and on training
images, the bound-tightness curve, the test ELBO and the active units.

Writes (paths under ``paths.reports``):

- ``metrics.json`` (DVC metrics): the training summary merged with L_k (``test_log_likelihood``,
  k = ``importance_samples``; Burda et al. 2016, Eq. 8) and its standard error over examples, the
  test ELBO (estimator B, averaged over the same k samples; estimator A with two stochastic
  layers, :func:`vae.objectives.elbo`), L_k on ``train_examples`` training
  images (binarized once with a fixed seed) so that overfitting shows as a number, L_k' at each
  k' of the curve, and the number of active units (Burda et al. 2016, Sec. 5.2; with two
  stochastic layers, also per layer: ``active_units_per_layer``).
- ``bound_curve.csv`` (DVC plot): k, L_k and its standard error, test and train.
- ``log_likelihood_per_example.csv``: each evaluated example's L_k and ELBO (for the histogram).
- ``active_units.json``: the per-unit variances A_u.
- ``ais_per_example.csv``: how tight L_k is (:mod:`vae.mcmc`): on the first ``ais_test_examples``
  test and ``ais_train_examples`` training images, each image's AIS estimate (Wu et al. 2017)
  beside its L_k and ELBO (and AEVB's App. D estimate when latent_dim <= 4); on ``bdmc_examples``
  images simulated from the model, the BDMC lower and upper bounds (Grosse et al. 2015). Their
  means, standard errors and the gaps (AIS - L_k, upper - lower) go into ``metrics.json``.

All values in nats per example, and nothing that differs between two executions of the same
evaluation (no wall time, no run id), so that their bytes, and their hashes in ``dvc.lock``, are
equal. Then logs them, with the wall times (``evaluate_seconds``, ``ais_seconds``), to the
pipeline's MLflow run (the run tagged with the checkpoint's hash,
:func:`vae.tracking.run_of_output`), tags that run with the hash of ``metrics.json``
(:data:`vae.tracking.METRICS_TAG`, by which the visualize and report stages find it) and
registers the model as a new version of ``vae-<dataset>``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from vae import mcmc, objectives, registry, tracking
from vae.config import EvaluateConfig, Params
from vae.data.splits import load_split
from vae.devices import describe, resolve_device
from vae.io import file_sha256, read_json, write_csv, write_json
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
        return mcmc.mean_and_stderr(values)


def evaluate_split(model: VAE, x: torch.Tensor, importance_samples: int, curve: list[int],
                   memory_budget_mb: float, seed: int, name: str, progress: bool = True) -> SplitEvaluation:
    """L_k, the ELBO and the curve for binary data ``x`` (N, D) on the model's device."""
    with tqdm(total=len(x), desc=f"{name} L_{importance_samples}", unit="example", disable=not progress) as bar:
        estimate = objectives.importance_sampled_log_likelihood(
            model, x, importance_samples, model.pairs_for_budget(memory_budget_mb), seed, curve, bar.update)
    return SplitEvaluation(estimate.log_likelihood.cpu(), estimate.elbo.cpu(),
                           {k: v.cpu() for k, v in estimate.curve.items()})


def _ais_settings(config: EvaluateConfig, model: VAE) -> dict:
    """:func:`vae.mcmc.ais`'s keyword arguments from the ``evaluate`` section."""
    return {"temperatures": config.ais_temperatures, "schedule": config.ais_schedule, "chains": config.ais_chains,
            "leapfrog_steps": config.ais_leapfrog_steps, "initial": config.ais_initial,
            "target_acceptance": config.ais_target_acceptance,
            "max_pairs": mcmc.pairs_for_budget(model, config.memory_budget_mb)}


def _paired(first: torch.Tensor, second: torch.Tensor) -> tuple[float, float]:
    """Mean of first - second over examples and its standard error (paired; NaN for one example)."""
    return SplitEvaluation.mean_and_stderr(first.double() - second.double())


def tightness(model: VAE, config: EvaluateConfig, images: dict[str, torch.Tensor],
              results: dict[str, SplitEvaluation], progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """How far L_k sits below log p(x): AIS on the first images of each split, beside L_k and the
    ELBO of the same images; BDMC on images simulated from the model; App. D when latent_dim <= 4.

    Args:
        images: split name -> (N, D) images on the model's device, the first of which get AIS
            (``ais_test_examples`` of ``test``, ``ais_train_examples`` of ``train``).
        results: the same splits' :class:`SplitEvaluation` (L_k and the ELBO per example).
    Returns:
        (metrics, per-example frame): ``{split}_ais_log_likelihood`` (and ``_stderr``),
        ``{split}_ais_bound`` (L_k on the same images), ``{split}_ais_elbo``, ``{split}_ais_gap``
        (AIS - L_k, paired, and ``_stderr``), ``{split}_appendix_d_log_likelihood`` when it
        applies, ``bdmc_lower``, ``bdmc_upper``, ``bdmc_gap`` (and ``_stderr``) and the settings;
        all nats per example. Empty when every count is 0. (Its wall time is the caller's to
        measure: :func:`run` logs it to MLflow as ``ais_seconds``.)
    """
    counts = {"test": config.ais_test_examples, "train": config.ais_train_examples}
    counts = {split: len(images[split]) if count is None else min(count, len(images[split]))
              for split, count in counts.items()}
    if not any(counts.values()) and not config.bdmc_examples:
        return {}, pd.DataFrame(columns=["split", "index", "ais_log_likelihood", "log_likelihood", "elbo"])
    settings = _ais_settings(config, model)
    metrics: dict = {"ais_temperatures": config.ais_temperatures, "ais_chains": config.ais_chains,
                     "ais_leapfrog_steps": config.ais_leapfrog_steps, "ais_initial": config.ais_initial,
                     "ais_schedule": config.ais_schedule}
    frames = []
    with_appendix_d = mcmc.standard_prior(model).latent_dim <= mcmc.APPENDIX_D_MAX_LATENT_DIM
    total = (sum(counts.values()) + 2 * config.bdmc_examples) * config.ais_temperatures
    with tqdm(total=total, desc=f"AIS (T = {config.ais_temperatures})", unit="image-step", unit_scale=True,
              disable=not progress) as bar:
        for offset, (split, count) in enumerate(counts.items()):
            if not count:
                continue
            x = images[split][:count]
            estimate = mcmc.ais(model, x, seed=config.seed + 10 + offset, on_step=bar.update, **settings)
            ais_ll = estimate.log_likelihood.cpu()
            bound, elbo = results[split].log_likelihood[:count], results[split].elbo[:count]
            mean, stderr = estimate.mean_and_stderr()
            gap, gap_stderr = _paired(ais_ll, bound)
            metrics |= {f"{split}_ais_examples": count, f"{split}_ais_log_likelihood": round(mean, 4),
                        f"{split}_ais_log_likelihood_stderr": round(stderr, 4),
                        f"{split}_ais_bound": round(SplitEvaluation.mean_and_stderr(bound)[0], 4),
                        f"{split}_ais_elbo": round(SplitEvaluation.mean_and_stderr(elbo)[0], 4),
                        f"{split}_ais_gap": round(gap, 4), f"{split}_ais_gap_stderr": round(gap_stderr, 4),
                        f"{split}_ais_acceptance_rate": round(float(estimate.acceptance_rate.mean()), 4)}
            frame = pd.DataFrame({"split": split, "index": range(count), "ais_log_likelihood": ais_ll.numpy(),
                                  "log_likelihood": bound.numpy(), "elbo": elbo.numpy()})
            if with_appendix_d:
                appendix_d = mcmc.appendix_d_log_likelihood(
                    model, x, config.appendix_d_samples, leapfrog_steps=config.appendix_d_leapfrog_steps,
                    initial="encoder", seed=config.seed + 20 + offset, max_pairs=settings["max_pairs"])
                mean, stderr = appendix_d.mean_and_stderr()
                metrics |= {f"{split}_appendix_d_log_likelihood": round(mean, 4),
                            f"{split}_appendix_d_log_likelihood_stderr": round(stderr, 4)}
                frame["appendix_d_log_likelihood"] = appendix_d.log_likelihood.cpu().numpy()
            frames.append(frame)
        if config.bdmc_examples:
            bounds = mcmc.bdmc(model, config.bdmc_examples, seed=config.seed + 30, device=images["test"].device,
                               on_step=bar.update, **settings)
            metrics |= {"bdmc_examples": config.bdmc_examples,
                        "bdmc_lower": round(float(bounds.lower.double().mean()), 4),
                        "bdmc_upper": round(float(bounds.upper.double().mean()), 4),
                        "bdmc_gap": round(bounds.gap, 4), "bdmc_gap_stderr": round(bounds.gap_stderr, 4)}
            frames.append(pd.DataFrame({"split": "simulated", "index": range(config.bdmc_examples),
                                        "bdmc_lower": bounds.lower.cpu().numpy(),
                                        "bdmc_upper": bounds.upper.cpu().numpy()}))
    return metrics, pd.concat(frames, ignore_index=True)


ACTIVE_UNIT_SAMPLES = 64  # draws of z1 behind each image's E_q[z2|x] (TwoLayerVAE.layer_means)


def posterior_means(model: VAE, x: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """E_q[z|x] per stochastic layer, for the active units: [(N, latent_dim)], or for a
    :class:`~vae.model.TwoLayerVAE` [(N, latent_dim), (N, top_latent_dim)], E_q[z2|x] averaged over
    :data:`ACTIVE_UNIT_SAMPLES` draws of z1 (seeded by ``seed``, per block of 10000 images)."""
    blocks = []
    with torch.no_grad():
        for i in range(0, len(x), 10000):
            if model.stochastic_layers == 2:
                blocks.append(model.layer_means(x[i : i + 10000], ACTIVE_UNIT_SAMPLES, seed + i))
            else:
                blocks.append((model.encode(x[i : i + 10000])[0],))
    return [torch.cat(layer) for layer in zip(*blocks, strict=True)]



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
    per_layer = [objectives.active_units(means, config.active_unit_threshold)
                 for means in posterior_means(model, test_x, config.seed)]
    active, variances = sum(count for count, _ in per_layer), torch.cat([v for _, v in per_layer])
    started_ais = time.perf_counter()
    tight, tight_frame = tightness(model, config, {"test": test_x, "train": train_x}, results, progress)
    ais_seconds = time.perf_counter() - started_ais

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
        **{key: summary.get(key) for key in ("dataset", "binarization", "likelihood", "input_dim", "latent_dim",
                                             "hidden_dim", "hidden_layers", "algorithm", "objective", "samples",
                                             "optimizer", "learning_rate", "batch_size", "epochs",
                                             "examples_seen")},
        **{key: summary[key] for key in ("stochastic_layers", "top_latent_dim", "top_hidden_dim") if key in summary},
        "importance_samples": k, "test_examples": len(test_x),
        "test_log_likelihood": round(test_ll, 4), "test_log_likelihood_stderr": round(test_se, 4),
        "test_elbo": round(float(results["test"].elbo.double().mean()), 4),
        "train_examples_evaluated": train_count,
        "train_log_likelihood": round(train_ll, 4), "train_log_likelihood_stderr": round(train_se, 4),
        "train_test_gap": round(train_ll - test_ll, 4),
        "train_elbo": round(summary["train_elbo"], 4), "valid_elbo": round(summary["valid_elbo"], 4),
        "active_units": active,
        **({"active_units_per_layer": [count for count, _ in per_layer]} if len(per_layer) > 1 else {}),
        "bound_curve": {str(r["k"]): round(r["test_log_likelihood"], 4) for r in rows},
        **tight,
    }
    # Wall times and the MLflow run are this execution's, not the evaluation's: logged to the run (metrics
    # evaluate_seconds, ais_seconds; the run is found by the hash of metrics.json), never written to it.
    per_example = pd.concat([
        pd.DataFrame({"split": split, "index": range(len(result.log_likelihood)),
                      "log_likelihood": result.log_likelihood.numpy(), "elbo": result.elbo.numpy()})
        for split, result in results.items()])
    settings = {f"evaluate.{key}": value for key, value in vars(config).items()}
    with tracking.run_of_output(paths.checkpoint, "evaluate", settings, tag=tracking.MODEL_TAG) as tracker:
        write_json(paths.metrics, metrics)
        write_csv(paths.bound_curve, curve_frame)
        write_csv(paths.per_example, per_example)
        write_csv(paths.ais_per_example, tight_frame)
        write_json(paths.unit_variances, {"threshold": config.active_unit_threshold,
                                          "unit_variances": [round(float(v), 6) for v in variances],
                                          **({"unit_variances_per_layer": [[round(float(v), 6) for v in layer]
                                                                           for _, layer in per_layer]}
                                             if len(per_layer) > 1 else {})})
        pairs = (len(test_x) + train_count) * k
        if "test_ais_log_likelihood" in tight:
            print(f"AIS (T = {config.ais_temperatures}, {config.ais_chains} chains, from the {config.ais_initial}) on "
                  f"{tight['test_ais_examples']} test images: {tight['test_ais_log_likelihood']:.2f} +- "
                  f"{tight['test_ais_log_likelihood_stderr']:.2f} nats, {tight['test_ais_gap']:.2f} +- "
                  f"{tight['test_ais_gap_stderr']:.2f} above their L_{k}", flush=True)
        if "bdmc_gap" in tight:
            print(f"BDMC on {tight['bdmc_examples']} simulated images: log p(x) between {tight['bdmc_lower']:.2f} and "
                  f"{tight['bdmc_upper']:.2f} (gap {tight['bdmc_gap']:.2f} +- {tight['bdmc_gap_stderr']:.2f} nats)",
                  flush=True)
        print(f"test L_{k} = {test_ll:.2f} +- {test_se:.2f} nats, test ELBO {metrics['test_elbo']:.2f}; "
              f"train L_{k} = {train_ll:.2f} +- {train_se:.2f} on {train_count} images "
              f"(gap {train_ll - test_ll:.2f}); {active} active units"
              + (f" ({' + '.join(str(count) for count, _ in per_layer)} by layer)" if len(per_layer) > 1 else "")
              + "; "
              f"{pairs / seconds:,.0f} importance samples/s on {describe(device)}", flush=True)
        numbers = {key: value for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)
                   and (key.startswith(("test_", "train_log", "train_test", "train_ais", "train_appendix", "bdmc_"))
                        or key == "active_units")}
        tracker.log_metrics({**numbers, "evaluate_seconds": round(seconds, 2),
                             **({"ais_seconds": round(ais_seconds, 2)} if tight else {})})
        if tracker.active:  # how visualize and report find the run this evaluation logged to
            tracker.set_tags({tracking.METRICS_TAG: file_sha256(paths.metrics)})
        tracker.log_history({f"{split}_log_likelihood_curve": [(int(r["k"]), r[f"{split}_log_likelihood"]) for r in rows]
                             for split in results})
        for path in (paths.metrics, paths.bound_curve, paths.per_example, paths.ais_per_example):
            tracker.log_artifact(path, "evaluation")
        version = None if not register else tracker.log_model(
            paths.checkpoint, f"vae-{summary['dataset']}",
            {"test_log_likelihood": metrics["test_log_likelihood"],
             "test_log_likelihood_stderr": metrics["test_log_likelihood_stderr"],
             "importance_samples": k, "binarization": summary["binarization"], "latent_dim": summary["latent_dim"],
             "train_seed": params.train.seed, registry.TEST_SET_TAG: registry.test_set_fingerprint(test_x)},
            test_x[:2].cpu().float().numpy())
        if version:
            name = f"vae-{summary['dataset']}"
            first = tracking.call(tracker.uri, registry.promote_first, tracker.client, name, version)
            print(f"MLflow: registered {name} version {version}"
                  + (f"; the first under this name, it is {name}@{registry.CHAMPION}" if first else ""), flush=True)
    return metrics
