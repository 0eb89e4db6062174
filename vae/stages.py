"""The data stages' entry points (``download``, ``binarize``); the others live in their modules."""

from __future__ import annotations

from vae.config import Params
from vae.data.sources import SOURCES


def download(params: Params, progress: bool = True) -> dict[str, str]:
    """Fetch ``data.dataset``'s files into ``paths.raw/<dataset>``; see :mod:`vae.data.download`."""
    from vae.data.download import download_dataset

    dataset = params.data.dataset
    return download_dataset(SOURCES[dataset], params.paths.raw_dir(dataset), progress=progress)


def binarize(params: Params, progress: bool = True) -> dict[str, int]:
    """Parse, split and binarize into ``paths.processed/<dataset>``; see :mod:`vae.data.mnist`."""
    from vae.data.mnist import prepare_mnist

    dataset = params.data.dataset
    sizes = prepare_mnist(params.paths.raw_dir(dataset), params.paths.processed_dir(dataset), params.data)
    print(", ".join(f"{name}: {count} examples" for name, count in sizes.items())
          + f" ({params.data.binarization} binarization)", flush=True)
    return sizes
