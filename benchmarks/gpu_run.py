"""One prepared GPU run (issue 20): every figure a GPU changes, measured in one command of under 10 minutes.

With only the packages of the device machine's image (torch and numpy; no dvc, prefect, mlflow or
pydantic) and the project's own model, objective and estimator code (:mod:`vae.model`,
:mod:`vae.objectives`, :mod:`vae.mcmc`, :mod:`vae.data.splits`; nothing that imports
:mod:`vae.config`), tracking off, this script runs four parts inside one wall-clock budget:

1. **Training throughput** of aevb-mnist (784-500-20 tanh, Bernoulli decoder, N(0, 0.01^2) init,
   Adagrad lr 0.02, weight decay 1/N, batch 100, L = 1) and iwae-mnist (784-200-200-50 tanh, two
   hidden layers, PyTorch's init, Adam (0.9, 0.999) eps 1e-4, lr 1e-3, batch 20, L = 1), each as
   - ``eager``: the train stage's step as :func:`vae.loop.run_pass` takes it (data held on the
     device as one tensor, a minibatch by indexing a permutation, dynamic binarization by one
     ``torch.bernoulli`` on the device, :func:`vae.objectives.elbo`, backward, the project's
     optimizer settings of ``vae.train.make_optimizer``: fused Adam, Adagrad fused on CPU and
     foreach on CUDA), written out here (:class:`Trainer`) because ``run_pass`` and
     ``make_optimizer`` take a validated ``TrainConfig`` (pydantic, absent from the image);
   - ``graph``: ``--graph-steps`` whole steps (forward, backward and optimizer step, with the
     Bernoulli draw and the reparameterization noise on the device) captured in one
     ``torch.cuda.CUDAGraph`` by PyTorch's documented whole-network pattern (warm-up on a side
     stream, ``zero_grad(set_to_none=True)``, capture under ``torch.cuda.graph``, static index
     buffer, replay); Adam with ``capturable=True`` (and a device-tensor learning rate, so the
     schedule can change it between replays). Adagrad has no ``capturable`` option (read in
     torch 2.15's source here; 2.11's is taken to be the same, and the device run reports which
     capture worked), and its step does not run the capture health check; its foreach update
     with ``lr_decay = 0`` reads its step count only on the CPU and the count does not enter the
     arithmetic, so the whole step is captured as it is (its CPU step counter then stays at the
     capture's value). If that capture fails, forward and backward are captured and Adagrad's
     step runs eagerly after each replay; the table says which ran;
   - ``compile``: the minibatch bound (Bernoulli draw and ELBO) under
     ``torch.compile(mode="reduce-overhead")`` (CUDA graphs through cudagraph trees; backward
     through AOTAutograd), ``torch._inductor.config.fallback_random`` on so that the compiled
     random ops draw what eager draws, the optimizer step eager.
   Before a variant is timed its first ``--check-steps`` steps are run from the same parameters,
   optimizer state, permutations and RNG seed as eager's, and its per-step bounds must equal
   eager's within ``LOSS_RTOL`` (relative); the check (and the largest difference of the
   parameters after those steps) is reported. Every variant draws its noise from the device's
   default generator, reseeded before each run (CUDA graphs replay that generator's Philox
   stream; PyTorch's "CUDA Graph-safe RNG"), and the permutations from a CPU generator, so a
   replayed step sees the eager step's noise. Eager's own check: a second run from the reset
   state reproduces the first (exactly, on the CPU; ``exact`` in the JSON says).
2. **The evaluator** L_5000 (:func:`vae.objectives.importance_sampled_log_likelihood`, k = 5000,
   chunks of ``model.pairs_for_budget(--eval-memory-mb)`` pairs) on the whole 10000-image test
   set, timed, on the iwae-mnist model as part 4 leaves it (its "test L_5000 at the end").
3. **AIS** (:func:`vae.mcmc.ais`) at Wu et al. (2017)'s setting: 10000 sigmoid temperatures,
   16 chains, 10 leapfrog steps, initial distribution the prior, on the first n test images of
   that model, n sized to ``--ais-share`` of the budget from two short probes (time per
   temperature = a + b n), all n examples in one chunk.
4. **The iwae-mnist schedule** as the profile runs it (Burda et al. 2016, Sec. 5, as the authors'
   code ran it: ``train.schedule: iwae``, ``schedule_rounding: true``): 3^i passes at
   1e-4 * round(10^(1 - i/7), 1), i = 0..7, 3280 passes of 2980 steps (the 59,600 training images
   of ``split_order: file``) at batch 20, from a fresh model whose output bias is the logit of the
   training mean image (``output_bias_init: data_mean``), with the fastest variant whose check
   passed, for whatever time the budget leaves after reserving parts 2 and 3 (predicted by
   probes run before it). Reports the passes and steps reached, and what the whole schedule
   would take at that rate: the full schedule is a GPU's work, of hours, beyond one 10-minute
   call. ``--schedule-profile iwae-mnist-2layer`` runs parts 1 (beside aevb-mnist), 2, 3 and 4
   on the two-stochastic-layer model instead (784-200-200-100-100-100-50; AIS through autograd).

Order of execution: 1, the probes of 2 and 3, 4, 2, 3. Each part is wrapped so that a failure
records its error in the table and the rest still run. After each part the table (Markdown,
``gpu_run.md``), the JSON record (``gpu_run.json``) and the log (``gpu_run.log``) are rewritten in
``--out``, so a run stopped at its limit still leaves what it measured.

Targets, checked when CUDA is used: the aevb-mnist step at least 20x the 2-core CPU's
(:data:`CPU_REFERENCE`: 22,133 examples/s, benchmarks/train_speed.results.md, 2026-11-21 00:58
UTC entry, the project step on 2 threads); the full k = 5000 test-set evaluation in seconds
(read as under 60 s); the iwae-mnist step at batch 20 at >= 5000 steps/s with graphs.

Data: the processed MNIST splits travel in the git-ignored folder ``gpu_data/`` (one compressed
file, about 9 MB, against 47 MB of .pt files; the device tool carries at most 64 MiB), written
here by

    uv run python benchmarks/gpu_run.py --prepare        # data/processed/mnist -> gpu_data/mnist.npz

The device machine's Python is the image's (no uv, no venv; ``python3``); the repository root is
put on ``sys.path``. The exact device call (the budget leaves 60 s of the 600 for start-up, CUDA
initialisation and the writes):

    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_run.py --out $OUT --budget-s 540",
        carry=["gpu_data"], timeout_s=600)

or the same through ``bash benchmarks/gpu_run.sh --out $OUT --budget-s 540``. The test suite runs
``--device cpu --tiny`` (tests/test_gpu_run.py): the same code paths on small data and small
counts, the CUDA-only variants skipped with the reason.

    uv run python benchmarks/gpu_run.py --device cpu --tiny --budget-s 8 --out /tmp/gpu_run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The bottom layer of vae/ (pyproject.toml's import-linter contract) and the training loop, whose
# config import is for annotations only: none imports vae.config (pydantic), tracking (mlflow) or the stages.
from vae import mcmc, objectives  # noqa: E402
from vae.data.splits import Split, load_split  # noqa: E402
from vae.loop import learning_rate_at, schedule_stage  # noqa: E402
from vae.model import VAE, TwoLayerVAE  # noqa: E402

INPUT_DIM = 784
DEFAULT_DATA = ROOT / "gpu_data" / "mnist.npz"
DEFAULT_PROCESSED = ROOT / "data" / "processed" / "mnist"
LOSS_RTOL = 1e-4  # per-step bound of a variant against eager's, relative (float32 rounding ~1e-6)
VARIANTS = ("eager", "graph", "compile")

# The 2-core CPU's aevb-mnist training rate (benchmarks/train_speed.results.md, entry of
# 2026-11-21 00:58 UTC: "project step (vae.train.run_pass)", median of 3 runs of 20000 examples,
# 2 threads, AMD EPYC, torch 2.15.0, real MNIST, batch 100). The 20x target is against it.
CPU_REFERENCE = {"model": "aevb-mnist", "examples_per_s": 22133.0, "steps_per_s": 221.33, "batch": 100,
                 "source": "benchmarks/train_speed.results.md, 2026-11-21 00:58 UTC entry: project step "
                           "(vae.train.run_pass), 2 threads, x86_64 AMD EPYC, torch 2.15.0+cu132"}
TARGET_AEVB_SPEEDUP = 20.0
TARGET_EVAL_SECONDS = 60.0
TARGET_IWAE_STEPS = 5000.0

IWAE_BATCH = 20
# IWAE's schedule (Burda et al. 2016, Sec. 5; vae.loop.schedule_stage / learning_rate_at).
SCHEDULE_STAGES = 8
SCHEDULE_PASSES = sum(3**i for i in range(SCHEDULE_STAGES))  # 3280
FULL_STEPS_PER_PASS = 59600 // IWAE_BATCH  # the profiles' split (the authors': 59600 train, 400 validate) at batch 20
# The profiles' schedule: rates rounded as the authors' code rounds them (vae.loop.learning_rate_at reads these two).
ROUNDED_SCHEDULE = SimpleNamespace(schedule="iwae", schedule_rounding=True)


@dataclass(frozen=True)
class Spec:
    """One profile's model and optimizer, as vae/profiles/<name>.yaml and vae.train set them up."""

    name: str
    hidden_dim: int
    latent_dim: int
    hidden_layers: int
    batch: int
    optimizer: str  # "adam" or "adagrad"
    learning_rate: float
    epsilon: float | None  # None: PyTorch's default eps
    map_prior: bool  # weight decay 1 / (training examples)
    init_std: float | None  # None: PyTorch's default initialisation
    output_bias_init: bool = False  # the decoder's output bias at the logit of the training mean image
    stochastic_layers: int = 1
    top_latent_dim: int = 50  # two stochastic layers only
    top_hidden_dim: int = 100

    @property
    def architecture(self) -> str:
        text = f"{INPUT_DIM}-" + "-".join([str(self.hidden_dim)] * self.hidden_layers) + f"-{self.latent_dim}"
        if self.stochastic_layers == 2:
            text += "-" + "-".join([str(self.top_hidden_dim)] * self.hidden_layers) + f"-{self.top_latent_dim}"
        return text


