"""The VAE's objectives and estimators, each with its source.

Conventions: ``x`` is (batch, D) float; latent tensors are (..., batch, latent_dim); every
log-density is summed over its event dimensions and returned per example, in nats. A model is
anything with ``encode(x) -> (mu, log_var)`` and ``decoder_log_prob(x, z) -> log p(x|z)``
(see :class:`LatentVariableModel`), so the estimators serve the Bernoulli VAE, a Gaussian
decoder and the linear-Gaussian model the tests check against in closed form. A model with two
stochastic layers (:class:`TwoLayerModel`: also ``encode_top(z1)`` and ``decode_top(z2)``,
Burda et al. 2016, Sec. 5) gets the same estimators over both layers: its noise per sample is
(latent_dim + top_latent_dim) standard normals, z1's then z2's. Wake-sleep's two
objectives (:func:`wake_objective`, :func:`sleep_objective`) also need ``latent_dim`` and
``decoder_sample(z)`` (:class:`WakeSleepModel`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
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


class TwoLayerModel(LatentVariableModel, Protocol):
    """A model with two stochastic layers (Burda et al. 2016, Sec. 5): q(z1|x) q(z2|z1) and
    p(z2) p(z1|z2) p(x|z1), p(z2) = N(0, I), every conditional a diagonal Gaussian except p(x|z1).
    ``encode`` gives q(z1|x) and ``decoder_log_prob(x, z1)`` gives log p(x|z1)."""

    top_latent_dim: int

    def encode_top(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z2|z1): z1 (..., latent_dim) -> mean and log-variance, each (..., top_latent_dim)."""

    def decode_top(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z1|z2): z2 (..., top_latent_dim) -> mean and log-variance, each (..., latent_dim)."""


def is_two_layer(model: object) -> bool:
    """Whether ``model`` has two stochastic layers (a :class:`TwoLayerModel`)."""
    return callable(getattr(model, "encode_top", None))


def noise_dim(model: LatentVariableModel, latent_dim: int) -> int:
    """Standard normals per importance sample: ``latent_dim`` (z's), or for a
    :class:`TwoLayerModel` latent_dim + top_latent_dim (z1's, then z2's)."""
    return latent_dim + (model.top_latent_dim if is_two_layer(model) else 0)


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
    # One fused kernel forward and backward (einsum + softplus cost two, and a batched matmul of
    # 1 x 1 products in the backward); x broadcasts over the leading sample dimensions.
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


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
    With two stochastic layers (:class:`TwoLayerModel`), estimator A over both layers, as the IWAE
    authors' code has it (yburda/iwae, ``iwae.py``): (1/L) sum_l log w_l, w_l = p(x, z1_l, z2_l) /
    q(z1_l, z2_l|x), (z1_l, z2_l) ~ q(z1|x) q(z2|z1) (:func:`two_layer_log_weights`). (Taking
    H[q(z1|x)] and KL(q(z2|z1) || p(z2)) in closed form instead gives the same expectation but, on
    a small random model, a larger spread: 1.65 to 1.86 nats per image against 0.94 to 1.19; the
    sampled terms cancel each other's noise.)
    Shapes: x (batch, D) -> (batch,); nats per example. Its expectation is <= log p(x).

    Raises:
        ValueError: ``samples < 1``.
    """
    if samples < 1:
        raise ValueError(f"samples = {samples}: expected an integer >= 1")
    mu, log_var = model.encode(x)
    if is_two_layer(model):
        eps = torch.randn((samples, *mu.shape[:-1], noise_dim(model, mu.shape[-1])), generator=generator,
                          device=mu.device, dtype=mu.dtype)
        return two_layer_log_weights(model, x, mu, log_var, eps).mean(0)
    z = reparameterize(mu, log_var, samples, generator)
    return model.decoder_log_prob(x, z).mean(0) - gaussian_kl_divergence(mu, log_var)


def log_importance_weights(model: LatentVariableModel, x: torch.Tensor, mu: torch.Tensor,
                           log_var: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log w_i = log p(x, z_i) - log q(z_i|x) for z_i = mu + sigma * eps_i (Burda et al. 2016, Eq. 8).

    With (z - mu) / sigma = eps, log p(z) - log q(z|x) = (|eps|^2 - |z|^2 + sum log sigma^2) / 2
    (the 2 pi terms cancel), so no division and no second pass over z.
    Shapes: x (batch, D), mu and log_var (batch, latent_dim), eps (samples, batch, latent_dim)
    standard normal. Returns ``(log_w, log_px_given_z)``, each (samples, batch), nats.
    """
    z = mu + torch.exp(0.5 * log_var) * eps
    log_px_given_z = model.decoder_log_prob(x, z)
    log_w = log_px_given_z + 0.5 * (eps.pow(2).sum(-1) - z.pow(2).sum(-1) + log_var.sum(-1))
    return log_w, log_px_given_z


def two_layer_log_weights(model: TwoLayerModel, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
                          eps: torch.Tensor) -> torch.Tensor:
    """Importance weights of a two-stochastic-layer model (Burda et al. 2016, Eq. 8 and Sec. 5).

    z1 = mu + sigma * eps1 ~ q(z1|x); z2 = mu2(z1) + sigma2(z1) * eps2 ~ q(z2|z1); then
    log w = log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1), the log q terms
    from the noise: log N(z; m, s^2) = -(|eps|^2 + sum log s^2 + d log 2 pi) / 2. Their mean is
    the ELBO's estimate (:func:`elbo`).

    Shapes: x (batch, D); mu and log_var (batch, latent_dim), q(z1|x)'s; eps (samples, batch,
    latent_dim + top_latent_dim) standard normal, z1's noise first. Returns log w (samples, batch),
    nats.
    """
    first = mu.shape[-1]
    eps1, eps2 = eps[..., :first], eps[..., first:]
    z1 = mu + torch.exp(0.5 * log_var) * eps1
    mu2, log_var2 = model.encode_top(z1)
    z2 = mu2 + torch.exp(0.5 * log_var2) * eps2
    prior_mean, prior_log_var = model.decode_top(z2)
    log_px_given_z1 = model.decoder_log_prob(x, z1)
    log_pz1_given_z2 = gaussian_log_prob(z1, prior_mean, prior_log_var)
    log_q = -0.5 * (eps.pow(2).sum(-1) + log_var.sum(-1) + log_var2.sum(-1) + eps.shape[-1] * LOG_2PI)
    return log_px_given_z1 + log_pz1_given_z2 + standard_normal_log_prob(z2) - log_q


def sample_log_weights(model: LatentVariableModel, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
                       eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any model's log importance weights and per-sample ELBO terms, (samples, batch) each, nats:
    :func:`log_importance_weights` (the terms are log p(x|z); the ELBO adds -KL(q(z|x) || p(z)))
    or, with two stochastic layers, :func:`two_layer_log_weights` (the terms are the log weights;
    the ELBO is their mean). :func:`elbo_constant` is the part of the ELBO beside the terms' mean."""
    if is_two_layer(model):
        log_w = two_layer_log_weights(model, x, mu, log_var, eps)
        return log_w, log_w
    return log_importance_weights(model, x, mu, log_var, eps)


