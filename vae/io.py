"""Atomic file writes: an interrupted stage never leaves a half-written file that looks whole.

Every output goes to a temporary file in the destination's folder and is renamed over the final
path only once it is complete (``os.replace`` is atomic on POSIX within one file system).

A process killed with SIGKILL cannot delete its temporary file. Its name holds the writer's
process id (``.<name>.<pid>.<random>.tmp``), and the next write of the same file deletes the
temporaries whose writer is gone, so interrupted runs do not leave them piling up.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries of ``path`` (``.<name>.<pid>.<random>.tmp`` beside it) whose writing
    process no longer runs, e.g. one killed with SIGKILL mid-write. Returns the paths deleted."""
    final = Path(path)
    removed = []
    for candidate in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        match = TEMPORARY.fullmatch(candidate.name)
        if match and match["name"] == final.name and not _alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    Use it for writers that want a file name (``torch.save``, ``Figure.savefig``). Temporaries
    of ``path`` left by killed writers are deleted first (:func:`remove_stale_temporaries`).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of the file's bytes, 64 hex digits (read in 1 MiB blocks).

    Raises:
        FileNotFoundError: the file does not exist.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, raising :class:`FileNotFoundError` naming the path if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (run the stage that writes it first)")
    return json.loads(path.read_text(encoding="utf-8"))
