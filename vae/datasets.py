"""The dataset registry: one entry per dataset, and every other module asks it.

An entry (:class:`Dataset`) holds everything the pipeline knows about a dataset: its display name,
its image shape, whether it has labels, its standard split, and one :class:`Variant` per
binarization it allows (``data.binarization``): the upstream files with their checksums and
mirrors (:class:`DatasetSource`; the mirror logic is :mod:`vae.data.sources`), the parser that turns them into processed
splits, the decoder likelihood the data calls for, and the published test log-likelihoods a run
on it may be compared with (:class:`Reference`).

This module is at the bottom of the stack: it imports no torch and no stage module. A parser is
named as ``"module:function"`` (the convention of Python entry points) and imported only when the
``binarize`` stage calls it, so that reading the registry (e.g. to validate ``params.yaml``) stays
cheap and the parsers, which read their sizes from here, import nothing that imports them.

To add a dataset: write its parser in ``vae/data/`` (``prepare(raw_dir, out_dir, config) ->
{split: examples}``), add its entry to :data:`DATASETS` below, and its files to the mirror. The
configuration, the download and binarize stages, the figures and the report pick it up from here.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vae.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the parsers import the configuration, not the other way
    from vae.config import DataConfig

LIKELIHOODS = ("bernoulli", "gaussian")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file: its name at the source and the SHA-256 of its uncompressed content."""

    name: str
    sha256: str

    @property
    def compressed(self) -> bool:
        return self.name.endswith(".gz")

    @property
    def local_name(self) -> str:
        """The name it is stored under: the upstream name without ``.gz`` (stored uncompressed)."""
        return self.name[: -len(".gz")] if self.compressed else self.name


@dataclass(frozen=True)
class DatasetSource:
    """A dataset's files and the base URLs that serve them, tried in order."""

    name: str
    base_urls: tuple[str, ...]
    files: tuple[RemoteFile, ...]


@dataclass(frozen=True)
class Reference:
    """One published test log-likelihood, with the set-up needed to judge comparability.

    ``log_likelihood`` is in nats per example (negative: the papers print the NLL);
    ``importance_samples`` is the k of the L_k they evaluated with.
    """

    source: str
    where: str
    model: str
    binarization: str
    architecture: str
    importance_samples: int
    log_likelihood: float


@dataclass(frozen=True)
class EstimatorReference:
    """One published estimate of how tight a bound is: a model's test log-likelihood by one
    estimator (``estimator``: AIS with T intermediate distributions, the IWAE bound at k, ...),
    nats per example. The gaps between a paper's estimators are what a run's own gaps compare
    with; the absolute numbers only where model and binarization agree."""

    source: str
    where: str
    model: str
    binarization: str
    estimator: str
    log_likelihood: float


Parser = Callable[[Path, Path, "DataConfig"], dict[str, int]]


@dataclass(frozen=True)
class Variant:
    """One binarization of a dataset: where its files come from, how they are parsed, and what
    the decoder models.

    ``parser`` is ``"module:function"``; the function takes (raw folder, processed folder,
    :class:`~vae.config.DataConfig`) and returns the number of examples per split.
    ``labelled``: the files carry class labels (used only to colour figures).
    ``fixed_split``: the files fix all three splits (``data.validation_size`` and
    ``data.test_size`` must stay null). ``file_counts``: the number of examples the upstream files
    hold per split, which the parser checks (MNIST's IDX files: 60000 training and 10000 test
    images; the static binarization's files: 50000 / 10000 / 10000); empty where the parser takes
    whatever number the file holds (Frey Face). ``references``: published numbers on exactly this data.
    """

    binarization: str
    source: DatasetSource
    parser: str
    likelihood: str
    description: str
    fixed_split: bool = False
    labelled: bool = False
    file_counts: dict[str, int] = field(default_factory=dict, hash=False)
    references: tuple[Reference, ...] = ()

    def load_parser(self) -> Parser:
        """The parser function, imported now (reading the registry imports no parser, nor torch)."""
        return pkgutil.resolve_name(self.parser)


