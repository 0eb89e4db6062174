"""Typed, validated views of ``params.yaml``: one frozen pydantic model per section.

Each knob is one typed line with its documentation (``Field(description=...)``); the rules that
involve several knobs are ``model_validator``s. Dataset names, their binarizations, fixed test sets
and splits and the decoder's likelihood come from the dataset registry (:mod:`vae.datasets`).
``Params.model_json_schema()`` is the JSON schema of ``params.yaml`` (``vae params --schema``).

:func:`load_params` reads the file once and rejects, before any work starts, an unknown section or
key (with the closest valid name), a value of the wrong type, a non-positive size, a value outside
its allowed set and an integer beyond 64 bits: one :class:`~vae.errors.ConfigError` names the file
and lists every problem, one line each (``section.key = value: expected ...``; pydantic's errors
become those lines in :mod:`vae.config_messages`).

The configuration algebra lives here too: :func:`overlay` puts section values on top of validated
parameters (the named profiles of :mod:`vae.profile`, the latent-size sweep's members), and the
sweep's members and their parameters (:class:`Member`, :func:`members`, :func:`member_params`,
:func:`sweep_id`) are derived from the ``sweep`` section, which validates every member it declares.

What changes a result: an *operational* knob changes no output of any stage (where checkpoints are
written, how evaluation is cut into chunks); its ``Field`` says so and why
(``json_schema_extra`` :data:`OPERATIONAL_KEY`, shown by ``vae params --schema``) and
:data:`OPERATIONAL` lists them all. ``dvc.yaml`` lists every other knob under the ``params:`` of
each stage whose outputs it changes, and no operational one, so changing an operational knob
re-runs nothing (``tests/test_params_tracking.py`` checks both). The sweep's members take their
operational knobs from ``sweep.operational``, never from ``sweep.settings`` (which DVC tracks).

Types are as strict as the file's reader can be: an integer knob takes no bool, float or string; a
number knob takes integers and numeric strings (YAML reads ``1e-3``, without a dot, as a string) but
no bool, NaN or infinity; a boolean knob takes only ``true`` or ``false``.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      ValidationInfo, model_validator)
from pydantic_core import PydanticCustomError

from vae import datasets
from vae.config_messages import (Problems, custom, invalid, key_text, oversized_integers, section_problems, shown,
                                 unknown)
from vae.errors import ConfigError

# --------------------------------------------------------------------------- choices and value types

Algorithm = Literal["aevb", "wake-sleep"]
Optimizer = Literal["adam", "adagrad"]
Objective = Literal["elbo", "iwae"]
Schedule = Literal["constant", "iwae"]
SplitOrder = Literal["permuted", "file"]
OutputBiasInit = Literal["default", "data_mean"]
Device = Literal["auto", "cpu", "cuda"]
Projection = Literal["pca", "tsne"]
AISInitial = Literal["prior", "encoder"]
AISSchedule = Literal["sigmoid", "linear"]
SweepSize = Literal["quick", "full"]
DatasetName = Literal[datasets.NAMES]  # type: ignore[valid-type]  # from the registry
Binarization = Literal[datasets.BINARIZATIONS]  # type: ignore[valid-type]

# The allowed values, for messages and callers (the dataset names and binarizations are the registry's).
DATASETS: tuple[str, ...] = datasets.NAMES
BINARIZATIONS: tuple[str, ...] = datasets.BINARIZATIONS
ALGORITHMS, OPTIMIZERS, OBJECTIVES, SCHEDULES, DEVICES, PROJECTIONS, SWEEP_SIZES = (
    typing.get_args(choice) for choice in (Algorithm, Optimizer, Objective, Schedule, Device, Projection, SweepSize))

PROFILE_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]*")


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read true as 1.0
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise custom("expected each value once")
    return values


def _one_or_two(value: int) -> int:
    if value not in (1, 2):
        raise custom("expected 1 or 2")
    return value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0), BeforeValidator(_no_bool)]  # finite: allow_inf_nan=False below
Rate = Annotated[float, Field(gt=0, lt=1), BeforeValidator(_no_bool)]  # strictly between 0 and 1
UNIQUE = {"uniqueItems": True}  # a list's schema: each value once

# The JSON-schema keyword that marks an operational knob: one that changes no output of any stage, so
# that dvc.yaml lists it under no stage's `params:`; its value says why (:data:`OPERATIONAL`).
OPERATIONAL_KEY = "x-operational"


def _operational(reason: str) -> dict[str, str]:
    """``json_schema_extra`` of an operational knob's ``Field``: ``reason`` is why it changes no result."""
    return {OPERATIONAL_KEY: reason}


def operational_knobs(cls: type[BaseModel]) -> dict[str, str]:
    """``{key: reason}`` of the operational knobs among ``cls``'s fields (:data:`OPERATIONAL_KEY`)."""
    return {name: field.json_schema_extra[OPERATIONAL_KEY] for name, field in cls.model_fields.items()
            if isinstance(field.json_schema_extra, dict) and OPERATIONAL_KEY in field.json_schema_extra}


# --------------------------------------------------------------------------- the models


class _Validating(type(BaseModel)):
    """Construction with keyword arguments (``TrainConfig(epochs=3)``) raises the same
    :class:`ConfigError` as a bad file, not pydantic's ``ValidationError``."""

    def __call__(cls, /, **values: Any) -> Any:
        try:
            return super().__call__(**values)
        except ValidationError as error:
            lines = cls._problems(values) or [f"{'.'.join(map(str, e['loc']))} = {shown(e['input'])}: {e['msg']}"
                                              for e in error.errors()]
            raise invalid(cls.__name__, lines) from None


class _Model(BaseModel, metaclass=_Validating):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    @classmethod
    def _problems(cls, values: dict[str, Any]) -> list[str]:
        return []  # pydantic's own messages

    def to_dict(self) -> dict[str, Any]:
        """The values as plain nested dicts and lists (what was read, with defaults filled in)."""
        return self.model_dump()

    def replace(self, **changes: Any) -> typing.Self:
        """A copy with ``changes`` applied, validated (the frozen models' ``dataclasses.replace``).

        Raises:
            ConfigError: a changed value is invalid.
        """
        return type(self)(**{**dict(self), **changes})


