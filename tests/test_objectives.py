"""Tests of vae/objectives.py against closed forms.

The estimators are checked on a linear-Gaussian model (probabilistic PCA) whose marginal
likelihood, posterior, KL(q || posterior) and importance-weight variance are all known exactly,
so every statistical tolerance below is derived from a closed-form variance, not guessed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from support import DTYPE, LinearGaussianModel, generator, make_linear_gaussian
from vae.objectives import (
    active_units,
    bernoulli_log_prob,
    chunk_shape,
    elbo,
    gaussian_kl_divergence,
    gaussian_log_prob,
    importance_sampled_log_likelihood,
    iwae_bound,
    log_importance_weights,
    reparameterize,
    standard_normal_log_prob,
)

# (data dimension D, latent dimension k) of the linear-Gaussian models.
DIMS = [(5, 2), (10, 3), (20, 5)]
# The deliberately wrong q: mean moved by 1.5 posterior standard deviations in every latent
# dimension, variance doubled. chi^2(posterior || q) is then 5.0, 13.6 and 86 for DIMS.
WRONG_SHIFT, WRONG_INFLATE = 1.5, 2.0


def standard_error(values: torch.Tensor) -> float:
    return float(values.std() / math.sqrt(values.numel()))


# --------------------------------------------------------------------------------------------
# Closed-form densities and divergences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dim", [1, 3, 8])
def test_gaussian_kl_divergence_matches_monte_carlo(latent_dim: int) -> None:
    """KL = E_q[log q(z) - log p(z)], estimated with 200k draws; tolerance 5 standard errors."""
    g = generator(latent_dim)
    samples = 200_000
    for _ in range(3):
        mu = torch.randn(latent_dim, generator=g, dtype=DTYPE)
        log_var = 1.5 * torch.randn(latent_dim, generator=g, dtype=DTYPE)
        q = Normal(mu, torch.exp(0.5 * log_var))
        z = mu + torch.exp(0.5 * log_var) * torch.randn(samples, latent_dim, generator=g, dtype=DTYPE)
        log_ratio = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)
        closed_form = gaussian_kl_divergence(mu, log_var)
        assert closed_form.shape == ()
        assert abs(float(closed_form) - float(log_ratio.mean())) < 5 * standard_error(log_ratio)


def test_gaussian_kl_divergence_matches_torch_distributions() -> None:
    g = generator(1)
    mu = 2 * torch.randn(4, 6, 5, generator=g, dtype=DTYPE)
    log_var = 2 * torch.randn(4, 6, 5, generator=g, dtype=DTYPE)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(0.0, 1.0)).sum(-1)
    actual = gaussian_kl_divergence(mu, log_var)
    assert actual.shape == (4, 6)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_gaussian_kl_divergence_is_zero_only_at_the_prior() -> None:
    zeros = torch.zeros(3, 4, dtype=DTYPE)
    assert torch.equal(gaussian_kl_divergence(zeros, zeros), torch.zeros(3, dtype=DTYPE))
    assert float(gaussian_kl_divergence(torch.tensor([0.1]), torch.tensor([0.0]))) == pytest.approx(0.005)
    assert float(gaussian_kl_divergence(torch.tensor([0.0]), torch.tensor([0.2]))) > 0


def test_gaussian_log_prob_matches_torch_with_sample_dim() -> None:
    g = generator(2)
    mu = torch.randn(3, 4, generator=g, dtype=DTYPE)
    log_var = torch.randn(3, 4, generator=g, dtype=DTYPE)
    z = 3 * torch.randn(7, 3, 4, generator=g, dtype=DTYPE)  # leading sample dimension
    expected = Normal(mu, torch.exp(0.5 * log_var)).log_prob(z).sum(-1)
    actual = gaussian_log_prob(z, mu, log_var)
    assert actual.shape == (7, 3)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_standard_normal_log_prob_matches_torch() -> None:
    z = 3 * torch.randn(7, 3, 4, generator=generator(3), dtype=DTYPE)
    expected = Normal(0.0, 1.0).log_prob(z).sum(-1)
    actual = standard_normal_log_prob(z)
    assert actual.shape == (7, 3)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)
    assert float(standard_normal_log_prob(torch.zeros(2, dtype=DTYPE))) == pytest.approx(-math.log(2 * math.pi))


def test_bernoulli_log_prob_matches_binary_cross_entropy() -> None:
    g = generator(4)
    x = (torch.rand(3, 10, generator=g) < 0.5).to(DTYPE)
    logits = 4 * torch.randn(5, 3, 10, generator=g, dtype=DTYPE)  # (S, B, D) against x (B, D)
    expected = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    actual = bernoulli_log_prob(x, logits)
    assert actual.shape == (5, 3)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)
    # Without a sample dimension, too.
    torch.testing.assert_close(bernoulli_log_prob(x, logits[0]), expected[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize(("dtype", "size"), [(torch.float32, 100.0), (torch.float64, 1000.0)])
def test_bernoulli_log_prob_is_finite_for_extreme_logits(dtype: torch.dtype, size: float) -> None:
    """exp(logit) overflows there (float32: e^100, float64: e^1000); the result must not."""
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=dtype)
    logits = size * torch.tensor([[[1.0, -1.0, -1.0, 1.0]], [[1.0, -1.0, 1.0, -1.0]]], dtype=dtype)
    actual = bernoulli_log_prob(x, logits)
    assert actual.shape == (2, 1)
    assert torch.isfinite(actual).all()
    # Two confident misses (-size each) and two confident hits (~ -e^-size); then four hits.
    assert actual[0, 0].item() == pytest.approx(-2 * size, rel=1e-6)
    assert actual[1, 0].item() == pytest.approx(0.0, abs=1e-6)
    expected = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    torch.testing.assert_close(actual, expected)


# --------------------------------------------------------------------------------------------
# Reparameterization
# --------------------------------------------------------------------------------------------


def test_reparameterize_has_the_right_moments() -> None:
    """Sample mean within 5 SE of mu, sample variance within 5 SE (var * sqrt(2/n)) of exp(log_var)."""
    mu = torch.tensor([[0.0, 3.0], [-2.0, 0.5]], dtype=DTYPE)
    log_var = torch.tensor([[0.0, -2.0], [1.0, 2.0]], dtype=DTYPE)
    n = 200_000
    z = reparameterize(mu, log_var, samples=n, generator=generator(5))
    assert z.shape == (n, 2, 2)
    var = log_var.exp()
    assert ((z.mean(0) - mu).abs() < 5 * (var / n).sqrt()).all()
    assert ((z.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()


def test_reparameterize_shapes_and_reproducibility() -> None:
    mu, log_var = torch.zeros(3, 2), torch.zeros(3, 2)
    assert reparameterize(mu, log_var).shape == (3, 2)
    assert reparameterize(mu, log_var, samples=7).shape == (7, 3, 2)
    first = reparameterize(mu, log_var, samples=4, generator=generator(6))
    again = reparameterize(mu, log_var, samples=4, generator=generator(6))
    other = reparameterize(mu, log_var, samples=4, generator=generator(7))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_reparameterize_gradients_flow_to_mu_and_log_var() -> None:
    """d(sum z)/d mu = number of samples; d(sum z)/d log_var = sum over samples of (z - mu) / 2."""
    mu = torch.tensor([[0.5, -1.0]], dtype=DTYPE, requires_grad=True)
    log_var = torch.tensor([[0.3, -0.7]], dtype=DTYPE, requires_grad=True)
    z = reparameterize(mu, log_var, samples=5, generator=generator(8))
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.full_like(mu, 5.0))
    torch.testing.assert_close(log_var.grad, 0.5 * (z - mu).sum(0).detach())


# --------------------------------------------------------------------------------------------
# ELBO and importance-sampled log-likelihood on the linear-Gaussian model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("D", "k"), DIMS)
def test_exact_posterior_gives_constant_weights_equal_to_log_marginal(D: int, k: int) -> None:
    """With q = p(z|x), log w = log p(x, z) - log q(z|x) = log p(x) for every z, so L_1 is exact."""
    model, x = make_linear_gaussian(D, k, examples=8, seed=D)
    log_px = model.log_marginal(x)
    for samples in (1, 7):
        estimate = importance_sampled_log_likelihood(model, x, samples, seed=9)
        torch.testing.assert_close(estimate.log_likelihood, log_px, rtol=0, atol=1e-6)
    mu, log_var = model.encode(x)
    eps = torch.randn(20, *mu.shape, generator=generator(10), dtype=DTYPE)
    log_w, _ = log_importance_weights(model, x, mu, log_var, eps)
    assert log_w.shape == (20, 8)
    torch.testing.assert_close(log_w, log_px.expand_as(log_w), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("D", "k"), DIMS)
def test_elbo_with_exact_posterior_equals_log_marginal(D: int, k: int) -> None:
    """Estimator B's Monte Carlo term varies with z even for q = p(z|x): tolerance 5 SE."""
    model, x = make_linear_gaussian(D, k, examples=8, seed=D)
    samples = 20_000
    actual = elbo(model, x, samples=samples, generator=generator(11))
    assert actual.shape == (8,)
    mu, log_var = model.encode(x)
    spread = model.decoder_log_prob(x, reparameterize(mu, log_var, samples, generator(12))).std(0)
    assert ((actual - model.log_marginal(x)).abs() < 5 * spread / math.sqrt(samples)).all()


