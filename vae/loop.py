"""The training loop: passes of minibatch steps on data held on the device, and hooks between passes.

:func:`fit` runs the passes. Each pass draws a fresh permutation of the training examples and takes
one optimizer step per minibatch (:func:`run_pass`); then every hook's ``on_pass_end`` runs, in
the order given. A hook that evaluates returns the pass's ELBO row from ``on_pass_end``, and
every hook then sees that row in ``on_evaluation`` before the next hook's ``on_pass_end`` runs:

    for each pass:
        run_pass                        minibatch steps; a non-finite loss raises TrainingError
        Evaluation.on_pass_end          at the evaluation passes: train/valid/test ELBO row
            -> every hook.on_evaluation   (EarlyStopping keeps the best parameters, stops; ...)
        Checkpointing.on_pass_end       every checkpoint_interval seconds: the resumable state

The hooks here are :class:`Evaluation`, :class:`EarlyStopping`, :class:`ProgressReport` and
:class:`Checkpointing`; the ``train`` stage (:mod:`vae.train`) adds its MLflow logging. The loop
needs no tracking: a hook that is not given does not run.

Objectives per minibatch: the SGVB ELBO, estimator B with an analytic KL (Kingma & Welling 2014,
Alg. 1, Eq. 7), the k-sample importance-weighted bound (Burda et al. 2016, Eq. 8), or wake-sleep's
two phases (Hinton, Dayan, Frey & Neal 1995; :func:`wake_sleep_loss`). The loss is minus the
bound in nats per example (sum over pixels, mean over the minibatch).

The whole dataset sits on the device as one tensor and minibatches are taken by indexing a
permutation; dynamic binarization draws x ~ Bernoulli(intensity) for each minibatch on the
device. No DataLoader and no per-example Python work: for models this small, indexing is far
faster.

Random streams, all seeded from ``train.seed``: the training generator (``seed``: permutations,
binarization, the objectives' noise), in the order of the steps; the evaluation noise of the
train, validation and test ELBO (``seed + 2``, ``+ 3``, ``+ 4``). A resumed run restores the
training generator's state, so it ends with the same parameters as an uninterrupted one (same
device and thread count).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from vae import objectives
if TYPE_CHECKING:  # annotations only: the loop imports without pydantic (benchmarks/gpu_run.py's device image)
    from vae.config import TrainConfig
from vae.data.splits import Split
from vae.errors import TrainingError
from vae.io import atomic_open
from vae.model import VAE

EVAL_BATCH = 10000  # examples per forward pass of dataset_elbo
STATE_FORMAT = "vae-pipeline/train-state"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# How long, at which step size, evaluated when
# --------------------------------------------------------------------------------------------


def training_length(config: TrainConfig, examples: int) -> tuple[int, int]:
    """(examples to train on in all, passes): ``training_samples``, else ``epochs`` x ``examples``;
    the passes are that total over ``examples``, rounded up (the last one may be partial)."""
    total = config.training_samples if config.training_samples is not None else config.epochs * examples
    return total, -(-total // examples)


def schedule_stage(pass_index: int) -> int:
    """The stage i of IWAE's schedule that pass ``pass_index`` (0-based) falls in: passes
    (3^i - 1) / 2 to (3^(i+1) - 1) / 2 - 1, i.e. 3^i passes per stage (Burda et al. 2016, Sec. 5)."""
    stage = 0
    while (3 ** (stage + 1) - 1) // 2 <= pass_index:
        stage += 1
    return stage


def learning_rate_at(config: TrainConfig, base: float, pass_index: int) -> float:
    """The step size of pass ``pass_index`` (0-based): ``base``, or under ``iwae`` base * 10^(-i/7)
    for stage i (Burda et al. 2016, Sec. 5), or with ``schedule_rounding`` base * round(10^(1 - i/7), 1)
    / 10, the rounded factors of the authors' code (yburda/iwae, experiments.py: 1e-4 * round(10 **
    (1 - i / 7.), 1) for base 1e-3)."""
    if config.schedule == "iwae":
        stage = schedule_stage(pass_index)
        if config.schedule_rounding:
            return base * round(10.0 ** (1 - stage / 7.0), 1) / 10.0
        return base * 10.0 ** (-stage / 7.0)
    return base


def evaluation_passes(passes: int, points: int) -> set[int]:
    """The passes (1-based) after which the train and validation ELBO are computed: every pass
    when there are at most ``points``, else ``points`` log-spaced ones (the curves are drawn on a
    log axis) and always the last."""
    if passes <= points:
        return set(range(1, passes + 1))
    return {int(p) for p in np.unique(np.round(np.geomspace(1, passes, points)))} | {passes}


# --------------------------------------------------------------------------------------------
# The data and one pass over it
# --------------------------------------------------------------------------------------------


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
    (:func:`vae.objectives.wake_sleep`, L = ``config.samples``), so one optimizer over all
    parameters gives each its own phase's update.
    record: (3,) float, nats per example, in :data:`WAKE_SLEEP_STEP_COLUMNS` order: the minibatch
    ELBO (estimator B at the wake phase's samples), the mean wake and the mean sleep objective,
    each detached. A non-finite loss has a non-finite wake or sleep entry, so the NaN guard sees it.
    """
    terms = objectives.wake_sleep(model, x, config.samples, generator)
    wake, sleep = terms.wake.mean(), terms.sleep.mean()
    record = torch.stack([terms.elbo.mean(), wake.detach(), sleep.detach()])
    return -(wake + sleep), record