class Section(_Model):
    """One section of ``params.yaml``; ``section`` is its name there."""

    section: ClassVar[str]

    @classmethod
    def _problems(cls, values: dict[str, Any]) -> list[str]:
        return [f"{cls.section}.{line}" for line in section_problems(cls, values)[1]]


class PathsConfig(Section):
    """Where each stage reads and writes, relative to the repository root (``dvc.yaml`` uses them too)."""

    section: ClassVar[str] = "paths"

    raw: Str = Field("data/raw", description="Downloaded files, one folder per dataset (stage download).")
    processed: Str = Field("data/processed", description="Parsed splits, one folder per dataset (stage binarize).")
    models: Str = Field("models", description="The trained model (model.pt) and the resumable train_state.pt.")
    reports: Str = Field("reports", description="Metrics, curves, figures and the report.")

    def raw_dir(self, dataset: str) -> Path:
        return Path(self.raw) / dataset

    def processed_dir(self, dataset: str) -> Path:
        return Path(self.processed) / dataset

    @property
    def checkpoint(self) -> Path:
        return Path(self.models) / "model.pt"

    @property
    def train_state(self) -> Path:
        """The train stage's resumable checkpoint (not a DVC output: it must survive a re-run)."""
        return Path(self.models) / "train_state.pt"

    @property
    def train_summary(self) -> Path:
        return Path(self.reports) / "train_summary.json"

    @property
    def metrics(self) -> Path:
        return Path(self.reports) / "metrics.json"

    @property
    def unit_variances(self) -> Path:
        return Path(self.reports) / "active_units.json"

    @property
    def bound_curve(self) -> Path:
        return Path(self.reports) / "bound_curve.csv"

    @property
    def per_example(self) -> Path:
        return Path(self.reports) / "log_likelihood_per_example.csv"

    @property
    def ais_per_example(self) -> Path:
        return Path(self.reports) / "ais_per_example.csv"

    @property
    def elbo_curve(self) -> Path:
        return Path(self.reports) / "elbo_curve.csv"

    @property
    def train_steps(self) -> Path:
        return Path(self.reports) / "train_steps.csv"

    @property
    def figures(self) -> Path:
        return Path(self.reports) / "figures"


def _split_sizes(variant: datasets.Variant) -> str:
    """`` (50000 / 10000 / 10000)``: the examples per split the variant's files hold, if it says."""
    counts = variant.file_counts
    return f" ({' / '.join(str(counts[split]) for split in datasets.SPLITS if split in counts)})" if counts else ""


class DataConfig(Section):
    """Dataset, split and binarization (stages ``download`` and ``binarize``); the datasets and
    what each allows are the registry's (:mod:`vae.datasets`). The subsets exist for quick
    experiments and tests, never for reported numbers."""

    section: ClassVar[str] = "data"

    dataset: DatasetName = Field(
        "mnist", description="The dataset: mnist, or frey (Frey Face, grey, Gaussian decoder).")
    binarization: Binarization = Field(
        "dynamic", description="mnist: dynamic (training images resampled ~ Bernoulli(intensity) per minibatch; "
                               "validation and test binarized once) or static (the fixed Larochelle files, their own "
                               "50000 / 10000 / 10000 split); frey: none (grey values).")
    validation_size: PositiveInt | None = Field(
        None, description="Validation examples; null = the dataset's standard (MNIST: 10000 of the 60000 training "
                          "images; Frey Face: 200 of the 1965 faces, by a permutation seeded with split_seed).")
    test_size: PositiveInt | None = Field(
        None, description="Test examples; null = the dataset's standard (MNIST's fixed 10000 test images; "
                          "Frey Face 200).")
    split_seed: Int = Field(0, ge=0, description="Seeds the permutation that splits the examples.")
    split_order: SplitOrder = Field(
        "permuted", description="mnist (dynamic): permuted (validation drawn by a permutation seeded with split_seed) "
                                "or file (the last validation_size training images, in file order, as the IWAE "
                                "authors' datasets.binarized_mnist(n_validation) takes them; the rest train).")
    binarization_seed: Int = Field(
        0, ge=0, description="Seeds the fixed binarization of the validation and test images.")
    train_subset: PositiveInt | None = Field(
        None, description="Cap on training examples (null = all); for quick trials only.")
    eval_subset: PositiveInt | None = Field(
        None, description="Cap on validation and test examples (null = all); for quick trials only.")

    @model_validator(mode="after")
    def _fits_the_dataset(self, info: ValidationInfo) -> DataConfig:
        problems = Problems(self, info)
        entry = datasets.get(self.dataset)
        variant = entry.variants.get(self.binarization)
        if problems.valid("dataset", "binarization") and variant is None:
            problems.add("binarization", f"dataset {self.dataset!r} allows {', '.join(entry.binarizations)}")
        if problems.valid("dataset", "test_size") and entry.fixed_test and self.test_size is not None:
            problems.add("test_size", f"{entry.title} has a fixed test set of {entry.test_size} images; expected "
                                      "null (use eval_subset to evaluate fewer)")
        if problems.valid("dataset", "binarization", "split_order") and self.split_order == "file" \
                and (self.dataset, self.binarization) != ("mnist", "dynamic"):
            problems.add("split_order", f"file applies to mnist with binarization dynamic (the IWAE authors' split); "
                                        f"expected permuted for {self.dataset} ({self.binarization})")
        if problems.valid("dataset", "binarization", "validation_size") and variant is not None \
                and variant.fixed_split and self.validation_size is not None:
            problems.add("validation_size", f"the {self.binarization} binarization's files fix the split"
                                            f"{_split_sizes(variant)}; expected null")
        return problems.done()

    @property
    def likelihood(self) -> str:
        """The decoder's likelihood this data calls for (the registry's): ``bernoulli`` for binary
        data, ``gaussian`` for grey values."""
        return datasets.variant(self.dataset, self.binarization).likelihood