AEVB = Spec("aevb-mnist", 500, 20, 1, 100, "adagrad", 0.02, None, True, 0.01)
IWAE = Spec("iwae-mnist", 200, 50, 2, IWAE_BATCH, "adam", 1e-3, 1e-4, False, None, output_bias_init=True)
IWAE_2LAYER = Spec("iwae-mnist-2layer", 200, 100, 2, IWAE_BATCH, "adam", 1e-3, 1e-4, False, None,
                   output_bias_init=True, stochastic_layers=2, top_latent_dim=50, top_hidden_dim=100)
SCHEDULE_SPECS = {spec.name: spec for spec in (IWAE, IWAE_2LAYER)}  # --schedule-profile


def schedule_learning_rate(pass_index: int, base: float = 1e-3) -> float:
    """The profiles' rate in stage i (Burda et al. 2016, Sec. 5): base * round(10^(1 - i/7), 1) / 10, the
    authors' rounding, through :func:`vae.loop.learning_rate_at` (1e-3, 7.2e-4, 5.2e-4, ... for base 1e-3)."""
    return learning_rate_at(ROUNDED_SCHEDULE, base, pass_index)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def prepare_data(processed: Path, out: Path) -> Path:
    """Write the train and test splits of ``processed`` (``{train,test}.pt``, :func:`load_split`'s
    format) into one compressed ``.npz`` at ``out`` (uint8 images, the ``binary`` flag and the
    binarization name of each; labels and the validation split are not needed). Returns ``out``."""
    arrays: dict[str, np.ndarray] = {}
    for name in ("train", "test"):
        split = load_split(processed / f"{name}.pt")
        arrays[f"{name}_images"] = split.images.numpy()
        arrays[f"{name}_binary"] = np.array(split.binary)
        arrays[f"{name}_binarization"] = np.array(split.binarization)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".partial.npz")
    np.savez_compressed(temporary, **arrays)
    temporary.replace(out)
    return out


def _split_from(arrays: Any, name: str) -> Split:
    images = torch.from_numpy(np.ascontiguousarray(arrays[f"{name}_images"]))
    return Split(images=images, labels=torch.full((len(images),), -1), binary=bool(arrays[f"{name}_binary"]),
                 binarization=str(arrays[f"{name}_binarization"]))


def synthetic_splits(train: int, test: int, seed: int = 0) -> tuple[Split, Split]:
    """Grey uint8 training images (dynamic binarization) and binary test images, uniform noise."""
    g = torch.Generator().manual_seed(seed)
    grey = torch.randint(0, 256, (train, INPUT_DIM), dtype=torch.uint8, generator=g)
    binary = (torch.rand(test, INPUT_DIM, generator=g) < 0.15).to(torch.uint8)
    return (Split(grey, torch.full((train,), -1), False, "dynamic"),
            Split(binary, torch.full((test,), -1), True, "dynamic"))


def load_data(path: Path, processed: Path, train_limit: int | None, test_limit: int | None,
              seed: int) -> tuple[Split, Split, str]:
    """(train, test, description): ``path`` (:func:`prepare_data`'s file) if present, else the
    processed ``.pt`` splits, else synthetic images (speeds hold; likelihoods mean nothing)."""
    if path.is_file():
        with np.load(path) as arrays:
            train, test = _split_from(arrays, "train"), _split_from(arrays, "test")
        source = f"{_shown(path)}"
    elif (processed / "train.pt").is_file() and (processed / "test.pt").is_file():
        train, test = load_split(processed / "train.pt"), load_split(processed / "test.pt")
        source = f"{_shown(processed)}/{{train,test}}.pt"
    else:
        train, test = synthetic_splits(train_limit or 50000, test_limit or 10000, seed)
        source = (f"synthetic uniform images ({_shown(path)} not found: run --prepare; the likelihoods "
                  "mean nothing)")
    if train_limit is not None:
        train = Split(train.images[:train_limit], train.labels[:train_limit], train.binary, train.binarization)
    if test_limit is not None:
        test = Split(test.images[:test_limit], test.labels[:test_limit], test.binary, test.binarization)
    return train, test, (f"{source}: {len(train)} training images ({'binary' if train.binary else 'grey'}, "
                         f"binarization {train.binarization}), {len(test)} test images")


class DeviceData:
    """The training examples on the device as one (N, D) float tensor, as vae.loop.TrainingData
    holds them: intensities in [0, 1] resampled per minibatch when dynamically binarized, else
    the values as they are. N is cut to a multiple of ``multiple`` (whole minibatches)."""

    def __init__(self, split: Split, device: torch.device, multiple: int) -> None:
        count = len(split) - len(split) % multiple
        if count < multiple:
            raise ValueError(f"{len(split)} training images: fewer than one minibatch group of {multiple}")
        self.resample = split.binarization == "dynamic" and not split.binary
        images = split.images[:count]
        if self.resample:
            self.values = images.to(device).float().div_(255.0)
        else:
            self.values = Split(images, split.labels[:count], split.binary, split.binarization).values(device=device)

    def __len__(self) -> int:
        return self.values.shape[0]

    def pixel_means(self) -> torch.Tensor:
        """Each pixel's mean over the examples, (D,) float64 in [0, 1] (vae.train.pixel_means)."""
        return self.values.double().mean(0)


