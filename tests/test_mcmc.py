"""Tests of vae/mcmc.py against closed forms.

HMC, AIS, BDMC and AEVB's Appendix D estimator are checked on the linear-Gaussian model
(probabilistic PCA, tests/support.py), whose posterior p(z|x) and marginal log p(x) are known
exactly, so each statistical check compares an estimate with the truth and allows a stated
multiple of a standard error computed in the test from independent replicates (chains or
examples), plus, where an estimator has a known bias, a stated allowance for it. The closed-form
gradient of :class:`vae.model.VAE` is checked against autograd; the ordering ELBO <= L_k <= AIS is
checked on a small VAE trained in the test. Every run is seeded, so the file is deterministic.

Units: log-likelihoods and their errors are nats per example; "error" is estimate - exact.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from support import (
    DTYPE,
    LinearGaussianModel,
    binary_images,
    generator,
    make_linear_gaussian,
    one_thread,
    small_model,
)
from vae import mcmc
from vae.mcmc import GradientError
from vae.model import VAE
from vae.objectives import LOG_2PI, elbo, importance_sampled_log_likelihood

# (data dimension D, latent dimension k) of the linear-Gaussian models for AIS and BDMC.
DIMS = [(5, 2), (10, 3), (20, 5)]
# The deliberately wrong encoder q(z|x) (initial="encoder"): its mean moved by 1.5 posterior
# standard deviations in every latent dimension, its variance doubled.
WRONG_SHIFT, WRONG_INFLATE = 1.5, 2.0
TEMPERATURES = (10, 100, 1000)
BDMC_EXAMPLES = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tensors are small, so a second thread only adds contention."""
    with one_thread():
        yield