@pytest.mark.parametrize(("D", "k"), DIMS)
def test_elbo_equals_log_marginal_minus_kl_to_posterior(D: int, k: int) -> None:
    """log p(x) = ELBO(x) + KL(q || p(z|x)) for a wrong q; tolerance 5 SE of the MC term."""
    model, x = make_linear_gaussian(D, k, examples=8, seed=D, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    samples = 20_000
    actual = elbo(model, x, samples=samples, generator=generator(13))
    expected = model.log_marginal(x) - model.kl_to_posterior(x)
    mu, log_var = model.encode(x)
    spread = model.decoder_log_prob(x, reparameterize(mu, log_var, samples, generator(14))).std(0)
    assert (model.kl_to_posterior(x) > 1.0).all()  # the check below can tell q from p(z|x)
    assert ((actual - expected).abs() < 5 * spread / math.sqrt(samples)).all()


@pytest.mark.parametrize("samples", [0, -1])
def test_elbo_rejects_non_positive_samples(samples: int) -> None:
    model, x = make_linear_gaussian(5, 2, examples=3)
    with pytest.raises(ValueError, match="samples"):
        elbo(model, x, samples=samples)


@pytest.mark.parametrize(("D", "k"), DIMS)
def test_iwae_with_wrong_posterior_converges_to_log_marginal(D: int, k: int) -> None:
    """L_5000 per example within 6 sqrt(chi^2/k) + chi^2/(2k) of log p(x).

    Observed on 200 examples: the spread of L_5000 - log p(x) equals sd = sqrt(chi^2/k) (0.034 vs
    0.032, 0.050 vs 0.052, 0.134 vs 0.131 nats) and its maximum is below 3.6 sd; the tolerance
    (0.19, 0.31, 0.80 nats) still rejects a missing log k (8.5 nats) or the ELBO
    (KL(q || p(z|x)) = 2.6, 3.8, 6.4 nats).
    """
    model, x = make_linear_gaussian(D, k, examples=8, seed=D, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    samples = 5000
    estimate = importance_sampled_log_likelihood(model, x, samples, seed=15)
    chi2 = model.chi_square(x)
    tolerance = 6 * (chi2 / samples).sqrt() + chi2 / (2 * samples)
    assert (tolerance < 1.0).all()
    assert ((estimate.log_likelihood - model.log_marginal(x)).abs() < tolerance).all()


@pytest.mark.parametrize(("D", "k"), DIMS)
def test_iwae_gap_shrinks_as_k_grows(D: int, k: int) -> None:
    """log p(x) - E[L_k] is KL(q || p(z|x)) at k = 1, then shrinks (~chi^2/(2k)) towards 0.

    50 examples x 20 repeats. Observed gaps (k = 1, 10, 1000), each +- 1 SE:
    (5,2): 2.56+-0.10, 0.26+-0.025, 0.003+-0.002; (10,3): 3.79+-0.12, 0.52+-0.04, 0.009+-0.004;
    (20,5): 6.38+-0.16, 1.42+-0.06, 0.051+-0.009 (chi^2/2k = 0.043). Each step asks for a
    margin of 5 SE (observed: 10 SE or more); a missing log k would make the gaps negative.
    """
    model, x = make_linear_gaussian(D, k, examples=50, seed=D, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    repeats = 20
    x = x.repeat(repeats, 1)
    log_px = model.log_marginal(x)
    gap, se = {}, {}
    for samples in (1, 10, 1000):
        diff = log_px - importance_sampled_log_likelihood(model, x, samples, seed=16).log_likelihood
        gap[samples], se[samples] = float(diff.mean()), standard_error(diff)
    kl = float(model.kl_to_posterior(x).mean())
    assert abs(gap[1] - kl) < 5 * se[1]
    assert gap[1] - gap[10] > 5 * math.hypot(se[1], se[10])
    assert gap[10] - gap[1000] > 5 * math.hypot(se[10], se[1000])
    assert gap[1000] > -5 * se[1000]  # L_k is a lower bound in expectation
    assert gap[1000] < float(model.chi_square(x[:1])) / 1000 + 5 * se[1000]


@pytest.mark.parametrize(("D", "k"), DIMS)
def test_elbo_below_iwae_and_iwae_increasing_in_k(D: int, k: int) -> None:
    """Means over 50 examples x 80 repeats: ELBO <= L_5 < L_50 < L_500 <= log p(x), L_1 ~ ELBO.

    Compared through the per-row gaps log p(x) - L_k (the spread of log p(x) over examples
    cancels). Observed gaps with 40 repeats (k = 1, 5, 50, 500): (5,2) 2.63, 0.57, 0.053, 0.003;
    (10,3) 3.97, 1.12, 0.117, 0.014; (20,5) 6.58, 2.42, 0.515, 0.093. The tightest step,
    (5,2) k = 50 -> 500, is ~chi^2 (1/100 - 1/1000) = 0.045 nats against an SE of 0.0076 with 40
    repeats (it fell below 5 SE for 3 of 8 other seeds); with 80 repeats it is ~8 SE, and the
    steps must exceed 4 SE. Other comparisons use 5 SE.
    """
    model, x = make_linear_gaussian(D, k, examples=50, seed=D, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    repeats = 80
    x = x.repeat(repeats, 1)
    log_px = model.log_marginal(x)
    kl = float(model.kl_to_posterior(x).mean())
    gap, gap_se = {}, {}
    for samples in (1, 5, 50, 500):
        estimate = importance_sampled_log_likelihood(model, x, samples, seed=17)
        diff = log_px - estimate.log_likelihood
        gap[samples], gap_se[samples] = float(diff.mean()), standard_error(diff)
        # The estimate's ELBO is estimator B over the same k draws: unbiased for the true ELBO.
        elbo_gap = log_px - estimate.elbo
        assert abs(float(elbo_gap.mean()) - kl) < 5 * standard_error(elbo_gap)
        if samples > 1:  # ELBO <= L_k, paired per row
            excess = estimate.log_likelihood - estimate.elbo
            assert float(excess.mean()) > 5 * standard_error(excess)
    assert abs(gap[1] - kl) < 5 * gap_se[1]  # L_1 = ELBO in expectation
    for smaller, larger in [(1, 5), (5, 50), (50, 500)]:
        assert gap[smaller] - gap[larger] > 4 * math.hypot(gap_se[larger], gap_se[smaller])
    assert gap[500] > -5 * gap_se[500]


class ChunkRecorder(nn.Module):
    """Wraps a model and records the (samples, examples) of every decoder call."""

    def __init__(self, model: LinearGaussianModel) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, int]] = []

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(x)

    def decoder_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.calls.append((z.shape[0], z.shape[1]))
        return self.model.decoder_log_prob(x, z)


@pytest.mark.parametrize(("D", "k"), DIMS)
def test_chunked_estimate_agrees_with_single_chunk(D: int, k: int) -> None:
    """k = 1000 split into 64-sample chunks (15 x 64 + 40) gives L_k within the same tolerance of
    log p(x) as one chunk (draws differ, so both are compared with the exact value)."""
    model, x = make_linear_gaussian(D, k, examples=6, seed=D, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    log_px = model.log_marginal(x)
    samples = 1000
    chi2 = model.chi_square(x)
    tolerance = 6 * (chi2 / samples).sqrt() + chi2 / (2 * samples)
    recorder = ChunkRecorder(model)
    chunked = importance_sampled_log_likelihood(recorder, x, samples, max_pairs=64, seed=18)
    assert recorder.calls == ([(64, 1)] * 15 + [(40, 1)]) * 6
    whole = importance_sampled_log_likelihood(model, x, samples, seed=19)
    assert ((chunked.log_likelihood - log_px).abs() < tolerance).all()
    assert ((whole.log_likelihood - log_px).abs() < tolerance).all()
    assert float((chunked.log_likelihood - whole.log_likelihood).abs().max()) < float(tolerance.max())
    # The ELBO field averages log p(x|z) over all k draws of all chunks: 5 SE of log p(x) - KL.
    mu, log_var = model.encode(x)
    spread = model.decoder_log_prob(x, reparameterize(mu, log_var, samples, generator(26))).std(0)
    expected_elbo = log_px - model.kl_to_posterior(x)
    assert ((chunked.elbo - expected_elbo).abs() < 5 * spread / math.sqrt(samples)).all()
    assert ((whole.elbo - expected_elbo).abs() < 5 * spread / math.sqrt(samples)).all()


@pytest.mark.parametrize(("D", "k"), DIMS)
def test_chunked_iwae_spread_matches_delta_method(D: int, k: int) -> None:
    """Over 200 examples, L_1000 (7 x 128 + 104 samples) - log p(x) has sd sqrt(chi^2/k) and mean
    ~ -chi^2/(2k). Observed sd ratios 1.00, 1.04, 0.90; a chunking that lost samples would
    inflate the spread (all but the last chunk lost: 5x) and bias the mean by log(k/k_used)."""
    model, x = make_linear_gaussian(D, k, examples=200, seed=D + 1, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    samples = 1000
    estimate = importance_sampled_log_likelihood(model, x, samples, max_pairs=128, seed=25)
    diff = estimate.log_likelihood - model.log_marginal(x)
    sd = float(model.chi_square(x[:1]).div(samples).sqrt())
    assert 0.75 < float(diff.std()) / sd < 1.25
    assert abs(float(diff.mean())) < 5 * sd / math.sqrt(len(diff)) + sd**2


@pytest.mark.parametrize("max_pairs", [1, 7, 64, 99, 250, 300, 10**6])
def test_chunking_with_exact_posterior_is_exact(max_pairs: int) -> None:
    """Constant weights make L_k deterministic, so any chunking must give log p(x) per example."""
    model, x = make_linear_gaussian(10, 3, examples=8, seed=20)
    samples = 100
    recorder = ChunkRecorder(model)
    finished: list[int] = []
    estimate = importance_sampled_log_likelihood(recorder, x, samples, max_pairs=max_pairs,
                                                 seed=21, on_chunk=finished.append)
    torch.testing.assert_close(estimate.log_likelihood, model.log_marginal(x), rtol=0, atol=1e-6)
    assert estimate.log_likelihood.shape == estimate.elbo.shape == (8,)
    assert sum(finished) == 8
    assert all(s * e <= max_pairs for s, e in recorder.calls)
    assert sum(s * e for s, e in recorder.calls) == samples * 8


def test_importance_sampled_log_likelihood_is_reproducible_with_a_generator() -> None:
    model, x = make_linear_gaussian(5, 2, examples=4, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    first = importance_sampled_log_likelihood(model, x, 10, seed=22)
    again = importance_sampled_log_likelihood(model, x, 10, seed=22)
    other = importance_sampled_log_likelihood(model, x, 10, seed=23)
    assert torch.equal(first.log_likelihood, again.log_likelihood)
    assert torch.equal(first.elbo, again.elbo)
    assert not torch.equal(first.log_likelihood, other.log_likelihood)


@pytest.mark.parametrize(
    ("examples", "samples", "max_pairs", "expected"),
    [
        (100, 10, 64, (6, 10)),       # k fits: whole examples, all k samples
        (3, 10, 64, (3, 10)),         # never more examples than there are
        (100, 64, 64, (1, 64)),       # exactly one example fits
        (100, 1000, 64, (1, 64)),     # k > max_pairs: one example, k split up
        (100, 65, 64, (1, 64)),
        (5, 1, 1, (1, 1)),
        (5, 3, 0, (1, 1)),            # a max_pairs below 1 is treated as 1
    ],
)
def test_chunk_shape_cases(examples: int, samples: int, max_pairs: int, expected: tuple[int, int]) -> None:
    assert chunk_shape(examples, samples, max_pairs) == expected


def test_chunk_shape_never_exceeds_max_pairs_nor_returns_zero() -> None:
    for examples in (1, 2, 7, 100):
        for samples in (1, 2, 5, 63, 64, 65, 1000):
            for max_pairs in (1, 2, 10, 64, 5000):
                n_examples, n_samples = chunk_shape(examples, samples, max_pairs)
                assert 1 <= n_examples <= examples
                assert 1 <= n_samples <= samples
                assert n_examples * n_samples <= max_pairs
                if samples <= max_pairs:  # whole examples fit: use as many as fit
                    assert n_samples == samples
                    assert n_examples == min(examples, max_pairs // samples)


@pytest.mark.parametrize("samples", [0, -1])
def test_importance_sampled_log_likelihood_rejects_non_positive_k(samples: int) -> None:
    model, x = make_linear_gaussian(5, 2, examples=3)
    with pytest.raises(ValueError, match="importance_samples"):
        importance_sampled_log_likelihood(model, x, samples)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5)])
def test_importance_sampled_log_likelihood_rejects_non_2d_x(shape: tuple[int, ...]) -> None:
    model, _ = make_linear_gaussian(5, 2, examples=3)
    with pytest.raises(ValueError, match="expected"):
        importance_sampled_log_likelihood(model, torch.zeros(shape, dtype=DTYPE), 5)


# --------------------------------------------------------------------------------------------
# The IWAE training objective L_k
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("D", "k"), DIMS)
def test_iwae_bound_with_exact_posterior_is_log_marginal(D: int, k: int) -> None:
    """q = p(z|x) makes every weight p(x): L_k = log p(x) exactly, for any k and any draw."""
    model, x = make_linear_gaussian(D, k, examples=8, seed=D)
    for samples in (1, 2, 7, 50):
        actual = iwae_bound(model, x, samples, generator(30 + samples))
        assert actual.shape == (8,)
        torch.testing.assert_close(actual, model.log_marginal(x), rtol=0, atol=1e-5)


def test_iwae_bound_with_one_sample_is_estimator_a() -> None:
    """L_1 = log p(x|z) + log p(z) - log q(z|x) at z = mu + sigma * eps, the eps of the same generator."""
    model, x = make_linear_gaussian(10, 3, examples=6, seed=3, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    mu, log_var = model.encode(x)
    eps = torch.randn((1, *mu.shape), generator=generator(31), dtype=DTYPE)
    z = mu + torch.exp(0.5 * log_var) * eps
    expected = (model.decoder_log_prob(x, z) + standard_normal_log_prob(z) - gaussian_log_prob(z, mu, log_var))[0]
    torch.testing.assert_close(iwae_bound(model, x, 1, generator(31)), expected, rtol=0, atol=1e-10)


def test_iwae_bound_increases_with_k_towards_log_marginal() -> None:
    """Means of log p(x) - L_k over 50 examples x 40 repeats: KL(q || p(z|x)) at k = 1 (the ELBO),
    then smaller for k = 5 and k = 50, never below 0. Observed gaps (k = 1, 5, 50) on the (10, 3)
    model: 3.70, 1.02, 0.13 nats with SEs of 0.09, 0.04, 0.01 (KL 3.84); the comparisons ask for 5 SE."""
    model, x = make_linear_gaussian(10, 3, examples=50, seed=10, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    x = x.repeat(40, 1)
    log_px = model.log_marginal(x)
    g = generator(32)
    gap, se = {}, {}
    for samples in (1, 5, 50):
        diff = log_px - iwae_bound(model, x, samples, g)
        gap[samples], se[samples] = float(diff.mean()), standard_error(diff)
    assert abs(gap[1] - float(model.kl_to_posterior(x).mean())) < 5 * se[1]  # E[L_1] = ELBO
    assert gap[1] - gap[5] > 5 * math.hypot(se[1], se[5])
    assert gap[5] - gap[50] > 5 * math.hypot(se[5], se[50])
    assert gap[50] > -5 * se[50]


@pytest.mark.parametrize("samples", [0, -3])
def test_iwae_bound_rejects_non_positive_k(samples: int) -> None:
    model, x = make_linear_gaussian(5, 2, examples=3)
    with pytest.raises(ValueError, match="importance_samples"):
        iwae_bound(model, x, samples)


def test_iwae_bound_gradients_reach_every_parameter_of_a_vae() -> None:
    """The noise is reparameterized: the encoder gets a gradient through every z_i, the decoder
    through log p(x|z_i); the bound is differentiable and its gradient is finite."""
    from vae.model import VAE

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = VAE(input_dim=30, hidden_dim=16, latent_dim=3)
    x = (torch.rand(8, 30, generator=generator(33)) < 0.4).float()
    bound = iwae_bound(model, x, 5, generator(34))
    assert bound.shape == (8,) and bound.requires_grad
    (-bound.mean()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert float(parameter.grad.abs().max()) > 0, name
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {
        "encoder", "encoder_mean", "encoder_log_var", "decoder"}


# --------------------------------------------------------------------------------------------
# Active units
# --------------------------------------------------------------------------------------------


def test_active_units_counts_dimensions_above_threshold() -> None:
    """Columns standardised to population variance 1, then scaled to variances [0, 0.05, 1, 1e-3]."""
    base = torch.randn(1000, 4, generator=generator(24), dtype=DTYPE)
    base = (base - base.mean(0)) / base.std(0, unbiased=False)
    variances = torch.tensor([0.0, 0.05, 1.0, 1e-3], dtype=DTYPE)
    mu = 3.0 + base * variances.sqrt()  # an offset does not change the variance
    count, per_unit = active_units(mu)
    assert count == 2
    torch.testing.assert_close(per_unit, variances, rtol=1e-9, atol=1e-12)
    assert active_units(mu, threshold=1e-4)[0] == 3
    assert active_units(mu, threshold=2.0)[0] == 0