class IndexStream:
    """Minibatch indices: a fresh permutation per pass from a CPU generator (the same on every
    device and for every variant), moved to the device; ``take(count)`` gives the next ``count``."""

    def __init__(self, examples: int, seed: int, device: torch.device) -> None:
        self.examples, self.seed, self.device = examples, seed, device
        self.restart()

    def restart(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.order: torch.Tensor | None = None
        self.position = self.examples

    def take(self, count: int) -> torch.Tensor:
        """(count,) int64 on the device; ``count`` divides the examples, so no pass is cut."""
        if self.position + count > self.examples:
            self.order = torch.randperm(self.examples, generator=self.generator).to(self.device)
            self.position = 0
        indices = self.order[self.position : self.position + count]
        self.position += count
        return indices


# --------------------------------------------------------------------------------------------
# The training step and its three variants
# --------------------------------------------------------------------------------------------


def build_model(spec: Spec, seed: int, pixel_means: torch.Tensor | None = None) -> VAE:
    """The profile's model as vae.train.build_model makes it (torch seeded, optional N(0, std^2); a
    :class:`TwoLayerVAE` for two stochastic layers; the output bias from ``pixel_means``, (D,) in
    [0, 1], when the profile sets it and they are given)."""
    torch.manual_seed(seed)
    sizes = {"input_dim": INPUT_DIM, "hidden_dim": spec.hidden_dim, "latent_dim": spec.latent_dim,
             "hidden_layers": spec.hidden_layers}
    model = VAE(**sizes) if spec.stochastic_layers == 1 else \
        TwoLayerVAE(**sizes, top_latent_dim=spec.top_latent_dim, top_hidden_dim=spec.top_hidden_dim)
    if spec.init_std is not None:
        model.initialize_normal_(spec.init_std, torch.Generator().manual_seed(seed))
    if spec.output_bias_init and pixel_means is not None:
        model.initialize_output_bias_(pixel_means.cpu())
    return model


def make_optimizer(spec: Spec, parameters: list[torch.nn.Parameter], train_examples: int, device: torch.device,
                   *, capturable: bool = False, fused: bool | None = None) -> torch.optim.Optimizer:
    """vae.train.make_optimizer's settings (that module imports the configuration and tracking):
    Adam (0.9, 0.999) or Adagrad, eps when the profile sets it, weight decay 1/N under map_prior,
    fused kernels on CPU and for Adam on CUDA. ``capturable``: Adam's CUDA-graph-safe form, with
    the learning rate a device tensor (so a graph replay reads the current one)."""
    options: dict[str, Any] = {"lr": spec.learning_rate,
                               "weight_decay": 1.0 / train_examples if spec.map_prior else 0.0}
    if spec.epsilon is not None:
        options["eps"] = spec.epsilon
    if fused is None:
        fused = device.type == "cpu" or (device.type == "cuda" and spec.optimizer == "adam")
    options["fused"] = fused
    if not fused and device.type == "cuda":
        options["foreach"] = True
    if spec.optimizer == "adam":
        if capturable:
            options["capturable"] = True
            options["lr"] = torch.tensor(spec.learning_rate, device=device)
        return torch.optim.Adam(parameters, betas=(0.9, 0.999), **options)
    if spec.optimizer == "adagrad":
        return torch.optim.Adagrad(parameters, **options)
    raise ValueError(f"optimizer {spec.optimizer!r}: expected adam or adagrad")


def minibatch_bound(model: VAE, values: torch.Tensor, index: torch.Tensor, resample: bool) -> torch.Tensor:
    """Mean single-sample ELBO of one minibatch, 0-d, nats per example (vae.loop.run_pass's step):
    the examples ``values[index]`` ((B,) indices into (N, D)), binarized afresh by one
    ``torch.bernoulli`` when ``resample``, through :func:`vae.objectives.elbo` (L = 1). All noise
    from the device's default generator."""
    x = values[index]
    if resample:
        x = torch.bernoulli(x)
    return objectives.elbo(model, x).mean()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """A model, its optimizer and a way to take training steps on :class:`DeviceData`.

    ``run(steps)`` returns each step's minibatch bound, (steps,) float on the device (not synced);
    ``steps`` must be a multiple of ``chunk``. ``reset()`` puts the initial parameters, a zeroed
    optimizer state, the permutation stream's start and the noise seed back, in place (the
    tensors keep their addresses, as captured graphs need). ``setup_seconds``: capture or
    compilation time; ``notes``: how the variant ended up being built.
    """

    kind = "eager"

    def __init__(self, spec: Spec, data: DeviceData, device: torch.device, seed: int) -> None:
        self.spec, self.data, self.device, self.seed = spec, data, device, seed
        self.model = build_model(spec, seed, data.pixel_means()).to(device).train()
        self.parameters = list(self.model.parameters())
        self.initial = [p.detach().clone() for p in self.parameters]
        self.optimizer = self.build_optimizer()
        self.stream = IndexStream(len(data), seed, device)
        self.chunk = 1
        self.setup_seconds = 0.0
        self.notes: list[str] = []

    def build_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.spec, self.parameters, len(self.data), self.device)

    @torch.no_grad()
    def reset(self) -> None:
        for parameter, initial in zip(self.parameters, self.initial, strict=True):
            parameter.copy_(initial)
        for state in self.optimizer.state.values():
            for value in state.values():  # Adam's moments and step, Adagrad's sum (initial 0) and step
                if torch.is_tensor(value):
                    value.zero_()
        torch.manual_seed(self.seed + 1)  # the CPU and every CUDA default generator
        self.stream.restart()

    def set_learning_rate(self, learning_rate: float) -> None:
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(learning_rate)
            else:
                group["lr"] = learning_rate

    def step(self) -> torch.Tensor:
        bound = minibatch_bound(self.model, self.data.values, self.stream.take(self.spec.batch), self.data.resample)
        self.optimizer.zero_grad(set_to_none=True)
        (-bound).backward()
        self.optimizer.step()
        return bound.detach()

    def run(self, steps: int) -> torch.Tensor:
        bounds = torch.empty(steps, device=self.device)
        for i in range(steps):
            bounds[i] = self.step()
        return bounds


class GraphTrainer(Trainer):
    """``graph_steps`` whole training steps captured in one CUDA graph (CUDA only).

    PyTorch's whole-network capture ("CUDA semantics", CUDA Graphs): warm-up steps on a side
    stream (they create the optimizer state and the cuBLAS workspace), then the parameters,
    optimizer state and seed are reset in place, ``zero_grad(set_to_none=True)``, and the steps
    are captured under ``torch.cuda.graph``; the first step's backward allocates the gradients in
    the graph's pool, the later ones zero and accumulate into them. Each replay reads its
    ``graph_steps`` x B indices from a static buffer (one copy before it) and writes each step's
    bound to a static (graph_steps,) buffer. With ``optimizer_in_graph`` False only forward and
    backward are captured (one step per graph) and the optimizer steps eagerly after each replay.
    """

    kind = "graph"

    def __init__(self, spec: Spec, data: DeviceData, device: torch.device, seed: int, graph_steps: int,
                 optimizer_in_graph: bool = True, fused: bool | None = None) -> None:
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.fused, self.optimizer_in_graph = fused, optimizer_in_graph
        super().__init__(spec, data, device, seed)
        self.chunk = graph_steps if optimizer_in_graph else 1
        self.static_index = torch.zeros(self.chunk * spec.batch, dtype=torch.long, device=device)
        self.static_bounds = torch.zeros(self.chunk, device=device)
        started = time.perf_counter()
        self.static_index.copy_(self.stream.take(self.chunk * spec.batch))
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
                if not optimizer_in_graph:
                    self.optimizer.step()
        torch.cuda.current_stream(device).wait_stream(side)
        synchronize(device)
        self.reset()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()
        synchronize(device)
        self.reset()
        self.setup_seconds = time.perf_counter() - started
        what = "forward, backward and optimizer step" if optimizer_in_graph else \
            "forward and backward (optimizer step eager after each replay)"
        self.notes.append(f"{what}; {self.chunk} step(s) per graph; optimizer {type(self.optimizer).__name__}"
                          f"({self._optimizer_options()})")

    def build_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.spec, self.parameters, len(self.data), self.device,
                              capturable=self.spec.optimizer == "adam", fused=self.fused)

    def _optimizer_options(self) -> str:
        group = self.optimizer.param_groups[0]
        keys = [k for k in ("fused", "foreach", "capturable") if group.get(k)]
        lr = "tensor lr" if torch.is_tensor(group["lr"]) else "float lr"
        return ", ".join([*(f"{k}=True" for k in keys), lr])

    def _body(self) -> None:
        batch = self.spec.batch
        for j in range(self.chunk):
            if j:
                self.optimizer.zero_grad(set_to_none=False)
            bound = minibatch_bound(self.model, self.data.values, self.static_index[j * batch : (j + 1) * batch],
                                    self.data.resample)
            (-bound).backward()
            if self.optimizer_in_graph:
                self.optimizer.step()
            self.static_bounds[j].copy_(bound.detach())

    def run(self, steps: int) -> torch.Tensor:
        if steps % self.chunk:
            raise ValueError(f"steps = {steps}: expected a multiple of {self.chunk}")
        bounds = torch.empty(steps, device=self.device)
        for start in range(0, steps, self.chunk):
            self.static_index.copy_(self.stream.take(self.chunk * self.spec.batch))
            self.graph.replay()
            if not self.optimizer_in_graph:
                self.optimizer.step()
            bounds[start : start + self.chunk].copy_(self.static_bounds)
        return bounds


