"""The ``train`` stage: fit the VAE by stochastic gradient ascent on a variational bound.

Objectives: the SGVB ELBO, estimator B with an analytic KL (Kingma & Welling 2014, Alg. 1, Eq. 7),
or the k-sample importance-weighted bound (Burda et al. 2016, Eq. 8). The loss is minus the bound
in nats per example (sum over pixels, mean over the minibatch), plus, with ``map_prior``, the
N(0, I) prior on the parameters scaled by 1 / N (weight decay; AEVB Sec. 5's approximate MAP).

``train.algorithm: wake-sleep`` trains the same encoder and decoder by wake-sleep instead (Hinton,
Dayan, Frey & Neal 1995; AEVB Sec. 5's baseline): per minibatch the loss is
-(mean wake objective + mean sleep objective) (:func:`vae.loop.wake_sleep_loss`), whose two terms
reach disjoint parameters (decoder, encoder), so one optimizer over all parameters gives each its
own phase's update with the same optimizer settings. Its train, validation and test curves are the
same :func:`~vae.loop.dataset_elbo` as AEVB's; its per-step curve records the minibatch ELBO at the
wake phase's samples, beside the wake and sleep objectives under their own names.

The passes themselves are :func:`vae.loop.fit`'s, with its hooks (evaluation, early stopping,
progress, checkpoints); this stage picks the step size, resumes, adds the MLflow logging
(:class:`MlflowLogging`) and writes the outputs.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from vae import tracking
from vae.config import Params, TrainConfig
from vae.data.splits import Split, load_splits
from vae.devices import computes_on, describe, resolve_device, software
from vae.errors import TrainingError
from vae.io import file_sha256, write_csv, write_json
from vae.loop import (
    WAKE_SLEEP_STEP_COLUMNS,
    Checkpointing,
    EarlyStopping,
    Evaluation,
    Hook,
    OnEvaluation,
    Progress,
    ProgressReport,
    ResumableState,
    Run,
    TrainingData,
    dataset_elbo,
    fit,
    restore,
    run_pass,
    training_length,
)
from vae.model import VAE, TwoLayerVAE, save_checkpoint

# Columns of the per-pass rows (vae.loop.Evaluation) that describe the execution, not the result: logged
# to MLflow (elapsed_seconds), left out of elbo_curve.csv.
EXECUTION_COLUMNS = ("seconds",)


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


def select_step_size(model: VAE, data: TrainingData, config: TrainConfig, train_x: torch.Tensor,
                     progress: bool = True) -> tuple[float, dict[str, float]]:
    """Pick the global step size as the AEVB paper did (Sec. 5): train from the model's current
    parameters with each of ``config.step_size_candidates`` for ``step_size_selection_samples``
    examples (same minibatches for each: a generator seeded ``train.seed`` + 7) and keep the one
    with the best training ELBO on ``train_x`` (under wake-sleep too: the ELBO is the yardstick
    both algorithms share).

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


def train_model(model: VAE, train: Split, valid: Split, config: TrainConfig, device: torch.device,
                on_evaluation: Callable[[dict, list[tuple[int, float]]], None] | None = None,
                progress: bool = True, state: ResumableState | None = None, resume: dict | None = None,
                extra_state: dict | None = None, test: Split | None = None,
                hooks: Sequence[Hook] = ()) -> TrainResult:
    """Train ``model`` in place, from scratch or from ``resume``, with :func:`vae.loop.fit`.

    Random streams: the fixed training subset of the train ELBO is binarized by a generator
    seeded ``train.seed`` + 1, then the training generator (``train.seed``) draws every step;
    step-size selection (when configured, fresh runs only) uses its own (``train.seed`` + 7).

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
        hooks: more hooks (:class:`vae.loop.Hook`), run after ``on_evaluation``'s and before the
            checkpoints (e.g. :class:`MlflowLogging`).

    Returns:
        :class:`TrainResult` with the histories; the model in eval mode.

    Raises:
        TrainingError: a non-finite loss or ELBO; the last checkpoint in ``state`` is kept.
    """
    model.to(device).train()
    data = TrainingData(train, device)
    valid_x = valid.values(device=device)
    test_x = test.values(device=device) if test is not None else None
    fixed = torch.Generator(device=device).manual_seed(config.seed + 1)
    train_x = data.fixed(min(config.elbo_eval_size, len(data)), fixed)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    if resume is not None:
        record = Progress(**resume["progress"])
    else:
        learning_rate, trials = config.learning_rate, {}
        if config.step_size_candidates:
            learning_rate, trials = select_step_size(model, data, config, train_x, progress)
            print(f"step size {learning_rate:g} chosen from {config.step_size_candidates}", flush=True)
        record = Progress(learning_rate=learning_rate, step_size_trials=trials)
    optimizer = make_optimizer(config, model.parameters(), record.learning_rate, len(data))
    best_model = None
    if resume is not None:
        best_model = restore(resume, model, optimizer, generator)
        record.resumed_from.append(record.passes_done)
        print(f"resuming from {state.path if state is not None else 'a checkpoint'}: pass {record.passes_done} of "
              f"{training_length(config, len(data))[1]}, {record.examples_seen} examples seen", flush=True)

    patience = config.early_stopping_patience
    run = fit(model, optimizer, data, config, [
        Evaluation(train_x, valid_x, test_x),
        *([EarlyStopping(patience)] if patience is not None else []),
        ProgressReport(bar=progress),
        *([OnEvaluation(on_evaluation)] if on_evaluation is not None else []),
        *hooks,
        Checkpointing(state, config.checkpoint_interval, extra_state),
    ], generator=generator, progress=record, best_model=best_model)
    model.eval()
    columns = WAKE_SLEEP_STEP_COLUMNS if config.algorithm == "wake-sleep" else ("train_elbo",)
    return TrainResult(model=model, epochs=pd.DataFrame(record.epoch_rows),
                       steps=pd.DataFrame(record.step_rows, columns=["step", "examples_seen", *columns]),
                       progress=run.progress, device=describe(device))


