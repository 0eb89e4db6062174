"""Typed, validated views of ``params.yaml``: one frozen dataclass per section.

``load_params`` reads the file once and rejects, before any work starts, an unknown section or
key (with the closest valid name), a value of the wrong type, a non-positive size and a value
outside its allowed set. Every message names the file, the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vae.errors import ConfigError

DATASETS = ("mnist", "frey")
BINARIZATIONS = ("dynamic", "static", "none")
# Which binarizations each dataset has: MNIST is binary (resampled, or the fixed Larochelle files);
# Frey Face stays grey and gets a Gaussian decoder (a Bernoulli likelihood of grey values is not one).
DATASET_BINARIZATIONS = {"mnist": ("dynamic", "static"), "frey": ("none",)}
ALGORITHMS = ("aevb", "wake-sleep")
OPTIMIZERS = ("adam", "adagrad")
OBJECTIVES = ("elbo", "iwae")
SCHEDULES = ("constant", "iwae")
DEVICES = ("auto", "cpu", "cuda")
PROJECTIONS = ("pca", "tsne")
SWEEP_SIZES = ("quick", "full")


def _positive(*names: str):
    # Written as "not (x > 0)" so that NaN fails too; infinity is never a sensible setting.
    def check(self) -> list[str]:
        return [f"{name} = {getattr(self, name)!r}: expected a finite number > 0"
                for name in names if getattr(self, name) is not None
                and not (0 < getattr(self, name) < math.inf)]
    return check


def _non_negative(*names: str):
    def check(self) -> list[str]:
        return [f"{name} = {getattr(self, name)!r}: expected a finite number >= 0"
                for name in names if getattr(self, name) is not None
                and not (0 <= getattr(self, name) < math.inf)]
    return check


def _positive_items(name: str):
    def check(self) -> list[str]:
        value = getattr(self, name)
        if value is None or all(0 < item < math.inf for item in value):
            return []
        return [f"{name} = {value!r}: expected a list of finite numbers > 0"]
    return check


def _choice(name: str, allowed: tuple[str, ...]):
    def check(self) -> list[str]:
        value = getattr(self, name)
        if value in allowed:
            return []
        return [f"{name} = {value!r}: expected one of {', '.join(allowed)}"]
    return check


@dataclass(frozen=True)
class PathsConfig:
    """Where each stage reads and writes, relative to the repository root (``dvc.yaml`` uses them too)."""

    raw: str = "data/raw"
    processed: str = "data/processed"
    models: str = "models"
    reports: str = "reports"

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
    def elbo_curve(self) -> Path:
        return Path(self.reports) / "elbo_curve.csv"

    @property
    def train_steps(self) -> Path:
        return Path(self.reports) / "train_steps.csv"

    @property
    def figures(self) -> Path:
        return Path(self.reports) / "figures"


def _dataset_binarization(self) -> list[str]:
    allowed = DATASET_BINARIZATIONS.get(self.dataset)
    if allowed is None or self.binarization in allowed or self.binarization not in BINARIZATIONS:
        return []  # an unknown dataset or binarization is reported by its own check
    return [f"binarization = {self.binarization!r}: dataset {self.dataset!r} allows "
            f"{', '.join(allowed)}"]


def _fixed_split(self) -> list[str]:
    problems = []
    if self.dataset == "mnist" and self.test_size is not None:
        problems.append(f"test_size = {self.test_size!r}: MNIST has a fixed test set of 10000 images; "
                        "expected null (use eval_subset to evaluate fewer)")
    if self.binarization == "static" and self.validation_size is not None:
        problems.append(f"validation_size = {self.validation_size!r}: the static binarization's "
                        "files fix the split (50000 / 10000 / 10000); expected null")
    return problems


@dataclass(frozen=True)
class DataConfig:
    """Dataset, split and binarization (stages ``download`` and ``binarize``).

    ``dataset`` ``mnist`` has binarization ``dynamic`` (training images resampled as
    Bernoulli(intensity) per minibatch) or ``static`` (the fixed Larochelle files, their own
    50000 / 10000 / 10000 split); ``frey`` (Frey Face) has ``none`` (grey values, Gaussian
    decoder). ``validation_size`` and ``test_size`` null mean the dataset's standard split
    (MNIST: 10000 validation images from the 60000 training ones, the 10000 test images;
    Frey Face: 200 and 200 of the 1965 faces, by a permutation seeded with ``split_seed``).
    ``train_subset`` caps the training examples and ``eval_subset`` the validation and the test
    examples (``null`` keeps all); they exist for quick experiments and tests, never for
    reported numbers.
    """

    dataset: str = "mnist"
    binarization: str = "dynamic"
    validation_size: int | None = None
    test_size: int | None = None
    split_seed: int = 0
    binarization_seed: int = 0
    train_subset: int | None = None
    eval_subset: int | None = None

    _checks = (_choice("dataset", DATASETS), _choice("binarization", BINARIZATIONS),
               _dataset_binarization, _fixed_split,
               _positive("validation_size", "test_size", "train_subset", "eval_subset"),
               _non_negative("split_seed", "binarization_seed"))

    @property
    def likelihood(self) -> str:
        """The decoder's likelihood this data calls for: ``bernoulli`` for binary data, else ``gaussian``."""
        return "gaussian" if self.binarization == "none" else "bernoulli"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: ``hidden_layers`` tanh layers of ``hidden_dim`` units in the encoder and, mirrored,
    in the decoder (AEVB App. C: one layer; IWAE's one-stochastic-layer model: two of 200).

    ``init_std`` null keeps PyTorch's default initialisation; a number draws every weight and
    bias from N(0, init_std^2) (AEVB Sec. 5: N(0, 0.01), read as a standard deviation of 0.01, as in
    the authors' code). The decoder's likelihood follows the data (``DataConfig.likelihood``).
    """

    latent_dim: int = 20
    hidden_dim: int = 500
    hidden_layers: int = 1
    init_std: float | None = None

    _checks = (_positive("latent_dim", "hidden_dim", "hidden_layers", "init_std"),)


def _one_length(self) -> list[str]:
    if (self.epochs is None) == (self.training_samples is None):
        return [f"epochs = {self.epochs!r}: set exactly one of epochs and training_samples "
                f"(training_samples = {self.training_samples!r})"]
    return []


def _iwae_samples(self) -> list[str]:
    if self.objective == "elbo" or self.samples > 1 or self.samples < 1:
        return []
    return [f"samples = {self.samples!r}: the iwae objective with k = 1 is the ELBO; expected k > 1 "
            "(or objective: elbo)"]


def _wake_sleep_objective(self) -> list[str]:
    if self.algorithm != "wake-sleep" or self.objective == "elbo":
        return []
    return [f"algorithm = {self.algorithm!r}: not with objective = {self.objective!r} (wake-sleep trains its own "
            "wake and sleep objectives; the iwae bound is an AEVB objective); expected objective: elbo, "
            "or algorithm: aevb"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (stage ``train``).

    ``algorithm`` ``aevb`` (Kingma & Welling 2014, Alg. 1: encoder and decoder ascend one bound,
    ``objective``) or ``wake-sleep`` (Hinton, Dayan, Frey & Neal 1995, the baseline of AEVB Sec. 5,
    with the same encoder and decoder): the wake phase ascends log p(x, z), z ~ q(z|x) (``samples``
    = L per example, no gradient to the encoder), over the decoder; the sleep phase ascends
    log q(z|x) on as many fantasies (z, x) ~ p(z) p(x|z), over the encoder. Both with the same
    optimizer settings; the curves report the same ELBO as AEVB's. Under wake-sleep ``objective``
    stays ``elbo`` (the bound its curves report); ``iwae`` is rejected.
    Length: ``epochs`` passes over the training set, or ``training_samples`` training examples
    evaluated (AEVB Fig. 2's x-axis; the last pass may be partial); exactly one is set.
    ``schedule`` ``iwae`` divides the learning rate by 10^(i/7) during passes 3^0 + ... + 3^(i-1)
    to 3^0 + ... + 3^i (Burda et al. 2016, Sec. 5; 3280 passes for i = 0..7).
    ``step_size_candidates``: when set, each candidate trains from the same initial parameters
    for ``step_size_selection_samples`` examples and the one with the best training ELBO is used
    (AEVB Sec. 5; ``learning_rate`` is then ignored).
    ``objective`` ``elbo`` (SGVB estimator B with ``samples`` = L) or ``iwae`` (the k-sample
    importance-weighted bound, Burda et al. 2016 Eq. 8, ``samples`` = k > 1).
    ``map_prior`` adds a N(0, I) prior on the parameters, scaled by 1 / (training examples):
    weight decay making the fit approximate MAP (AEVB Sec. 5).
    ``curve_points`` bounds how many (log-spaced) passes get a train and validation ELBO;
    ``log_interval`` minibatches are averaged into each row of the per-step curve.
    ``checkpoint_interval`` seconds between resumable checkpoints (0: after every pass); a
    re-run after an interruption resumes from the last one. ``early_stopping_patience``
    evaluations without a better validation ELBO stop training and keep the best parameters
    (null: off).
    """

    algorithm: str = "aevb"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    epsilon: float | None = None
    step_size_candidates: list[float] | None = None
    step_size_selection_samples: int = 100000
    schedule: str = "constant"
    objective: str = "elbo"
    samples: int = 1
    map_prior: bool = False
    batch_size: int = 100
    epochs: int | None = 30
    training_samples: int | None = None
    seed: int = 0
    device: str = "auto"
    elbo_eval_size: int = 10000
    curve_points: int = 200
    log_interval: int = 50
    checkpoint_interval: int = 60
    early_stopping_patience: int | None = None

    _checks = (_choice("algorithm", ALGORITHMS), _choice("optimizer", OPTIMIZERS), _choice("device", DEVICES),
               _choice("schedule", SCHEDULES), _choice("objective", OBJECTIVES), _wake_sleep_objective,
               _positive("learning_rate", "epsilon", "step_size_selection_samples", "samples", "batch_size",
                         "epochs", "training_samples", "elbo_eval_size", "curve_points", "log_interval",
                         "early_stopping_patience"),
               _positive_items("step_size_candidates"),
               _one_length, _iwae_samples, _non_negative("seed", "checkpoint_interval"))


@dataclass(frozen=True)
class EvaluateConfig:
    """Importance-sampled log-likelihood (stage ``evaluate``; IWAE, Burda et al. 2016, Eq. 8).

    ``memory_budget_mb`` bounds the working memory of one (examples x samples) chunk; 16 MB keeps
    a chunk in a CPU's caches (on a GPU, 1024 or more runs faster). ``bound_curve`` lists the k
    at which L_k is also reported (values above ``importance_samples`` are dropped, and
    ``importance_samples`` itself is always included). ``train_examples`` training images
    (null = all) get the same estimate, so that overfitting shows as a number.
    """

    importance_samples: int = 1000
    bound_curve: list[int] = field(default_factory=lambda: [1, 5, 50, 500, 5000])
    train_examples: int | None = 2000
    memory_budget_mb: float = 16
    seed: int = 0
    device: str = "auto"
    active_unit_threshold: float = 0.01

    _checks = (_choice("device", DEVICES),
               _positive("importance_samples", "train_examples", "memory_budget_mb", "active_unit_threshold"),
               _positive_items("bound_curve"), _non_negative("seed"))

    @property
    def curve(self) -> list[int]:
        """The k of the bound-tightness curve: ``bound_curve`` values <= k, and k itself."""
        return sorted({k for k in self.bound_curve if k <= self.importance_samples} | {self.importance_samples})


@dataclass(frozen=True)
class VisualizeConfig:
    """Figures (stage ``visualize``)."""

    samples_grid: int = 10
    reconstructions: int = 10
    manifold_grid: int = 20
    projection: str = "pca"
    latent_points: int = 5000
    seed: int = 0

    _checks = (_choice("projection", PROJECTIONS),
               _positive("samples_grid", "reconstructions", "manifold_grid", "latent_points"),
               _non_negative("seed"))


def _distinct_items(*names: str):
    def check(self) -> list[str]:
        problems = []
        for name in names:
            value = getattr(self, name)
            if not value:
                problems.append(f"{name} = {value!r}: expected a non-empty list")
            elif len(set(value)) != len(value):
                problems.append(f"{name} = {value!r}: expected each value once")
        return problems
    return check


def _sweep_algorithms(self) -> list[str]:
    bad = [a for a in self.algorithms if a not in ALGORITHMS]
    return [f"algorithms = {self.algorithms!r}: unknown {', '.join(map(repr, bad))}; expected values from "
            f"{', '.join(ALGORITHMS)}"] if bad else []


def _sweep_seeds(self) -> list[str]:
    return [] if all(seed >= 0 for seed in self.seeds) else \
        [f"seeds = {self.seeds!r}: expected integers >= 0"]


def _per_dataset(name: str):
    def check(self) -> list[str]:
        value = getattr(self, name)
        if sorted(value) == sorted(DATASETS):
            return []
        return [f"{name} = {value!r}: expected one entry per dataset ({', '.join(DATASETS)}); "
                "an empty list of latent sizes leaves a dataset out"]
    return check


def _sweep_latent_dims(self) -> list[str]:
    problems = []
    for dataset, sizes in self.latent_dims.items():
        if not all(size > 0 for size in sizes) or len(set(sizes)) != len(sizes):
            problems.append(f"latent_dims = {{{dataset}: {sizes!r}}}: expected distinct integers > 0 "
                            f"for {dataset}")
    if not any(self.latent_dims.values()):
        problems.append(f"latent_dims = {self.latent_dims!r}: the sweep has no member; give at least "
                        "one dataset a latent size")
    return problems


# What a sweep member's settings may set: the matrix fixes the dataset, latent size, algorithm and
# seed; paths are the sweep's own.
SWEEP_FIXED = {"data": ("dataset",), "model": ("latent_dim",), "train": ("algorithm", "seed")}
SWEEP_SECTIONS = ("data", "model", "train", "evaluate")


def _sweep_settings(self) -> list[str]:
    from vae.sweep import member_params, Member  # the member's full parameters are built there

    problems = []
    for dataset in DATASETS:
        settings = self.settings.get(dataset)
        if not isinstance(settings, dict):
            continue  # reported by _per_dataset
        reported = len(problems)
        for section, values in settings.items():
            if section not in SWEEP_SECTIONS:
                problems.append(f"settings.{dataset}.{_key_text(section)} = {values!r}: unknown section; expected "
                                f"{', '.join(SWEEP_SECTIONS)}")
            elif not isinstance(values, dict):
                problems.append(f"settings.{dataset}.{section} = {values!r}: expected a mapping of keys to values")
            else:
                problems.extend(f"settings.{dataset}.{section}.{key} = {values[key]!r}: set by the sweep "
                                f"(its matrix and {'data.dataset' if key == 'dataset' else 'the member'}); "
                                "remove it here" for key in SWEEP_FIXED.get(section, ()) if key in values)
        if len(problems) > reported:
            continue
        # A valid latent size stands in for the matrix's (a bad one is _sweep_latent_dims' to report).
        latent_dim = next((size for size in self.latent_dims.get(dataset, []) if size > 0), 1)
        failing: dict[str, list[str]] = {}  # problem -> the algorithms it occurs with
        for algorithm in self.algorithms if _sweep_algorithms(self) == [] else ():
            try:
                member_params(self, Member(dataset, latent_dim, algorithm, 0))
            except ConfigError as error:
                for line in str(error).split(":\n", 1)[-1].splitlines():
                    failing.setdefault(line.strip(), []).append(algorithm)
        problems.extend(f"settings.{dataset}.{line}" + ("" if len(algorithms) == len(self.algorithms) else
                                                         f" (with algorithm {', '.join(algorithms)})")
                        for line, algorithms in failing.items())
    return problems


def _sweep_members(self) -> list[str]:
    # Latent sizes and settings per dataset, once latent_dims and settings have an entry for each.
    if _per_dataset("latent_dims")(self) or _per_dataset("settings")(self):
        return []
    return _sweep_latent_dims(self) + _sweep_settings(self)


@dataclass(frozen=True)
class SweepConfig:
    """The latent-size sweep of AEVB Figure 2 (stages ``sweep-data``, ``sweep-mnist``, ``sweep-frey``,
    ``sweep-report``; :mod:`vae.sweep`): every combination of ``latent_dims[dataset]`` x
    ``algorithms`` x ``seeds`` is one member, trained and evaluated on its own.

    A member's parameters are the defaults of this module (not the main run's sections) with
    ``settings[dataset]`` (sections data, model, train, evaluate) on top, and the member's dataset,
    latent size, algorithm and seed. ``threads`` fixes torch's CPU threads per member, so a member
    gives the same numbers whether ``dvc repro`` runs it alone or a parallel sweep runs it beside
    others (null: torch's default, which depends on the machine). An empty ``latent_dims`` list
    leaves that dataset out.
    """

    size: str = "quick"
    algorithms: list[str] = field(default_factory=lambda: ["aevb", "wake-sleep"])
    seeds: list[int] = field(default_factory=lambda: [0])
    latent_dims: dict[str, list[int]] = field(default_factory=lambda: {"mnist": [3, 20], "frey": [2, 10]})
    threads: int | None = 1
    settings: dict[str, dict] = field(default_factory=lambda: {
        "mnist": {"data": {"binarization": "dynamic", "train_subset": 10000, "eval_subset": 1000},
                  "model": {"hidden_dim": 200},
                  "train": {"epochs": None, "training_samples": 200000, "curve_points": 40,
                            "checkpoint_interval": 0, "device": "cpu"},
                  "evaluate": {"importance_samples": 100, "bound_curve": [1, 10, 100], "train_examples": 1000,
                               "device": "cpu"}},
        "frey": {"data": {"binarization": "none"},
                 "model": {"hidden_dim": 200},
                 "train": {"epochs": None, "training_samples": 200000, "curve_points": 40,
                           "checkpoint_interval": 0, "device": "cpu"},
                 "evaluate": {"importance_samples": 100, "bound_curve": [1, 10, 100], "train_examples": 1000,
                              "device": "cpu"}}})

    _checks = (_choice("size", SWEEP_SIZES), _distinct_items("algorithms", "seeds"), _sweep_algorithms,
               _sweep_seeds, _per_dataset("latent_dims"), _per_dataset("settings"), _positive("threads"), _sweep_members)


PROFILE_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]*")
INTEGER_LIMIT = 2**63  # every integer parameter must fit in 64 bits (torch's and numpy's integers)


@dataclass(frozen=True)
class Params:
    """All sections of ``params.yaml``, and ``profile``: the name of the named configuration
    (``vae profile``) the file was written from, recorded with every result."""

    profile: str = "quick"
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The parameters as plain nested dicts (what was read, with defaults filled in)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every parameter of every section, e.g. to log to MLflow."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items()
                if isinstance(values, dict) for key, value in values.items()}


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is dict or typing.get_origin(annotation) is dict:
        key_type, value_type = typing.get_args(annotation) or (str, Any)
        return isinstance(value, dict) and all(_type_ok(k, key_type) and (value_type is Any or _type_ok(v, value_type))
                                               for k, v in value.items())
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:  # YAML reads 1e-3 as a string unless written 1.0e-3; accept ints too
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    if annotation is dict or typing.get_origin(annotation) is dict:
        value_type = (typing.get_args(annotation) or (str, Any))[1]
        inner = "values" if value_type is Any else _type_name(value_type).removeprefix("an ").removeprefix("a ")
        return f"a mapping of names to {'mappings' if value_type is dict else inner}"
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0]).removeprefix('an ').removeprefix('a ')}s"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    return {type(None): "null", int: "an integer", float: "a number", str: "a string",
            bool: "true or false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(value: Any, annotation: Any) -> Any:
    # PyYAML parses "1e-3" (no dot) as a string; accept it for float fields.
    if isinstance(value, str) and _type_ok(1.0, annotation) and not _type_ok(value, annotation):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and _type_ok(1.0, annotation) \
            and not _type_ok(True, annotation):  # int for a float (or float | None) field
        try:
            return float(value)
        except OverflowError:  # beyond a float's range: the type check reports it
            return value
    return value