class CompiledTrainer(Trainer):
    """:func:`minibatch_bound` under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs by
    cudagraph trees on CUDA; plain Inductor on CPU), backward through AOTAutograd, the optimizer
    step eager. The data tensor and a static index buffer are marked static, so cudagraph trees
    copy nothing per replay; ``fallback_random`` makes the compiled Bernoulli and normal draws
    the eager kernels' draws from the default generator."""

    kind = "compile"

    def __init__(self, spec: Spec, data: DeviceData, device: torch.device, seed: int,
                 compile_seconds: float) -> None:
        super().__init__(spec, data, device, seed)
        import torch._dynamo
        import torch._inductor.config

        torch._inductor.config.fallback_random = True
        self.index = torch.zeros(spec.batch, dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(self.data.values)
        torch._dynamo.mark_static_address(self.index)
        self.compiled = torch.compile(minibatch_bound, mode="reduce-overhead", fullgraph=True, dynamic=False)
        started = time.perf_counter()
        # The time limit covers the first step only: compilation of forward and backward (and
        # cudagraph trees' eager warm-up). Their recording (a stream capture, second call) is
        # never interrupted, so that no capture is left open.
        with time_limit(compile_seconds):
            self.run(1)
            synchronize(device)
        self.run(2)
        synchronize(device)
        self.setup_seconds = time.perf_counter() - started
        self.reset()
        self.notes.append("minibatch bound compiled (mode reduce-overhead, fallback_random), optimizer eager")

    def step(self) -> torch.Tensor:
        self.index.copy_(self.stream.take(self.spec.batch))
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        bound = self.compiled(self.model, self.data.values, self.index, self.data.resample)
        self.optimizer.zero_grad(set_to_none=True)
        (-bound).backward()
        self.optimizer.step()
        return bound.detach()  # copied into run()'s buffer before the next replay overwrites it


def build_graph_trainer(spec: Spec, data: DeviceData, device: torch.device, seed: int,
                        graph_steps: int) -> GraphTrainer:
    """The first capture that works of: Adam fused + capturable, then foreach + capturable;
    Adagrad (foreach) inside the graph, then forward and backward only. Failed attempts are noted."""
    attempts: list[tuple[str, dict]] = (
        [("fused capturable Adam", {"fused": True}), ("foreach capturable Adam", {"fused": False})]
        if spec.optimizer == "adam" else
        [("whole step with Adagrad (foreach)", {"fused": False}),
         ("forward and backward only", {"fused": False, "optimizer_in_graph": False})])
    failures = []
    for name, options in attempts:
        try:
            trainer = GraphTrainer(spec, data, device, seed, graph_steps, **options)
            trainer.notes += [f"capture of {failed} failed: {error}" for failed, error in failures]
            return trainer
        except Exception as error:  # noqa: BLE001 - recorded, next attempt
            failures.append((name, _error_text(error)))
            torch.cuda.synchronize(device)
    raise RuntimeError("; ".join(f"{name}: {error}" for name, error in failures))


# --------------------------------------------------------------------------------------------
# Part 1: throughput, with the equality check first
# --------------------------------------------------------------------------------------------


def steps_per_graph(requested: int, steps_per_pass: int) -> int:
    """The largest divisor of the pass's steps not above ``requested`` (graphs never cut a pass)."""
    for candidate in range(max(1, min(requested, steps_per_pass)), 0, -1):
        if steps_per_pass % candidate == 0:
            return candidate
    return 1


def measure(trainer: Trainer, seconds: float, repeats: int = 3) -> dict:
    """Steps per second: warm-up, then ``repeats`` synced runs of about ``seconds / repeats``
    each (sized by a first timed chunk); median and best."""
    device, chunk = trainer.device, trainer.chunk
    trainer.run(chunk)
    synchronize(device)
    started = time.perf_counter()
    trainer.run(chunk)
    synchronize(device)
    per_chunk = max(time.perf_counter() - started, 1e-6)
    count = chunk * max(1, int(seconds / repeats / per_chunk))
    rates = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        bounds = trainer.run(count)
        synchronize(device)
        rates.append(count / (time.perf_counter() - started))
    if not bool(torch.isfinite(bounds).all()):
        raise RuntimeError("non-finite bound while timing")
    median = statistics.median(rates)
    return {"steps_per_s": median, "best_steps_per_s": max(rates), "runs_steps_per_s": rates,
            "steps_per_run": count, "examples_per_s": median * trainer.spec.batch}


def compare(found: torch.Tensor, expected: torch.Tensor) -> float:
    """max |found - expected| / max(|expected|, 1) over the steps (inf if any is not finite)."""
    found, expected = found.double().cpu(), expected.double().cpu()
    if not bool(torch.isfinite(found).all()):
        return math.inf
    return float(((found - expected).abs() / expected.abs().clamp(min=1.0)).max())


def parameter_difference(found: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest |difference| of any parameter element."""
    return max(float((p.detach() - q).abs().max()) for p, q in zip(found, expected, strict=True))


def throughput(spec: Spec, data: DeviceData, args: argparse.Namespace, device: torch.device, log: Callable,
               budget: Budget) -> tuple[dict, dict[str, Trainer]]:
    """Part 1 for one profile: each variant built, checked against eager, timed. Returns
    ({variant: record}, {variant: trainer that passed its check})."""
    records: dict[str, dict] = {}
    passed: dict[str, Trainer] = {}
    steps_per_pass = len(data) // spec.batch
    graph_steps = steps_per_graph(args.graph_steps, steps_per_pass)
    check_steps = graph_steps * max(1, math.ceil(args.check_steps / graph_steps))
    reference: torch.Tensor | None = None
    reference_parameters: list[torch.Tensor] = []
    for kind in VARIANTS:
        record: dict[str, Any] = {"variant": kind}
        records[kind] = record
        if kind == "graph" and device.type != "cuda":
            record.update(status="skipped", reason="CUDA graphs need a CUDA device")
            continue
        if kind == "compile" and args.compile_skip:
            record.update(status="skipped", reason=args.compile_skip)
            continue
        if kind != "eager" and reference is None:
            record.update(status="skipped", reason="no eager reference (eager failed)")
            continue
        if kind != "eager" and budget.left() < args.time_per_variant + 2 * budget.margin:
            record.update(status="skipped", reason=f"budget: {budget.left():.0f} s left")
            continue
        try:
            if kind == "eager":
                trainer = Trainer(spec, data, device, args.seed)
            elif kind == "graph":
                trainer = build_graph_trainer(spec, data, device, args.seed, graph_steps)
            else:
                limit = min(args.compile_timeout, max(1.0, budget.left() * 0.2))
                trainer = CompiledTrainer(spec, data, device, args.seed, limit)
            record["setup_s"] = trainer.setup_seconds
            record["notes"] = trainer.notes
            trainer.reset()
            bounds = trainer.run(check_steps)
            if kind == "eager":
                reference = bounds.clone()
                trainer.reset()
                again = trainer.run(check_steps)
                difference = compare(again, reference)
                check = {"kind": f"a rerun from reset reproduces the bounds within {LOSS_RTOL:g} (relative)",
                         "steps": check_steps, "max_rel_difference": difference, "exact": difference == 0.0,
                         "passed": difference <= LOSS_RTOL}
                reference_parameters = [p.detach().clone() for p in trainer.parameters]
            else:
                difference = compare(bounds, reference)
                check = {"kind": f"per-step bounds equal eager's within {LOSS_RTOL:g} (relative)",
                         "steps": check_steps, "max_rel_difference": difference,
                         "passed": difference <= LOSS_RTOL,
                         "max_abs_parameter_difference": parameter_difference(trainer.parameters,
                                                                              reference_parameters)}
            check["first_bounds"] = [round(float(v), 4) for v in bounds[:3].cpu()]
            record["check"] = check
            log(f"  {spec.name} {kind}: check {'passed' if check['passed'] else 'FAILED'} "
                f"({check['kind']}; max relative difference {difference:.2e} over {check_steps} steps)")
            record.update(measure(trainer, args.time_per_variant))
            record["status"] = "ok"
            if check["passed"]:
                passed[kind] = trainer
            log(f"  {spec.name} {kind}: {record['steps_per_s']:,.0f} steps/s "
                f"({record['examples_per_s']:,.0f} examples/s; setup {record['setup_s']:.1f} s)")
        except Exception as error:  # noqa: BLE001 - recorded in the table, the rest runs on
            record.update(status="error", error=_error_text(error), traceback=traceback.format_exc(limit=6))
            log(f"  {spec.name} {kind}: error {_error_text(error)}")
            if device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(device)
    return records, passed


# --------------------------------------------------------------------------------------------
# Parts 2 and 3: the evaluator and AIS
# --------------------------------------------------------------------------------------------


def evaluate(model: VAE, x: torch.Tensor, k: int, memory_mb: float, seed: int = 0) -> tuple[float, Any]:
    """(seconds, estimate) of L_k on ``x`` ((N, D) on the device) in chunks of
    ``model.pairs_for_budget(memory_mb)`` pairs (vae.objectives.importance_sampled_log_likelihood)."""
    was_training = model.training
    model.eval()
    try:
        synchronize(x.device)
        started = time.perf_counter()
        estimate = objectives.importance_sampled_log_likelihood(model, x, k, model.pairs_for_budget(memory_mb), seed)
        synchronize(x.device)
        return time.perf_counter() - started, estimate
    finally:
        model.train(was_training)


def run_ais(model: VAE, x: torch.Tensor, temperatures: int, args: argparse.Namespace) -> tuple[float, Any]:
    """(seconds, :class:`vae.mcmc.AISEstimate`) of AIS on ``x``, every example's chains in one chunk."""
    synchronize(x.device)
    started = time.perf_counter()
    estimate = mcmc.ais(model, x, temperatures, chains=args.ais_chains, leapfrog_steps=args.ais_leapfrog_steps,
                        initial="prior", seed=0, max_pairs=max(1, len(x)) * args.ais_chains)
    synchronize(x.device)
    return time.perf_counter() - started, estimate


@dataclass
class AISCost:
    """Seconds of AIS at T temperatures on n examples in one chunk: T (a + b n), from two probes."""

    a: float
    b: float
    probes: list[dict] = field(default_factory=list)

    def seconds(self, examples: int, temperatures: int) -> float:
        return temperatures * (self.a + self.b * examples)

    def examples_for(self, seconds: float, temperatures: int, available: int) -> int:
        return max(0, min(available, int((seconds / temperatures - self.a) / self.b)))


def probe_ais(model: VAE, x: torch.Tensor, args: argparse.Namespace) -> AISCost:
    """Time AIS with ``--ais-probe-temperatures`` on two subset sizes and fit a + b n per temperature.
    A non-increasing fit falls back to b = t(n2) / n2 (an upper bound on the per-example cost)."""
    sizes = sorted({max(1, min(len(x), n)) for n in args.ais_probe_sizes})
    run_ais(model, x[: sizes[0]], 2, args)  # warm-up: kernels, cuBLAS, the gradient check
    probes = []
    for n in sizes:
        seconds, _ = run_ais(model, x[:n], args.ais_probe_temperatures, args)
        probes.append({"examples": n, "temperatures": args.ais_probe_temperatures, "seconds": seconds,
                       "per_temperature_s": seconds / args.ais_probe_temperatures})
    per = [p["per_temperature_s"] for p in probes]
    if len(probes) >= 2 and per[-1] > per[0]:
        b = (per[-1] - per[0]) / (sizes[-1] - sizes[0])
        a = max(0.0, per[0] - b * sizes[0])
    else:
        a, b = 0.0, per[-1] / sizes[-1]
    return AISCost(a, b, probes)


# --------------------------------------------------------------------------------------------
# Part 4: the iwae-mnist schedule
# --------------------------------------------------------------------------------------------


def run_schedule(trainer: Trainer, seconds: float, log: Callable) -> dict:
    """IWAE's schedule from the trainer's initial parameters for at most ``seconds`` (whole
    chunks of steps; the learning rate set at each pass). Returns passes, steps, rates, the last
    pass's mean training bound, and each completed stage's last-pass bound."""
    trainer.reset()
    device, batch = trainer.device, trainer.spec.batch
    steps_per_pass = len(trainer.data) // batch
    chunk = trainer.chunk * max(1, (steps_per_pass // 10) // trainer.chunk)
    while steps_per_pass % chunk:
        chunk -= trainer.chunk
    synchronize(device)
    started = time.perf_counter()
    steps, passes, pass_bounds, stage_bounds = 0, 0, [], {}
    stop_reason = f"time budget ({seconds:.0f} s)"
    while passes < SCHEDULE_PASSES:
        trainer.set_learning_rate(schedule_learning_rate(passes))
        done_in_pass, sums = 0, []
        while done_in_pass < steps_per_pass:
            sums.append(trainer.run(chunk).sum())
            done_in_pass += chunk
            steps += chunk
            if time.perf_counter() - started > seconds:
                break
        if done_in_pass < steps_per_pass:
            break
        mean = float(torch.stack(sums).sum()) / steps_per_pass  # one sync per pass
        if not math.isfinite(mean):
            stop_reason = f"non-finite bound in pass {passes + 1}"
            break
        pass_bounds.append(mean)
        passes += 1
        if passes == (3 ** (schedule_stage(passes - 1) + 1) - 1) // 2:
            stage_bounds[schedule_stage(passes - 1)] = mean
        if time.perf_counter() - started > seconds:
            break
    else:
        stop_reason = "schedule complete"
    synchronize(device)
    elapsed = time.perf_counter() - started
    log(f"  schedule: {passes} passes ({steps:,} steps) in {elapsed:.1f} s, {steps / elapsed:,.0f} steps/s; "
        f"last pass's mean train ELBO {pass_bounds[-1] if pass_bounds else float('nan'):.2f}; stopped: {stop_reason}")
    return {"variant": trainer.kind, "passes": passes, "passes_total": SCHEDULE_PASSES, "steps": steps,
            "steps_per_pass": steps_per_pass, "seconds": elapsed, "steps_per_s": steps / elapsed if elapsed else 0.0,
            "stage": schedule_stage(max(0, passes - 1)), "learning_rate": schedule_learning_rate(max(0, passes - 1)),
            "last_pass_train_elbo": pass_bounds[-1] if pass_bounds else None,
            "stage_end_train_elbo": stage_bounds, "stop": stop_reason,
            "full_schedule_estimate_s": SCHEDULE_PASSES * FULL_STEPS_PER_PASS / (steps / elapsed) if steps else None}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget from the start of the script; ``margin`` is kept for the final writes."""

    def __init__(self, seconds: float, started: float) -> None:
        self.seconds, self.started = seconds, started
        self.margin = max(1.0, min(10.0, 0.02 * seconds))

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)


class TimeLimitExceeded(Exception):
    """Raised by :func:`time_limit` in the main thread when its seconds are up."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TimeLimitExceeded` in the main thread after ``seconds`` (Unix; no limit
    elsewhere), also when the code interrupted wraps the signal's exception in its own."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    fired = []

    def expire(signum, frame):
        fired.append(True)
        raise TimeLimitExceeded(f"over {seconds:.1f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Exception as error:
        if fired and not isinstance(error, TimeLimitExceeded):
            raise TimeLimitExceeded(f"over {seconds:.1f} s ({_error_text(error)})") from error
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def describe_device(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(name=properties.name, memory_gib=round(properties.total_memory / 2**30, 1),
                    multiprocessors=properties.multi_processor_count, cuda=torch.version.cuda)
    else:
        info["name"] = _cpu_model()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _f(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _status(record: dict) -> str:
    status = record.get("status", "not run")
    if status == "skipped":
        return _cell(f"skipped: {record.get('reason', '')}")
    if status == "error":
        return _cell(f"error: {record.get('error', '')}")
    return status


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(result: dict) -> str:
    """The Markdown table of everything measured so far, with the targets below it."""
    rows = ["| part | what | status | check | rate | seconds | notes |", "|---|---|---|---|---:|---:|---|"]
    for name, records in result.get("training", {}).items():
        spec = AEVB if name == AEVB.name else SCHEDULE_SPECS.get(name, IWAE)
        for kind in VARIANTS:
            record = records.get(kind, {})
            check = record.get("check")
            check_text = "n/a" if not check else (
                f"{'passed' if check['passed'] else 'FAILED'} ({check['max_rel_difference']:.1e} over "
                f"{check['steps']} steps)")
            rate = (f"{_f(record.get('steps_per_s'))} steps/s = {_f(record.get('examples_per_s'))} ex/s"
                    if "steps_per_s" in record else "n/a")
            notes = _cell("; ".join(record.get("notes", [])))
            if name == AEVB.name and "examples_per_s" in record:
                notes = f"{record['examples_per_s'] / CPU_REFERENCE['examples_per_s']:.1f}x the 2-core CPU; " + notes
            rows.append(f"| 1 training | {name} ({spec.architecture}, {spec.optimizer}, batch {spec.batch}), {kind} | "
                        f"{_status(record)} | {check_text} | {rate} | {_f(record.get('setup_s'), 1)} setup | {notes} |")
    ev = result.get("evaluator", {})
    rows.append(f"| 2 evaluator | L_{ev.get('importance_samples', 5000)} on {ev.get('examples', 'n/a')} test images | "
                f"{_status(ev)} | n/a | {_f(ev.get('samples_per_s'))} samples/s | {_f(ev.get('seconds'), 1)} | "
                f"mean L_k {_f(ev.get('mean_log_likelihood'), 2)} nats; {ev.get('pairs_per_chunk', 'n/a')} pairs "
                f"per chunk; probe predicted {_f(ev.get('predicted_s'), 1)} s; {ev.get('model', '')} |")
    ais = result.get("ais", {})
    rows.append(f"| 3 AIS | T = {ais.get('temperatures', 'n/a')}, {ais.get('chains', 'n/a')} chains, "
                f"{ais.get('leapfrog_steps', 'n/a')} leapfrog, prior, on {ais.get('examples', 'n/a')} test images | "
                f"{_status(ais)} | n/a | {_f(ais.get('leapfrog_chain_steps_per_s'))} leapfrog x chain/s | "
                f"{_f(ais.get('seconds'), 1)} | mean AIS {_f(ais.get('mean_log_likelihood'), 2)} nats (L_k on the "
                f"same images {_f(ais.get('same_images_l_k'), 2)}); acceptance {_f(ais.get('acceptance_rate'), 2)}; "
                f"predicted {_f(ais.get('predicted_s'), 1)} s; whole test set ~{_f(ais.get('full_test_set_estimate_s'))} s |")
    sc = result.get("schedule", {})
    rows.append(f"| 4 schedule | {sc.get('profile', IWAE.name)}, 3^i passes at 1e-4 round(10^(1-i/7), 1), batch 20, "
                f"{FULL_STEPS_PER_PASS} steps per pass | {_status(sc)} | "
                f"{sc.get('variant', 'n/a')} step | {_f(sc.get('steps_per_s'))} steps/s | {_f(sc.get('seconds'), 1)} | "
                f"{sc.get('passes', 'n/a')} of {SCHEDULE_PASSES} passes ({_f(sc.get('steps'))} steps), stage "
                f"{sc.get('stage', 'n/a')}; last pass's train ELBO {_f(sc.get('last_pass_train_elbo'), 2)}; test "
                f"L_{ev.get('importance_samples', 5000)} at the end: part 2; the 3280 passes at this rate "
                f"~{_f(sc.get('full_schedule_estimate_s'))} s; "
                f"stopped: {sc.get('stop', 'n/a')} |")
    lines = rows + [""]
    for target in result.get("targets", []):
        met = {True: "met", False: "NOT met", None: "not checked"}[target["met"]]
        lines.append(f"- Target: {target['name']}: {met} ({target['value']}).")
    return "\n".join(lines)


def targets(result: dict, device: torch.device) -> list[dict]:
    """The issue's three targets; checked (met True/False) only on CUDA."""
    on_cuda = device.type == "cuda"
    training = result.get("training", {})
    aevb = max((r.get("examples_per_s", 0.0) for r in training.get(AEVB.name, {}).values()
                if r.get("check", {}).get("passed")), default=None)
    graph = next((training[name].get("graph", {}) for name in SCHEDULE_SPECS if name in training), {})
    iwae = graph.get("steps_per_s") if graph.get("check", {}).get("passed") else None
    ev = result.get("evaluator", {})
    full_eval = ev.get("seconds") if ev.get("status") == "ok" and ev.get("examples") == ev.get("test_examples") \
        and ev.get("importance_samples") == 5000 else None

    def met(value, ok):
        return (ok(value) if value is not None else False) if on_cuda else None
    speedup = aevb / CPU_REFERENCE["examples_per_s"] if aevb else None
    return [
        {"name": f"aevb-mnist training step >= {TARGET_AEVB_SPEEDUP:g}x the 2-core CPU's "
                 f"({CPU_REFERENCE['examples_per_s']:,.0f} examples/s)",
         "value": f"{_f(aevb)} examples/s, {_f(speedup, 1)}x (fastest checked variant)",
         "met": met(speedup, lambda v: v >= TARGET_AEVB_SPEEDUP)},
        {"name": f"full k = 5000 test-set evaluation in seconds (< {TARGET_EVAL_SECONDS:g} s)",
         "value": f"{_f(full_eval, 1)} s", "met": met(full_eval, lambda v: v < TARGET_EVAL_SECONDS)},
        {"name": f"iwae-mnist step at batch 20 >= {TARGET_IWAE_STEPS:,.0f} steps/s with graphs",
         "value": f"{_f(iwae)} steps/s", "met": met(iwae, lambda v: v >= TARGET_IWAE_STEPS)},
    ]


class Output:
    """The log (stdout and ``gpu_run.log``), and the table and JSON rewritten after each part."""

    def __init__(self, folder: Path, started: float) -> None:
        self.folder, self.started = folder, started
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "gpu_run.log"
        self.log_path.write_text("")

    def log(self, message: str) -> None:
        if message:
            message = f"[{time.perf_counter() - self.started:6.1f} s] {message}"
        print(message, flush=True)
        with self.log_path.open("a") as handle:
            handle.write(message + "\n")

    def write(self, result: dict, device: torch.device, started: float) -> str:
        result["elapsed_s"] = time.perf_counter() - started
        result["targets"] = targets(result, device)
        text = table(result)
        info = result["device"]
        header = (f"## {result['started_utc']}, {info['type']}: {info.get('name', '')}, torch {info['torch']}\n\n"
                  f"`{result['command']}` ({result['elapsed_s']:.0f} s of a {result['budget_s']:g} s budget). "
                  f"Data: {result.get('data', 'n/a')}.\n\n")
        (self.folder / "gpu_run.md").write_text(header + text + "\n")
        (self.folder / "gpu_run.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_run.md, gpu_run.json and gpu_run.log (required "
                                                 "unless --prepare)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock seconds for everything, from the script's start (default: %(default)s, "
                             "one 600 s device command with 60 s to spare)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when available (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true",
                        help="small counts for the test suite: 1000 training and 100 test images, k = 50, "
                             "20 AIS temperatures, short timings; the same code paths")
    parser.add_argument("--prepare", action="store_true",
                        help="write --data from --processed (the binarize stage's splits) and exit")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the compressed splits --prepare writes (default: %(default)s); if missing, "
                             "--processed's .pt files, else synthetic images")
    parser.add_argument("--processed", type=Path, default=DEFAULT_PROCESSED,
                        help="processed MNIST folder with train.pt and test.pt (default: %(default)s)")
    parser.add_argument("--schedule-profile", default=IWAE.name, choices=list(SCHEDULE_SPECS),
                        help="the profile whose model parts 1 (beside aevb-mnist), 2, 3 and 4 run: iwae-mnist (one "
                             "stochastic layer) or iwae-mnist-2layer (two; AIS then differentiates by autograd) "
                             f"(default: {IWAE.name})")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, permutations and noise (default: 0)")
    parser.add_argument("--graph-steps", type=int, default=50,
                        help="training steps captured per CUDA graph (a divisor of a pass's steps; default: "
                             "%(default)s)")
    parser.add_argument("--check-steps", type=int, default=None,
                        help="steps of each variant compared with eager's (default: 100; tiny: 8), rounded up "
                             "to whole graphs")
    parser.add_argument("--time-per-variant", type=float, default=None,
                        help="seconds of timed steps per variant, 3 runs (default: 3; tiny: 0.3)")
    parser.add_argument("--compile-timeout", type=float, default=120.0,
                        help="seconds allowed for each torch.compile warm-up (default: %(default)s)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="the torch.compile variant; auto: on, except --tiny on the CPU, where Inductor's C++ "
                             "build takes about 25 s per model on 2 cores (default: %(default)s)")
    parser.add_argument("--importance-samples", type=int, default=None, help="k of the evaluator (default: 5000; "
                                                                             "tiny: 50)")
    parser.add_argument("--eval-memory-mb", type=float, default=None,
                        help="evaluator's chunk memory, model.pairs_for_budget (default: 4096 on CUDA, 16 on CPU)")
    parser.add_argument("--eval-probe-examples", type=int, default=None,
                        help="test images of the evaluator's timing probe (default: 200; tiny: 10)")
    parser.add_argument("--ais-temperatures", type=int, default=None, help="AIS T (default: 10000, Wu et al.; "
                                                                           "tiny: 20)")
    parser.add_argument("--ais-chains", type=int, default=16, help="AIS chains per example (default: 16)")
    parser.add_argument("--ais-leapfrog-steps", type=int, default=10, help="leapfrog steps per HMC step (default: 10)")
    parser.add_argument("--ais-share", type=float, default=0.15,
                        help="share of the budget for AIS; its test subset is sized to it (default: %(default)s)")
    parser.add_argument("--ais-probe-temperatures", type=int, default=None,
                        help="temperatures of the two AIS timing probes (default: 50; tiny: 5)")
    parser.add_argument("--ais-probe-sizes", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help="test images of the two AIS probes, comma-separated (default: 64,512; tiny: 2,8)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {"check_steps": (8, 100), "time_per_variant": (0.3, 3.0), "importance_samples": (50, 5000),
                "eval_probe_examples": (10, 200), "ais_temperatures": (20, 10000), "ais_probe_temperatures": (5, 50),
                "ais_probe_sizes": ([2, 8], [64, 512])}
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    args.train_limit, args.test_limit = (1000, 100) if tiny else (None, None)
    args.compile_skip = ""
    if args.compile == "off":
        args.compile_skip = "--compile off"
    elif args.compile == "auto" and tiny and (args.device == "cpu" or not torch.cuda.is_available()):
        args.compile_skip = ("--tiny on the CPU: Inductor's C++ build takes about 25 s per model on the 2-core "
                             "machine, beyond the test's time (it ran and passed its check there: --compile on); "
                             "on CUDA it runs")
    if not args.prepare and args.out is None:
        parser.error("--out is required (or --prepare)")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.prepare:
        out = prepare_data(args.processed, args.data)
        print(f"wrote {_shown(out)} ({out.stat().st_size / 2**20:.1f} MiB) from {_shown(args.processed)}; "
              f"name its folder in the device call's carry")
        return 0
    warnings.filterwarnings("ignore", message=".*capturable=True.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.eval_memory_mb is None:
        args.eval_memory_mb = 4096.0 if device.type == "cuda" else 16.0
    budget = Budget(args.budget_s, started)
    output = Output(args.out, started)
    log = output.log
    result: dict[str, Any] = {
        "script": "benchmarks/gpu_run.py", "command": "python3 benchmarks/gpu_run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started_utc": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "budget_s": args.budget_s,
        "tiny": args.tiny, "device": describe_device(device), "cpu_reference": CPU_REFERENCE,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "training": {}, "evaluator": {}, "ais": {}, "schedule": {}}
    log(f"gpu_run: {result['device']}; budget {args.budget_s:g} s")

    def save() -> None:
        output.write(result, device, started)

    # Data ---------------------------------------------------------------------------------------
    try:
        train_split, test_split, result["data"] = load_data(args.data, args.processed, args.train_limit,
                                                            args.test_limit, args.seed)
        schedule_spec = SCHEDULE_SPECS[args.schedule_profile]
        data = DeviceData(train_split, device, multiple=max(AEVB.batch, schedule_spec.batch))
        test_x = test_split.values(torch.Generator().manual_seed(args.seed), device=device)
        log(f"data: {result['data']}")
    except Exception as error:  # noqa: BLE001 - nothing else can run
        result["data"] = f"error: {_error_text(error)}"
        log(result["data"])
        save()
        return 1

    # Part 1 ---------------------------------------------------------------------------------------
    passed_iwae: dict[str, Trainer] = {}
    for spec in (AEVB, schedule_spec):
        log(f"part 1: training throughput, {spec.name} ({spec.architecture}, {spec.optimizer}, batch {spec.batch})")
        try:
            records, passed = throughput(spec, data, args, device, log, budget)
        except Exception as error:  # noqa: BLE001
            records, passed = {"eager": {"status": "error", "error": _error_text(error)}}, {}
        result["training"][spec.name] = records
        if spec is schedule_spec:
            passed_iwae = passed
        save()

    # Pick the schedule's step: the fastest checked iwae variant (a fresh eager one if none).
    name = schedule_spec.name
    timed = {k: t for k, t in passed_iwae.items() if "steps_per_s" in result["training"][name].get(k, {})}
    chosen: Trainer | None = None
    if timed:
        chosen = timed[max(timed, key=lambda k: result["training"][name][k]["steps_per_s"])]
    model_for_eval: VAE | None = chosen.model if chosen is not None else None
    if model_for_eval is None:
        with contextlib.suppress(Exception):
            model_for_eval = build_model(schedule_spec, args.seed, data.pixel_means()).to(device)

    # Probes of parts 2 and 3 (before the schedule, to reserve their time) ---------------------------
    k = args.importance_samples
    eval_record: dict[str, Any] = {"importance_samples": k, "test_examples": len(test_x),
                                   "memory_mb": args.eval_memory_mb}
    result["evaluator"] = eval_record
    ais_record: dict[str, Any] = {"temperatures": args.ais_temperatures, "chains": args.ais_chains,
                                  "leapfrog_steps": args.ais_leapfrog_steps, "initial": "prior",
                                  "schedule": "sigmoid", "allocation_s": args.ais_share * args.budget_s}
    result["ais"] = ais_record
    eval_predicted = ais_cost = None
    if model_for_eval is not None:
        try:
            evaluate(model_for_eval, test_x[:2], k, args.eval_memory_mb)  # warm-up
            probe = max(1, min(len(test_x), args.eval_probe_examples))
            seconds, _ = evaluate(model_for_eval, test_x[:probe], k, args.eval_memory_mb)
            eval_predicted = seconds * len(test_x) / probe
            eval_record.update(probe_examples=probe, probe_s=seconds, predicted_s=eval_predicted)
            log(f"probe: L_{k} on {probe} test images in {seconds:.2f} s; the whole test set predicted "
                f"{eval_predicted:.1f} s")
        except Exception as error:  # noqa: BLE001
            eval_record.update(probe_error=_error_text(error))
            log(f"probe of the evaluator: error {_error_text(error)}")
        try:
            ais_cost = probe_ais(model_for_eval, test_x, args)
            ais_record.update(probes=ais_cost.probes, per_temperature_s={"a": ais_cost.a, "b_per_example": ais_cost.b})
            log(f"probe: AIS per temperature {ais_cost.a * 1e3:.2f} ms + {ais_cost.b * 1e6:.2f} us per example")
        except Exception as error:  # noqa: BLE001
            ais_record.update(probe_error=_error_text(error))
            log(f"probe of AIS: error {_error_text(error)}")
    save()

    # Part 4: the schedule, with what is left after reserving parts 2 and 3 --------------------------
    eval_reserve = 1.25 * (eval_predicted if eval_predicted is not None else 0.05 * args.budget_s) + 1.0
    ais_reserve = ais_record["allocation_s"] if ais_cost is not None else 0.0
    schedule_seconds = budget.left() - eval_reserve - ais_reserve - budget.margin
    log(f"part 4: {name} schedule, {max(0.0, schedule_seconds):.0f} s (reserving {eval_reserve:.0f} s for "
        f"the evaluator and {ais_reserve:.0f} s for AIS)")
    if chosen is None:
        result["schedule"] = {"status": "skipped", "reason": f"no {name} variant passed its check", "profile": name}
    elif schedule_seconds <= 0:
        result["schedule"] = {"status": "skipped", "reason": f"budget: {budget.left():.0f} s left, "
                                                             f"{eval_reserve + ais_reserve:.0f} s reserved", "profile": name}
    else:
        try:
            result["schedule"] = {**run_schedule(chosen, schedule_seconds, log), "status": "ok", "profile": name}
        except Exception as error:  # noqa: BLE001
            result["schedule"] = {"status": "error", "error": _error_text(error), "variant": chosen.kind, "profile": name,
                                  "traceback": traceback.format_exc(limit=6)}
            log(f"  schedule: error {_error_text(error)}")
    save()
    schedule = result["schedule"]
    model_name = (f"{name} after {schedule['passes']} schedule passes" if schedule.get("status") == "ok"
                  else f"{name} as part 1's timing left it (the schedule did not run)")

    # Part 2: the evaluator on the whole test set -----------------------------------------------------
    log(f"part 2: evaluator, L_{k} on the test set ({model_name})")
    eval_record["model"] = model_name
    l_k_values = None
    if model_for_eval is None:
        eval_record.update(status="error", error=f"no {name} model could be built")
    else:
        try:
            count = len(test_x)
            room = budget.left() - ais_reserve - budget.margin
            if eval_predicted is not None and eval_predicted > room:
                count = max(min(len(test_x), args.eval_probe_examples), int(len(test_x) * room / eval_predicted))
                eval_record["subset_reason"] = f"budget: {room:.0f} s left for a predicted {eval_predicted:.0f} s"
            seconds, estimate = evaluate(model_for_eval, test_x[:count], k, args.eval_memory_mb)
            l_k_values = estimate.log_likelihood.double().cpu()
            eval_record.update(status="ok", examples=count, seconds=seconds, samples_per_s=count * k / seconds,
                               pairs_per_chunk=model_for_eval.pairs_for_budget(args.eval_memory_mb),
                               mean_log_likelihood=float(l_k_values.mean()),
                               stderr=float(l_k_values.std() / math.sqrt(count)) if count > 1 else None,
                               mean_elbo=float(estimate.elbo.double().mean()))
            log(f"  L_{k} = {eval_record['mean_log_likelihood']:.2f} nats on {count} test images in {seconds:.1f} s")
        except Exception as error:  # noqa: BLE001
            eval_record.update(status="error", error=_error_text(error), traceback=traceback.format_exc(limit=6))
            log(f"  evaluator: error {_error_text(error)}")
    save()

    # Part 3: AIS on a test subset sized to what is left ------------------------------------------------
    log(f"part 3: AIS, T = {args.ais_temperatures}, {args.ais_chains} chains, {args.ais_leapfrog_steps} leapfrog "
        f"steps, initial prior ({model_name})")
    ais_record["model"] = model_name
    if model_for_eval is None or ais_cost is None:
        ais_record.update(status="skipped", reason=ais_record.get("probe_error", "no model"))
    else:
        try:
            allocation = min(ais_record["allocation_s"], budget.left() - budget.margin)
            count = ais_cost.examples_for(allocation, args.ais_temperatures, len(test_x))
            ais_record["full_test_set_estimate_s"] = ais_cost.seconds(len(test_x), args.ais_temperatures)
            if count < 1:
                ais_record.update(status="skipped", reason=(
                    f"budget: {allocation:.0f} s left, one example predicted "
                    f"{ais_cost.seconds(1, args.ais_temperatures):.0f} s"))
            else:
                ais_record["predicted_s"] = ais_cost.seconds(count, args.ais_temperatures)
                seconds, estimate = run_ais(model_for_eval, test_x[:count], args.ais_temperatures, args)
                values = estimate.log_likelihood.double().cpu()
                ais_record.update(
                    status="ok", examples=count, seconds=seconds, mean_log_likelihood=float(values.mean()),
                    stderr=float(values.std() / math.sqrt(count)) if count > 1 else None,
                    acceptance_rate=float(estimate.acceptance_rate.mean()),
                    leapfrog_chain_steps_per_s=estimate.leapfrog_steps * args.ais_chains * count / seconds,
                    same_images_l_k=float(l_k_values[:count].mean()) if l_k_values is not None
                    and len(l_k_values) >= count else None)
                log(f"  AIS = {ais_record['mean_log_likelihood']:.2f} nats on {count} test images in {seconds:.1f} s "
                    f"(predicted {ais_record['predicted_s']:.1f} s); acceptance {ais_record['acceptance_rate']:.2f}")
        except Exception as error:  # noqa: BLE001
            ais_record.update(status="error", error=_error_text(error), traceback=traceback.format_exc(limit=6))
            log(f"  AIS: error {_error_text(error)}")
    if "status" not in eval_record:
        eval_record["status"] = "skipped"
    text = output.write(result, device, started)
    log("")
    log(text)
    log(f"\nwritten: {', '.join(sorted(p.name for p in args.out.iterdir()))} in {args.out} "
        f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
