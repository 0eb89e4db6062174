"""The ``binarize`` stage for MNIST with binarization ``dynamic``: parse the IDX files, split,
binarize (binarization ``static`` lives in :mod:`vae.data.binarized_mnist`).

Split: train / validation from the 60000 training images by a permutation seeded with
``split_seed`` (``validation_size`` null means the standard 10000, leaving 50000 for training),
and the 10000 test images. Binarization ``dynamic`` (IWAE, Burda et al. 2016, Sec. 5.1;
Salakhutdinov & Murray 2008): training images stay grey and are resampled
x ~ Bernoulli(intensity) each time they are used; validation and test images are sampled once
with a fixed seed and saved binary.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from vae.config import DataConfig
from vae.data.splits import Split, save_splits, take_subsets
from vae.errors import DataError

IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IMAGE_SIDE = 28
VALIDATION_SIZE = 10000  # the standard validation set, used when data.validation_size is null
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}


def _read_idx(path: Path, magic: int, dims: tuple[int, ...]) -> np.ndarray:
    """Validate an IDX file's magic number, dimensions and length, then read its uint8 payload
    (shape ``dims``; an empty one too, which torchvision's reader rejects)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (run `vae download` first)")
    size = path.stat().st_size
    header_bytes = 4 + 4 * len(dims)
    with open(path, "rb") as handle:
        header = handle.read(header_bytes)
    if len(header) < header_bytes:
        raise DataError(f"{path}: too short for an IDX header ({size} bytes)")
    found_magic, *found_dims = struct.unpack(f">{len(dims) + 1}I", header)
    if found_magic != magic:
        raise DataError(f"{path}: IDX magic number 0x{found_magic:08x}, expected 0x{magic:08x}")
    if tuple(found_dims) != dims:
        raise DataError(f"{path}: IDX dimensions {tuple(found_dims)}, expected {dims}")
    expected_size = header_bytes + int(torch.tensor(dims).prod())
    if size != expected_size:
        raise DataError(f"{path}: {size} bytes, expected {expected_size} for dimensions {dims}")
    return np.fromfile(path, dtype=np.uint8, offset=header_bytes).reshape(dims)


def read_idx_images(path: Path, count: int) -> torch.Tensor:
    """Read an MNIST image file. Returns uint8 (count, 784).

    Raises:
        DataError: missing file, wrong magic number, dimensions or length.
    """
    images = _read_idx(path, IMAGE_MAGIC, (count, IMAGE_SIDE, IMAGE_SIDE))
    return torch.from_numpy(images.reshape(count, IMAGE_SIDE * IMAGE_SIDE))


def read_idx_labels(path: Path, count: int) -> torch.Tensor:
    """Read an MNIST label file. Returns int64 (count,) with values 0..9.

    Raises:
        DataError: missing file, wrong magic number, length, or a label outside 0..9.
    """
    labels = _read_idx(path, LABEL_MAGIC, (count,))
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{path}: label {int(labels.max())} found, expected digits 0..9")
    return torch.from_numpy(labels.astype(np.int64))


def prepare_mnist(raw_dir: Path, out_dir: Path, config: DataConfig) -> dict[str, int]:
    """Parse, split and binarize MNIST from ``raw_dir`` into ``out_dir/{train,valid,test}.pt``.

    Returns:
        The number of examples in each split.

    Raises:
        DataError: a raw file is missing or malformed.
        ConfigError: ``validation_size`` leaves no training examples, or ``test_size`` is set
            (MNIST's test set is fixed).
    """
    from vae.errors import ConfigError

    if config.test_size is not None:
        raise ConfigError(f"data.test_size = {config.test_size!r}: MNIST has a fixed test set of "
                          "10000 images; expected null (use eval_subset to evaluate fewer)")
    validation_size = VALIDATION_SIZE if config.validation_size is None else config.validation_size
    train_images = read_idx_images(raw_dir / FILES["train"][0], FILES["train"][2])
    train_labels = read_idx_labels(raw_dir / FILES["train"][1], FILES["train"][2])
    test_images = read_idx_images(raw_dir / FILES["test"][0], FILES["test"][2])
    test_labels = read_idx_labels(raw_dir / FILES["test"][1], FILES["test"][2])
    if validation_size >= len(train_images):
        raise ConfigError(f"data.validation_size = {validation_size}: expected fewer than "
                          f"the {len(train_images)} training images")

    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(config.split_seed))
    valid_index, train_index = order[:validation_size], order[validation_size:]
    indices = take_subsets({"train": train_index, "valid": valid_index, "test": torch.arange(len(test_images))},
                           config.train_subset, config.eval_subset)
    train_index, valid_index, test_index = indices["train"], indices["valid"], indices["test"]

    generator = torch.Generator().manual_seed(config.binarization_seed)

    def binarize_once(images: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(images.float() / 255.0, generator=generator).to(torch.uint8)

    splits = {
        "train": Split(train_images[train_index].clone(), train_labels[train_index].clone(),
                       binary=False, binarization=config.binarization),
        "valid": Split(binarize_once(train_images[valid_index]), train_labels[valid_index].clone(),
                       binary=True, binarization=config.binarization),
        "test": Split(binarize_once(test_images[test_index]), test_labels[test_index].clone(),
                      binary=True, binarization=config.binarization),
    }
    return save_splits(splits, out_dir)
