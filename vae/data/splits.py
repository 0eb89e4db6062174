"""The on-disk format of a processed split (``data/processed/<dataset>/{train,valid,test}.pt``).

A split is a dict of tensors saved with ``torch.save`` and read back with ``weights_only=True``
(no code is ever unpickled):

- ``images``: uint8, shape (N, 784). For a dynamically binarized training split, grey
  intensities 0..255 that are resampled as Bernoulli(intensity / 255) each time they are used;
  otherwise binary values {0, 1}, fixed.
- ``labels``: int64, shape (N,), the digit classes (used only for figures).
- ``binary``: whether ``images`` is already binary.
- ``binarization``: the scheme's name (``dynamic``), recorded with every result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vae.errors import DataError
from vae.io import atomic_open

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Split:
    """One processed split; see the module docstring for the meaning of each field."""

    images: torch.Tensor
    labels: torch.Tensor
    binary: bool
    binarization: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def binarized(self, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The images as a (N, 784) float tensor of {0, 1} on ``device``.

        A binary split is returned as is; a grey one is sampled once as Bernoulli(intensity)
        with ``generator`` (which must live on ``device``), e.g. for a fixed evaluation copy.
        """
        images = self.images.to(device)
        if self.binary:
            return images.to(dtype)
        return torch.bernoulli(images.to(dtype) / 255.0, generator=generator)

    def save(self, path: Path) -> None:
        """Write the split atomically; the same split always gives the same bytes."""
        # Saving to a handle (not a temporary *name*) keeps the archive's internal name fixed.
        with atomic_open(path) as handle:
            torch.save({"images": self.images, "labels": self.labels, "binary": self.binary,
                        "binarization": self.binarization}, handle)


def load_split(path: str | Path) -> Split:
    """Read a split written by :meth:`Split.save`.

    Raises:
        DataError: the file is missing or is not a processed split of this project.
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
    return Split(images=images, labels=labels, binary=bool(raw["binary"]),
                 binarization=str(raw["binarization"]))


def load_splits(folder: str | Path) -> dict[str, Split]:
    """Read ``train``, ``valid`` and ``test`` from a processed dataset folder."""
    return {name: load_split(Path(folder) / f"{name}.pt") for name in SPLITS}
