"""The ``train`` stage: fit the VAE by maximising the SGVB ELBO (Kingma & Welling 2014, Alg. 1).

Loss = minus the ELBO in nats per example (sum over pixels, mean over the minibatch, analytic KL).
The whole dataset sits on the device as one tensor and minibatches are taken by indexing a
permutation; dynamic binarization draws x ~ Bernoulli(intensity) for each minibatch on the device.
No DataLoader and no per-example Python work: for models this small, indexing is far faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from vae import objectives, tracking
from vae.config import Params, TrainConfig
from vae.data.splits import Split, load_splits
from vae.devices import describe, resolve_device
from vae.io import write_csv, write_json
from vae.model import VAE, save_checkpoint

EVAL_BATCH = 10000


@dataclass
class TrainResult:
    """What training produced: per-epoch and per-step histories (ELBOs in nats per example)."""

    model: VAE
    epochs: pd.DataFrame  # columns: epoch, examples_seen, train_elbo, valid_elbo, seconds
    steps: pd.DataFrame  # columns: step, examples_seen, train_elbo (minibatch estimate)
    seconds: float
    device: str


def make_optimizer(name: str, parameters, learning_rate: float) -> torch.optim.Optimizer:
    """``adam`` or ``adagrad`` (the AEVB paper's) with the given global step size."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate)
    if name == "adagrad":
        return torch.optim.Adagrad(parameters, lr=learning_rate)
    raise ValueError(f"optimizer {name!r}: expected adam or adagrad")


@torch.no_grad()
def dataset_elbo(model: VAE, x: torch.Tensor, seed: int) -> float:
    """Mean single-sample ELBO over ``x`` (N, D) with fixed noise, in nats per example."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = 0.0
    for start in range(0, len(x), EVAL_BATCH):
        total += float(objectives.elbo(model, x[start : start + EVAL_BATCH], generator=generator).sum())
    return total / len(x)


def train_model(model: VAE, train: Split, valid: Split, config: TrainConfig, device: torch.device,
                on_epoch: Callable[[dict, list[tuple[int, float]]], None] | None = None,
                progress: bool = True) -> TrainResult:
    """Train ``model`` in place.

    Args:
        train: training split (grey intensities are binarized dynamically per minibatch).
        valid: validation split, binary.
        on_epoch: called after each epoch with that epoch's row and its (examples_seen,
            minibatch ELBO) step points, e.g. to log them.

    Returns:
        :class:`TrainResult` with the histories.
    """
    model.to(device).train()
    generator = torch.Generator(device=device).manual_seed(config.seed)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.learning_rate)
    intensities = train.images.to(device).float().div_(255.0)
    if train.binary:
        intensities = intensities.round_()
    valid_x = valid.binarized(device=device)
    fixed = torch.Generator(device=device).manual_seed(config.seed + 1)
    eval_subset = slice(0, min(config.elbo_eval_size, len(train)))
    train_eval_x = torch.bernoulli(intensities[eval_subset], generator=fixed)

    examples, step = len(train), 0
    steps_per_epoch = -(-examples // config.batch_size)
    epoch_rows, step_rows = [], []
    started = time.perf_counter()
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="train", unit="step", disable=not progress)
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(examples, generator=generator, device=device)
        step_elbos = torch.empty(steps_per_epoch, device=device)
        for i, start in enumerate(range(0, examples, config.batch_size)):
            x = torch.bernoulli(intensities[order[start : start + config.batch_size]], generator=generator)
            loss = -objectives.elbo(model, x, generator=generator).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_elbos[i] = -loss.detach()
            bar.update()
        step_values = step_elbos.tolist()  # one device sync per epoch
        points = []
        for i, value in enumerate(step_values):
            step += 1
            seen = (epoch - 1) * examples + min((i + 1) * config.batch_size, examples)
            step_rows.append((step, seen, value))
            points.append((seen, value))
        model.eval()
        row = {"epoch": epoch, "examples_seen": epoch * examples,
               "train_elbo": dataset_elbo(model, train_eval_x, config.seed + 2),
               "valid_elbo": dataset_elbo(model, valid_x, config.seed + 3),
               "seconds": time.perf_counter() - started}
        model.train()
        epoch_rows.append(row)
        bar.set_postfix(train_elbo=f"{row['train_elbo']:.2f}", valid_elbo=f"{row['valid_elbo']:.2f}")
        if not progress:
            print(f"epoch {epoch}/{config.epochs}: train ELBO {row['train_elbo']:.2f}, "
                  f"valid ELBO {row['valid_elbo']:.2f} nats", flush=True)
        if on_epoch is not None:
            on_epoch(row, points)
    bar.close()
    model.eval()
    return TrainResult(model=model, epochs=pd.DataFrame(epoch_rows),
                       steps=pd.DataFrame(step_rows, columns=["step", "examples_seen", "train_elbo"]),
                       seconds=time.perf_counter() - started, device=describe(device))



def run(params: Params, progress: bool = True) -> dict:
    """Stage entry point: train on ``paths.processed/<dataset>``, write the checkpoint, the ELBO
    curves (``elbo_curve.csv``, ``train_steps.csv``) and ``train_summary.json``; log to MLflow.

    Returns:
        The summary written to ``train_summary.json``.
    """
    data, paths = params.data, params.paths
    splits = load_splits(paths.processed_dir(data.dataset))
    device = resolve_device(params.train.device)
    torch.manual_seed(params.train.seed)  # parameter initialisation
    model = VAE(input_dim=splits["train"].images.shape[1], hidden_dim=params.model.hidden_dim,
                latent_dim=params.model.latent_dim)
    experiment = f"vae-{data.dataset}"
    run_name = f"{data.dataset}-{data.binarization}-z{params.model.latent_dim}-e{params.train.epochs}"
    tags = {"dataset": data.dataset, "binarization": data.binarization, "device": describe(device)}
    with tracking.start_run(experiment, run_name, "train", tags) as tracker:
        # Only what training reads: later stages log their own settings (MLflow params are final).
        tracker.log_params({key: value for key, value in params.flat().items()
                            if key.split(".")[0] in ("paths", "data", "model", "train")})
        tracker.log_params({"data.train_examples": len(splits["train"]),
                            "data.valid_examples": len(splits["valid"]),
                            "data.test_examples": len(splits["test"])})

        def log_epoch(row: dict, points: list[tuple[int, float]]) -> None:
            tracker.log_history({"train_elbo_step": points,
                                 "train_elbo": [(row["examples_seen"], row["train_elbo"])],
                                 "valid_elbo": [(row["examples_seen"], row["valid_elbo"])],
                                 "epoch_seconds": [(row["examples_seen"], row["seconds"])]})

        result = train_model(model, splits["train"], splits["valid"], params.train, device,
                             on_epoch=log_epoch, progress=progress)
        last = result.epochs.iloc[-1]
        summary = {"dataset": data.dataset, "binarization": data.binarization,
                   "latent_dim": params.model.latent_dim, "hidden_dim": params.model.hidden_dim,
                   "epochs": params.train.epochs, "train_examples": len(splits["train"]),
                   "examples_seen": int(last["examples_seen"]),
                   "train_elbo": float(last["train_elbo"]), "valid_elbo": float(last["valid_elbo"]),
                   "train_seconds": round(result.seconds, 2), "device": result.device,
                   "mlflow_run_id": tracker.run_id}
        save_checkpoint(result.model, paths.checkpoint,
                        metadata={k: v for k, v in summary.items() if k != "mlflow_run_id"})
        write_csv(paths.elbo_curve, result.epochs)
        write_csv(paths.train_steps, result.steps)
        write_json(paths.train_summary, summary)
        tracker.log_metrics({"train_seconds": result.seconds})
        tracker.log_artifact(paths.elbo_curve, "curves")
        tracker.log_artifact(paths.checkpoint, "checkpoint")
    print(f"trained {params.train.epochs} epochs in {result.seconds:.1f} s on {result.device}: "
          f"train ELBO {summary['train_elbo']:.2f}, valid ELBO {summary['valid_elbo']:.2f} nats", flush=True)
    return summary
