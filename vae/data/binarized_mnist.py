"""The ``binarize`` stage for MNIST with binarization ``static``: the fixed binary MNIST of
Larochelle & Murray (2011), source ``binarized_mnist``
(``vae.datasets.variant("mnist", "static").source``).

Three plain-text ``.amat`` files hold their own split, 50000 / 10000 / 10000 train / validation /
test images (the validation images are the last 10000 of MNIST's training set), each image
binarized once by its authors. Format: one image per line, its 784 pixels (28 x 28, row-major)
as the characters ``0`` or ``1`` separated by single spaces, each line ended by ``\\n``; so a
line is 1568 bytes and a file of ``count`` images is ``count * 1568`` bytes. A file whose last
line lacks its ``\\n`` (``count * 1568 - 1`` bytes) is accepted: the content is unambiguous and
text tools often drop a final line end. Anything else (``\\r\\n`` line ends, tabs, doubled
spaces, other values) is rejected with the first offending line.

The files carry no labels: every split's labels are -1 (unlabelled).

The image size (784 pixels) and the files' image counts are the dataset registry's; the
``.amat`` line layout is this module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vae import datasets
from vae.data.splits import UNLABELLED, Split, save_splits, take_subsets
from vae.errors import ConfigError, DataError

if TYPE_CHECKING:  # an annotation only: the configuration sits above the parsers
    from vae.config import DataConfig

DATASET = datasets.get("mnist")
VARIANT = DATASET.variant("static")
PIXELS = DATASET.input_dim  # 784
LINE_BYTES = 2 * PIXELS  # 784 characters and 783 spaces, then "\n"
# split -> (file, images in it); the counts are the registry's (50000 / 10000 / 10000).
FILES = {
    "train": ("binarized_mnist_train.amat", VARIANT.file_counts["train"]),
    "valid": ("binarized_mnist_valid.amat", VARIANT.file_counts["valid"]),
    "test": ("binarized_mnist_test.amat", VARIANT.file_counts["test"]),
}

_ZERO, _ONE, _SPACE, _NEWLINE = ord("0"), ord("1"), ord(" "), ord("\n")
_SEPARATORS = np.full(PIXELS, _SPACE, dtype=np.uint8)
_SEPARATORS[-1] = _NEWLINE


def read_amat(path: Path, count: int) -> torch.Tensor:
    """Read a binarized-MNIST ``.amat`` file of ``count`` images (format: module docstring).

    Returns:
        uint8 tensor of shape (count, 784) with values {0, 1}, row i being line i + 1.

    Raises:
        DataError: the file is missing (``run `vae download` first``), or is not exactly
            ``count`` well-formed lines; the message names the file and, for a malformed line,
            its 1-based number and what is wrong with it (its number of values, the first value
            that is not 0 or 1 and its 1-based position, an empty value, a ``\\r`` line end),
            else the number of lines found.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (run `vae download` first)")
    data = np.fromfile(path, dtype=np.uint8)
    if count > 0 and data.size == count * LINE_BYTES - 1 and data[-1] != _NEWLINE:
        data = np.append(data, np.uint8(_NEWLINE))  # tolerate a missing final line end
    if data.size == count * LINE_BYTES:
        rows = data.reshape(count, PIXELS, 2)  # (digit, separator) pairs
        digits, separators = rows[:, :, 0], rows[:, :, 1]
        if (separators == _SEPARATORS).all() and ((digits == _ZERO) | (digits == _ONE)).all():
            return torch.from_numpy(np.ascontiguousarray(digits - np.uint8(_ZERO)))
    raise DataError(f"{path}: {_first_problem(path, count)}")


def _first_problem(path: Path, count: int) -> str:
    """What is wrong with a file the fast path rejected: its first bad line, else its line count."""
    content = path.read_bytes()
    lines = content.split(b"\n")
    terminated = content.endswith(b"\n")
    if terminated or not content:
        lines.pop()  # the empty string after the final "\n" (or of an empty file)
    for number, line in enumerate(lines, start=1):
        if _line_ok(line):
            continue
        message = f"line {number}: {_line_problem(line)}"
        if number == len(lines) and not terminated:
            message += " (the last line, with no line end: is the file truncated?)"
        return message
    if len(lines) != count:
        return f"{len(lines)} lines, expected {count}"
    return "not a binarized-MNIST .amat file"  # unreachable: the fast path accepts such a file


def _line_ok(line: bytes) -> bool:
    return (len(line) == LINE_BYTES - 1 and line[1::2] == b" " * (PIXELS - 1)
            and not line[0::2].translate(None, b"01"))


def _line_problem(line: bytes) -> str:
    """A description of what is wrong with one line (without its ``\\n``) that is not well formed."""
    if line.endswith(b"\r"):
        return "ends with '\\r\\n' (a Windows line end), expected '\\n'"
    if not line:
        return f"empty, expected {PIXELS} values"
    values = line.split(b" ")
    if b"" in values:
        position = values.index(b"") + 1
        return (f"empty value at position {position} (a leading, trailing or doubled space), "
                "expected values separated by single spaces")
    if len(values) != PIXELS:
        return f"{len(values)} values, expected {PIXELS}"
    for position, value in enumerate(values, start=1):
        if value not in (b"0", b"1"):
            return f"value {value.decode('ascii', 'backslashreplace')!r} at position {position}, expected 0 or 1"
    return "not well formed"  # unreachable: a line of 784 values 0 or 1 is well formed


def prepare_static_mnist(raw_dir: Path, out_dir: Path, config: DataConfig) -> dict[str, int]:
    """Parse the three ``.amat`` files in ``raw_dir`` into ``out_dir/{train,valid,test}.pt``.

    The split is the files' own (50000 / 10000 / 10000, in file order); ``train_subset`` keeps
    the first training images and ``eval_subset`` the first validation and test images. Every
    split is saved binary (``binary`` true, binarization ``static``) with labels -1.

    Returns:
        The number of examples in each split.

    Raises:
        DataError: a file is missing or malformed (see :func:`read_amat`); nothing is written.
        ConfigError: ``validation_size`` or ``test_size`` is set (the files fix the split).
    """
    for name in ("validation_size", "test_size"):
        if getattr(config, name) is not None:
            fixed = " / ".join(str(count) for count in VARIANT.file_counts.values())
            raise ConfigError(f"data.{name} = {getattr(config, name)!r}: the static binarization's "
                              f"files fix the split ({fixed}); expected null")
    images = {name: read_amat(Path(raw_dir) / file, count) for name, (file, count) in FILES.items()}
    images = take_subsets(images, config.train_subset, config.eval_subset)
    splits = {name: Split(split.clone(), torch.full((len(split),), UNLABELLED, dtype=torch.int64),
                          binary=True, binarization="static")
              for name, split in images.items()}
    return save_splits(splits, out_dir)
