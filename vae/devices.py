"""Choosing the torch device a stage runs on."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from vae.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu`` / ``cuda`` as given.

    Raises:
        ConfigError: ``cuda`` was asked for on a machine without a CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda': no CUDA device is available here (use 'auto' or 'cpu')")
    return torch.device(name)


def _cpu_name() -> str | None:
    """The processor's model name (Linux ``/proc/cpuinfo``, else ``platform.processor()``), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def describe(device: torch.device) -> str:
    """A human-readable name of the hardware, for reports: e.g. 'cuda (NVIDIA H200)' or
    'cpu (AMD EPYC, 2 threads)' (the thread count torch computes with)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    name = _cpu_name()
    return f"cpu ({name + ', ' if name else ''}{torch.get_num_threads()} threads)"


def computes_on(device: torch.device) -> str:
    """What of the hardware a result depends on, for the outputs DVC hashes: 'cpu (2 threads)' (the
    thread count torch computes with changes the order of its sums) or 'cuda'. The processor's or
    GPU's model name is the host's (:func:`describe`; it goes to MLflow), so that two machines that
    compute the same weights write the same bytes."""
    if device.type == "cuda":
        return "cuda"
    return f"cpu ({torch.get_num_threads()} threads)"


def software() -> str:
    """The versions that change numbers: e.g. 'torch 2.13.0, Python 3.12.3'."""
    return f"torch {torch.__version__}, Python {platform.python_version()}"
