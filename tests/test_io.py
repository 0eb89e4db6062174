"""Atomic writes (vae/io.py): a failed or killed writer never leaves a half-written file at the
final path, and the temporaries that SIGKILL leaves behind are cleared by the next write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vae.io import atomic_open, remove_stale_temporaries, write_json, write_text

KILLED_WRITER = """
import os, signal, sys
from vae.io import atomic_open
with atomic_open(sys.argv[1]) as handle:
    handle.write(b"half of the new conte")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"old": 1})
    with pytest.raises(RuntimeError, match="disk full"), atomic_open(path) as handle:
        handle.write(b'{"new": ')
        raise RuntimeError("disk full")
    assert path.read_text() == '{\n  "old": 1\n}\n'
    assert _temporaries(tmp_path) == []


def test_a_killed_writer_keeps_the_old_file_and_the_next_write_clears_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_text(path, "<html>old</html>")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True)
    assert killed.returncode == -9
    assert path.read_text() == "<html>old</html>"
    (left,) = _temporaries(tmp_path)
    assert left.name.startswith(".report.html.") and left.read_bytes() == b"half of the new conte"

    write_text(path, "<html>new</html>")
    assert path.read_text() == "<html>new</html>"
    assert _temporaries(tmp_path) == []


def test_only_temporaries_of_dead_writers_of_that_file_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        stale = tmp_path / f".model.pt.{dead}.abc123.tmp"
        live = tmp_path / f".model.pt.{sleeper.pid}.def456.tmp"  # a writer still at work
        other_file = tmp_path / f".model.pt.bak.{dead}.ghi789.tmp"  # the temporary of model.pt.bak
        unrelated = tmp_path / ".model.pt.notes.tmp"
        for each in (stale, live, other_file, unrelated):
            each.write_bytes(b"x")
        assert remove_stale_temporaries(path) == [stale]
        assert not stale.exists() and live.exists() and other_file.exists() and unrelated.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
