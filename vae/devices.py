"""Choosing the torch device a stage runs on."""

from __future__ import annotations

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


def describe(device: torch.device) -> str:
    """A human-readable name of the hardware, for reports: e.g. 'cuda (NVIDIA H200)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
