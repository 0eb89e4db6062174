"""The benchmarks' results files: Markdown, one title line, then entries newest first."""

from __future__ import annotations

from pathlib import Path


def prepend_entry(path: str | Path, title: str, entry: str) -> Path:
    """Insert ``entry`` right after the title line of ``path`` (created with ``title`` if missing)."""
    path = Path(path)
    previous = path.read_text() if path.is_file() else f"{title}\n\n"
    header, _, rest = previous.partition("\n\n")
    path.write_text(f"{header}\n\n{entry}\n{rest}")
    return path
