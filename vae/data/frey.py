"""The ``binarize`` stage for Frey Face (binarization ``none``): parse Roweis's MATLAB file and split.

Source ``frey`` (``vae.datasets.variant("frey", "none").source``): ``frey_rawface.mat``, a
MATLAB v5 file whose variable ``ff`` is uint8 of shape (560, 1965): 1965 grey faces of 28 rows x
20 columns, one per column, each column the image in row-major order (so ``ff.T`` is (1965, 560),
row i the i-th face).

Split (there is no standard one; AEVB does not publish its own): a permutation of the faces
seeded with ``split_seed``; its first ``test_size`` faces (null: 200) are the test split, the next
``validation_size`` (null: 200) the validation split, the rest (1565 by default) the training
split. The faces stay grey (``binary`` false, binarization ``none``); a model sees them as
intensity / 256 (:meth:`vae.data.splits.Split.values`). There are no labels: all are -1.

The face shape (28 x 20) and the standard split sizes (200 / 200) are the dataset registry's
(``vae.datasets.get("frey")``); the MATLAB file's facts (its name, the variable ``ff``, the
column layout) are this module's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vae import datasets
from vae.data.splits import UNLABELLED, Split, save_splits, take_subsets
from vae.errors import ConfigError, DataError

if TYPE_CHECKING:  # an annotation only: the configuration sits above the parsers
    from vae.config import DataConfig

DATASET = datasets.get("frey")
FILE = "frey_rawface.mat"
VARIABLE = "ff"
HEIGHT, WIDTH = DATASET.image_shape  # 28 rows x 20 columns
PIXELS = DATASET.input_dim  # 560
# MATLAB classes that scipy reads into an array sized by the data the file holds (cells, structs
# and objects are allocated from the dimensions their header claims, before any element is read).
NUMERIC_CLASSES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "single",
                   "double", "logical")


def read_frey(path: Path) -> torch.Tensor:
    """Read the Frey Face MATLAB file (variable ``ff``, uint8, shape (560, N)).

    The variables' headers are listed first (``scipy.io.whosmat``) and only ``ff`` is read, and
    only when its header declares a numeric array: a damaged header claiming a cell or struct
    array of billions of elements would otherwise have scipy allocate them before it fails.

    Returns:
        uint8 tensor of shape (N, 560) (1965 for the real file): row i is face i, 28 rows x 20
        columns, row-major (``reshape(N, 28, 20)`` gives upright images).

    Raises:
        DataError, naming the file: it is missing (``run `vae download` first``), not a MATLAB
            file scipy can read (e.g. random bytes, truncated, MATLAB v7.3), has no variable ``ff``
            (the message lists the variables found), or ``ff`` is not uint8 of shape (560, N)
            (the message says what it is).
    """
    from scipy.io import loadmat, whosmat

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (run `vae download` first)")
    expected = f"expected uint8 of shape ({PIXELS}, N) (one {HEIGHT}x{WIDTH} face per column)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns of duplicated and unreadable variables
            declared = whosmat(path)
            headers = [(shape, kind) for name, shape, kind in declared if name == VARIABLE]
            if headers and headers[0][1] not in NUMERIC_CLASSES:
                shape, kind = headers[0]
                raise DataError(f"{path}: variable {VARIABLE!r} is a MATLAB {kind} array of shape "
                                f"{tuple(shape)}, {expected}")
            content = loadmat(path, variable_names=[VARIABLE]) if headers else {}
    except DataError:
        raise
    except Exception as error:  # scipy raises ValueError, TypeError, OSError, MatReadError, zlib.error,
        # NotImplementedError (v7.3), MemoryError, ... for a damaged or foreign file
        raise DataError(f"{path}: not a readable MATLAB file ({type(error).__name__}: {error})") from None
    if VARIABLE not in content:
        variables = sorted({name for name, _, _ in declared if not name.startswith("__")})
        raise DataError(f"{path}: no variable {VARIABLE!r}; found "
                        f"{', '.join(repr(name) for name in variables) or 'none'}")
    faces = content[VARIABLE]
    if not isinstance(faces, np.ndarray) or faces.dtype != np.uint8 or faces.ndim != 2 \
            or faces.shape[0] != PIXELS or faces.shape[1] == 0:
        found = (f"{faces.dtype} of shape {faces.shape}" if isinstance(faces, np.ndarray)
                 else type(faces).__name__)
        raise DataError(f"{path}: variable {VARIABLE!r} is {found}, {expected}")
    return torch.from_numpy(np.ascontiguousarray(faces.T))


def prepare_frey(raw_dir: Path, out_dir: Path, config: DataConfig) -> dict[str, int]:
    """Parse and split Frey Face from ``raw_dir`` into ``out_dir/{train,valid,test}.pt``.

    See the module docstring for the split. ``train_subset`` keeps the first training faces and
    ``eval_subset`` the first validation and test faces (in permutation order).

    Returns:
        The number of examples in each split (default: train 1565, valid 200, test 200).

    Raises:
        DataError: the file is missing or malformed (see :func:`read_frey`); nothing is written.
        ConfigError: ``validation_size + test_size`` leaves no training faces.
    """
    faces = read_frey(Path(raw_dir) / FILE)
    # null: the registry's standard sizes (200 and 200)
    test_size = DATASET.test_size if config.test_size is None else config.test_size
    validation_size = DATASET.validation_size if config.validation_size is None else config.validation_size
    if validation_size + test_size >= len(faces):
        raise ConfigError(f"data.validation_size = {validation_size} and data.test_size = {test_size} "
                          f"(null means {DATASET.validation_size} and {DATASET.test_size}): together expected fewer "
                          f"than the {len(faces)} faces, to leave some for training")

    order = torch.randperm(len(faces), generator=torch.Generator().manual_seed(config.split_seed))
    indices = {
        "train": order[test_size + validation_size:],
        "valid": order[test_size: test_size + validation_size],
        "test": order[:test_size],
    }
    indices = take_subsets(indices, config.train_subset, config.eval_subset)
    splits = {name: Split(faces[index], torch.full((len(index),), UNLABELLED, dtype=torch.int64),
                          binary=False, binarization="none")
              for name, index in indices.items()}
    return save_splits(splits, out_dir)
