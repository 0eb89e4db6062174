"""Where each dataset's files come from and the checksums that verify them.

Checksums are of the **uncompressed** content: mirrors recompress ``.gz`` files (the shared
mirror's ``train-images-idx3-ubyte.gz`` is one), so the compressed bytes are not a stable identity.
Upstream URLs are the defaults; ``VAE_DATA_MIRROR`` (a folder or URL laid out as
``<mirror>/<source name>/<upstream file name>``) replaces them.

A *source* is one set of upstream files; a dataset can have several, one per binarization
(:func:`source_for`): ``mnist`` + ``dynamic`` reads the grey IDX files (source ``mnist``),
``mnist`` + ``static`` the fixed binarization of Larochelle & Murray (2011) (source
``binarized_mnist``), ``frey`` + ``none`` Roweis's Frey Face file (source ``frey``). The mirror
folder is named after the source; the files are stored under ``paths.raw/<dataset>`` whatever
their source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vae.errors import ConfigError

MIRROR_ENV = "VAE_DATA_MIRROR"


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


MNIST = DatasetSource(
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
    ),
)

BINARIZED_MNIST = DatasetSource(
    name="binarized_mnist",
    # Larochelle & Murray (2011): MNIST binarized once, split 50000 / 10000 / 10000; plain text,
    # one image per line (see vae.data.binarized_mnist).
    base_urls=("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",),
    files=(
        RemoteFile("binarized_mnist_train.amat",
                   "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
        RemoteFile("binarized_mnist_valid.amat",
                   "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
        RemoteFile("binarized_mnist_test.amat",
                   "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
    ),
)

FREY = DatasetSource(
    name="frey",
    # Roweis's Frey Face: a MATLAB v5 file, variable ff, uint8 (560, 1965) (see vae.data.frey).
    base_urls=("https://cs.nyu.edu/~roweis/data/",),
    files=(
        RemoteFile("frey_rawface.mat",
                   "265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64"),
    ),
)

SOURCES: dict[str, DatasetSource] = {source.name: source for source in (MNIST, BINARIZED_MNIST, FREY)}

# (data.dataset, data.binarization) -> the source of its raw files.
DATASET_SOURCES: dict[tuple[str, str], DatasetSource] = {
    ("mnist", "dynamic"): MNIST,
    ("mnist", "static"): BINARIZED_MNIST,
    ("frey", "none"): FREY,
}


def source_for(dataset: str, binarization: str) -> DatasetSource:
    """The source of the raw files for ``data.dataset`` and ``data.binarization``.

    ``("mnist", "dynamic")`` -> :data:`MNIST`, ``("mnist", "static")`` -> :data:`BINARIZED_MNIST`,
    ``("frey", "none")`` -> :data:`FREY`.

    Raises:
        ConfigError: any other pair; the message names it and lists the allowed pairs.
    """
    source = DATASET_SOURCES.get((dataset, binarization))
    if source is None:
        allowed = ", ".join(f"{d} + {b}" for d, b in DATASET_SOURCES)
        raise ConfigError(f"data.dataset = {dataset!r} with data.binarization = {binarization!r}: "
                          f"no such data; expected one of {allowed}")
    return source


def mirror_base_url(mirror: str, dataset: str) -> str:
    """The base URL of source ``dataset`` (a source name) inside a mirror given as a folder path or a URL.

    ``"../shared/datasets"`` -> ``"file:///abs/shared/datasets/mnist/"``;
    ``"https://host/data"`` -> ``"https://host/data/mnist/"``.
    """
    if urlparse(mirror).scheme in ("http", "https", "file"):
        return mirror.rstrip("/") + f"/{dataset}/"
    return Path(mirror).expanduser().resolve().joinpath(dataset).as_uri() + "/"


def base_urls(source: DatasetSource, mirror: str | None = None) -> list[str]:
    """The base URLs to try for ``source``: the mirror's alone when one is set, else upstream's.

    ``mirror`` defaults to the ``VAE_DATA_MIRROR`` environment variable.
    """
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return [mirror_base_url(mirror, source.name)]
    return list(source.base_urls)
