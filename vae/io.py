"""Atomic file writes: an interrupted stage never leaves a half-written file that looks whole.

Every output goes to a temporary file in the destination's folder and is renamed over the final
path only once it is complete (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    Use it for writers that want a file name (``torch.save``, ``Figure.savefig``).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the final file the usual mode
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears at ``path`` only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 text to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON (keys in insertion order) to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: str | os.PathLike[str], frame: Any) -> None:
    """Write a pandas DataFrame as CSV (no index, 6 significant digits) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, raising :class:`FileNotFoundError` naming the path if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (run the stage that writes it first)")
    return json.loads(path.read_text(encoding="utf-8"))
