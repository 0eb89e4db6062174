"""The VAE's objectives and estimators, each with its source.

Conventions: ``x`` is (batch, D) float; latent tensors are (..., batch, latent_dim); every
log-density is summed over its event dimensions and returned per example, in nats. A model is
anything with ``encode(x) -> (mu, log_var)`` and ``decoder_log_prob(x, z) -> log p(x|z)``
(see :class:`LatentVariableModel`), so the estimators serve the Bernoulli VAE, a Gaussian
decoder and the linear-Gaussian model the tests check against in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


class LatentVariableModel(Protocol):
    """What the estimators need of a model with prior p(z) = N(0, I)."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, D) -> mean and log-variance of q(z|x), each (batch, latent_dim)."""

    def decoder_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over D: x (batch, D), z (..., batch, latent_dim) -> (..., batch)."""


def gaussian_kl_divergence(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(log_var)) || N(0, I)) in closed form, summed over the last dimension.

    0.5 * sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)  (Kingma & Welling 2014, App. B).
    Shapes: (..., latent_dim) -> (...); nats.
    """
    return 0.5 * (mu.pow(2) + log_var.exp() - log_var - 1.0).sum(-1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(log_var)) summed over the last dimension; broadcasts; nats."""
    return -0.5 * (LOG_2PI + log_var + (z - mu).pow(2) * torch.exp(-log_var)).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension: (..., latent_dim) -> (...); nats."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last dimension, stable for any logits.

    sum_d [x_d * l_d - softplus(l_d)], i.e. minus the binary cross-entropy with logits.
    Shapes: x (batch, D), logits (..., batch, D) -> (..., batch); nats.
    """
    # einsum contracts x * logits without materialising the (..., batch, D) product.
    data_term = torch.einsum("...bd,bd->...b", logits, x)
    return data_term - F.softplus(logits).sum(-1)


def reparameterize(mu: torch.Tensor, log_var: torch.Tensor, samples: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, Sec. 2.4), differentiable in mu, log_var.

    Shapes: mu, log_var (batch, latent_dim) -> z (batch, latent_dim), or
    (samples, batch, latent_dim) when ``samples`` is given.
    """
    shape = mu.shape if samples is None else (samples, *mu.shape)
    eps = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * log_var) * eps


def elbo(model: LatentVariableModel, x: torch.Tensor, samples: int = 1,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """The SGVB estimator B of the evidence lower bound, per example (Kingma & Welling 2014, Eq. 7).

    ELBO(x) ~= (1/L) sum_l log p(x|z_l) - KL(q(z|x) || p(z)), z_l ~ q(z|x), with the KL analytic.
    Shapes: x (batch, D) -> (batch,); nats per example. Its expectation is <= log p(x).

    Raises:
        ValueError: ``samples < 1``.
    """
    if samples < 1:
        raise ValueError(f"samples = {samples}: expected an integer >= 1")
    mu, log_var = model.encode(x)
    z = reparameterize(mu, log_var, samples, generator)
    return model.decoder_log_prob(x, z).mean(0) - gaussian_kl_divergence(mu, log_var)


def log_importance_weights(model: LatentVariableModel, x: torch.Tensor, mu: torch.Tensor,
                           log_var: torch.Tensor, samples: int,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log w_i = log p(x, z_i) - log q(z_i|x) for z_i ~ q(z|x) (Burda et al. 2016, Eq. 8).

    Returns ``(log_w, log_px_given_z)``, each (samples, batch), nats.
    """
    z = reparameterize(mu, log_var, samples, generator)
    log_px_given_z = model.decoder_log_prob(x, z)
    log_w = log_px_given_z + standard_normal_log_prob(z) - gaussian_log_prob(z, mu, log_var)
    return log_w, log_px_given_z


@dataclass(frozen=True)
class LogLikelihoodEstimate:
    """Per-example results of :func:`importance_sampled_log_likelihood`, each (N,) float, nats.

    ``log_likelihood`` is L_k; ``elbo`` is estimator B (analytic KL) averaged over the same k
    samples, so ``log_likelihood >= elbo - O(1/sqrt(k))`` and L_1 equals the ELBO in expectation.
    """

    log_likelihood: torch.Tensor
    elbo: torch.Tensor