def standard_error(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Standard error of the mean along ``dim``: std / sqrt(n), from n independent replicates."""
    return values.std(dim) / math.sqrt(values.shape[dim])


def assert_close(found: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """|found - expected| <= tolerance * (|expected| + 1) elementwise, shapes equal (torch.testing's
    assert_close costs ~2.5 s of imports on first use)."""
    assert found.shape == expected.shape, (found.shape, expected.shape)
    error = float(((found - expected).abs() / (expected.abs() + 1)).max())
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance}"


def rms(values: torch.Tensor) -> float:
    """Root mean square: for errors, sqrt(bias^2 + variance) estimated over the examples."""
    return float(values.pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class LinearGaussianWithGradient(LinearGaussianModel):
    """:class:`support.LinearGaussianModel` with log p(x|z) and its gradient in closed form,
    grad_z log N(x; W z + b, sigma^2 I) = W^T (x - W z - b) / sigma^2, so that HMC and AIS take
    the path they take for a VAE (``decoder_log_prob_and_grad``); every run below checks it
    against autograd first (``gradient_check``, :func:`vae.mcmc.check_gradient`).

    Shapes: x (n, D), z (..., n, k) -> ((..., n), (..., n, k)); nats.
    """

    def decoder_log_prob_and_grad(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = (x - (z @ self.W_t + self.b)) / self.sigma
        value = (-0.5 * residual**2 - math.log(self.sigma) - 0.5 * LOG_2PI).sum(-1)
        return value, (residual / self.sigma) @ self.W


def linear_gaussian(D: int, k: int, *, sigma: float = 0.5, shift: float = 0.0, inflate: float = 1.0,
                    seed: int = 0) -> LinearGaussianWithGradient:
    """The W and b of :func:`support.make_linear_gaussian` with noise ``sigma`` (float64)."""
    base, _ = make_linear_gaussian(D, k, 1, seed=seed)
    return LinearGaussianWithGradient(base.W, base.b, sigma, shift, inflate)


class SignFlippedGradientVAE(VAE):
    """A VAE whose closed-form gradient of log p(x|z) has the wrong sign (its value is right)."""

    def decoder_log_prob_and_grad(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, grad = super().decoder_log_prob_and_grad(x, z)
        return value, -grad


class DecoderOnly:
    """A :class:`vae.mcmc.DecoderModel` without an encoder: a linear-Gaussian decoder."""

    def __init__(self, model: LinearGaussianModel) -> None:
        self.model, self.latent_dim = model, model.latent_dim

    def decoder_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.model.decoder_log_prob(x, z)


# --------------------------------------------------------------------------------------------
# The closed-form gradient of the VAE's decoder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_layers", [1, 2])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("z_shape", [(5, 3), (4, 5, 3)], ids=["z-2d", "z-3d"])
def test_decoder_log_prob_and_grad_equals_autograd(likelihood: str, hidden_layers: int,
                                                   z_shape: tuple[int, ...]) -> None:
    """VAE.decoder_log_prob_and_grad against autograd of decoder_log_prob, float64: x (5, 20),
    z (5, 3) or (4, 5, 3). Float64 rounding is ~1e-16 relative; 1e-10 leaves six orders of
    magnitude for a different summation order, while a wrong term errs by O(1)."""
    model = small_model(input_dim=20, hidden_dim=8, latent_dim=3, hidden_layers=hidden_layers,
                        likelihood=likelihood, dtype=DTYPE, weight_scale=2.0)
    g = generator(7)
    if likelihood == "bernoulli":
        x = binary_images(5, input_dim=20, seed=7, dtype=DTYPE)
    else:
        x = torch.rand(5, 20, generator=g, dtype=DTYPE)
    z = torch.randn(z_shape, generator=g, dtype=DTYPE)
    value, grad = model.decoder_log_prob_and_grad(x, z)
    z_leaf = z.clone().requires_grad_(True)
    reference = model.decoder_log_prob(x, z_leaf)
    (reference_grad,) = torch.autograd.grad(reference.sum(), z_leaf)
    assert value.shape == z_shape[:-1] and grad.shape == z_shape
    assert_close(value, reference.detach(), 1e-10)
    assert_close(grad, reference_grad, 1e-10)
    assert float(grad.abs().max()) > 0.1  # the comparison is not between two near-zero tensors
    mcmc.check_gradient(model, x, z)  # and the check the samplers run passes


def test_check_gradient_names_a_wrong_gradient() -> None:
    model = SignFlippedGradientVAE(20, 8, 3).double()
    x = binary_images(5, input_dim=20, dtype=DTYPE)
    z = torch.randn(2, 5, 3, generator=generator(0), dtype=DTYPE)
    with pytest.raises(GradientError, match=r"SignFlippedGradientVAE.*grad_z log p\(x\|z\) disagrees with autograd"):
        mcmc.check_gradient(model, x, z)


@pytest.mark.parametrize("initial", mcmc.INITIALS)
def test_annealed_density_and_its_gradient_match_autograd(initial: str) -> None:
    """Along the AIS path, log f_b(z) = (1 - b) log p0(z) + b log p(x, z) and its gradient
    (:class:`vae.mcmc.Point`) against an independent reference (torch.distributions.Normal) and
    its autograd gradient, for p0 the prior and a Gaussian q(z|x); z (3, 4, 2), float64. A wrong
    gradient here leaves HMC valid but slow (the Metropolis test corrects it), so accuracy
    checks alone would not see it."""
    model = linear_gaussian(6, 2, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    x, _ = mcmc.simulate(model, 4, seed=2)
    mean, log_var = model.encode(x) if initial == "encoder" else (None, None)
    z = torch.randn(3, 4, 2, generator=generator(3), dtype=DTYPE)
    point = mcmc.Path(model, x, mean, log_var).point(z)
    z_leaf = z.clone().requires_grad_(True)
    standard = torch.distributions.Normal(torch.zeros((), dtype=DTYPE), torch.ones((), dtype=DTYPE))
    log_joint = standard.log_prob(z_leaf).sum(-1) + model.decoder_log_prob(x, z_leaf)
    if initial == "encoder":
        log_initial = torch.distributions.Normal(mean, (0.5 * log_var).exp()).log_prob(z_leaf).sum(-1)
    else:
        log_initial = standard.log_prob(z_leaf).sum(-1)
    assert_close(point.log_ratio(), (log_joint - log_initial).detach(), 1e-12)
    for beta in (0.0, 0.3, 1.0):
        reference = (1 - beta) * log_initial + beta * log_joint
        (reference_grad,) = torch.autograd.grad(reference.sum(), z_leaf, retain_graph=True)
        assert_close(point.log_target(beta), reference.detach(), 1e-12)
        assert_close(point.grad_log_target(beta), reference_grad, 1e-12)


# --------------------------------------------------------------------------------------------
# HMC on the exact Gaussian posterior
# --------------------------------------------------------------------------------------------

# sigma = 0.1: the posterior standard deviations sigma / sqrt(s^2 + sigma^2) are 0.05 to 0.18
# (s in [0.5, 2], the scales of W's columns), so the adapted step sizes (about 0.05 to 0.15)
# stay below the cap STEP_SIZE_MAX = 0.5: the acceptance rate is set by the adaptation, not the cap.
HMC_SIGMA = 0.1
# The adaptation's bias. The rule moves a chain's step size up when the moving average of its
# acceptances (slowness 0.9, a window of ~10 steps) is above the target and down otherwise, so
# its fixed point is where that average exceeds the target half of the time: for a fixed
# acceptance probability p the average's median, not p, equals the target, which puts p at
# 0.646 for 0.65 and 0.892 for 0.9 (a simulation of the moving average). The step sizes also
# keep moving by 5 % a step until burn-in ends, so the chains end it spread (log step size
# s.d. 0.2 at 0.65, 0.3 at 0.9), and near 0.9 the acceptance is concave in the step size, which
# lowers the mean further (measured over 4 seeds: 0.63 to 0.68 for 0.65, 0.873 to 0.894 for
# 0.9). 0.05 covers both; an adaptation that fails (stuck at the first step size: acceptance
# near 1) misses by 0.1 or more.
ACCEPTANCE_BIAS = 0.05


@pytest.mark.parametrize("target", [0.65, 0.9])
def test_hmc_samples_the_exact_posterior_at_its_target_acceptance(target: float) -> None:
    """hmc_sample's draws z (samples, chains, N, k) have the exact posterior's mean and
    covariance, and its acceptance rate reaches ``target``.

    The draws are standardised by the exact posterior, u = (z - mean) / sd, which is N(0, I)
    for every example; each chain's mean of u and its second moments about the exact mean are
    one independent replicate (the chains share no noise), so the standard errors are the
    spread over the replicates: 16 chains x 8 examples pooled (4 s.e., normal), and per example
    16 chains (5 s.e.: Student's t with 15 degrees of freedom exceeds 5 with probability 2e-4).
    """
    model = linear_gaussian(10, 3, sigma=HMC_SIGMA)
    x, _ = mcmc.simulate(model, 8, seed=1)
    chains = 16
    draws = mcmc.hmc_sample(model, x, 200, chains=chains, target_acceptance=target, seed=0)
    assert draws.z.shape == (200, chains, 8, 3)
    mean, var = model.posterior(x)
    u = (draws.z - mean) / var.sqrt()
    chain_mean = u.mean(0)  # (C, N, k), 0 in expectation
    chain_moment = torch.einsum("scni,scnj->cnij", u, u) / len(u)  # (C, N, k, k), I in expectation
    identity = torch.eye(3, dtype=DTYPE)
    for replicates, expected in ((chain_mean, 0.0), (chain_moment, identity)):
        pooled = replicates.flatten(0, 1)
        assert ((pooled.mean(0) - expected).abs() <= 4 * standard_error(pooled)).all()
        assert ((replicates.mean(0) - expected).abs() <= 5 * standard_error(replicates)).all()
    # The cap did not bind and the step sizes did adapt (they start at STEP_SIZE = 0.01).
    assert float(draws.step_size.max()) < mcmc.STEP_SIZE_MAX
    assert float(draws.step_size.median()) > 3 * mcmc.STEP_SIZE
    # The 8 examples' acceptance rates (each over 16 chains x 200 steps) are independent replicates.
    rate = draws.acceptance_rate
    assert abs(float(rate.mean()) - target) <= ACCEPTANCE_BIAS + 3 * float(standard_error(rate))


def wrong_gradient_models() -> tuple[VAE, SignFlippedGradientVAE, torch.Tensor]:
    """A float64 VAE (64-16-2, weights x 3: a posterior much narrower than the prior), the same
    weights with a sign-flipped gradient, and 8 images simulated from it (8, 64)."""
    right = small_model(input_dim=64, hidden_dim=16, latent_dim=2, dtype=DTYPE, weight_scale=3.0)
    wrong = SignFlippedGradientVAE(64, 16, 2).double()
    wrong.load_state_dict(right.state_dict())
    x, _ = mcmc.simulate(right, 8, seed=0)
    return right, wrong, x


def test_a_wrong_gradient_stops_hmc_and_ais() -> None:
    right, wrong, x = wrong_gradient_models()
    with pytest.raises(GradientError, match="disagrees with autograd"):
        mcmc.hmc_sample(wrong, x, 5)
    with pytest.raises(GradientError, match="disagrees with autograd"):
        mcmc.ais(wrong, x, 5)
    with pytest.raises(GradientError, match="disagrees with autograd"):
        mcmc.bdmc(wrong, 2, 5)
    mcmc.hmc_sample(right, x, 5)  # the same weights with the right gradient pass the check
    mcmc.ais(right, x, 5)


def test_an_unchecked_wrong_gradient_shows_in_step_size_and_acceptance() -> None:
    """With ``gradient_check=False`` the sign-flipped gradient still cannot go unnoticed: the
    adapted step size collapses (measured: 0.29 with the right gradient, 0.005 with the wrong
    one), and at the step size the right gradient adapts to, the acceptance collapses (0.74 with
    the right gradient, 0.01 with the wrong one). Thresholds: a tenfold smaller step size, an
    acceptance below 0.1 against above 0.4."""
    right, wrong, x = wrong_gradient_models()
    adapted = mcmc.hmc_sample(right, x, 20, chains=4)
    unchecked = mcmc.hmc_sample(wrong, x, 20, chains=4, gradient_check=False)
    assert float(unchecked.step_size.median()) < float(adapted.step_size.median()) / 10
    step = float(adapted.step_size.median())
    at_step = {name: mcmc.hmc_sample(model, x, 20, chains=4, adapt=False, step_size=step, gradient_check=False)
               for name, model in (("right", right), ("wrong", wrong))}
    assert float(at_step["right"].acceptance_rate.mean()) > 0.4
    assert float(at_step["wrong"].acceptance_rate.mean()) < 0.1


# --------------------------------------------------------------------------------------------
# AIS and BDMC on the linear-Gaussian model
# --------------------------------------------------------------------------------------------

# At T = 1000 (Wu et al.'s defaults otherwise: 16 chains, 10 leapfrog steps) AIS is required to
# be within 0.05 nats per example of log p(x) on average (up to 3 s.e. of the 16-example mean)
# and within 0.25 nats root-mean-square per example; BDMC's mean gap within 0.1 nats (+3 s.e.).
# These are accuracy requirements, not fits to this seed (measured here, over the 6 models:
# |mean error| <= 0.045 with s.e. 0.01 to 0.04, RMS <= 0.14, |mean gap| <= 0.07; with two other
# seeds for the models and the chains every check in this section passes too).
AIS_MEAN_TOLERANCE, AIS_RMS_TOLERANCE, BDMC_GAP_TOLERANCE = 0.05, 0.25, 0.1


@functools.cache
def bdmc_runs(D: int, k: int, initial: str) -> dict[int, mcmc.BDMCBounds]:
    """mcmc.bdmc on 16 examples simulated from a (D, k) model, at each of TEMPERATURES; for
    initial="encoder" the model's q(z|x) is the wrong one (WRONG_SHIFT, WRONG_INFLATE). The
    forward runs are AIS on data from the model; computed once for the AIS and BDMC tests."""
    model = linear_gaussian(D, k, shift=WRONG_SHIFT, inflate=WRONG_INFLATE)
    return {T: mcmc.bdmc(model, BDMC_EXAMPLES, T, initial=initial, seed=0) for T in TEMPERATURES}


def bdmc_errors(D: int, k: int, initial: str, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower - exact, upper - exact) per example (16,), nats."""
    bounds = bdmc_runs(D, k, initial)[T]
    exact = linear_gaussian(D, k).log_marginal(bounds.x)
    return bounds.lower.double() - exact, bounds.upper.double() - exact


@pytest.mark.parametrize("initial", mcmc.INITIALS)
@pytest.mark.parametrize(("D", "k"), DIMS)
def test_ais_is_a_lower_bound_whose_error_shrinks_with_temperatures(D: int, k: int, initial: str) -> None:
    """Forward AIS: E[Z-hat] = p(x), so E[log Z-hat] <= log p(x) (Jensen); the mean error over
    the examples is at most 3 s.e. above 0 at every T. Its root-mean-square error decreases
    from T = 10 to 100 to 1000 (measured over 3 seeds: by a factor 2 or more at each step),
    down to the tolerances at T = 1000."""
    errors = [bdmc_errors(D, k, initial, T)[0] for T in TEMPERATURES]
    for error in errors:
        assert float(error.mean()) <= 3 * float(standard_error(error))
    spreads = [rms(error) for error in errors]
    assert spreads[0] > spreads[1] > spreads[2]
    final = errors[-1]
    assert abs(float(final.mean())) <= AIS_MEAN_TOLERANCE + 3 * float(standard_error(final))
    assert spreads[-1] <= AIS_RMS_TOLERANCE


@pytest.mark.parametrize("initial", mcmc.INITIALS)
@pytest.mark.parametrize(("D", "k"), DIMS)
def test_bdmc_bounds_bracket_the_exact_log_likelihood(D: int, k: int, initial: str) -> None:
    """BDMC (Grosse et al. 2015): mean lower <= exact <= mean upper at every T (each up to
    3 s.e. over the 16 examples); the gap shrinks with T: its RMS per example decreases at each
    step (measured: by a factor 2 or more), its mean falls from T = 10 to T = 1000 by more than
    2 s.e. of the difference (measured: 2.7 s.e. or more over 3 seeds; the gap at T = 10 is
    heavy-tailed, hence its large s.e.), and at T = 1000 it is within BDMC_GAP_TOLERANCE
    (+3 s.e.; noise can make it negative)."""
    gap_rms = []
    for T in TEMPERATURES:
        lower, upper = bdmc_errors(D, k, initial, T)
        assert float(lower.mean()) <= 3 * float(standard_error(lower))
        assert float(upper.mean()) >= -3 * float(standard_error(upper))
        gap_rms.append(rms(upper - lower))
    assert gap_rms[0] > gap_rms[1] > gap_rms[2]
    first, last = bdmc_runs(D, k, initial)[TEMPERATURES[0]], bdmc_runs(D, k, initial)[TEMPERATURES[-1]]
    assert first.gap - last.gap > 2 * math.hypot(first.gap_stderr, last.gap_stderr)
    assert abs(last.gap) <= BDMC_GAP_TOLERANCE + 3 * last.gap_stderr


def test_bdmc_runs_on_a_float64_vae() -> None:
    """simulate draws z in the model's dtype, so BDMC runs on a float64 VAE (float32 z failed)."""
    model = small_model(input_dim=16, hidden_dim=8, latent_dim=2, dtype=DTYPE)
    x, z = mcmc.simulate(model, 3)
    assert x.dtype == z.dtype == DTYPE
    bounds = mcmc.bdmc(model, 3, 5, chains=2)
    assert bounds.lower.dtype == bounds.upper.dtype == DTYPE
    assert bool(torch.isfinite(bounds.lower).all() and torch.isfinite(bounds.upper).all())


# --------------------------------------------------------------------------------------------
# AEVB Appendix D
# --------------------------------------------------------------------------------------------

# The estimator is biased: -log of a mean of L = 50 ratios q/p(x, z) is a stochastic upper
# bound (Jensen), and q is fitted to correlated HMC samples. mcmc's docstring states a mean
# error of 0.02 nats or less with the defaults; the mean over 40 examples may be off by that
# plus 4 s.e. (measured: +0.011 +- 0.006 for N_z = 2, +0.007 +- 0.012 for 3; -0.028 to +0.016
# with 3 other seeds). One example's estimate may be off by at most 0.5 nats (measured: 0.21
# here, up to 0.41 with the other seeds), else it would not separate models a nat apart.
APPENDIX_D_BIAS, APPENDIX_D_MAX_ERROR = 0.02, 0.5


@pytest.mark.parametrize("latent_dim", [2, 3])
def test_appendix_d_is_close_to_the_exact_log_likelihood(latent_dim: int) -> None:
    """appendix_d_log_likelihood with its defaults on 40 examples of a (10, latent_dim)
    linear-Gaussian model (support.LinearGaussianModel: its gradient by autograd)."""
    model, x = make_linear_gaussian(10, latent_dim, 40)
    estimate = mcmc.appendix_d_log_likelihood(model, x)
    error = estimate.log_likelihood.double() - model.log_marginal(x)
    assert estimate.mean_and_stderr()[0] == pytest.approx(float(estimate.log_likelihood.double().mean()))
    assert abs(float(error.mean())) <= APPENDIX_D_BIAS + 4 * float(standard_error(error))
    assert float(error.abs().max()) <= APPENDIX_D_MAX_ERROR
    assert estimate.acceptance_rate.shape == (40,)


def test_appendix_d_refuses_five_latent_dimensions() -> None:
    """App. D: reliable only for fewer than 5 latent dimensions; 4 runs, 5 is refused."""
    model, x = make_linear_gaussian(10, 4, 2)
    assert mcmc.appendix_d_log_likelihood(model, x, samples=10, chains=10).log_likelihood.shape == (2,)
    model, x = make_linear_gaussian(10, 5, 2)
    with pytest.raises(ValueError, match=r"latent_dim = 5: AEVB's Appendix D estimator .* fewer than 5"):
        mcmc.appendix_d_log_likelihood(model, x)


# --------------------------------------------------------------------------------------------
# A trained model: ELBO <= L_k <= AIS
# --------------------------------------------------------------------------------------------

TRAINED_T = 250  # AIS at T and 4T


@functools.cache
def trained_vae() -> tuple[VAE, torch.Tensor]:
    """A VAE(64, 32, 4) trained for 300 full-batch Adam steps (lr 0.01) on the single-sample ELBO
    of 512 binary images (512, 64) from 16 prototypes (a prototype's pixels are 1 with
    probability 0.9, the others 0.1: images with latent structure, so the trained posterior is
    not the prior); returns it in eval mode and 16 fresh images (16, 64), one per prototype."""
    prototypes = (torch.rand(16, 64, generator=generator(0)) < 0.5).float()
    images = torch.cat([binary_images(32, input_dim=64, seed=10 + c, probability=0.1 + 0.8 * prototypes[c])
                        for c in range(16)])
    test = torch.cat([binary_images(1, input_dim=64, seed=1000 + c, probability=0.1 + 0.8 * prototypes[c])
                      for c in range(16)])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = VAE(64, 32, 4)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            optimizer.zero_grad()
            (-elbo(model, images).mean()).backward()
            optimizer.step()
    return model.eval(), test


@functools.cache
def trained_ais(temperatures: int) -> torch.Tensor:
    """AIS (defaults: 16 chains, prior start) of the trained model's 16 test images, (16,) nats."""
    model, test = trained_vae()
    return mcmc.ais(model, test, temperatures).log_likelihood.double()


def test_trained_model_elbo_below_importance_sampled_below_ais() -> None:
    """Averaged over the 16 images: ELBO < L_10 < AIS at 4T = 1000, and AIS not below L_1000 by
    more than 3 paired s.e. (both bound log p(x) from below; measured AIS - L_1000 = +0.2 +-
    0.08). L_10 - ELBO must be more than 2 s.e. above 0: training made the posterior differ from
    q(z|x) (measured 0.83 +- 0.23 nats; 3.6 to 5 s.e. over 4 training seeds); AIS - L_10 is
    required positive (measured 1.0 +- 0.27; 0.34 to 1.0 nats, always positive, over 4 seeds).
    The ELBO is estimator B averaged over the same 1000 samples as L_1000 (its ``elbo``)."""
    model, test = trained_vae()
    with torch.no_grad():
        estimate = importance_sampled_log_likelihood(model, test, 1000, seed=0, curve=(10,))
    bound, l_10, l_1000 = (t.double() for t in (estimate.elbo, estimate.curve[10], estimate.log_likelihood))
    annealed = trained_ais(4 * TRAINED_T)
    assert float(bound.mean()) < float(l_10.mean()) < float(annealed.mean())
    assert float((l_10 - bound).mean()) > 2 * float(standard_error(l_10 - bound))
    difference = annealed - l_1000
    assert float(difference.mean()) >= -3 * float(standard_error(difference))


def test_trained_model_ais_at_t_and_4t_agree() -> None:
    """AIS at T = 250 and 4T = 1000 agree within 3 paired s.e. over the 16 images (measured
    difference -0.04 +- 0.14 nats; -0.02 to +0.22 over 4 training seeds), and that s.e. is below
    0.25 nats, so the check has power."""
    difference = trained_ais(4 * TRAINED_T) - trained_ais(TRAINED_T)
    stderr = float(standard_error(difference))
    assert abs(float(difference.mean())) <= 3 * stderr
    assert stderr < 0.25


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def determinism_model() -> tuple[VAE, torch.Tensor]:
    """A float64 VAE (64-16-3, weights x 2) and 6 binary images (6, 64): in float64 a rounding
    difference (~1e-16) flips a Metropolis decision with probability ~1e-16, so chunking may
    change results by rounding only (1e-9 allows for its accumulation over the steps)."""
    model = small_model(input_dim=64, hidden_dim=16, latent_dim=3, dtype=DTYPE, weight_scale=2.0)
    return model, binary_images(6, input_dim=64, seed=3, dtype=DTYPE)


# max_pairs over chains = 4: chunks of 1, 2 and 5 (+1) examples against one chunk of all 6.
CHUNKINGS = (4, 8, 20)


@pytest.mark.parametrize("initial", mcmc.INITIALS)
def test_ais_is_deterministic_and_does_not_depend_on_chunking(initial: str) -> None:
    """AIS (T = 30, 4 chains, step-size jitter on): bitwise identical under the same seed,
    different for every example under another, and the same up to rounding however the
    (6 examples x 4 chains) grid is cut into chunks."""
    model, x = determinism_model()
    run = functools.partial(mcmc.ais, model, x, 30, chains=4, initial=initial, jitter=0.1)
    first = run(seed=5)
    again = run(seed=5)
    assert torch.equal(first.log_weights, again.log_weights) and torch.equal(first.final_z, again.final_z)
    assert torch.equal(first.log_likelihood, again.log_likelihood)
    other = run(seed=6)
    assert float((other.log_likelihood - first.log_likelihood).abs().min()) > 1e-6
    for max_pairs in CHUNKINGS:
        chunked = run(seed=5, max_pairs=max_pairs)
        assert_close(chunked.log_weights, first.log_weights, 1e-9)
        assert_close(chunked.final_z, first.final_z, 1e-9)
        assert torch.equal(chunked.acceptance_rate, first.acceptance_rate)


def test_hmc_sample_is_deterministic_and_does_not_depend_on_chunking() -> None:
    """hmc_sample (20 burn-in steps, 10 kept, 4 chains): as for AIS above."""
    model, x = determinism_model()
    run = functools.partial(mcmc.hmc_sample, model, x, 10, chains=4, burn_in=20)
    first = run(seed=5)
    again = run(seed=5)
    assert torch.equal(first.z, again.z) and torch.equal(first.step_size, again.step_size)
    other = run(seed=6)
    assert float((other.z - first.z).abs().max()) > 1e-3
    for max_pairs in CHUNKINGS:
        chunked = run(seed=5, max_pairs=max_pairs)
        assert_close(chunked.z, first.z, 1e-9)
        assert_close(chunked.step_size, first.step_size, 1e-9)
        assert torch.equal(chunked.acceptance_rate, first.acceptance_rate)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def bad_input_setup() -> tuple[LinearGaussianWithGradient, torch.Tensor]:
    model = linear_gaussian(5, 2)
    return model, mcmc.simulate(model, 3)[0]


ESTIMATORS = {
    "ais": lambda model, x, **kw: mcmc.ais(model, x, 5, **kw),
    "hmc_sample": lambda model, x, **kw: mcmc.hmc_sample(model, x, 5, **kw),
    "appendix_d": lambda model, x, **kw: mcmc.appendix_d_log_likelihood(model, x, **kw),
}


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize(("settings", "message"), [
    ({"chains": 0}, r"chains = 0"),
    ({"chains": -2}, r"chains = -2"),
    ({"leapfrog_steps": 0}, r"leapfrog_steps = 0: expected an integer >= 1"),
    ({"target_acceptance": 0.0}, r"target_acceptance = 0.0: expected a rate strictly between 0 and 1"),
    ({"target_acceptance": 1.0}, r"target_acceptance = 1.0: expected a rate strictly between 0 and 1"),
    ({"target_acceptance": 1.5}, r"target_acceptance = 1.5"),
    ({"initial": "posterior"}, r"initial = 'posterior': expected one of prior, encoder"),
])
def test_estimators_reject_bad_settings(estimator: str, settings: dict, message: str) -> None:
    model, x = bad_input_setup()
    with pytest.raises(ValueError, match=message):
        ESTIMATORS[estimator](model, x, **settings)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("shape", [(5,), (2, 3, 5)])
def test_estimators_reject_x_that_is_not_2d(estimator: str, shape: tuple[int, ...]) -> None:
    model, _ = bad_input_setup()
    with pytest.raises(ValueError, match=r"x has shape .*: expected \(examples, dimensions\)"):
        ESTIMATORS[estimator](model, torch.zeros(shape, dtype=DTYPE))


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_encoder_start_needs_an_encoder(estimator: str) -> None:
    model, x = bad_input_setup()
    with pytest.raises(ValueError, match=r"initial = 'encoder': DecoderOnly has no encoder"):
        ESTIMATORS[estimator](DecoderOnly(model), x, initial="encoder")


@pytest.mark.parametrize(("temperatures", "schedule", "message"), [
    (5, "cosine", r"schedule = 'cosine': expected one of sigmoid, linear"),
    (0, "sigmoid", r"temperatures = 0: expected an integer >= 1"),
    (torch.tensor([0.0, 0.7, 0.5, 1.0]), "sigmoid", r"expected inverse temperatures rising from 0 to 1"),
    (torch.tensor([0.1, 0.5, 1.0]), "sigmoid", r"rising from 0 to 1, got 3 values from 0.1 to 1"),
])
def test_ais_rejects_bad_schedules(temperatures, schedule: str, message: str) -> None:
    model, x = bad_input_setup()
    with pytest.raises(ValueError, match=message):
        mcmc.ais(model, x, temperatures, schedule=schedule)


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (3,)])
def test_ais_rejects_reverse_from_of_the_wrong_shape(shape: tuple[int, ...]) -> None:
    model, x = bad_input_setup()
    with pytest.raises(ValueError, match=r"reverse_from has shape .*: expected \(3, 2\)"):
        mcmc.ais(model, x, 5, reverse_from=torch.zeros(shape, dtype=DTYPE))


