"""The project's error types: each one carries a message that names what to fix.

The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message about a damaged file: shortened to ``limit``
    characters, and never failing (Python refuses to print an integer of over 4300 digits)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class VaeError(Exception):
    """Base class of the project's own, user-facing errors."""


class ConfigError(VaeError, ValueError):
    """A value in ``params.yaml`` (or a CLI override) is unknown, of the wrong type or out of range."""


class DataError(VaeError):
    """A dataset file is missing, truncated, of the wrong format or fails its checksum."""


class ChecksumError(DataError):
    """A downloaded file's content does not match the checksum the project expects."""


class DownloadError(DataError):
    """No source could deliver a verified copy of a file."""


class CheckpointError(VaeError):
    """A file is not a checkpoint written by this project, or it is damaged."""


class TrackingError(VaeError):
    """The MLflow tracking store cannot be reached or refused a request."""


class TrainingError(VaeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