class ModelConfig(Section):
    """Architecture: ``hidden_layers`` tanh layers of ``hidden_dim`` units in the encoder and, mirrored,
    in the decoder (AEVB App. C: one layer; IWAE's one-stochastic-layer model: two of 200). With
    ``stochastic_layers`` 2, a second Gaussian latent layer z2 of ``top_latent_dim`` units above z1,
    ``hidden_layers`` tanh layers of ``top_hidden_dim`` units between them on each side (IWAE's
    784-200-200-100-100-100-50; :class:`vae.model.TwoLayerVAE`). The decoder's likelihood follows
    the data (``DataConfig.likelihood``)."""

    section: ClassVar[str] = "model"

    stochastic_layers: Annotated[int, Strict(), AfterValidator(_one_or_two)] = Field(
        1, description="1: x <-> z; 2: x <-> z1 <-> z2 (IWAE Sec. 5's two-stochastic-layer model: q(z1|x) q(z2|z1), "
                       "p(z2) p(z1|z2) p(x|z1), Gaussian latent layers; latent_dim is z1's size).",
        json_schema_extra={"enum": [1, 2]})
    latent_dim: PositiveInt = Field(20, description="N_z: size of the latent variable z (z1 with two stochastic layers).")
    hidden_dim: PositiveInt = Field(500, description="Units of each tanh hidden layer (between x and z, or z1).")
    hidden_layers: PositiveInt = Field(
        1, description="Tanh layers on each side (AEVB: 1; IWAE's models: 2), also between z1 and z2.")
    top_latent_dim: PositiveInt = Field(50, description="Two stochastic layers only: the size of z2 (IWAE: 50).")
    top_hidden_dim: PositiveInt = Field(
        100, description="Two stochastic layers only: units of each tanh layer between z1 and z2, in q and p (IWAE: 100).")
    init_std: PositiveFloat | None = Field(
        None, description="null keeps PyTorch's default initialisation; a number draws every weight and bias from "
                          "N(0, init_std^2) (AEVB Sec. 5: N(0, 0.01), read as a standard deviation of 0.01, as in "
                          "the authors' code).")
    output_bias_init: OutputBiasInit = Field(
        "default", description="default (the initialisation above) or data_mean: the decoder's output bias set to "
                               "logit(mean training pixel, clipped to [0.001, 0.999]), as the IWAE authors' "
                               "get_train_bias_np does.")


class TrainConfig(Section):
    """Optimisation (stage ``train``).

    ``algorithm`` ``aevb`` (Kingma & Welling 2014, Alg. 1: encoder and decoder ascend one bound,
    ``objective``) or ``wake-sleep`` (Hinton, Dayan, Frey & Neal 1995, the baseline of AEVB Sec. 5,
    with the same encoder and decoder): the wake phase ascends log p(x, z), z ~ q(z|x) (``samples``
    = L per example, no gradient to the encoder), over the decoder; the sleep phase ascends
    log q(z|x) on as many fantasies (z, x) ~ p(z) p(x|z), over the encoder. Both with the same
    optimizer settings; the curves report the same ELBO as AEVB's. Length: exactly one of
    ``epochs`` and ``training_samples``.
    """

    section: ClassVar[str] = "train"

    algorithm: Algorithm = Field(
        "aevb", description="aevb (Kingma & Welling 2014, Alg. 1) or wake-sleep (Hinton et al. 1995, AEVB Sec. 5's "
                            "baseline; its objective stays elbo, the bound its curves report).")
    optimizer: Optimizer = Field("adam", description="adam or adagrad.")
    learning_rate: PositiveFloat = Field(1e-3, description="Step size (ignored when step_size_candidates is set).")
    epsilon: PositiveFloat | None = Field(
        None, description="The optimizer's eps; null = PyTorch's default (IWAE: Adam eps 1e-4).")
    step_size_candidates: list[PositiveFloat] | None = Field(
        None, description="When set, each candidate trains from the same initial parameters for "
                          "step_size_selection_samples examples and the one with the best training ELBO is used "
                          "(AEVB Sec. 5; learning_rate is then ignored).")
    step_size_selection_samples: PositiveInt = Field(
        100000, description="Training examples each candidate is tried for.")
    schedule: Schedule = Field(
        "constant", description="constant, or iwae: the learning rate divided by 10^(i/7) during passes "
                                "3^0 + ... + 3^(i-1) to 3^0 + ... + 3^i (Burda et al. 2016, Sec. 5; 3280 passes for "
                                "i = 0..7).")
    schedule_rounding: Bool = Field(
        False, description="With schedule iwae: stage i's rate is learning_rate * round(10^(1 - i/7), 1) / 10 (the IWAE "
                           "authors' code: 1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4) instead of "
                           "learning_rate * 10^(-i/7).")
    objective: Objective = Field(
        "elbo", description="elbo (SGVB estimator B with samples = L) or iwae (the k-sample importance-weighted "
                            "bound, Burda et al. 2016 Eq. 8, samples = k > 1).")
    samples: PositiveInt = Field(1, description="L for elbo (and for wake-sleep's wake phase), k for iwae.")
    map_prior: Bool = Field(
        False, description="Adds a N(0, I) prior on the parameters, scaled by 1 / (training examples): weight decay "
                           "making the fit approximate MAP (AEVB Sec. 5).")
    batch_size: PositiveInt = Field(100, description="Examples per minibatch.")
    epochs: PositiveInt | None = Field(
        30, description="Passes over the training set; or null and set training_samples.")
    training_samples: PositiveInt | None = Field(
        None, description="Training examples evaluated (AEVB Fig. 2's x-axis; the last pass may be partial), "
                          "instead of epochs.")
    seed: Int = Field(0, ge=0, description="Seeds the initialisation, the minibatch order and the noise.")
    device: Device = Field("auto", description="auto = CUDA when available, else CPU.")
    elbo_eval_size: PositiveInt = Field(10000, description="Training examples behind the per-pass train ELBO.")
    curve_points: PositiveInt = Field(
        200, description="At most this many (log-spaced) passes get a train and validation ELBO.")
    log_interval: PositiveInt = Field(50, description="Minibatches averaged into each row of train_steps.csv.")
    checkpoint_interval: Int = Field(
        60, ge=0, description="Seconds between resumable checkpoints (0: after every pass); a re-run after an "
                              "interruption resumes from the last one. Operational: changes no result, so DVC "
                              "does not track it.",
        json_schema_extra=_operational(
            "writing a checkpoint draws no random number and changes no parameter, so model.pt and the curves are "
            "the same bit for bit whatever the interval (tests/test_params_tracking.py); only wall time differs"))
    early_stopping_patience: PositiveInt | None = Field(
        None, description="Evaluations without a better validation ELBO before training stops, keeping the best "
                          "parameters (null: off).")

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> TrainConfig:
        problems = Problems(self, info)
        if problems.valid("algorithm", "objective") and self.algorithm == "wake-sleep" and self.objective != "elbo":
            problems.add("algorithm", f"not with objective = {self.objective!r} (wake-sleep trains its own wake and "
                                      "sleep objectives; the iwae bound is an AEVB objective); expected objective: "
                                      "elbo, or algorithm: aevb")
        if problems.valid("epochs", "training_samples") and (self.epochs is None) == (self.training_samples is None):
            problems.add("epochs", "set exactly one of epochs and training_samples "
                                   f"(training_samples = {self.training_samples!r})")
        if problems.valid("objective", "samples") and self.objective == "iwae" and self.samples == 1:
            problems.add("samples", "the iwae objective with k = 1 is the ELBO; expected k > 1 (or objective: elbo)")
        if problems.valid("schedule", "schedule_rounding") and self.schedule_rounding and self.schedule != "iwae":
            problems.add("schedule_rounding", f"rounds the iwae schedule's rates; expected false with schedule "
                                              f"{self.schedule}")
        return problems.done()