def elbo_constant(model: LatentVariableModel, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """The analytic part of the ELBO beside the mean of :func:`sample_log_weights`' terms: -KL(q(z|x) ||
    p(z)) with one stochastic layer, 0 with two. (batch, latent_dim) -> (batch,), nats."""
    if is_two_layer(model):
        return torch.zeros_like(mu[..., 0])
    return -gaussian_kl_divergence(mu, log_var)


def iwae_bound(model: LatentVariableModel, x: torch.Tensor, importance_samples: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The importance-weighted bound L_k as a training objective (Burda et al. 2016, Eq. 8 and Sec. 3).

    L_k(x) = log (1/k) sum_i w_i, w_i = p(x, z_i) / q(z_i|x), z_i = mu + sigma * eps_i; the noise is
    reparameterized, so the gradient flows through every z_i (each weighted by its normalized w_i).
    L_1 is the ELBO estimator A; L_k <= L_{k+1} <= log p(x) in expectation. With two stochastic
    layers, w_i = p(x, z1_i, z2_i) / q(z1_i, z2_i|x) (:func:`two_layer_log_weights`).
    Shapes: x (batch, D) -> (batch,); nats per example.

    Raises:
        ValueError: ``importance_samples < 1``.
    """
    if importance_samples < 1:
        raise ValueError(f"importance_samples = {importance_samples}: expected an integer >= 1")
    mu, log_var = model.encode(x)
    shape = (importance_samples, *mu.shape[:-1], noise_dim(model, mu.shape[-1]))
    eps = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    log_w, _ = sample_log_weights(model, x, mu, log_var, eps)
    return torch.logsumexp(log_w, dim=0) - math.log(importance_samples)


class WakeSleepModel(LatentVariableModel, Protocol):
    """What wake-sleep needs beyond :class:`LatentVariableModel`: the latent size, the parameters
    (for the device and dtype of the fantasies) and a sampler of the decoder."""

    latent_dim: int

    def parameters(self) -> Iterator[torch.Tensor]:
        """The model's parameters (the first one gives the device and dtype of z ~ p(z))."""

    def decoder_sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x|z) without gradient: z (..., latent_dim) -> (..., D)."""


def wake_objective(model: LatentVariableModel, x: torch.Tensor, samples: int = 1,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Wake phase of the wake-sleep algorithm (Hinton, Dayan, Frey & Neal 1995, Science 268:1158;
    with a Gaussian recognition model for continuous latents as in Kingma & Welling 2014, Sec. 5).

    wake(x) = (1/L) sum_l [log p_theta(x|z_l) + log p(z_l)] = (1/L) sum_l log p_theta(x, z_l),
    z_l ~ q_phi(z|x) drawn **without gradient to the encoder** (z is treated as observed), so
    the gradient reaches the decoder's parameters theta only. The prior N(0, I) has no
    parameters: log p(z) is in the value (making it log p(x, z)) but not in the gradient.

    Also returns the ELBO (SGVB estimator B, Kingma & Welling 2014 Eq. 7) at the same samples:
    (1/L) sum_l log p(x|z_l) - KL(q(z|x) || p(z)), the formula of :func:`elbo` with the same noise
    (``elbo(model, x, samples, g)`` from the same generator state gives the same values); detached,
    for the per-step training curve.

    Shapes: x (batch, D) -> (wake, elbo), each (batch,) float; nats per example.

    Raises:
        ValueError: ``samples < 1``.
    """
    if samples < 1:
        raise ValueError(f"samples = {samples}: expected an integer >= 1")
    with torch.no_grad():
        mu, log_var = model.encode(x)
        z = reparameterize(mu, log_var, samples, generator)
    log_px_given_z = model.decoder_log_prob(x, z)
    wake = (log_px_given_z + standard_normal_log_prob(z)).mean(0)
    return wake, log_px_given_z.detach().mean(0) - gaussian_kl_divergence(mu, log_var)


def sleep_objective(model: WakeSleepModel, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sleep phase of the wake-sleep algorithm (Hinton, Dayan, Frey & Neal 1995, Science 268:1158).

    sleep = log q_phi(z|x) for "fantasies" (z, x) ~ p(z) p_theta(x|z): z ~ N(0, I), then
    x ~ p(x|z) (binary draws for a Bernoulli decoder, N(mean, diag var) for a Gaussian one), both
    drawn without gradient, so the gradient reaches the encoder's parameters phi only. Maximizing
    it fits q to the model's true posterior in the direction KL(p(z|x) || q(z|x)) on the model's
    own samples (the sleep phase's "wrong" KL, Hinton et al. 1995).

    Shapes: ``count`` fantasies -> (count,) float, log N(z; mu(x), diag exp(log_var(x))) summed
    over latent_dim; nats per fantasy. The model's first parameter gives z's device and dtype;
    ``generator`` must live on that device.

    Raises:
        ValueError: ``count < 1``.
    """
    if count < 1:
        raise ValueError(f"count = {count}: expected an integer >= 1")
    first = next(iter(model.parameters()))
    with torch.no_grad():
        z = torch.randn(count, model.latent_dim, generator=generator, device=first.device, dtype=first.dtype)
        x = model.decoder_sample(z, generator)
    mu, log_var = model.encode(x)
    return gaussian_log_prob(z, mu, log_var)


@dataclass(frozen=True)
class WakeSleepTerms:
    """One minibatch of wake-sleep (:func:`wake_sleep`), nats.

    ``wake`` (batch,): log p(x, z), z ~ q(z|x); its gradient reaches the decoder only.
    ``sleep`` (batch,): log q(z|x) of as many fantasies (z, x) ~ p(z) p(x|z); gradient to the encoder only.
    ``elbo`` (batch,): the ELBO (estimator B) at the wake phase's samples, detached.
    """

    wake: torch.Tensor
    sleep: torch.Tensor
    elbo: torch.Tensor


def wake_sleep(model: WakeSleepModel, x: torch.Tensor, samples: int = 1,
               generator: torch.Generator | None = None) -> WakeSleepTerms:
    """Both phases of wake-sleep on one minibatch: :func:`wake_objective` on ``x`` with L =
    ``samples``, then :func:`sleep_objective` on ``len(x)`` fantasies, drawn in that order from
    ``generator`` (Hinton et al. 1995; the continuous-latent form AEVB Sec. 5 compared against).

    The two objectives are separate (together they are not a bound on log p(x)); their gradients
    reach disjoint parameter sets, decoder and encoder, so maximizing wake.mean() + sleep.mean()
    with one optimizer step updates each with its own phase's gradient. Both phases are computed
    at the same parameters (the sleep phase dreams from the decoder as it was before this step's
    wake update), where Hinton et al. alternate them; in expectation the two orders differ only
    by that one step's lag.
    Shapes: x (batch, D) -> :class:`WakeSleepTerms` of (batch,) tensors; nats.

    Raises:
        ValueError: ``samples < 1``, an empty ``x``, or a model with two stochastic layers.
    """
    if is_two_layer(model):
        raise ValueError(f"{type(model).__name__} has two stochastic layers: wake-sleep here trains models with "
                         "one (prior N(0, I) on z)")
    wake, elbo_value = wake_objective(model, x, samples, generator)
    return WakeSleepTerms(wake=wake, sleep=sleep_objective(model, len(x), generator), elbo=elbo_value)


LOG_SIGMOID_FLOOR = -80.0  # below this, log sigmoid(t) = t to float precision (e^-80 ~ 1e-35)


@torch.no_grad()
def bernoulli_log_prob_(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """:func:`bernoulli_log_prob` for evaluation: same value, about 2.5x faster, **overwrites** ``logits``.

    sum_d log sigmoid(s_d l_d), s_d = 2 x_d - 1, computed as
    log sigmoid(max(t, -80)) + (t - max(t, -80)): sigmoid and log are vectorised kernels while
    softplus and log1p are not, and the clamp keeps it finite for any logit (exact to float
    rounding, about 1e-7 nats per pixel). No autograd: use it under ``torch.no_grad()``.
    Shapes: x (batch, D), logits (..., batch, D) -> (..., batch); nats.
    """
    t = logits.mul_(2.0 * x - 1.0)
    below_floor = t.sum(-1)
    t.clamp_(min=LOG_SIGMOID_FLOOR)
    below_floor -= t.sum(-1)
    return t.sigmoid_().log_().sum(-1) + below_floor


@torch.no_grad()
def gaussian_log_prob_(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """:func:`gaussian_log_prob` of x for evaluation: same value, **overwrites** ``mean`` and ``log_var``.

    -0.5 * sum_d [log 2 pi + log_var_d + (x_d - mean_d)^2 exp(-log_var_d)], with no temporaries
    of the full (..., batch, D) size. No autograd: use it under ``torch.no_grad()``.
    Shapes: x (batch, D), mean and log_var (..., batch, D) -> (..., batch); nats.
    """
    total_log_var = log_var.sum(-1)
    precision = log_var.neg_().exp_()
    squared = mean.sub_(x).square_().mul_(precision)
    return -0.5 * (x.shape[-1] * LOG_2PI + total_log_var + squared.sum(-1))


@dataclass(frozen=True)
class LogLikelihoodEstimate:
    """Per-example results of :func:`importance_sampled_log_likelihood`, each (N,) float, nats.

    ``log_likelihood`` is L_k; ``elbo`` is estimator B (analytic KL) averaged over the same k
    samples, so L_1 equals the ELBO in expectation; ``curve`` maps each requested k' <= k to
    L_k' computed from the first k' of the same samples (the bound-tightness curve).
    """

    log_likelihood: torch.Tensor
    elbo: torch.Tensor
    curve: dict[int, torch.Tensor]


def chunk_shape(examples: int, importance_samples: int, max_pairs: int) -> tuple[int, int]:
    """(examples per chunk, samples per chunk) so that one chunk holds at most ``max_pairs``
    (example, sample) pairs: whole examples when k fits, else one example and k split up."""
    max_pairs = max(1, max_pairs)
    if importance_samples <= max_pairs:
        return max(1, min(examples, max_pairs // importance_samples)), importance_samples
    return 1, max_pairs


class NoiseStream:
    """The standard-normal noise of one example: its own generator, drawn in fixed blocks.

    One stream per example, so that no chunking of the (examples x samples) grid changes which
    noise an example's samples get; fixed-size draws because torch's ``randn`` consumes its
    generator differently for different sizes. Noise is float32 whatever the model's dtype, so a
    float64 evaluation sees exactly the draws of a float32 one. torch's CPU generator keeps only
    the low 32 bits of a seed, so seed and index are mixed within 32 bits (golden-ratio multiplier).
    """

    BLOCK = 64  # samples per draw

    def __init__(self, seed: int, index: int, latent_dim: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed((seed * 0x9E3779B1 + index) % 2**32)
        self.latent_dim, self.device = latent_dim, device
        self.buffer = torch.empty(0, latent_dim, device=device)

    def take(self, samples: int) -> torch.Tensor:
        """The next ``samples`` rows of the stream: (samples, latent_dim) float32."""
        missing = max(0, samples - len(self.buffer))
        blocks = [torch.randn(self.BLOCK, self.latent_dim, generator=self.generator, device=self.device)
                  for _ in range(-(-missing // self.BLOCK))]  # the same draws as one block at a time
        if blocks:
            self.buffer = torch.cat([self.buffer, *blocks])  # one copy, however many blocks
        rows, self.buffer = self.buffer[:samples], self.buffer[samples:]
        return rows


@torch.no_grad()
def importance_sampled_log_likelihood(
    model: LatentVariableModel,
    x: torch.Tensor,
    importance_samples: int,
    max_pairs: int = 4096,
    seed: int = 0,
    curve: Sequence[int] = (),
    on_chunk: Callable[[int], None] | None = None,
) -> LogLikelihoodEstimate:
    """Importance-sampled log-likelihood L_k per example (Burda et al. 2016, Eq. 8).

    L_k(x) = log (1/k) sum_{i=1..k} p(x, z_i) / q(z_i|x), z_i ~ q(z|x). It is a stochastic lower
    bound of log p(x) whose expectation increases with k towards log p(x) (Burda et al. Thm. 1).
    A :class:`TwoLayerModel`'s samples are (z1, z2) ~ q(z1|x) q(z2|z1) (:func:`two_layer_log_weights`).

    The (examples x samples) grid is processed in chunks of at most ``max_pairs`` pairs with a
    streaming log-sum-exp (``logaddexp`` of chunk results), so memory stays bounded for any k.
    Example i draws its noise from its own stream (:class:`NoiseStream`), so the result
    depends on ``seed``, the data and each example's position in ``x``, not on ``max_pairs``
    (how many examples and samples share a chunk). The first k' samples of a run with k are
    those of a run with k', so ``curve[k']`` equals a separate L_k' evaluation.

    Args:
        model: a :class:`LatentVariableModel`.
        x: (N, D) float data.
        importance_samples: k >= 1.
        max_pairs: bound on examples x samples per chunk; working memory is about
            ``max_pairs`` x the decoder's activations per sample.
        seed: seeds the per-example streams.
        curve: values k' in [1, k] at which L_k' is also reported (from the first k' samples).
        on_chunk: called with the number of examples finished after each block of examples.

    Returns:
        :class:`LogLikelihoodEstimate` with (N,) tensors, nats per example.

    Raises:
        ValueError: ``importance_samples < 1``, a ``curve`` value outside [1, k], or ``x`` not 2-D.
    """
    if importance_samples < 1:
        raise ValueError(f"importance_samples = {importance_samples}: expected an integer >= 1")
    if x.ndim != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (examples, dimensions)")
    curve = sorted(set(curve))
    if curve and (curve[0] < 1 or curve[-1] > importance_samples):
        raise ValueError(f"curve = {curve}: expected values between 1 and importance_samples = "
                         f"{importance_samples}")
    if len(x) == 0:
        empty = x.new_empty(0)
        return LogLikelihoodEstimate(empty, empty.clone(), {k: empty.clone() for k in curve})
    examples_per_chunk, samples_per_chunk = chunk_shape(len(x), importance_samples, max_pairs)
    log_likelihoods, elbos = [], []
    curves: dict[int, list[torch.Tensor]] = {k: [] for k in curve}
    for start in range(0, len(x), examples_per_chunk):
        batch = x[start : start + examples_per_chunk]
        mu, log_var = model.encode(batch)
        streams = [NoiseStream(seed, start + i, noise_dim(model, mu.shape[1]), x.device) for i in range(len(batch))]
        log_sum_w = torch.full((len(batch),), -math.inf, device=x.device, dtype=mu.dtype)
        sum_elbo_terms = torch.zeros(len(batch), device=x.device, dtype=mu.dtype)
        for done in range(0, importance_samples, samples_per_chunk):
            samples = min(samples_per_chunk, importance_samples - done)
            eps = torch.stack([stream.take(samples) for stream in streams], dim=1).to(mu.dtype)
            log_w, elbo_terms = sample_log_weights(model, batch, mu, log_var, eps)
            for k in curve:
                if done < k <= done + samples:
                    partial = torch.logaddexp(log_sum_w, torch.logsumexp(log_w[: k - done], dim=0))
                    curves[k].append(partial - math.log(k))
            log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w, dim=0))
            sum_elbo_terms += elbo_terms.sum(0)
        log_likelihoods.append(log_sum_w - math.log(importance_samples))
        elbos.append(sum_elbo_terms / importance_samples + elbo_constant(model, mu, log_var))
        if on_chunk is not None:
            on_chunk(len(batch))
    return LogLikelihoodEstimate(torch.cat(log_likelihoods), torch.cat(elbos),
                                 {k: torch.cat(values) for k, values in curves.items()})


def active_units(mu: torch.Tensor, threshold: float = 1e-2) -> tuple[int, torch.Tensor]:
    """Active latent units (Burda et al. 2016, Sec. 5.2): A_u = Cov_x(E_q(u|x)[u]) > threshold.

    Args:
        mu: (N, latent_dim) posterior means E_q[z|x] over a dataset.
    Returns:
        (number of active units, per-unit variances A_u of shape (latent_dim,)).
    """
    variances = mu.var(dim=0, unbiased=False)
    return int((variances > threshold).sum()), variances
