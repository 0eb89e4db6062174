"""Published test log-likelihoods on MNIST that the report sets our numbers beside.

Each entry carries the binarization, architecture and number of importance samples k of its
evaluation, because numbers from different binarizations are not comparable (static MNIST
overfits by a few nats) and the report never puts them in one table. Values are test
log-likelihoods in nats per example (the papers print the negative, the NLL).
"""

from __future__ import annotations

from dataclasses import dataclass

IWAE = "Burda, Grosse & Salakhutdinov 2016 (IWAE)"
IWAE_SETUP = "784-200-200-50 tanh encoder, mirrored decoder; Adam, batch 20, 3280 passes"
IWAE_SETUP_2L = ("2 stochastic layers (100 and 50 units) with tanh layers 200-200 and 100-100 between; "
                 "Adam, batch 20, 3280 passes")


@dataclass(frozen=True)
class Reference:
    """One published number: ``log_likelihood`` in nats per example (negative)."""

    source: str
    where: str
    model: str
    binarization: str
    architecture: str
    importance_samples: int
    log_likelihood: float


REFERENCES: tuple[Reference, ...] = (
    Reference(IWAE, "Table 1", "VAE, 1 stochastic layer (k=1)", "dynamic", IWAE_SETUP, 5000, -86.76),
    Reference(IWAE, "Table 1", "VAE, 1 stochastic layer (k=50)", "dynamic", IWAE_SETUP, 5000, -86.35),
    Reference(IWAE, "Table 1", "IWAE, 1 stochastic layer (k=50)", "dynamic", IWAE_SETUP, 5000, -84.78),
    Reference(IWAE, "Table 1", "VAE, 2 stochastic layers (k=1)", "dynamic", IWAE_SETUP_2L, 5000, -85.33),
    Reference(IWAE, "Table 1", "IWAE, 2 stochastic layers (k=50)", "dynamic", IWAE_SETUP_2L, 5000, -82.90),
    Reference(IWAE, "Table 3 (App. D)", "VAE, 1 stochastic layer (k=1)", "static", IWAE_SETUP, 5000, -88.71),
    Reference(IWAE, "Table 3 (App. D)", "IWAE, 1 stochastic layer (k=50)", "static", IWAE_SETUP, 5000, -87.10),
    Reference(IWAE, "Table 3 (App. D)", "VAE, 2 stochastic layers (k=1)", "static", IWAE_SETUP_2L, 5000, -88.08),
    Reference(IWAE, "Table 3 (App. D)", "IWAE, 2 stochastic layers (k=50)", "static", IWAE_SETUP_2L, 5000, -85.32),
)


def comparable(dataset: str, binarization: str) -> list[Reference]:
    """The references a run on ``dataset`` with ``binarization`` may be compared with."""
    if dataset != "mnist":
        return []
    return [ref for ref in REFERENCES if ref.binarization == binarization]