class EvaluateConfig(Section):
    """Importance-sampled log-likelihood (stage ``evaluate``; IWAE, Burda et al. 2016, Eq. 8)."""

    section: ClassVar[str] = "evaluate"

    importance_samples: PositiveInt = Field(
        500, description="k of L_k (the literature reports k = 5000: about 8 min for 10000 images on 2 CPU cores; "
                         "500, the quick default, about 1 min).")
    bound_curve: list[PositiveInt] = Field(
        [1, 5, 50, 500, 5000], description="L_k is also reported at these k (values above importance_samples are "
                                           "dropped; importance_samples itself is always included).")
    train_examples: PositiveInt | None = Field(
        2000, description="Training images given the same estimate, so that overfitting shows as a number "
                          "(null = all).")
    memory_budget_mb: PositiveFloat = Field(
        16.0, description="Working memory of one (examples x samples) chunk; 16 MB keeps a chunk in a CPU's caches "
                          "(on a GPU, 1024 or more runs faster). Operational: DVC does not track it. It changes L_k "
                          "and the ELBO by float rounding only: 1, 16, 256 and 1024 MB gave per-image values within "
                          "5e-5 nats and means within 2e-7 (L_1000 of 784-500-20 and 784-200-2 models on 1000 and 300 "
                          "MNIST test images, CPU); AIS, BDMC and App. D the same to the bit.",
        json_schema_extra=_operational(
            "it sets how the (examples x samples) and (examples x chains) grids are cut into chunks; every example "
            "draws its noise from its own stream, so the estimates differ by float rounding only (L_k: within 5e-5 "
            "nats per image, 2e-7 in the mean, at 1 to 1024 MB)"))
    seed: Int = Field(0, ge=0, description="Seeds the importance samples.")
    device: Device = Field("auto", description="auto = CUDA when available, else CPU.")
    active_unit_threshold: PositiveFloat = Field(
        0.01, description="A latent unit is active when the variance of its posterior mean over the test set "
                          "exceeds this.")
    # Annealed importance sampling (Wu et al. 2017), BDMC (Grosse et al. 2015), AEVB App. D: vae/mcmc.py.
    ais_test_examples: Int | None = Field(
        32, ge=0, description="The first test images given an AIS estimate, beside L_k on the same images "
                              "(0: no AIS; null: all). Wu et al. 2017: all 10000.")
    ais_train_examples: Int = Field(
        16, ge=0, description="The first of the train_examples training images given an AIS estimate (0: none).")
    ais_temperatures: PositiveInt = Field(
        200, description="T, intermediate distributions between the initial distribution and the posterior "
                         "(Wu et al. 2017: 10000; 1000 is within 0.06 nats of it on their model).")
    ais_schedule: AISSchedule = Field(
        "sigmoid", description="sigmoid (Grosse et al. 2015, as Wu et al.) or linear inverse temperatures.")
    ais_chains: PositiveInt = Field(16, description="AIS chains per image; the estimate is their log-mean-exp "
                                                    "(Wu et al.: 16).")
    ais_leapfrog_steps: PositiveInt = Field(10, description="Leapfrog steps of the one HMC trajectory per "
                                                            "intermediate distribution (Wu et al.: 10).")
    ais_initial: AISInitial = Field(
        "encoder", description="The path's initial distribution: prior (N(0, I), Wu et al.'s AIS) or encoder "
                               "(q(z|x), their 'AIS + encoder', tighter at few temperatures).")
    ais_target_acceptance: Rate = Field(
        0.65, description="Acceptance rate each chain's HMC step size adapts toward (Wu et al.: 0.65).")
    bdmc_examples: Int = Field(
        16, ge=0, description="Images simulated from the model (z ~ p(z), x ~ p(x|z)) whose forward and reverse AIS "
                              "bound log p(x) from both sides; the gap bounds AIS's error (0: no BDMC).")
    appendix_d_samples: PositiveInt = Field(
        50, description="Posterior samples per image of AEVB's App. D estimator, reported when latent_dim <= 4 on "
                        "the AIS images (App. E: 50).")
    appendix_d_leapfrog_steps: PositiveInt = Field(
        4, description="Leapfrog steps per HMC trajectory of the App. D estimator (App. E: 4).")

    @property
    def curve(self) -> list[int]:
        """The k of the bound-tightness curve: ``bound_curve`` values <= k, and k itself."""
        return sorted({k for k in self.bound_curve if k <= self.importance_samples} | {self.importance_samples})