def _unknown(key: Any, known: list[str], kind: str = "key") -> str:
    if not isinstance(key, str):  # YAML reads a key written 1, null or true as int, None, bool
        return f"{_key_text(key)}: unknown {kind}, not a name ({type(key).__name__}); allowed {kind}s: {', '.join(known)}"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{_key_text(key)}: unknown {kind}{hint}; allowed {kind}s: {', '.join(known)}"


def _integer_text(value: int) -> str:
    # Python refuses to print an integer of over 4300 digits; no message may depend on it.
    return repr(value) if value.bit_length() <= 128 else f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"


def _key_text(key: Any) -> str:
    """A key as messages name it: a printable name as it is, else (empty, blank at either end,
    a line break, not a string) its repr, on one line."""
    if isinstance(key, str) and key and key.isprintable() and key == key.strip():
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return _integer_text(key)
    try:
        return repr(key)
    except (ValueError, RecursionError):
        return f"<a {type(key).__name__} key>"


def _oversized_integers(raw: Any) -> list[str]:
    """One problem per integer of more than 64 bits anywhere in ``raw`` (values, list items, keys),
    named by its path: torch and numpy take no larger integer, and one of over 4300 digits cannot
    even be printed in a message."""
    problems: list[str] = []
    stack: list[tuple[str, Any]] = [("", raw)]
    seen: set[int] = set()  # YAML anchors can make a list that contains itself
    while stack:
        where, value = stack.pop()
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INTEGER_LIMIT <= value < INTEGER_LIMIT:
                problems.append(f"{where or 'the file'} = {_integer_text(value)}: expected an integer "
                                "from -2**63 to 2**63 - 1")
            continue
        if not isinstance(value, (dict, list, tuple, set, frozenset)) or id(value) in seen:
            continue
        seen.add(id(value))
        children = []
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{_key_text(key)}" if where else _key_text(key)
                children += [(f"{name} (the key)", key), (name, item)]
        else:
            children = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
        stack.extend(reversed(children))
    return problems