def chunk_shape(examples: int, importance_samples: int, max_pairs: int) -> tuple[int, int]:
    """(examples per chunk, samples per chunk) so that one chunk holds at most ``max_pairs``
    (example, sample) pairs: whole examples when k fits, else one example and k split up."""
    max_pairs = max(1, max_pairs)
    if importance_samples <= max_pairs:
        return max(1, min(examples, max_pairs // importance_samples)), importance_samples
    return 1, max_pairs


@torch.no_grad()
def importance_sampled_log_likelihood(
    model: LatentVariableModel,
    x: torch.Tensor,
    importance_samples: int,
    max_pairs: int = 65536,
    generator: torch.Generator | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> LogLikelihoodEstimate:
    """Importance-sampled log-likelihood L_k per example (Burda et al. 2016, Eq. 8).

    L_k(x) = log (1/k) sum_{i=1..k} p(x, z_i) / q(z_i|x), z_i ~ q(z|x). It is a stochastic lower
    bound of log p(x) whose expectation increases with k towards log p(x) (Burda et al. Thm. 1).

    The (examples x samples) grid is processed in chunks of at most ``max_pairs`` pairs with a
    streaming log-sum-exp (``logaddexp`` of chunk results), so memory stays bounded for any k.

    Args:
        model: a :class:`LatentVariableModel`.
        x: (N, D) float data.
        importance_samples: k >= 1.
        max_pairs: bound on examples x samples per chunk (working memory ~ max_pairs x the
            decoder's per-sample activations).
        generator: source of randomness (on ``x.device``) for reproducible estimates.
        on_chunk: called with the number of examples finished after each block of examples.

    Returns:
        :class:`LogLikelihoodEstimate` with (N,) tensors, nats per example.

    Raises:
        ValueError: ``importance_samples < 1`` or ``x`` is not 2-D.
    """
    if importance_samples < 1:
        raise ValueError(f"importance_samples = {importance_samples}: expected an integer >= 1")
    if x.ndim != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (examples, dimensions)")
    if len(x) == 0:
        empty = x.new_empty(0)
        return LogLikelihoodEstimate(empty, empty.clone())
    examples_per_chunk, samples_per_chunk = chunk_shape(len(x), importance_samples, max_pairs)
    log_likelihoods, elbos = [], []
    for start in range(0, len(x), examples_per_chunk):
        batch = x[start : start + examples_per_chunk]
        mu, log_var = model.encode(batch)
        log_sum_w = torch.full((len(batch),), -math.inf, device=x.device, dtype=mu.dtype)
        sum_log_px = torch.zeros(len(batch), device=x.device, dtype=mu.dtype)
        for done in range(0, importance_samples, samples_per_chunk):
            samples = min(samples_per_chunk, importance_samples - done)
            log_w, log_px_given_z = log_importance_weights(model, batch, mu, log_var, samples, generator)
            log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w, dim=0))
            sum_log_px += log_px_given_z.sum(0)
        log_likelihoods.append(log_sum_w - math.log(importance_samples))
        elbos.append(sum_log_px / importance_samples - gaussian_kl_divergence(mu, log_var))
        if on_chunk is not None:
            on_chunk(len(batch))
    return LogLikelihoodEstimate(torch.cat(log_likelihoods), torch.cat(elbos))


def active_units(mu: torch.Tensor, threshold: float = 1e-2) -> tuple[int, torch.Tensor]:
    """Active latent units (Burda et al. 2016, Sec. 5.2): A_u = Cov_x(E_q(u|x)[u]) > threshold.

    Args:
        mu: (N, latent_dim) posterior means E_q[z|x] over a dataset.
    Returns:
        (number of active units, per-unit variances A_u of shape (latent_dim,)).
    """
    variances = mu.var(dim=0, unbiased=False)
    return int((variances > threshold).sum()), variances
