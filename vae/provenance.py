"""Where a result comes from in git: the commit the code was at, and whether it had changes.

The train stage tags its MLflow run with the commit (``mlflow.source.git.commit``, through
:mod:`vae.tracking`); the report names the commit and whether tracked files differed from it.
Git runs in the working directory (the repository root under ``dvc repro``); outside a git work
tree, or without git, the answers are None and False.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


def _git(*args: str) -> str | None:
    """``git <args>``'s stripped output, or None when git is missing, fails or takes over 10 s."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The repository's HEAD commit (40 hex digits), or None outside a git work tree."""
    return _git("rev-parse", "HEAD") or None


def git_dirty(ignore: Sequence[str] = ()) -> bool:
    """Whether tracked files differ from HEAD (pipeline outputs are git-ignored and do not count);
    paths in ``ignore`` (relative to the repository root, e.g. ``dvc.lock``) do not count either."""
    changed = _git("diff", "--name-only", "HEAD") or ""  # staged and unstaged changes to tracked files
    return any(path not in ignore for path in changed.splitlines() if path)
