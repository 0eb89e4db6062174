"""How a dataset's upstream files are described, verified and mirrored.

Checksums are of the **uncompressed** content: mirrors recompress ``.gz`` files (the shared
mirror's ``train-images-idx3-ubyte.gz`` is one), so the compressed bytes are not a stable identity.
Upstream URLs are the defaults; ``VAE_DATA_MIRROR`` (a folder or URL laid out as
``<mirror>/<source name>/<upstream file name>``) replaces them.

A *source* is one set of upstream files. The sources themselves are declared in the dataset
registry (:mod:`vae.datasets`), one per binarization of a dataset
(``datasets.variant(dataset, binarization).source``; all of them: ``datasets.sources()``):
``mnist`` + ``dynamic`` reads the grey IDX files (source ``mnist``), ``mnist`` + ``static`` the
fixed binarization of Larochelle & Murray (2011) (source ``binarized_mnist``), ``frey`` + ``none``
Roweis's Frey Face file (source ``frey``). The mirror folder is named after the source; the files
are stored under ``paths.raw/<dataset>`` whatever their source.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from vae.datasets import DatasetSource

MIRROR_ENV = "VAE_DATA_MIRROR"


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