def run_pass(model: VAE, optimizer: torch.optim.Optimizer, data: TrainingData, count: int,
             config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
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
    return values


@torch.no_grad()
def dataset_elbo(model: VAE, x: torch.Tensor, seed: int) -> float:
    """Mean single-sample ELBO over ``x`` (N, D) with fixed noise (a generator seeded with
    ``seed``, on x's device), in nats per example; batches of :data:`EVAL_BATCH` examples."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = 0.0
    for start in range(0, len(x), EVAL_BATCH):
        total += float(objectives.elbo(model, x[start : start + EVAL_BATCH], generator=generator).sum())
    return total / len(x)


# --------------------------------------------------------------------------------------------
# The record of a run, and its resumable checkpoint
# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """The resumable part of training: where it is, what it has recorded, and its choices.

    ``epoch_rows``: one dict per evaluated pass (:class:`Evaluation`'s row); ``step_rows``: one
    tuple (step, examples_seen, bound[, wake, sleep]) per ``log_interval`` steps, each value the
    mean over those steps in nats per example; ``seconds``: training time, resumed runs included.
    """

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
    Read with ``torch.load(weights_only=True)``; written atomically. The payload
    (:class:`Checkpointing`): format, format_version, fingerprint, model, optimizer, generator,
    progress (:class:`Progress` as a dict), best_model, and the caller's extra entries.
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


def restore(payload: dict, model: VAE, optimizer: torch.optim.Optimizer,
            generator: torch.Generator) -> dict[str, torch.Tensor] | None:
    """Load a checkpoint's model, optimizer and generator states (``payload`` from
    :meth:`ResumableState.load`) into those given; returns its best validated parameters (None
    when early stopping kept none). Its :class:`Progress` is ``Progress(**payload["progress"])``."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    generator.set_state(payload["generator"])
    return payload.get("best_model")


def _copy_state(model: VAE) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A training run as :func:`fit` and its hooks see it between passes.

    ``passes`` and ``examples`` are the whole run's (:func:`training_length`); ``learning_rate``
    is the last pass's step size; ``best_model`` the best validated parameters that
    :class:`EarlyStopping` keeps and :class:`Checkpointing` saves; ``checkpoint`` the file where
    the last good state is kept (None: none); ``failed`` is True in ``on_end`` after an error.
    """

    model: VAE
    optimizer: torch.optim.Optimizer
    data: TrainingData
    config: TrainConfig
    generator: torch.Generator
    progress: Progress
    passes: int
    examples: int
    learning_rate: float = math.nan
    best_model: dict[str, torch.Tensor] | None = None
    checkpoint: Path | None = None
    failed: bool = False
    evaluated_rows: int = 0  # len(progress.step_rows) at the previous evaluation (or at the start)

    @property
    def finished(self) -> bool:
        return self.progress.passes_done >= self.passes or self.progress.stopped_early

    @property
    def points(self) -> list[tuple]:
        """The per-step curve since the previous evaluation (or since this process started):
        (examples_seen, bound[, wake objective, sleep objective]) per row, nats per example."""
        return [row[1:] for row in self.progress.step_rows[self.evaluated_rows:]]

    def kept(self) -> str:
        """What an error message says survives a failed run."""
        if self.checkpoint is not None and self.checkpoint.is_file():
            return f"the last good checkpoint {self.checkpoint} is kept"
        return "no checkpoint had been written yet"


class Hook:
    """What runs around the passes of :func:`fit`; every method does nothing unless overridden."""

    def on_start(self, run: Run) -> None:
        """Before the first pass (of this process: after a resume, the first pass left)."""

    def on_pass_end(self, run: Run) -> dict | None:
        """After each pass, hooks in order. Return an evaluation row to show it to every hook."""
        return None

    def on_evaluation(self, run: Run, row: dict) -> None:
        """After an evaluation (:class:`Evaluation`'s row), before the later hooks' ``on_pass_end``."""

    def on_end(self, run: Run) -> None:
        """After the last pass, or after an error (then ``run.failed``), which is raised on."""


def fit(model: VAE, optimizer: torch.optim.Optimizer, data: TrainingData, config: TrainConfig,
        hooks: Sequence[Hook], *, generator: torch.Generator, progress: Progress | None = None,
        best_model: dict[str, torch.Tensor] | None = None) -> Run:
    """Train ``model`` in place with ``optimizer`` on ``data`` for :func:`training_length` of
    ``config``, step size :func:`learning_rate_at` each pass, ``hooks`` between passes.

    ``generator`` draws every permutation, binarization and objective noise, in step order; a
    resumed run passes its restored ``progress`` and ``best_model`` (:func:`restore`). The model
    stays in training mode. Returns the :class:`Run` (its ``progress`` holds the histories).

    Raises:
        TrainingError: a non-finite loss (naming the step), or whatever a hook raises.
    """
    examples, passes = training_length(config, len(data))
    progress = progress if progress is not None else Progress(learning_rate=config.learning_rate)
    run = Run(model, optimizer, data, config, generator, progress, passes, examples, best_model=best_model,
              evaluated_rows=len(progress.step_rows))
    started, seconds_before = time.perf_counter(), progress.seconds
    for hook in hooks:
        hook.on_start(run)
    try:
        while not run.finished:
            count = min(len(data), examples - progress.passes_done * len(data))
            run.learning_rate = learning_rate_at(config, progress.learning_rate, progress.passes_done)
            for group in optimizer.param_groups:
                group["lr"] = run.learning_rate
            values = run_pass(model, optimizer, data, count, config, generator)
            _record_pass(run, values, count)
            progress.seconds = seconds_before + time.perf_counter() - started
            for hook in hooks:
                row = hook.on_pass_end(run)
                if row is not None:  # an evaluation: every hook sees it
                    for each in hooks:
                        each.on_evaluation(run, row)
                    run.evaluated_rows = len(progress.step_rows)
    except BaseException:
        run.failed = True
        raise
    finally:
        for hook in hooks:
            hook.on_end(run)
    return run


def _record_pass(run: Run, values: torch.Tensor, count: int) -> None:
    """Check a pass's per-step bounds (one device sync), add its per-step rows (means over
    ``log_interval`` steps) and advance the counters by its ``count`` examples."""
    progress, config = run.progress, run.config
    finite = torch.isfinite(values).reshape(len(values), -1).all(-1)  # per step
    if not bool(finite.all()):
        bad = progress.step + 1 + int((~finite).nonzero()[0])
        raise TrainingError(f"non-finite loss at step {bad} (pass {progress.passes_done + 1}, learning rate "
                            f"{run.learning_rate:g}); {run.kept()}. Try a smaller train.learning_rate")
    for start in range(0, len(values), config.log_interval):
        window = values[start : start + config.log_interval]
        step = progress.step + start + len(window)
        seen = progress.examples_seen + min((start + len(window)) * config.batch_size, count)
        means = (float(window.mean()),) if values.ndim == 1 else tuple(window.mean(0).tolist())
        progress.step_rows.append((step, seen, *means))
    progress.step += len(values)
    progress.examples_seen += count
    progress.passes_done += 1


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


class Evaluation(Hook):
    """The curves' rows: at each of :func:`evaluation_passes` (``curve_points`` of them), the
    single-sample ELBO (:func:`dataset_elbo`, nats per example) of ``train_x``, ``valid_x`` and,
    when given, ``test_x`` ((N, D) tensors on the model's device), with fixed noise seeded
    ``train.seed`` + 2, + 3, + 4, in eval mode.

    The row: epoch, examples_seen, train_elbo, valid_elbo[, test_elbo], learning_rate, seconds;
    appended to ``progress.epoch_rows``. The best validation ELBO and its pass are tracked in
    ``progress`` (the test ELBO is only recorded: nothing in training looks at it).

    Raises:
        TrainingError: a non-finite train or validation ELBO.
    """

    def __init__(self, train_x: torch.Tensor, valid_x: torch.Tensor, test_x: torch.Tensor | None = None) -> None:
        self.train_x, self.valid_x, self.test_x = train_x, valid_x, test_x
        self.due: set[int] = set()

    def on_start(self, run: Run) -> None:
        self.due = evaluation_passes(run.passes, run.config.curve_points)

    def on_pass_end(self, run: Run) -> dict | None:
        progress, seed = run.progress, run.config.seed
        if progress.passes_done not in self.due:
            return None
        run.model.eval()
        row = {"epoch": progress.passes_done, "examples_seen": progress.examples_seen,
               "train_elbo": dataset_elbo(run.model, self.train_x, seed + 2),
               "valid_elbo": dataset_elbo(run.model, self.valid_x, seed + 3),
               **({"test_elbo": dataset_elbo(run.model, self.test_x, seed + 4)} if self.test_x is not None else {}),
               "learning_rate": run.learning_rate, "seconds": progress.seconds}
        run.model.train()
        if not (math.isfinite(row["train_elbo"]) and math.isfinite(row["valid_elbo"])):
            raise TrainingError(f"non-finite ELBO after pass {progress.passes_done} (step {progress.step}): "
                                f"train {row['train_elbo']}, valid {row['valid_elbo']}; "
                                f"{run.kept()}. Try a smaller train.learning_rate")
        progress.epoch_rows.append(row)
        if row["valid_elbo"] > progress.best_valid_elbo:
            progress.best_valid_elbo, progress.best_pass, progress.evaluations_since_best = \
                row["valid_elbo"], progress.passes_done, 0
        else:
            progress.evaluations_since_best += 1
        return row


class EarlyStopping(Hook):
    """Stops after ``patience`` evaluations without a better validation ELBO, keeping the best
    validated parameters (``run.best_model``), which the model holds at the end, stopped or not."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_evaluation(self, run: Run, row: dict) -> None:
        progress = run.progress
        if progress.best_pass == progress.passes_done:  # this pass is the best so far
            run.best_model = _copy_state(run.model)
        if progress.evaluations_since_best >= self.patience:
            progress.stopped_early = True
            print(f"early stopping after pass {progress.passes_done}: no better validation ELBO in "
                  f"{progress.evaluations_since_best} evaluations; keeping pass {progress.best_pass}", flush=True)

    def on_end(self, run: Run) -> None:
        if run.best_model is not None and not run.failed:
            run.model.load_state_dict(run.best_model)


class ProgressReport(Hook):
    """A tqdm bar over the run's steps with the last ELBOs (``bar``), or else one plain line per
    evaluation: ``pass i/n: train ELBO ..., valid ELBO ... nats``."""

    def __init__(self, bar: bool = True) -> None:
        self.show_bar = bar

    def on_start(self, run: Run) -> None:
        size, batch = len(run.data), run.config.batch_size
        steps = sum(-(-min(size, run.examples - p * size) // batch) for p in range(run.passes))
        self.shown = run.progress.step
        self.bar = tqdm(total=steps, initial=self.shown, desc="train", unit="step", disable=not self.show_bar)

    def on_pass_end(self, run: Run) -> None:
        self.bar.update(run.progress.step - self.shown)
        self.shown = run.progress.step

    def on_evaluation(self, run: Run, row: dict) -> None:
        self.bar.set_postfix(train_elbo=f"{row['train_elbo']:.2f}", valid_elbo=f"{row['valid_elbo']:.2f}")
        if not self.show_bar:
            print(f"pass {row['epoch']}/{run.passes}: train ELBO {row['train_elbo']:.2f}, "
                  f"valid ELBO {row['valid_elbo']:.2f} nats", flush=True)

    def on_end(self, run: Run) -> None:
        self.bar.close()


class Checkpointing(Hook):
    """Every ``interval`` seconds (at the end of a pass, the last pass excepted) writes the
    resumable state to ``state``: the model, the optimizer, the generator, ``progress``, the best
    validated parameters and the ``extra`` entries (plain values, e.g. the MLflow run id).

    A step can turn the parameters non-finite with a finite loss (a pass's last step), so they
    are checked before each write, and such a state never replaces the last good checkpoint. The
    check runs at each due write with ``state`` None too (nothing written), so a run fails at
    the same point with or without checkpoints.

    Raises:
        TrainingError: non-finite parameters at a due write.
    """

    def __init__(self, state: ResumableState | None, interval: float, extra: dict | None = None) -> None:
        self.state, self.interval, self.extra = state, interval, extra or {}

    def on_start(self, run: Run) -> None:
        run.checkpoint = self.state.path if self.state is not None else None
        self.last = time.perf_counter()

    def on_pass_end(self, run: Run) -> None:
        if run.finished or time.perf_counter() - self.last < self.interval:
            return
        progress = run.progress
        if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
            raise TrainingError(f"non-finite parameters after step {progress.step} (pass {progress.passes_done}, "
                                f"learning rate {run.learning_rate:g}); {run.kept()}. "
                                "Try a smaller train.learning_rate")
        if self.state is not None:
            self.state.save({"model": _copy_state(run.model), "optimizer": run.optimizer.state_dict(),
                             "generator": run.generator.get_state(), "progress": asdict(progress),
                             "best_model": run.best_model, **self.extra})
        self.last = time.perf_counter()


class OnEvaluation(Hook):
    """Calls ``callback(row, points)`` at each evaluation: the row and :attr:`Run.points`."""

    def __init__(self, callback: Callable[[dict, list[tuple]], None]) -> None:
        self.callback = callback

    def on_evaluation(self, run: Run, row: dict) -> None:
        self.callback(row, run.points)