def _build_section(cls: type, section: str, raw: Any, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: invalid parameters:\n  {section} = {raw!r}: section {section!r} must be "
                          f"a mapping of keys to values, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    problems = [_unknown(key, list(fields)) for key in raw if key not in fields]
    values = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        value = _coerce(value, hints[name])
        if not _type_ok(value, hints[name]):
            problems.append(f"{name} = {value!r}: expected {_type_name(hints[name])}")
        values[name] = value
    # Range and choice checks run on the well-typed values (defaults standing in for the
    # others), so one message names every problem of the section.
    bad_types = {p.split(" = ", 1)[0] for p in problems}
    instance = cls(**{k: v for k, v in values.items() if k not in bad_types})
    for check in getattr(cls, "_checks", ()):
        problems.extend(p for p in check(instance) if p.split(" = ", 1)[0] not in bad_types)
    if not problems:
        return instance
    lines = "\n".join(f"  {section}.{p}" for p in problems)
    raise ConfigError(f"{source}: invalid parameters:\n{lines}")


def params_from_dict(raw: Any, source: str = "params") -> Params:
    """Build and validate :class:`Params` from a nested mapping.

    Raises:
        ConfigError: naming every bad section, key or value at once (an integer of more than 64
            bits, anywhere, is reported alone, before the rest is checked).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    oversized = _oversized_integers(raw)
    if oversized:
        raise ConfigError(f"{source}: invalid parameters:\n" + "\n".join(f"  {problem}" for problem in oversized))
    sections = {f.name: f for f in dataclasses.fields(Params) if f.name != "profile"}
    unknown = [key for key in raw if key not in sections and key != "profile"]
    if unknown:
        raise ConfigError(f"{source}: invalid parameters:\n"
                          + "\n".join(f"  {_unknown(k, ['profile', *sections], 'section')}" for k in unknown))
    built = {}
    errors = []
    profile = raw.get("profile", Params.profile)
    if not isinstance(profile, str) or not PROFILE_PATTERN.fullmatch(profile):
        errors.append(f"  profile = {profile!r}: expected a profile name (lower-case letters, digits, "
                      "hyphens), e.g. quick")
    else:
        built["profile"] = profile
    for name, section_field in sections.items():
        cls = typing.get_type_hints(Params)[name]
        if raw.get(name) is None:  # the defaults, valid by construction (tests/test_config.py checks)
            built[name] = cls()
            continue
        try:
            built[name] = _build_section(cls, name, raw.get(name), source)
        except ConfigError as error:
            errors.append(str(error).split(":\n", 1)[-1])
    if errors:
        raise ConfigError(f"{source}: invalid parameters:\n" + "\n".join(errors))
    return Params(**built)


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