class VisualizeConfig(Section):
    """Figures (stage ``visualize``)."""

    section: ClassVar[str] = "visualize"

    samples_grid: PositiveInt = Field(10, description="A samples_grid x samples_grid grid of prior samples.")
    reconstructions: PositiveInt = Field(10, description="Test images shown beside their reconstructions.")
    manifold_grid: PositiveInt = Field(20, description="Points per side of Figure 4's manifold, when latent_dim = 2.")
    projection: Projection = Field("pca", description="pca or tsne: the latent space's projection for latent_dim > 2.")
    latent_points: PositiveInt = Field(5000, description="Test points in the latent-space scatter.")
    seed: Int = Field(0, ge=0, description="Seeds the samples and the projection.")


# What a sweep member's settings may set: the matrix fixes the dataset, latent size, algorithm and
# seed; paths are the sweep's own.
SWEEP_FIXED = {"data": ("dataset",), "model": ("latent_dim",), "train": ("algorithm", "seed")}
SWEEP_SECTIONS = ("data", "model", "train", "evaluate")

# Figure 2's members report L_k: AIS and BDMC (minutes per member) belong to the main model's report,
# so a member runs them only where its settings ask (evaluate.ais_test_examples, ...).
SWEEP_WITHOUT_AIS = {"ais_test_examples": 0, "ais_train_examples": 0, "bdmc_examples": 0}
DEFAULT_SWEEP_SETTINGS = {
    dataset: {"data": data, "model": {"hidden_dim": 200},
              "train": {"epochs": None, "training_samples": 100000, "curve_points": 40, "device": "cpu"},
              "evaluate": {"importance_samples": 100, "bound_curve": [1, 10, 100], "train_examples": 1000,
                           "device": "cpu"}}
    for dataset, data in (("mnist", {"binarization": "dynamic", "train_subset": 10000, "eval_subset": 1000}),
                          ("frey", {"binarization": "none"}))}
# A dataset the sweep does not use by default: no latent size, and its default binarization.
DEFAULT_SWEEP_LATENT_DIMS = {name: [] for name in datasets.NAMES} | {"mnist": [3, 20], "frey": [2, 10]}
DEFAULT_SWEEP_SETTINGS |= {name: {"data": {"binarization": datasets.get(name).binarizations[0]}}
                           for name in datasets.NAMES if name not in DEFAULT_SWEEP_SETTINGS}
# Every member's operational knobs: a checkpoint after every pass (a quick member trains for seconds).
DEFAULT_SWEEP_OPERATIONAL = {"train": {"checkpoint_interval": 0}}