@dataclass(frozen=True)
class Dataset:
    """A dataset as the pipeline knows it.

    ``image_shape`` (height, width): each example is a row-major image of that many pixels
    (``input_dim`` = height x width). ``validation_size`` and ``test_size`` are the standard split
    sizes used when ``data.validation_size`` / ``data.test_size`` are null; ``fixed_test``: the test
    set is the upstream one (``data.test_size`` must stay null). ``split`` describes the
    standard split in words for messages and the report. ``estimator_references``: published
    estimates of log p(x) by several estimators on one model (how far L_k sits below AIS).
    """

    name: str
    title: str
    image_shape: tuple[int, int]
    validation_size: int
    test_size: int
    fixed_test: bool
    split: str
    variants: dict[str, Variant] = field(default_factory=dict)
    estimator_references: tuple[EstimatorReference, ...] = ()

    @property
    def input_dim(self) -> int:
        """D: pixels per example."""
        return self.image_shape[0] * self.image_shape[1]

    @property
    def binarizations(self) -> tuple[str, ...]:
        """The ``data.binarization`` values it allows, the default first."""
        return tuple(self.variants)

    def variant(self, binarization: str) -> Variant:
        """The variant for ``binarization``.

        Raises:
            ConfigError: the dataset has no such binarization (lists the allowed ones).
        """
        try:
            return self.variants[binarization]
        except KeyError:
            raise ConfigError(f"data.dataset = {self.name!r} with data.binarization = {binarization!r}: "
                              f"no such data; expected one of {', '.join(self.binarizations)}") from None

    def panel_title(self, binarization: str) -> str:
        """A figure panel's title: ``MNIST, dynamic binarization``; ``Frey Face`` (grey data)."""
        return panel_title(self.name, binarization)


IWAE = "Burda, Grosse & Salakhutdinov 2016 (IWAE)"
IWAE_SETUP = "784-200-200-50 tanh encoder, mirrored decoder; Adam, batch 20, 3280 passes"
IWAE_SETUP_2L = ("2 stochastic layers (100 and 50 units) with tanh layers 200-200 and 100-100 between; "
                 "Adam, batch 20, 3280 passes")

WU = "Wu, Burda, Salakhutdinov & Grosse 2017"
WU_MODEL = "IWAE's MNIST VAE (Burda et al. 2016), 10000 test images"
WU_BINARIZATION = "binarized MNIST"
WU_TABLE_1 = tuple(EstimatorReference(WU, "Table 1", WU_MODEL, WU_BINARIZATION, estimator, value) for estimator, value in (
    ("AIS from the prior, T = 1000, 16 chains", -85.679), ("AIS from the prior, T = 10000, 16 chains", -85.619),
    ("AIS from the encoder, T = 100", -85.754), ("AIS from the encoder, T = 1000", -85.621),
    ("IWAE bound, k = 10^4", -86.902), ("IWAE bound, k = 10^5", -86.464)))

