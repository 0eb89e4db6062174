"""Where each dataset's files come from and the checksums that verify them.

Checksums are of the **uncompressed** content: mirrors recompress ``.gz`` files (the shared
mirror's ``train-images-idx3-ubyte.gz`` is one), so the compressed bytes are not a stable identity.
Upstream URLs are the defaults; ``VAE_DATA_MIRROR`` (a folder or URL laid out as
``<mirror>/<dataset>/<upstream file name>``) replaces them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

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

SOURCES: dict[str, DatasetSource] = {MNIST.name: MNIST}


def mirror_base_url(mirror: str, dataset: str) -> str:
    """The base URL of ``dataset`` inside a mirror given as a folder path or a URL.

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