class MlflowLogging(Hook):
    """Logs each evaluation to the MLflow run of ``tracker``: the per-step curve since the previous
    one (``train_elbo_step``; under wake-sleep also ``wake_objective_step``, ``sleep_objective_step``)
    and the pass's ``train_elbo``, ``valid_elbo``, ``test_elbo_curve`` (``test_elbo`` is the
    evaluate stage's final number), ``learning_rate`` and ``elapsed_seconds``, each at its
    examples_seen step.

    ``resumed``: the run resumes an interrupted one in the same MLflow run. The passes after its
    checkpoint were logged before the interruption and are trained again now; at the first
    evaluation the hook reads what the run holds (:meth:`vae.tracking.Tracker.last_steps`) and
    logs only later points, so that no point appears twice.
    """

    def __init__(self, tracker: Any, wake_sleep: bool, resumed: bool) -> None:
        self.tracker, self.wake_sleep = tracker, wake_sleep
        self.logged: dict[str, int] | None = None if resumed else {}

    def on_evaluation(self, run: Run, row: dict) -> None:
        points = run.points
        steps = {"train_elbo_step": [(seen, value) for seen, value, *_ in points]}
        if self.wake_sleep:  # points: (seen, ELBO, wake objective, sleep objective)
            steps |= {"wake_objective_step": [(p[0], p[2]) for p in points],
                      "sleep_objective_step": [(p[0], p[3]) for p in points]}
        series = {**steps, **{key: [(row["examples_seen"], row[column])] for key, column in (
            ("train_elbo", "train_elbo"), ("valid_elbo", "valid_elbo"), ("test_elbo_curve", "test_elbo"),
            ("learning_rate", "learning_rate"), ("elapsed_seconds", "seconds"))}}
        if self.logged is None:  # the first evaluation after resuming: what the run holds already
            self.logged = self.tracker.last_steps(list(series))
        self.tracker.log_history({key: [(step, value) for step, value in values if step > self.logged.get(key, -1)]
                                  for key, values in series.items()})


