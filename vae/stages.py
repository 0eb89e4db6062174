"""The data stages' entry points (``download``, ``binarize``); the others live in their modules."""

from __future__ import annotations

from vae.config import Params
from vae.data.sources import source_for


def download(params: Params, progress: bool = True) -> dict[str, str]:
    """Fetch the files of ``data.dataset`` with ``data.binarization`` (:func:`vae.data.sources.source_for`)
    into ``paths.raw/<dataset>``; see :mod:`vae.data.download`.

    Raises:
        ConfigError: no source for the dataset and binarization.
        DownloadError: a file could not be fetched and verified.
    """
    from vae.data.download import download_dataset

    data = params.data
    return download_dataset(source_for(data.dataset, data.binarization), params.paths.raw_dir(data.dataset),
                            progress=progress)


def binarize(params: Params, progress: bool = True) -> dict[str, int]:
    """Parse, split and binarize ``paths.raw/<dataset>`` into ``paths.processed/<dataset>``.

    MNIST + ``dynamic``: :func:`vae.data.mnist.prepare_mnist`; MNIST + ``static``:
    :func:`vae.data.binarized_mnist.prepare_static_mnist`; Frey Face + ``none``:
    :func:`vae.data.frey.prepare_frey`.

    Raises:
        ConfigError: an unknown dataset and binarization, or split sizes the data cannot meet.
        DataError: a raw file is missing or malformed.
    """
    data = params.data
    source = source_for(data.dataset, data.binarization)  # rejects a pair no source has
    # Imported on use: the MNIST IDX reader pulls in torchvision, which the others do not need.
    if source.name == "mnist":
        from vae.data.mnist import prepare_mnist as prepare
    elif source.name == "binarized_mnist":
        from vae.data.binarized_mnist import prepare_static_mnist as prepare
    else:
        from vae.data.frey import prepare_frey as prepare
    sizes = prepare(params.paths.raw_dir(data.dataset), params.paths.processed_dir(data.dataset), data)
    print(", ".join(f"{name}: {count} examples" for name, count in sizes.items())
          + f" ({data.binarization} binarization)", flush=True)
    return sizes
