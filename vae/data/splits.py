"""The on-disk format of a processed split (``data/processed/<dataset>/{train,valid,test}.pt``).

A split is a dict of tensors saved with ``torch.save`` and read back with ``weights_only=True``
(no code is ever unpickled):

- ``images``: uint8, shape (N, D), D = 784 (MNIST, 28 x 28) or 560 (Frey Face, 28 rows x 20
  columns), each image row-major. Either binary values {0, 1}, fixed (``binary`` true), or grey
  intensities 0..255 (``binary`` false).
- ``labels``: int64, shape (N,): the digit classes 0..9 where the data has them (used only for
  figures); -1 means unlabelled (the static binarization's files and Frey Face carry no labels).
- ``binary``: whether ``images`` is already binary.
- ``binarization``: the scheme's name, recorded with every result: ``dynamic`` (MNIST; the grey
  training split is resampled as Bernoulli(intensity / 255) each time it is used, validation and
  test were sampled once and saved binary), ``static`` (MNIST, Larochelle & Murray's fixed binary
  images, every split binary) or ``none`` (Frey Face: grey values, modelled as they are).

:meth:`Split.values` turns a split into the float tensor a model sees.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vae import datasets
from vae.errors import DataError, shown
from vae.io import atomic_open

SPLITS = datasets.SPLITS  # ("train", "valid", "test")
BINARIZATIONS = datasets.BINARIZATIONS  # every dataset's, in registry order: dynamic, static, none
UNLABELLED = -1
# Grey values of a ``none`` split are divided by 256, not 255, as in the AEVB authors' code
# (Kingma & Welling's Frey Face experiment): values lie in [0, 255/256], never exactly 1.
FREY_SCALE = 256.0


@dataclass(frozen=True)
class Split:
    """One processed split; see the module docstring for the meaning of each field."""

    images: torch.Tensor
    labels: torch.Tensor
    binary: bool
    binarization: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def values(self, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The images as the (N, D) float tensor (``dtype``, on ``device``) a model sees.

        - A binary split: its values {0, 1} as they are.
        - A grey split with binarization ``dynamic``: sampled once as Bernoulli(intensity / 255)
          with ``generator`` (which must live on ``device``), e.g. for a fixed evaluation copy;
          {0, 1}.
        - A grey split with binarization ``none`` (Frey Face): intensity / :data:`FREY_SCALE`
          (256, as in the AEVB authors' code), in [0, 255/256].

        Raises:
            DataError: a grey split with any other binarization (``static`` splits are binary).
        """
        images = self.images.to(device)
        if self.binary:
            return images.to(dtype)
        if self.binarization == "dynamic":
            return torch.bernoulli(images.to(dtype) / 255.0, generator=generator)
        if self.binarization == "none":
            return images.to(dtype) / FREY_SCALE
        raise DataError(f"a grey split with binarization {self.binarization!r}: expected dynamic or "
                        "none (a static split is binary)")

    def save(self, path: Path) -> None:
        """Write the split atomically; the same split always gives the same bytes."""
        # Saving to a handle (not a temporary *name*) keeps the archive's internal name fixed.
        with atomic_open(path) as handle:
            torch.save({"images": self.images, "labels": self.labels, "binary": self.binary,
                        "binarization": self.binarization}, handle)


def load_split(path: str | Path) -> Split:
    """Read a split written by :meth:`Split.save`.

    Raises:
        DataError: the file is missing or is not a processed split of this project (unreadable,
            missing keys, images not uint8 (N, D), labels not (N,), ``binary`` not a bool,
            ``binarization`` not one of :data:`BINARIZATIONS`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: processed split not found (run `vae binarize` first)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise DataError(f"{path}: not a readable processed split ({error})") from None
    expected = {"images", "labels", "binary", "binarization"}
    if not isinstance(raw, dict) or not expected <= set(raw):
        raise DataError(f"{path}: not a processed split (expected keys {sorted(expected)})")
    images, labels = raw["images"], raw["labels"]
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DataError(f"{path}: not a processed split (images and labels must be tensors)")
    if images.dtype != torch.uint8 or images.ndim != 2 or labels.shape != images.shape[:1]:
        raise DataError(f"{path}: expected uint8 images of shape (N, D) and N labels, "
                        f"got images {tuple(images.shape)} {images.dtype}, labels {tuple(labels.shape)}")
    binary, binarization = raw["binary"], raw["binarization"]
    if not isinstance(binarization, str) or binarization not in BINARIZATIONS:
        raise DataError(f"{path}: binarization {shown(binarization)}, expected one of {', '.join(BINARIZATIONS)}")
    if not isinstance(binary, bool):  # bool() of a tensor of several values raises; of "no" is True
        raise DataError(f"{path}: binary {shown(binary)}, expected true or false")
    return Split(images=images, labels=labels, binary=binary, binarization=binarization)


def load_splits(folder: str | Path) -> dict[str, Split]:
    """Read ``train``, ``valid`` and ``test`` from a processed dataset folder."""
    return {name: load_split(Path(folder) / f"{name}.pt") for name in SPLITS}


def take_subsets(parts: dict[str, Any], train_subset: int | None, eval_subset: int | None) -> dict[str, Any]:
    """Cap ``parts`` (``train``, ``valid``, ``test``: tensors or index tensors, first dimension the
    examples): the first ``train_subset`` training and ``eval_subset`` validation and test ones
    (None keeps all). For quick trials and tests (``data.train_subset`` / ``data.eval_subset``)."""
    limits = {"train": train_subset, "valid": eval_subset, "test": eval_subset}
    return {name: part if limits[name] is None else part[: limits[name]] for name, part in parts.items()}


def save_splits(splits: dict[str, Split], out_dir: str | Path) -> dict[str, int]:
    """Write each split to ``out_dir/<name>.pt`` (atomically); returns the number of examples in each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        split.save(out_dir / f"{name}.pt")
    return {name: len(split) for name, split in splits.items()}