def fingerprint(params: Params, train_file: Path, device: torch.device) -> str:
    """Identity of a training run's inputs: the data, model and train parameters that change the
    result, the training split's bytes and the device type (a resumed run must match all)."""
    digest = hashlib.sha256()
    train = {k: v for k, v in params.train.model_dump().items() if k not in ("device", "checkpoint_interval")}
    data, model = params.data.model_dump(), params.model.model_dump()
    # Options added later are left out at their defaults, as before they existed, so that states
    # written then still resume.
    for section, key, default in ((train, "algorithm", "aevb"), (train, "schedule_rounding", False),
                                  (data, "split_order", "permuted"), (model, "output_bias_init", "default")):
        if section[key] == default:
            del section[key]
    if model["stochastic_layers"] == 1:  # the top layer's sizes build nothing then
        for key in ("stochastic_layers", "top_latent_dim", "top_hidden_dim"):
            del model[key]
    settings = {"profile": None, "data": data, "model": model, "train": train, "device": device.type}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    with open(train_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pixel_means(split: Split) -> torch.Tensor:
    """Each pixel's mean intensity over the split's images: (D,) float64 in [0, 1] (grey images
    0..255 scaled; binary ones as they are)."""
    sums = split.images.sum(0, dtype=torch.float64)  # no float copy of the whole split
    return sums / len(split) / (1.0 if split.binary else 255.0)


def build_model(params: Params, input_dim: int, train: Split | None = None) -> VAE:
    """The configured model (:class:`VAE`, or :class:`TwoLayerVAE` with ``model.stochastic_layers``
    2), initialised from ``train.seed`` (N(0, init_std^2) when set), its
    output bias from the training split's mean image when ``model.output_bias_init`` is
    ``data_mean`` (:meth:`vae.model.VAE.initialize_output_bias_`).

    Raises:
        ValueError: ``data_mean`` without the training split ``train``.
    """
    torch.manual_seed(params.train.seed)
    config = params.model
    sizes = {"input_dim": input_dim, "hidden_dim": config.hidden_dim, "latent_dim": config.latent_dim,
             "hidden_layers": config.hidden_layers, "likelihood": params.data.likelihood}
    model = VAE(**sizes) if config.stochastic_layers == 1 else \
        TwoLayerVAE(**sizes, top_latent_dim=config.top_latent_dim, top_hidden_dim=config.top_hidden_dim)
    if params.model.init_std is not None:
        model.initialize_normal_(params.model.init_std, torch.Generator().manual_seed(params.train.seed))
    if params.model.output_bias_init == "data_mean":
        if train is None:
            raise ValueError("model.output_bias_init = data_mean needs the training split")
        model.initialize_output_bias_(pixel_means(train))
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
    model = build_model(params, splits["train"].images.shape[1], splits["train"])
    state = ResumableState(paths.train_state, fingerprint(params, folder / "train.pt", device))
    saved = state.load()
    length = f"e{config.epochs}" if config.epochs is not None else f"n{config.training_samples:.0e}".replace("+", "")
    experiment = experiment or f"vae-{data.dataset}"
    latents = f"z{params.model.latent_dim}"
    if params.model.stochastic_layers == 2:
        latents += f"-{params.model.top_latent_dim}"
    run_name = run_name or f"{params.profile}-{data.dataset}-{data.binarization}-{latents}-{length}" \
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
        logging = MlflowLogging(tracker, wake_sleep=config.algorithm == "wake-sleep",
                                resumed=tracker.active and tracker.run_id == resume_id)
        result = train_model(model, splits["train"], splits["valid"], config, device, progress=progress,
                             state=state, resume=saved, extra_state={"mlflow_run_id": tracker.run_id},
                             test=splits["test"], hooks=[logging])
        record, last = result.progress, result.epochs.iloc[-1]
        if config.early_stopping_patience is not None:  # the model holds the best validated pass
            last = result.epochs[result.epochs["epoch"] == record.best_pass].iloc[-1]
        # Not the profile: a label (the MLflow tag above; the report shows it), so that changing it re-runs no training.
        summary = {"dataset": data.dataset, "binarization": data.binarization,
                   "input_dim": splits["train"].images.shape[1],
                   "likelihood": data.likelihood, "latent_dim": params.model.latent_dim,
                   "hidden_dim": params.model.hidden_dim, "hidden_layers": params.model.hidden_layers,
                   **({"stochastic_layers": 2, "top_latent_dim": params.model.top_latent_dim,
                       "top_hidden_dim": params.model.top_hidden_dim} if params.model.stochastic_layers == 2 else {}),
                   "algorithm": config.algorithm, "objective": config.objective, "samples": config.samples,
                   "optimizer": config.optimizer,
                   "learning_rate": record.learning_rate, "step_size_trials": record.step_size_trials,
                   "schedule": config.schedule, "batch_size": config.batch_size, "map_prior": config.map_prior,
                   "epochs": record.passes_done, "train_examples": len(splits["train"]),
                   "examples_seen": record.examples_seen,
                   "train_elbo": float(last["train_elbo"]), "valid_elbo": float(last["valid_elbo"]),
                   "best_valid_elbo": record.best_valid_elbo, "best_pass": record.best_pass,
                   "stopped_early": record.stopped_early, "device": computes_on(device), "software": software()}
        # The outputs hold what the training computed, nothing of how this execution went: its wall time,
        # resumptions and MLflow run go to the run (metric train_seconds, tags), so that two trainings with
        # the same result write the same bytes (and the same hashes in dvc.lock).
        save_checkpoint(result.model, paths.checkpoint, metadata=summary)
        write_csv(paths.elbo_curve, result.epochs.drop(columns=list(EXECUTION_COLUMNS), errors="ignore"))
        write_csv(paths.train_steps, result.steps)
        write_json(paths.train_summary, summary)
        tracker.log_metrics({"train_seconds": record.seconds})
        if tracker.active:  # how the later stages (and the flows) find this run: by the checkpoint's hash
            tracker.set_tags({tracking.MODEL_TAG: file_sha256(paths.checkpoint),
                              tracking.RESUMED_TAG: ",".join(map(str, record.resumed_from)) or None})
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
