"""The data stages' entry points (``download``, ``binarize``); the others live in their modules.

Both ask the dataset registry (:mod:`vae.datasets`) for ``data.dataset`` with
``data.binarization``: ``download`` for its source of files, ``binarize`` for its parser.
"""

from __future__ import annotations

from vae import datasets
from vae.config import Params


def download(params: Params, progress: bool = True) -> dict[str, str]:
    """Fetch the files of ``data.dataset`` with ``data.binarization`` (the registry's
    ``datasets.variant(dataset, binarization).source``) into ``paths.raw/<dataset>``; see
    :mod:`vae.data.download`.

    Returns:
        ``{local file name: URL it came from or "cached"}``.

    Raises:
        ConfigError: the registry has no such dataset and binarization.
        DownloadError: a file could not be fetched and verified.
    """
    from vae.data.download import download_dataset

    data = params.data
    source = datasets.variant(data.dataset, data.binarization).source
    return download_dataset(source, params.paths.raw_dir(data.dataset), progress=progress)


def binarize(params: Params, progress: bool = True) -> dict[str, int]:
    """Parse, split and binarize ``paths.raw/<dataset>`` into ``paths.processed/<dataset>`` with the
    parser the registry names for ``data.dataset`` and ``data.binarization`` (MNIST + ``dynamic``:
    :func:`vae.data.mnist.prepare_mnist`; MNIST + ``static``:
    :func:`vae.data.binarized_mnist.prepare_static_mnist`; Frey Face + ``none``:
    :func:`vae.data.frey.prepare_frey`).

    Returns:
        The number of examples in each split.

    Raises:
        ConfigError: an unknown dataset and binarization, or split sizes the data cannot meet.
        DataError: a raw file is missing or malformed.
    """
    data = params.data
    variant = datasets.variant(data.dataset, data.binarization)  # rejects a pair the registry lacks
    prepare = variant.load_parser()  # imported on use, only the one this run needs
    sizes = prepare(params.paths.raw_dir(data.dataset), params.paths.processed_dir(data.dataset), data)
    print(", ".join(f"{name}: {count} examples" for name, count in sizes.items())
          + f" ({data.binarization} binarization)", flush=True)
    return sizes
