"""Reproducible Auto-Encoding Variational Bayes (Kingma & Welling 2014).

``vae.load_model(path)`` returns a trained model; the pipeline's stages live in ``vae.cli``.
Importing ``vae`` does no work: torch is imported only when ``load_model`` is first used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from vae.model import load_model

        return load_model
    raise AttributeError(f"module 'vae' has no attribute {name!r}")