def test_hmc_sample_and_appendix_d_reject_bad_counts() -> None:
    model, x = bad_input_setup()
    for settings in ({"burn_in": -1}, {"thin": 0}):
        with pytest.raises(ValueError, match=r"expected samples >= 1, burn_in >= 0 and thin >= 1"):
            mcmc.hmc_sample(model, x, 5, **settings)
    with pytest.raises(ValueError, match=r"samples = 0, burn_in = 100, thin = 1"):
        mcmc.hmc_sample(model, x, 0)
    with pytest.raises(ValueError, match=r"samples = 45, chains = 10: expected samples a positive multiple"):
        mcmc.appendix_d_log_likelihood(model, x, samples=45)


def test_fitted_density_is_scikit_learns_one_component_gaussian_mixture() -> None:
    """App. D's q: the batched torch fit equals scikit-learn's GaussianMixture(1, "full") per
    example (the library it stands in for), and more components go to scikit-learn itself."""
    from sklearn.mixture import GaussianMixture

    fit = torch.randn(25, 7, 3, generator=generator(0), dtype=DTYPE) * torch.tensor([1.0, 0.3, 2.0]) + 1.0
    points = torch.randn(30, 7, 3, generator=generator(1), dtype=DTYPE)
    found = mcmc.fitted_log_density(fit, points)
    expected = torch.stack([torch.from_numpy(
        GaussianMixture(1, covariance_type="full", reg_covar=mcmc.REG_COVAR).fit(fit[:, i].numpy())
        .score_samples(points[:, i].numpy())) for i in range(7)], dim=1)
    assert_close(found, expected, 1e-9)
    assert mcmc.fitted_log_density(fit, points, components=2).shape == (30, 7)
