"""The ``train`` stage: fit the VAE by stochastic gradient ascent on a variational bound.

Objectives: the SGVB ELBO, estimator B with an analytic KL (Kingma & Welling 2014, Alg. 1, Eq. 7),
or the k-sample importance-weighted bound (Burda et al. 2016, Eq. 8). The loss is minus the bound
in nats per example (sum over pixels, mean over the minibatch), plus, with ``map_prior``, the
N(0, I) prior on the parameters scaled by 1 / N (weight decay; AEVB Sec. 5's approximate MAP).

``train.algorithm: wake-sleep`` trains the same encoder and decoder by wake-sleep instead (Hinton,
Dayan, Frey & Neal 1995; AEVB Sec. 5's baseline): per minibatch the loss is
-(mean wake objective + mean sleep objective) (:func:`vae.objectives.wake_sleep`), whose two terms
reach disjoint parameters (decoder, encoder), so one optimizer over all parameters gives each its
own phase's update with the same optimizer settings. Its train, validation and test curves are the
same :func:`dataset_elbo` as AEVB's; its per-step curve records the minibatch ELBO at the wake
phase's samples, beside the wake and sleep objectives under their own names.

The whole dataset sits on the device as one tensor and minibatches are taken by indexing a
permutation; dynamic binarization draws x ~ Bernoulli(intensity) for each minibatch on the device.
No DataLoader and no per-example Python work: for models this small, indexing is far faster.

Training survives interruption: every ``checkpoint_interval`` seconds (at the end of a pass) the
model, the optimizer, the random generator and the histories are written atomically to
``models/train_state.pt``; a re-run with the same parameters and data resumes from there and
ends with the same parameters as an uninterrupted run (same device and thread count). A
non-finite loss stops training with :class:`~vae.errors.TrainingError`, naming the step, and the
last good checkpoint stays.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vae import objectives, tracking
from vae.config import Params, TrainConfig
from vae.data.splits import Split, load_splits
from vae.devices import describe, resolve_device, software
from vae.errors import TrainingError
from vae.io import atomic_open, write_csv, write_json
from vae.model import VAE, save_checkpoint

EVAL_BATCH = 10000
STATE_FORMAT = "vae-pipeline/train-state"
STATE_VERSION = 1


def make_optimizer(config: TrainConfig, parameters, learning_rate: float,
                   train_examples: int) -> torch.optim.Optimizer:
    """``adam`` (betas 0.9, 0.999) or ``adagrad`` (the AEVB paper's) at ``learning_rate``.

    With ``config.map_prior`` the weight decay is 1 / ``train_examples``: its gradient is that of
    ||theta||^2 / (2N), minus the log N(0, I) prior of the parameters divided by the N examples
    the per-example loss averages over (AEVB Sec. 5). ``config.epsilon`` replaces the default eps.
    """
    options: dict[str, Any] = {"lr": learning_rate,
                               "weight_decay": 1.0 / train_examples if config.map_prior else 0.0}
    if config.epsilon is not None:
        options["eps"] = config.epsilon
    # The fused kernels update each tensor in one pass (about 25% faster steps on a 2-core CPU for the
    # aevb-mnist model; benchmarks/train_speed.py); same algorithm, float rounding aside. Adam's exist
    # on CPU and CUDA, Adagrad's on CPU only.
    parameters = list(parameters)
    device = parameters[0].device.type if parameters else "cpu"
    options["fused"] = device == "cpu" or (device == "cuda" and config.optimizer == "adam")
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, betas=(0.9, 0.999), **options)
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(parameters, **options)
    raise ValueError(f"optimizer {config.optimizer!r}: expected adam or adagrad")


def schedule_stage(pass_index: int) -> int:
    """The stage i of IWAE's schedule that pass ``pass_index`` (0-based) falls in: passes
    (3^i - 1) / 2 to (3^(i+1) - 1) / 2 - 1, i.e. 3^i passes per stage (Burda et al. 2016, Sec. 5)."""
    stage = 0
    while (3 ** (stage + 1) - 1) // 2 <= pass_index:
        stage += 1
    return stage


def learning_rate_at(config: TrainConfig, base: float, pass_index: int) -> float:
    """The step size of pass ``pass_index`` (0-based): ``base``, or base * 10^(-i/7) under ``iwae``."""
    if config.schedule == "iwae":
        return base * 10.0 ** (-schedule_stage(pass_index) / 7.0)
    return base


def evaluation_passes(passes: int, points: int) -> set[int]:
    """The passes (1-based) after which the train and validation ELBO are computed: every pass
    when there are at most ``points``, else ``points`` log-spaced ones (the curves are drawn on a
    log axis) and always the last."""
    if passes <= points:
        return set(range(1, passes + 1))
    return {int(p) for p in np.unique(np.round(np.geomspace(1, passes, points)))} | {passes}


class TrainingData:
    """The training examples on the device, and how a minibatch is drawn from them.

    Dynamically binarized data keeps its intensities (N, D) in [0, 1] and samples a fresh
    Bernoulli draw per minibatch; binary data (static) and real data (Frey Face) are used as is.
    """

    def __init__(self, split: Split, device: torch.device) -> None:
        self.resample = split.binarization == "dynamic" and not split.binary
        if self.resample:
            self.values = split.images.to(device).float().div_(255.0)
        else:
            self.values = split.values(device=device)

    def __len__(self) -> int:
        return self.values.shape[0]

    def minibatch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(len(index), D) float: the examples at ``index``, binarized afresh when dynamic."""
        x = self.values[index]
        return torch.bernoulli(x, generator=generator) if self.resample else x

    def fixed(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """The first ``count`` examples, binarized once with ``generator`` (for a fixed train ELBO)."""
        x = self.values[:count]
        return torch.bernoulli(x, generator=generator) if self.resample else x


def minibatch_objective(model: VAE, x: torch.Tensor, config: TrainConfig,
                        generator: torch.Generator) -> torch.Tensor:
    """Per-example bound (batch,), nats: the ELBO with L = ``samples`` or L_k with k = ``samples``."""
    if config.objective == "iwae":
        return objectives.iwae_bound(model, x, config.samples, generator)
    return objectives.elbo(model, x, config.samples, generator)


# What each step of a wake-sleep run records (train_steps.csv's columns after step and examples_seen).
WAKE_SLEEP_STEP_COLUMNS = ("train_elbo", "wake_objective", "sleep_objective")


def wake_sleep_loss(model: VAE, x: torch.Tensor, config: TrainConfig,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One wake-sleep minibatch (Hinton et al. 1995): the loss and what the per-step curve records.

    loss = -(mean_x log p(x, z) + mean over len(x) fantasies of log q(z|x)), a 0-d tensor: the
    wake term's gradient reaches the decoder only, the sleep term's the encoder only
    (:func:`vae.objectives.wake_sleep`, L = ``config.samples``).
    record: (3,) float, nats per example, in :data:`WAKE_SLEEP_STEP_COLUMNS` order: the minibatch
    ELBO (estimator B at the wake phase's samples), the mean wake and the mean sleep objective,
    each detached. A non-finite loss has a non-finite wake or sleep entry, so the NaN guard sees it.
    """
    terms = objectives.wake_sleep(model, x, config.samples, generator)
    wake, sleep = terms.wake.mean(), terms.sleep.mean()
    record = torch.stack([terms.elbo.mean(), wake.detach(), sleep.detach()])
    return -(wake + sleep), record


def run_pass(model: VAE, optimizer: torch.optim.Optimizer, data: TrainingData, count: int,
             config: TrainConfig, generator: torch.Generator, bar: tqdm | None = None) -> torch.Tensor:
    """One pass over the first ``count`` examples of a fresh permutation, one optimizer step per
    minibatch. Returns each minibatch's mean bound, (steps,) float on the device (not synced);
    under wake-sleep, (steps, 3): each minibatch's :func:`wake_sleep_loss` record."""
    order = torch.randperm(len(data), generator=generator, device=data.values.device)
    steps = -(-count // config.batch_size)
    wake_sleep = config.algorithm == "wake-sleep"
    shape = (steps, len(WAKE_SLEEP_STEP_COLUMNS)) if wake_sleep else (steps,)
    values = torch.empty(shape, device=data.values.device)
    for i in range(steps):
        stop = min((i + 1) * config.batch_size, count)
        x = data.minibatch(order[i * config.batch_size : stop], generator)
        if wake_sleep:
            loss, values[i] = wake_sleep_loss(model, x, config, generator)
        else:
            loss = -minibatch_objective(model, x, config, generator).mean()
            values[i] = -loss.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update()
    return values


@torch.no_grad()
def dataset_elbo(model: VAE, x: torch.Tensor, seed: int) -> float:
    """Mean single-sample ELBO over ``x`` (N, D) with fixed noise, in nats per example."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = 0.0
    for start in range(0, len(x), EVAL_BATCH):
        total += float(objectives.elbo(model, x[start : start + EVAL_BATCH], generator=generator).sum())
    return total / len(x)


def select_step_size(model: VAE, data: TrainingData, config: TrainConfig, train_x: torch.Tensor,
                     progress: bool = True) -> tuple[float, dict[str, float]]:
    """Pick the global step size as the AEVB paper did (Sec. 5): train from the model's current
    parameters with each of ``config.step_size_candidates`` for ``step_size_selection_samples``
    examples (same minibatches for each) and keep the one with the best training ELBO on ``train_x``
    (under wake-sleep too: the ELBO is the yardstick both algorithms share).

    The model's parameters are left as they were. Returns (chosen step size, {candidate: ELBO}).

    Raises:
        TrainingError: every candidate diverged.
    """
    initial = copy.deepcopy(model.state_dict())
    scores: dict[str, float] = {}
    device = data.values.device
    for candidate in config.step_size_candidates:
        model.load_state_dict(initial)
        model.train()
        optimizer = make_optimizer(config, model.parameters(), candidate, len(data))
        generator = torch.Generator(device=device).manual_seed(config.seed + 7)
        done = 0
        with tqdm(total=config.step_size_selection_samples, desc=f"step size {candidate:g}", unit="example",
                  disable=not progress) as bar:
            while done < config.step_size_selection_samples:
                count = min(len(data), config.step_size_selection_samples - done)
                run_pass(model, optimizer, data, count, config, generator)
                done += count
                bar.update(count)
        model.eval()
        score = dataset_elbo(model, train_x, config.seed + 2)
        scores[f"{candidate:g}"] = score if math.isfinite(score) else -math.inf
        print(f"step size {candidate:g}: train ELBO {score:.2f} nats after {done} examples", flush=True)
    model.load_state_dict(initial)
    model.train()
    best = max(config.step_size_candidates, key=lambda c: scores[f"{c:g}"])
    if not math.isfinite(scores[f"{best:g}"]):
        raise TrainingError(f"train.step_size_candidates = {config.step_size_candidates}: every step size "
                            "diverged (non-finite training ELBO); try smaller ones")
    return best, scores


@dataclass
class Progress:
    """The resumable part of training: where it is, what it has recorded, and its choices."""

    learning_rate: float
    step_size_trials: dict[str, float] = field(default_factory=dict)
    passes_done: int = 0
    examples_seen: int = 0
    step: int = 0
    seconds: float = 0.0
    epoch_rows: list[dict] = field(default_factory=list)
    step_rows: list[tuple[int, int, float]] = field(default_factory=list)
    best_valid_elbo: float = -math.inf
    best_pass: int = 0
    evaluations_since_best: int = 0
    stopped_early: bool = False
    resumed_from: list[int] = field(default_factory=list)


class ResumableState:
    """The train stage's resumable checkpoint (``models/train_state.pt``), tied to its inputs.

    ``fingerprint`` identifies the training data and the parameters that change the result;
    a state written under another fingerprint is ignored (training starts over) and replaced.
    Read with ``torch.load(weights_only=True)``; written atomically.
    """

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = Path(path), fingerprint

    def load(self) -> dict | None:
        """The saved state, or None when there is none usable (the reason is printed)."""
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file: training starts over and replaces it
            print(f"{self.path}: unreadable training checkpoint ({error}); starting from scratch",
                  file=sys.stderr)
            return None
        if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT \
                or payload.get("format_version") != STATE_VERSION:
            print(f"{self.path}: not a training checkpoint of this version; starting from scratch",
                  file=sys.stderr)
            return None
        if payload.get("fingerprint") != self.fingerprint:
            print(f"{self.path}: written for other data or parameters; starting from scratch", file=sys.stderr)
            return None
        return payload

    def save(self, payload: dict) -> None:
        with atomic_open(self.path) as handle:
            torch.save({"format": STATE_FORMAT, "format_version": STATE_VERSION,
                        "fingerprint": self.fingerprint, **payload}, handle)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class TrainResult:
    """What training produced: per-pass and per-step histories (ELBOs in nats per example)."""

    model: VAE
    epochs: pd.DataFrame  # columns: epoch, examples_seen, train_elbo, valid_elbo, [test_elbo,] learning_rate, seconds
    steps: pd.DataFrame  # columns: step, examples_seen, train_elbo (mean minibatch bound over log_interval steps)
    #                      [, wake_objective, sleep_objective (wake-sleep: their means over the same steps)]
    progress: Progress
    device: str

    @property
    def seconds(self) -> float:
        return self.progress.seconds


def _kept(state: ResumableState | None) -> str:
    """What an error message says survives a failed run."""
    if state is not None and state.path.is_file():
        return f"the last good checkpoint {state.path} is kept"
    return "no checkpoint had been written yet"


def _state_dict_copy(model: VAE) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def train_model(model: VAE, train: Split, valid: Split, config: TrainConfig, device: torch.device,
                on_evaluation: Callable[[dict, list[tuple[int, float]]], None] | None = None,
                progress: bool = True, state: ResumableState | None = None, resume: dict | None = None,
                extra_state: dict | None = None, test: Split | None = None) -> TrainResult:
    """Train ``model`` in place, from scratch or from ``resume``.

    Args:
        train: training split (dynamically binarized grey images are resampled per minibatch).
        valid: validation split (early stopping and the best pass look at it alone).
        on_evaluation: called after each evaluated pass with that pass's row and the
            (examples_seen, bound) points of the per-step curve since the previous call
            (wake-sleep: (examples_seen, ELBO, wake objective, sleep objective)).
        state: where resumable checkpoints go (None: no checkpoints).
        resume: a checkpoint read by ``state.load()`` to continue from (None: start afresh).
        extra_state: plain values stored in each checkpoint (e.g. the MLflow run id).
        test: test split; when given, each evaluated pass also records its single-sample ELBO
            (``test_elbo``, nats per example), the test curve of AEVB Fig. 2. It is only
            recorded: nothing in training (step size, early stopping) looks at it.

    Returns:
        :class:`TrainResult` with the histories.

    Raises:
        TrainingError: a non-finite loss or ELBO; the last checkpoint in ``state`` is kept.
    """
    model.to(device).train()
    data = TrainingData(train, device)
    valid_x = valid.values(device=device)
    test_x = test.values(device=device) if test is not None else None
    fixed = torch.Generator(device=device).manual_seed(config.seed + 1)
    train_x = data.fixed(min(config.elbo_eval_size, len(data)), fixed)
    total = config.training_samples if config.training_samples is not None else config.epochs * len(data)
    passes = -(-total // len(data))
    evaluated = evaluation_passes(passes, config.curve_points)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    best_state = None
    if resume is not None:
        model.load_state_dict(resume["model"])
        record = Progress(**resume["progress"])
        optimizer = make_optimizer(config, model.parameters(), record.learning_rate, len(data))
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        best_state = resume.get("best_model")
        record.resumed_from.append(record.passes_done)
        print(f"resuming from {state.path if state is not None else 'a checkpoint'}: pass {record.passes_done} of {passes}, "
              f"{record.examples_seen} examples seen", flush=True)
    else:
        learning_rate, trials = config.learning_rate, {}
        if config.step_size_candidates:
            learning_rate, trials = select_step_size(model, data, config, train_x, progress)
            print(f"step size {learning_rate:g} chosen from {config.step_size_candidates}", flush=True)
        record = Progress(learning_rate=learning_rate, step_size_trials=trials)
        optimizer = make_optimizer(config, model.parameters(), learning_rate, len(data))

    def checkpoint() -> None:
        if state is not None:
            state.save({"model": _state_dict_copy(model), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "progress": asdict(record),
                        "best_model": best_state, **(extra_state or {})})

    steps_total = sum(-(-min(len(data), total - p * len(data)) // config.batch_size) for p in range(passes))
    started, last_checkpoint, seconds_before = time.perf_counter(), time.perf_counter(), record.seconds
    pending_points: list[tuple[int, float]] = []
    bar = tqdm(total=steps_total, initial=record.step, desc="train", unit="step", disable=not progress)
    while record.passes_done < passes and not record.stopped_early:
        index = record.passes_done
        count = min(len(data), total - index * len(data))
        rate = learning_rate_at(config, record.learning_rate, index)
        for group in optimizer.param_groups:
            group["lr"] = rate
        values = run_pass(model, optimizer, data, count, config, generator, bar)
        finite = torch.isfinite(values).reshape(len(values), -1).all(-1)  # per step
        if not bool(finite.all()):  # one device sync per pass
            bad = record.step + 1 + int((~finite).nonzero()[0])
            bar.close()
            kept = _kept(state)
            raise TrainingError(f"non-finite loss at step {bad} (pass {index + 1}, learning rate {rate:g}); "
                                f"{kept}. Try a smaller train.learning_rate")
        for start in range(0, len(values), config.log_interval):
            window = values[start : start + config.log_interval]
            step = record.step + start + len(window)
            seen = record.examples_seen + min((start + len(window)) * config.batch_size, count)
            means = (float(window.mean()),) if values.ndim == 1 else tuple(window.mean(0).tolist())
            record.step_rows.append((step, seen, *means))
            pending_points.append((seen, *means))
        record.step += len(values)
        record.examples_seen += count
        record.passes_done += 1
        record.seconds = seconds_before + time.perf_counter() - started
        if record.passes_done in evaluated:
            model.eval()
            row = {"epoch": record.passes_done, "examples_seen": record.examples_seen,
                   "train_elbo": dataset_elbo(model, train_x, config.seed + 2),
                   "valid_elbo": dataset_elbo(model, valid_x, config.seed + 3),
                   **({"test_elbo": dataset_elbo(model, test_x, config.seed + 4)} if test_x is not None else {}),
                   "learning_rate": rate, "seconds": record.seconds}
            model.train()
            if not (math.isfinite(row["train_elbo"]) and math.isfinite(row["valid_elbo"])):
                bar.close()
                kept = _kept(state)
                raise TrainingError(f"non-finite ELBO after pass {record.passes_done} (step {record.step}): "
                                    f"train {row['train_elbo']}, valid {row['valid_elbo']}; "
                                    f"{kept}. Try a smaller train.learning_rate")
            record.epoch_rows.append(row)
            if row["valid_elbo"] > record.best_valid_elbo:
                record.best_valid_elbo, record.best_pass, record.evaluations_since_best = \
                    row["valid_elbo"], record.passes_done, 0
                if config.early_stopping_patience is not None:
                    best_state = _state_dict_copy(model)
            else:
                record.evaluations_since_best += 1
            if config.early_stopping_patience is not None \
                    and record.evaluations_since_best >= config.early_stopping_patience:
                record.stopped_early = True
                print(f"early stopping after pass {record.passes_done}: no better validation ELBO in "
                      f"{record.evaluations_since_best} evaluations; keeping pass {record.best_pass}", flush=True)
            bar.set_postfix(train_elbo=f"{row['train_elbo']:.2f}", valid_elbo=f"{row['valid_elbo']:.2f}")
            if not progress:
                print(f"pass {record.passes_done}/{passes}: train ELBO {row['train_elbo']:.2f}, "
                      f"valid ELBO {row['valid_elbo']:.2f} nats", flush=True)
            if on_evaluation is not None:
                on_evaluation(row, pending_points)
            pending_points = []
        if record.passes_done < passes and not record.stopped_early \
                and time.perf_counter() - last_checkpoint >= config.checkpoint_interval:
            # A step can turn the parameters non-finite with a finite loss (the pass's last step):
            # such a state must not replace the last good checkpoint.
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                bar.close()
                kept = _kept(state)
                raise TrainingError(f"non-finite parameters after step {record.step} (pass {record.passes_done}, "
                                    f"learning rate {rate:g}); {kept}. Try a smaller train.learning_rate")
            checkpoint()
            last_checkpoint = time.perf_counter()
    bar.close()
    if best_state is not None:  # early stopping keeps the best validated parameters, stopped or not
        model.load_state_dict(best_state)
    model.eval()
    columns = WAKE_SLEEP_STEP_COLUMNS if config.algorithm == "wake-sleep" else ("train_elbo",)
    return TrainResult(model=model, epochs=pd.DataFrame(record.epoch_rows),
                       steps=pd.DataFrame(record.step_rows, columns=["step", "examples_seen", *columns]),
                       progress=record, device=describe(device))


def fingerprint(params: Params, train_file: Path, device: torch.device) -> str:
    """Identity of a training run's inputs: the data, model and train parameters that change the
    result, the training split's bytes and the device type (a resumed run must match all)."""
    digest = hashlib.sha256()
    train = {k: v for k, v in asdict(params.train).items() if k not in ("device", "checkpoint_interval")}
    if train["algorithm"] == "aevb":  # as before the option existed, so AEVB states written then still resume
        del train["algorithm"]
    settings = {"profile": None, "data": asdict(params.data), "model": asdict(params.model), "train": train,
                "device": device.type}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    with open(train_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_model(params: Params, input_dim: int) -> VAE:
    """The configured model, initialised from ``train.seed`` (N(0, init_std^2) when set)."""
    torch.manual_seed(params.train.seed)
    model = VAE(input_dim=input_dim, hidden_dim=params.model.hidden_dim, latent_dim=params.model.latent_dim,
                hidden_layers=params.model.hidden_layers, likelihood=params.data.likelihood)
    if params.model.init_std is not None:
        model.initialize_normal_(params.model.init_std, torch.Generator().manual_seed(params.train.seed))
    return model


def run(params: Params, progress: bool = True, *, experiment: str | None = None, run_name: str | None = None,
        tags: dict[str, str] | None = None) -> dict:
    """Stage entry point: train on ``paths.processed/<dataset>``, write the checkpoint, the ELBO
    curves (``elbo_curve.csv``, ``train_steps.csv``) and ``train_summary.json``; log to MLflow.

    ``experiment`` (default ``vae-<dataset>``), ``run_name`` and extra ``tags`` (e.g.
    ``mlflow.parentRunId``) place the MLflow run: a sweep member logs as a child of its sweep's run.

    Returns:
        The summary written to ``train_summary.json``.

    Raises:
        TrainingError: training diverged (the resumable checkpoint is kept).
        DataError: the processed splits are missing or damaged.
    """
    data, paths, config = params.data, params.paths, params.train
    folder = paths.processed_dir(data.dataset)
    splits = load_splits(folder)
    device = resolve_device(config.device)
    model = build_model(params, splits["train"].images.shape[1])
    state = ResumableState(paths.train_state, fingerprint(params, folder / "train.pt", device))
    saved = state.load()
    length = f"e{config.epochs}" if config.epochs is not None else f"n{config.training_samples:.0e}".replace("+", "")
    experiment = experiment or f"vae-{data.dataset}"
    run_name = run_name or f"{params.profile}-{data.dataset}-{data.binarization}-z{params.model.latent_dim}-{length}" \
        + ("-wake-sleep" if config.algorithm == "wake-sleep" else "")
    tags = {"dataset": data.dataset, "binarization": data.binarization, "profile": params.profile,
            "likelihood": data.likelihood, "algorithm": config.algorithm, "device": describe(device), **(tags or {})}
    resume_id = saved.get("mlflow_run_id") if saved else None
    with tracking.start_run(experiment, run_name, "train", tags, resume_run_id=resume_id) as tracker:
        # Only what training reads: later stages log their own settings (MLflow params are final).
        if tracker.run_id != resume_id:
            tracker.log_params({key: value for key, value in params.flat().items()
                                if key.split(".")[0] in ("paths", "data", "model", "train")})
            tracker.log_params({"data.train_examples": len(splits["train"]),
                                "data.valid_examples": len(splits["valid"]),
                                "data.test_examples": len(splits["test"])})

        # Resuming the interrupted run: the passes after its checkpoint were logged before the kill
        # and are trained again now; their points are not logged a second time.
        logged: dict[str, int] | None = None if tracker.active and tracker.run_id == resume_id else {}

        def log_evaluation(row: dict, points: list[tuple]) -> None:
            nonlocal logged
            # The per-pass test ELBO is "test_elbo_curve": "test_elbo" is evaluate's final number.
            steps = {"train_elbo_step": [(seen, value) for seen, value, *_ in points]}
            if config.algorithm == "wake-sleep":  # points: (seen, ELBO, wake objective, sleep objective)
                steps |= {"wake_objective_step": [(p[0], p[2]) for p in points],
                          "sleep_objective_step": [(p[0], p[3]) for p in points]}
            series = {**steps, **{key: [(row["examples_seen"], row[column])] for key, column in (
                ("train_elbo", "train_elbo"), ("valid_elbo", "valid_elbo"), ("test_elbo_curve", "test_elbo"),
                ("learning_rate", "learning_rate"), ("elapsed_seconds", "seconds"))}}
            if logged is None:  # the first evaluation after resuming: what the run holds already
                logged = tracker.last_steps(list(series))
            tracker.log_history({key: [(step, value) for step, value in values if step > logged.get(key, -1)]
                                 for key, values in series.items()})

        result = train_model(model, splits["train"], splits["valid"], config, device,
                             on_evaluation=log_evaluation, progress=progress, state=state, resume=saved,
                             extra_state={"mlflow_run_id": tracker.run_id}, test=splits["test"])
        record, last = result.progress, result.epochs.iloc[-1]
        if config.early_stopping_patience is not None:  # the model holds the best validated pass
            last = result.epochs[result.epochs["epoch"] == record.best_pass].iloc[-1]
        summary = {"profile": params.profile, "dataset": data.dataset, "binarization": data.binarization,
                   "input_dim": splits["train"].images.shape[1],
                   "likelihood": data.likelihood, "latent_dim": params.model.latent_dim,
                   "hidden_dim": params.model.hidden_dim, "hidden_layers": params.model.hidden_layers,
                   "algorithm": config.algorithm, "objective": config.objective, "samples": config.samples,
                   "optimizer": config.optimizer,
                   "learning_rate": record.learning_rate, "step_size_trials": record.step_size_trials,
                   "schedule": config.schedule, "batch_size": config.batch_size, "map_prior": config.map_prior,
                   "epochs": record.passes_done, "train_examples": len(splits["train"]),
                   "examples_seen": record.examples_seen,
                   "train_elbo": float(last["train_elbo"]), "valid_elbo": float(last["valid_elbo"]),
                   "best_valid_elbo": record.best_valid_elbo, "best_pass": record.best_pass,
                   "stopped_early": record.stopped_early, "resumed_from_passes": record.resumed_from,
                   "train_seconds": round(record.seconds, 2), "device": result.device, "software": software(),
                   "mlflow_run_id": tracker.run_id}
        save_checkpoint(result.model, paths.checkpoint,
                        metadata={k: v for k, v in summary.items() if k != "mlflow_run_id"})
        write_csv(paths.elbo_curve, result.epochs)
        write_csv(paths.train_steps, result.steps)
        write_json(paths.train_summary, summary)
        tracker.log_metrics({"train_seconds": record.seconds})
        if record.step_size_trials:
            tracker.log_params({f"train.step_size_trial.{k}": round(v, 4) for k, v in record.step_size_trials.items()}
                               | {"train.chosen_learning_rate": record.learning_rate})
        tracker.log_artifact(paths.elbo_curve, "curves")
        tracker.log_artifact(paths.checkpoint, "checkpoint")
    state.remove()  # the run is complete; a later run starts from its own initialisation
    print(f"trained {record.passes_done} passes ({record.examples_seen:,} examples) in {record.seconds:.1f} s "
          f"on {result.device}: train ELBO {summary['train_elbo']:.2f}, valid ELBO {summary['valid_elbo']:.2f} nats",
          flush=True)
    return summary
