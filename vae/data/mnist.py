"""The ``binarize`` stage for MNIST with binarization ``dynamic``: parse the IDX files, split,
binarize (binarization ``static`` lives in :mod:`vae.data.binarized_mnist`).

Split: train / validation from the 60000 training images by a permutation seeded with
``split_seed`` (``validation_size`` null means the standard 10000, leaving 50000 for training),
or with ``split_order: file`` the last ``validation_size`` images in file order (the IWAE
authors' ``datasets.binarized_mnist(n_validation=400)``: 59600 train, 400 validation); and the
10000 test images. Binarization ``dynamic`` (IWAE, Burda et al. 2016, Sec. 5.1;
Salakhutdinov & Murray 2008): training images stay grey and are resampled
x ~ Bernoulli(intensity) each time they are used; validation and test images are sampled once
with a fixed seed and saved binary.

The image shape (28 x 28), the files' image counts and the standard validation size are the
dataset registry's (``vae.datasets.get("mnist")``); the IDX format's facts (magic numbers,
header layout) are this module's.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vae import datasets
from vae.data.splits import Split, save_splits, take_subsets
from vae.errors import ConfigError, DataError

if TYPE_CHECKING:  # an annotation only: the configuration sits above the parsers
    from vae.config import DataConfig

DATASET = datasets.get("mnist")
VARIANT = DATASET.variant("dynamic")
IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IMAGE_SHAPE = DATASET.image_shape  # (rows, columns)
IMAGE_SIDE = IMAGE_SHAPE[0]  # MNIST's images are square
# split -> (image file, label file, images in each); the counts are the registry's.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", VARIANT.file_counts["train"]),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", VARIANT.file_counts["test"]),
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
    """Read an MNIST image file of ``count`` images of :data:`IMAGE_SHAPE` (28 x 28). Returns uint8
    (count, 784), each image row-major.

    Raises:
        DataError: missing file, wrong magic number, dimensions or length.
    """
    images = _read_idx(path, IMAGE_MAGIC, (count, *IMAGE_SHAPE))
    return torch.from_numpy(images.reshape(count, DATASET.input_dim))


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
    if config.test_size is not None:
        raise ConfigError(f"data.test_size = {config.test_size!r}: MNIST has a fixed test set of "
                          f"{DATASET.test_size} images; expected null (use eval_subset to evaluate fewer)")
    # null: the registry's standard validation set (10000 of the 60000 training images)
    validation_size = DATASET.validation_size if config.validation_size is None else config.validation_size
    train_images = read_idx_images(raw_dir / FILES["train"][0], FILES["train"][2])
    train_labels = read_idx_labels(raw_dir / FILES["train"][1], FILES["train"][2])
    test_images = read_idx_images(raw_dir / FILES["test"][0], FILES["test"][2])
    test_labels = read_idx_labels(raw_dir / FILES["test"][1], FILES["test"][2])
    if validation_size >= len(train_images):
        raise ConfigError(f"data.validation_size = {validation_size}: expected fewer than "
                          f"the {len(train_images)} training images")

    if config.split_order == "file":  # the IWAE authors' split: the last validation_size images validate
        order = torch.arange(len(train_images))
        train_index, valid_index = order[:-validation_size], order[-validation_size:]
    else:
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