MNIST = Dataset(
    name="mnist", title="MNIST", image_shape=(28, 28),
    validation_size=10000, test_size=10000, fixed_test=True,
    split="10000 validation images from the 60000 training ones, the 10000 test images",
    estimator_references=WU_TABLE_1,
    variants={
        "dynamic": Variant(
            binarization="dynamic",
            source=DatasetSource(
                name="mnist",
                # The two mirrors torchvision lists for MNIST.
                base_urls=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
                files=(
                    RemoteFile("train-images-idx3-ubyte.gz",
                               "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
                    RemoteFile("train-labels-idx1-ubyte.gz",
                               "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
                    RemoteFile("t10k-images-idx3-ubyte.gz",
                               "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
                    RemoteFile("t10k-labels-idx1-ubyte.gz",
                               "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
                )),
            parser="vae.data.mnist:prepare_mnist", likelihood="bernoulli", labelled=True,
            file_counts={"train": 60000, "test": 10000},
            description="grey IDX images; training images resampled ~ Bernoulli(intensity) per minibatch, "
                        "validation and test images binarized once",
            references=(
                Reference(IWAE, "Table 1", "VAE, 1 stochastic layer (k=1)", "dynamic", IWAE_SETUP, 5000, -86.76),
                Reference(IWAE, "Table 1", "VAE, 1 stochastic layer (k=50)", "dynamic", IWAE_SETUP, 5000, -86.35),
                Reference(IWAE, "Table 1", "IWAE, 1 stochastic layer (k=50)", "dynamic", IWAE_SETUP, 5000, -84.78),
                Reference(IWAE, "Table 1", "VAE, 2 stochastic layers (k=1)", "dynamic", IWAE_SETUP_2L, 5000, -85.33),
                Reference(IWAE, "Table 1", "IWAE, 2 stochastic layers (k=50)", "dynamic", IWAE_SETUP_2L, 5000,
                          -82.90),
            )),
        "static": Variant(
            binarization="static",
            source=DatasetSource(
                name="binarized_mnist",
                # Larochelle & Murray (2011): MNIST binarized once, split 50000 / 10000 / 10000; plain
                # text, one image per line (see vae.data.binarized_mnist).
                base_urls=("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",),
                files=(
                    RemoteFile("binarized_mnist_train.amat",
                               "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
                    RemoteFile("binarized_mnist_valid.amat",
                               "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
                    RemoteFile("binarized_mnist_test.amat",
                               "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
                )),
            parser="vae.data.binarized_mnist:prepare_static_mnist", likelihood="bernoulli", fixed_split=True,
            file_counts={"train": 50000, "valid": 10000, "test": 10000},
            description="Larochelle & Murray's fixed binary images, their own 50000 / 10000 / 10000 split",
            references=(
                Reference(IWAE, "Table 3 (App. D)", "VAE, 1 stochastic layer (k=1)", "static", IWAE_SETUP, 5000,
                          -88.71),
                Reference(IWAE, "Table 3 (App. D)", "IWAE, 1 stochastic layer (k=50)", "static", IWAE_SETUP, 5000,
                          -87.10),
                Reference(IWAE, "Table 3 (App. D)", "VAE, 2 stochastic layers (k=1)", "static", IWAE_SETUP_2L,
                          5000, -88.08),
                Reference(IWAE, "Table 3 (App. D)", "IWAE, 2 stochastic layers (k=50)", "static", IWAE_SETUP_2L,
                          5000, -85.32),
            )),
    })

FREY = Dataset(
    name="frey", title="Frey Face", image_shape=(28, 20),
    validation_size=200, test_size=200, fixed_test=False,
    split="200 validation and 200 test faces of the 1965, by a permutation seeded with data.split_seed",
    variants={
        "none": Variant(
            binarization="none",
            source=DatasetSource(
                name="frey",
                # Roweis's Frey Face: a MATLAB v5 file, variable ff, uint8 (560, 1965) (see vae.data.frey).
                base_urls=("https://cs.nyu.edu/~roweis/data/",),
                files=(RemoteFile("frey_rawface.mat",
                                  "265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64"),)),
            parser="vae.data.frey:prepare_frey", likelihood="gaussian",
            description="grey values in [0, 255/256], modelled as they are by a Gaussian decoder"),
    })

DATASETS: dict[str, Dataset] = {entry.name: entry for entry in (MNIST, FREY)}
NAMES: tuple[str, ...] = tuple(DATASETS)
BINARIZATIONS: tuple[str, ...] = tuple(dict.fromkeys(b for entry in DATASETS.values() for b in entry.binarizations))


def get(name: str) -> Dataset:
    """The registry entry of ``data.dataset`` = ``name``.

    Raises:
        ConfigError: no such dataset (lists the registered ones).
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"data.dataset = {name!r}: unknown dataset; expected one of {', '.join(NAMES)}") from None


def variant(name: str, binarization: str) -> Variant:
    """The variant of dataset ``name`` with ``binarization``.

    Raises:
        ConfigError: an unknown dataset, or a binarization it does not have; the message names
            both values and lists the allowed pairs (``mnist + dynamic, mnist + static, frey + none``).
    """
    entry = DATASETS.get(name)
    found = entry.variants.get(binarization) if entry else None
    if found is None:
        allowed = ", ".join(f"{d.name} + {b}" for d in DATASETS.values() for b in d.binarizations)
        raise ConfigError(f"data.dataset = {name!r} with data.binarization = {binarization!r}: "
                          f"no such data; expected one of {allowed}")
    return found


def sources() -> dict[str, DatasetSource]:
    """Every source of raw files, by its name (the mirror's folder name)."""
    return {v.source.name: v.source for entry in DATASETS.values() for v in entry.variants.values()}


def comparable(name: str, binarization: str) -> list[Reference]:
    """The published numbers a run on ``name`` with ``binarization`` may be set beside (none for an
    unknown pair)."""
    entry = DATASETS.get(name)
    found = entry.variants.get(binarization) if entry else None
    return list(found.references) if found else []


def estimator_references(name: str) -> list[EstimatorReference]:
    """Published estimates of log p(x) by several estimators for a model of dataset ``name``
    (none for a dataset without any, or an unknown name)."""
    entry = DATASETS.get(name)
    return list(entry.estimator_references) if entry else []


def panel_title(name: str, binarization: str) -> str:
    """A figure panel's title for a run on ``name`` with ``binarization``: the registry's title
    (``MNIST, dynamic binarization``; ``Frey Face`` for grey data), or the name itself for a dataset
    the registry does not know (a run of a tracking store shared with other code)."""
    title = DATASETS[name].title if name in DATASETS else name
    return title if binarization == "none" else f"{title}, {binarization} binarization"