class SweepConfig(Section):
    """The latent-size sweep of AEVB Figure 2 (stages ``sweep-data``, ``sweep-mnist``, ``sweep-frey``,
    ``sweep-report``; :mod:`vae.sweep`): every combination of ``latent_dims[dataset]`` x
    ``algorithms`` x ``seeds`` is one member (:class:`Member`), trained and evaluated on its own.

    A member's parameters (:func:`member_params`) are the defaults of this module (not the main
    run's sections) with ``settings[dataset]`` (sections data, model, train, evaluate) and
    ``operational`` on top, and the member's dataset, latent size, algorithm and seed. Validation
    derives every member's parameters, so a setting that fails one member is reported here.

    ``dvc.yaml`` tracks ``settings.<dataset>`` whole (one stage per member reads it), so
    ``settings`` holds only knobs that change results; the operational ones
    (:data:`OPERATIONAL`, e.g. ``train.checkpoint_interval``) go in ``operational``, which applies
    to every member and which DVC does not track.
    """

    section: ClassVar[str] = "sweep"

    size: SweepSize = Field(
        "quick", description="A label: quick (few members, short training: CPU minutes) or full "
                             "(`vae profile aevb-figure2`). Only the report shows it (the members' runs carry it "
                             "in MLflow), so changing it re-runs the report alone.")
    algorithms: Annotated[list[Algorithm], AfterValidator(_distinct)] = Field(
        ["aevb", "wake-sleep"], min_length=1, json_schema_extra=UNIQUE, description="The algorithms compared.")
    seeds: Annotated[list[Annotated[int, Strict(), Field(ge=0)]], AfterValidator(_distinct)] = Field(
        [0], min_length=1, json_schema_extra=UNIQUE, description="train.seed of the members; one member per seed.")
    latent_dims: dict[str, list[Int]] = Field(
        DEFAULT_SWEEP_LATENT_DIMS,
        description="Latent sizes per dataset, one entry per dataset; [] leaves it out (paper: mnist 3, 5, 10, 20, "
                    "200; frey 2, 5, 10, 20).",
        json_schema_extra={"additionalProperties": {"type": "array", "uniqueItems": True,
                                                    "items": {"type": "integer", "exclusiveMinimum": 0}}})
    threads: PositiveInt | None = Field(
        1, description="torch CPU threads per member, fixed so that a member gives the same numbers whether it runs "
                       "alone or beside others (null: torch's default, which depends on the machine).")
    settings: dict[str, dict] = Field(
        DEFAULT_SWEEP_SETTINGS,
        description="Per dataset: the sections data, model, train, evaluate that each member sets on top of the "
                    "defaults of vae/config.py (not the sections above). Knobs that change results only: DVC "
                    "tracks each dataset's settings whole, so an operational knob goes in sweep.operational.")
    operational: dict[str, dict] = Field(
        DEFAULT_SWEEP_OPERATIONAL,
        description="The operational knobs of every member, by section (e.g. train: {checkpoint_interval: 300}, "
                    "evaluate: {memory_budget_mb: 1024} on a GPU), on top of the defaults and settings; they change "
                    "no result, so DVC does not track them.",
        json_schema_extra=_operational("it holds only operational knobs (each validated as one), for the members"))

    @model_validator(mode="after")
    def _members_valid(self, info: ValidationInfo) -> SweepConfig:
        problems = Problems(self, info)
        names = datasets.NAMES
        for name in ("latent_dims", "settings"):
            if problems.valid(name) and sorted(getattr(self, name)) != sorted(names):
                problems.add(name, f"expected one entry per dataset ({', '.join(names)}); an empty list of latent "
                                   "sizes leaves a dataset out")
        if problems.lines:
            return problems.done()
        if problems.valid("latent_dims"):
            for dataset, sizes in self.latent_dims.items():
                if not all(size > 0 for size in sizes) or len(set(sizes)) != len(sizes):
                    problems.add("latent_dims", f"expected distinct integers > 0 for {dataset}",
                                 as_text=f"{{{dataset}: {sizes!r}}}")
            if not any(self.latent_dims.values()):
                problems.add("latent_dims", "the sweep has no member; give at least one dataset a latent size")
        operational = self._operational_problems() if problems.valid("operational") else None  # not a mapping
        problems.lines.extend(operational or [])
        if problems.valid("settings"):
            for dataset in names:
                problems.lines.extend(self._settings_problems(dataset, run_members=problems.valid("algorithms")
                                                              and operational == []))
        return problems.done()

    def _operational_problems(self) -> list[str]:
        """``operational``'s problems: each section one of a member's, each key an operational knob
        of it, each value valid for that knob."""
        problems = []
        for section, values in self.operational.items():
            knobs = operational_knobs(_SECTIONS[section]) if section in SWEEP_SECTIONS else {}
            if not knobs:
                allowed = [name for name in SWEEP_SECTIONS if operational_knobs(_SECTIONS[name])]
                problems.append(f"operational.{key_text(section)} = {shown(values)}: expected a section with "
                                f"operational knobs ({', '.join(allowed)})")
            elif not isinstance(values, dict):
                problems.append(f"operational.{section} = {shown(values)}: expected a mapping of keys to values")
            else:
                problems.extend(f"operational.{section}.{line}" for line in section_problems(
                    _SECTIONS[section], {key: value for key, value in values.items() if key in knobs})[1])
                for key in values:
                    if key in knobs:
                        continue
                    if key in _SECTIONS[section].model_fields:
                        problems.append(f"operational.{section}.{key_text(key)} = {shown(values[key])}: changes "
                                        f"results, so DVC must track it; set it in sweep.settings.<dataset>.{section}")
                    else:
                        problems.append(f"operational.{section}.{unknown(key, list(knobs))}")
        return problems

    def _settings_problems(self, dataset: str, run_members: bool) -> list[str]:
        settings = self.settings[dataset]
        where = f"settings.{dataset}"
        problems = []
        if "data" not in settings:  # dvc.yaml's sweep-data and sweep-report stages track settings.<dataset>.data
            problems.append(f"{where} = {shown(settings)}: expected a data section, which DVC tracks (e.g. data: "
                            f"{{binarization: {datasets.get(dataset).binarizations[0]}}})")
        for section, values in settings.items():
            if section not in SWEEP_SECTIONS:
                problems.append(f"{where}.{key_text(section)} = {shown(values)}: unknown section; expected "
                                f"{', '.join(SWEEP_SECTIONS)}")
            elif not isinstance(values, dict):
                problems.append(f"{where}.{section} = {shown(values)}: expected a mapping of keys to values")
            else:
                problems.extend(f"{where}.{section}.{key} = {shown(values[key])}: set by the sweep (its matrix and "
                                f"{'data.dataset' if key == 'dataset' else 'the member'}); remove it here"
                                for key in SWEEP_FIXED.get(section, ()) if key in values)
                problems.extend(f"{where}.{section}.{key} = {shown(values[key])}: operational (changes no result), "
                                f"so DVC does not track it; set it in sweep.operational.{section}, for every member"
                                for key in operational_knobs(_SECTIONS[section]) if key in values)
        if problems or not run_members:
            return problems
        # A valid latent size stands in for the matrix's (a bad one is reported as latent_dims').
        latent_dim = next((size for size in self.latent_dims.get(dataset, []) if size > 0), 1)
        failing: dict[str, list[str]] = {}  # problem -> the algorithms it occurs with
        for algorithm in self.algorithms:
            overrides = _member_overrides(settings, self.operational, Member(dataset, latent_dim, algorithm, 0))
            raw = {section: {**_SECTIONS[section]().to_dict(), **overrides[section]} for section in SWEEP_SECTIONS}
            for line in _sections(raw, {}, SWEEP_SECTIONS)[1]:
                failing.setdefault(line, []).append(algorithm)
        return [f"{where}.{line}" + ("" if len(algorithms) == len(self.algorithms) else
                                     f" (with algorithm {', '.join(algorithms)})")
                for line, algorithms in failing.items()]


