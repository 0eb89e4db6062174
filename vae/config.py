"""Typed, validated views of ``params.yaml``: one frozen dataclass per section.

``load_params`` reads the file once and rejects, before any work starts, an unknown section or
key (with the closest valid name), a value of the wrong type, a non-positive size and a value
outside its allowed set. Every message names the file, the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vae.errors import ConfigError

DATASETS = ("mnist",)
BINARIZATIONS = ("dynamic",)
OPTIMIZERS = ("adam", "adagrad")
DEVICES = ("auto", "cpu", "cuda")
PROJECTIONS = ("pca", "tsne")


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


@dataclass(frozen=True)
class DataConfig:
    """Dataset, split and binarization (stages ``download`` and ``binarize``).

    ``train_subset`` caps the training examples and ``eval_subset`` the validation and the test
    examples (``null`` keeps all); they exist for quick experiments and tests, never for
    reported numbers.
    """

    dataset: str = "mnist"
    binarization: str = "dynamic"
    validation_size: int = 10000
    split_seed: int = 0
    binarization_seed: int = 0
    train_subset: int | None = None
    eval_subset: int | None = None

    _checks = (_choice("dataset", DATASETS), _choice("binarization", BINARIZATIONS),
               _positive("validation_size", "train_subset", "eval_subset"),
               _non_negative("split_seed", "binarization_seed"))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: one tanh hidden layer in encoder and decoder (AEVB, App. C)."""

    latent_dim: int = 20
    hidden_dim: int = 500

    _checks = (_positive("latent_dim", "hidden_dim"),)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (stage ``train``). ``elbo_eval_size`` training examples give the per-epoch train ELBO."""

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 100
    epochs: int = 30
    seed: int = 0
    device: str = "auto"
    elbo_eval_size: int = 10000

    _checks = (_choice("optimizer", OPTIMIZERS), _choice("device", DEVICES),
               _positive("learning_rate", "batch_size", "epochs", "elbo_eval_size"),
               _non_negative("seed"))


def _positive_items(name: str):
    def check(self) -> list[str]:
        value = getattr(self, name)
        return [] if all(item > 0 for item in value) else [f"{name} = {value!r}: expected integers > 0"]
    return check


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


@dataclass(frozen=True)
class Params:
    """All sections of ``params.yaml``."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The parameters as plain nested dicts (what was read, with defaults filled in)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every parameter, e.g. to log to MLflow."""
        return {f"{section}.{key}": value
                for section, values in self.to_dict().items() for key, value in values.items()}


def _type_ok(value: Any, annotation: Any) -> bool:
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
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0]).removeprefix('an ').removeprefix('a ')}s"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    return {type(None): "null", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(value: Any, annotation: Any) -> Any:
    # PyYAML parses "1e-3" (no dot) as a string; accept it for float fields.
    if isinstance(value, str) and _type_ok(1.0, annotation) and not _type_ok(value, annotation):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and annotation is float:
        return float(value)
    return value


def _unknown(key: str, known: list[str], kind: str = "key") -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown {kind}{hint}; allowed {kind}s: {', '.join(known)}"


def _build_section(cls: type, section: str, raw: Any, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values, "
                          f"got {type(raw).__name__} {raw!r}")
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
        ConfigError: naming every bad section, key or value at once.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    unknown = [key for key in raw if key not in sections]
    if unknown:
        raise ConfigError(f"{source}: invalid parameters:\n"
                          + "\n".join(f"  {_unknown(k, list(sections), 'section')}" for k in unknown))
    built = {}
    errors = []
    for name, section_field in sections.items():
        cls = typing.get_type_hints(Params)[name]
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
        ConfigError: the file is missing, is not valid YAML, or holds a bad section, key or value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: parameters file not found (run from the repository root "
                          "or pass --params)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return params_from_dict(raw, source=str(path))