class Params(_Model):
    """All sections of ``params.yaml``, and ``profile``: the name of the named configuration
    (``vae profile``) the file was written from, a label that the report shows and MLflow's
    training runs carry (no stage output records it, so that it re-runs no training)."""

    profile: Str = Field("quick", pattern=f"^{PROFILE_PATTERN.pattern}$",
                         description="The named configuration (vae/profiles/NAME.yaml) this file was written from. "
                                     "A label: the report shows it and MLflow tags the training run with it; no "
                                     "other output records it, so changing it re-runs the report alone.")
    paths: PathsConfig = Field(default_factory=PathsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    visualize: VisualizeConfig = Field(default_factory=VisualizeConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    model_config = ConfigDict(title="params.yaml")

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The JSON schema of ``params.yaml`` (pydantic's, with its dialect and the sweep's
        per-dataset settings described as partial sections)."""
        schema = super().model_json_schema(*args, **kwargs)
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  "$comment": "Generated from vae/config.py (`vae params --schema`); the rules that involve "
                              "several knobs are checked by `vae params`.", **schema}
        # A member's section in settings: the section's knobs but its operational ones (sweep.operational's).
        sections = {name: {"$ref": f"#/$defs/{_SECTIONS[name].__name__}"}
                    | ({"propertyNames": {"not": {"enum": list(knobs)}}} if knobs else {})
                    for name in SWEEP_SECTIONS for knobs in [operational_knobs(_SECTIONS[name])]}
        sweep = schema["$defs"]["SweepConfig"]["properties"]
        sweep["settings"]["additionalProperties"] = {
            "type": "object", "properties": sections, "additionalProperties": False}
        operational = {name: {"type": "object", "additionalProperties": False, "properties": {
            key: schema["$defs"][_SECTIONS[name].__name__]["properties"][key]
            for key in operational_knobs(_SECTIONS[name])}}
            for name in SWEEP_SECTIONS if operational_knobs(_SECTIONS[name])}
        sweep["operational"] |= {"properties": operational, "additionalProperties": False}
        return schema

    @classmethod
    def _problems(cls, values: dict[str, Any]) -> list[str]:
        try:
            _params({key: value.to_dict() if isinstance(value, _Model) else value for key, value in values.items()}, "")
        except ConfigError as error:
            return str(error).split(":\n", 1)[-1].replace("\n  ", "\n").strip().splitlines()
        return []

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every parameter of every section, e.g. to log to MLflow."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items()
                if isinstance(values, dict) for key, value in values.items()}

    def result_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the operational knobs (:data:`OPERATIONAL`): the values that can
        change a result, as the report shows them."""
        return {section: {key: value for key, value in values.items() if f"{section}.{key}" not in OPERATIONAL}
                if isinstance(values, dict) else values for section, values in self.to_dict().items()}


_SECTIONS: dict[str, type[Section]] = {name: field.annotation for name, field in Params.model_fields.items()
                                       if name != "profile"}
SECTIONS: tuple[str, ...] = tuple(_SECTIONS)  # the sections of params.yaml, in its order

# Every operational knob of params.yaml (``section.key``) and why it changes no output of any stage:
# dvc.yaml lists none of them under a stage's `params:` (tests/test_params_tracking.py).
OPERATIONAL: dict[str, str] = {f"{name}.{key}": reason for name, cls in _SECTIONS.items()
                               for key, reason in operational_knobs(cls).items()}


def _sections(raw: Mapping[str, Any], base: Mapping[str, Section],
              names: tuple[str, ...] | None = None) -> tuple[dict[str, Section], list[str]]:
    """The sections ``names`` (default: all) of ``raw`` validated, and their problems
    (``section.key = value: ...``); a section that is absent or null is ``base``'s, else its defaults."""
    built, problems = {}, []
    for name in names or tuple(_SECTIONS):
        cls = _SECTIONS[name]
        values = raw.get(name)
        if values is None:
            built[name] = base[name] if name in base else cls()
        elif not isinstance(values, dict):
            problems.append(f"{name} = {shown(values)}: section {name!r} must be a mapping of keys to values, "
                            f"got {type(values).__name__}")
        else:
            instance, found = section_problems(cls, values)
            problems += [f"{name}.{line}" for line in found]
            if instance is not None:
                built[name] = instance
    return built, problems


def _params(raw: Any, source: str, base: Params | None = None) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    oversized = oversized_integers(raw)
    if oversized:
        raise invalid(source, oversized)
    strangers = [key for key in raw if key not in Params.model_fields]
    if strangers:
        raise invalid(source, [unknown(key, list(Params.model_fields), "section") for key in strangers])
    problems = []
    profile = raw.get("profile", base.profile if base else Params.model_fields["profile"].default)
    if not isinstance(profile, str) or not PROFILE_PATTERN.fullmatch(profile):
        problems.append(f"profile = {shown(profile)}: expected a profile name (lower-case letters, digits, "
                        "hyphens), e.g. quick")
    built, found = _sections(raw, dict(base) if base else {})
    if not found and built["model"].stochastic_layers == 2 and built["train"].algorithm == "wake-sleep":
        found.append("train.algorithm = 'wake-sleep': trains models with one stochastic layer (its sleep phase "
                      "fits q(z|x) to fantasies from p(z) = N(0, I)); expected aevb, or model.stochastic_layers: 1")
    if problems or found:
        raise invalid(source, problems + found)
    return Params(profile=profile, **built)


def params_from_dict(raw: Any, source: str = "params") -> Params:
    """Build and validate :class:`Params` from a nested mapping (a missing or null section: its defaults).

    Raises:
        ConfigError: naming ``source`` and every bad section, key or value at once (an integer of
            more than 64 bits, anywhere, is reported alone, before the rest is checked).
    """
    return _params(raw, source)


def overlay(base: Params, overrides: Mapping[str, Any], source: str = "params") -> Params:
    """``base`` with ``overrides`` on top, validated: ``{section: {key: value}}`` replaces those
    keys of those sections (a value that is itself a mapping, such as ``sweep.settings``, is
    replaced whole), ``{"profile": name}`` the profile. Serves the named profiles (on the
    defaults) and the sweep's members (:func:`member_params`).

    Raises:
        ConfigError: naming ``source``: an override that is not a section mapping keys to values,
            or any bad key or value of the result.
    """
    current = base.to_dict()
    raw: dict[str, Any] = {}
    for section, values in overrides.items():
        if section == "profile":
            raw["profile"] = values
        elif section not in _SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{source}: params.{key_text(section)}: expected a section ({', '.join(SECTIONS)}) "
                              "mapping keys to values")
        else:
            raw[section] = {**current[section], **values}
    return _params(raw, source, base)


# --------------------------------------------------------------------------- the sweep's members


@dataclass(frozen=True, order=True)
class Member:
    """One run of the sweep: a dataset, a latent size N_z, an algorithm and a seed."""

    dataset: str
    latent_dim: int
    algorithm: str
    seed: int

    @property
    def name(self) -> str:
        """Folder and MLflow run name, e.g. ``mnist-z3-aevb-s0``."""
        return f"{self.dataset}-z{self.latent_dim}-{self.algorithm}-s{self.seed}"

    @property
    def stage(self) -> str:
        """The DVC stage ``dvc.yaml``'s matrix makes for it, e.g. ``sweep-mnist@3-aevb-0``."""
        return f"sweep-{self.dataset}@{self.latent_dim}-{self.algorithm}-{self.seed}"


def members(sweep: SweepConfig) -> list[Member]:
    """Every member the sweep declares, in ``dvc.yaml``'s order (dataset, latent size, algorithm, seed)."""
    return [Member(dataset, latent_dim, algorithm, seed)
            for dataset in DATASETS for latent_dim in sweep.latent_dims.get(dataset, [])
            for algorithm in sweep.algorithms for seed in sweep.seeds]


def find_member(sweep: SweepConfig, dataset: str, latent_dim: int, algorithm: str, seed: int) -> Member:
    """The declared member with these values.

    Raises:
        ConfigError: the sweep declares no such member (lists what it declares).
    """
    member = Member(dataset, latent_dim, algorithm, seed)
    if member not in members(sweep):
        raise ConfigError(f"sweep member {member.name}: not declared by params.yaml's sweep section "
                          f"(latent_dims {sweep.latent_dims}, algorithms {sweep.algorithms}, seeds {sweep.seeds})")
    return member


def sweep_paths(paths: PathsConfig, member: Member | None = None) -> PathsConfig:
    """The folders of the sweep's data and, given a member, of its model and reports."""
    name = member.name if member else "_"
    return PathsConfig(raw=f"{paths.raw}/sweep", processed=f"{paths.processed}/sweep",
                       models=f"{paths.models}/sweep/{name}", reports=f"{paths.reports}/sweep/members/{name}")


def _member_overrides(settings: Mapping[str, Any], operational: Mapping[str, Any], member: Member | None,
                      dataset: str = "") -> dict[str, dict]:
    """The sections data, model, train, evaluate a member (or, without one, the sweep's data stage
    for ``dataset``) sets: ``settings`` and ``operational`` (disjoint keys) with the member's
    dataset, latent size, algorithm and seed."""
    fixed = ({"data": {"dataset": member.dataset}, "model": {"latent_dim": member.latent_dim},
              "train": {"algorithm": member.algorithm, "seed": member.seed}} if member else
             {"data": {"dataset": dataset}})
    base = {"evaluate": SWEEP_WITHOUT_AIS}
    return {section: {**base.get(section, {}), **settings.get(section, {}), **operational.get(section, {}),
                      **fixed.get(section, {})}
            for section in SWEEP_SECTIONS}


def _sweep_params(sweep: SweepConfig, dataset: str, overrides: dict, paths: PathsConfig) -> Params:
    return overlay(Params(), {**overrides, "paths": paths.to_dict(), "profile": f"sweep-{sweep.size}"},
                   source=f"params.yaml sweep.settings.{dataset}")


def member_params(sweep: SweepConfig, member: Member, paths: PathsConfig | None = None) -> Params:
    """The member's full parameters: this module's defaults with AIS and BDMC off
    (:data:`SWEEP_WITHOUT_AIS`), ``sweep.settings[dataset]`` and ``sweep.operational`` on top, then
    the member's dataset, latent size, algorithm and seed; paths from :func:`sweep_paths`.

    Raises:
        ConfigError: the settings give an invalid member (names the key and value).
    """
    return _sweep_params(sweep, member.dataset,
                         _member_overrides(sweep.settings[member.dataset], sweep.operational, member),
                         sweep_paths(paths or PathsConfig(), member))


def data_params(sweep: SweepConfig, dataset: str, paths: PathsConfig | None = None) -> Params:
    """Parameters of the ``sweep-data@<dataset>`` stage (only ``data`` and ``paths`` matter)."""
    return _sweep_params(sweep, dataset, _member_overrides(sweep.settings[dataset], sweep.operational, None, dataset),
                         sweep_paths(paths or PathsConfig()))


def sweep_id(sweep: SweepConfig) -> str:
    """A 12-hex-digit digest of the ``sweep`` section without its operational knobs (which change no
    member's result, so no stage re-runs for them): the MLflow sweep run's identity."""
    text = json.dumps({key: value for key, value in sweep.to_dict().items() if f"sweep.{key}" not in OPERATIONAL},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- reading the file


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``.

    Raises:
        ConfigError: naming the file: it is missing or unreadable (e.g. a folder), is not UTF-8
            text, is not valid YAML (PyYAML's own errors, and the values it cannot build: a date
            such as 2001-13-01, ``!!int abc``, an integer of over 4300 digits, nesting deeper than
            Python's recursion limit), or holds a bad section, key or value.
    """
    path = Path(path)
    return params_from_dict(parse_yaml(read_params_text(path), path), source=str(path))


def read_params_text(path: str | Path) -> str:
    """The UTF-8 text of a parameters file, line ends read as ``\\n`` (as ``Path.read_text`` does).

    Raises:
        ConfigError: the file is missing, cannot be read, or is not UTF-8 (the message gives the
            first offending byte, its line and offset).
    """
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: parameters file not found (run from the repository root "
                          "or pass --params)") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the parameters file ({error.strerror or error})") from None
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{content[error.start]:02x} on line {line}, "
                          f"offset {error.start}); the parameters file must be YAML encoded as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_yaml(text: str, path: str | Path) -> Any:
    """``yaml.safe_load(text)`` for the parameters file ``path`` (named in errors).

    Raises:
        ConfigError: the text is not valid YAML, or holds a value PyYAML cannot build.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except Exception as error:  # safe_load runs no code, so any error is the text's: PyYAML's
        # constructors let ValueError, AttributeError, RecursionError... through
        raise ConfigError(f"{path}: not valid YAML: {type(error).__name__}: {error}") from None
