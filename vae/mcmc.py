"""MCMC estimators of log p(x) for latent-variable models: HMC on the latent space, annealed
importance sampling (AIS) with bidirectional Monte Carlo (BDMC) bounds, and AEVB's Appendix D
estimator.

Sources:

- HMC: Neal (2011), "MCMC using Hamiltonian dynamics", Sec. 5.2 (leapfrog, Metropolis correction).
  The step size adapts per chain as in the public AIS code of Wu et al. (2017) (``hmc.py`` of
  tonywu95/eval_gen and jiamings/ais): an exponential moving average of the acceptance (slowness
  0.9) against a target rate, the step size multiplied by 1.02 above it and by 0.98 below it,
  clipped to [1e-4, 0.5], starting from 0.01. Theirs is one step size per batch; here it is one
  per chain.
- AIS: Neal (2001), "Annealed importance sampling"; for decoder-based models Wu, Burda,
  Salakhutdinov & Grosse (2017), "On the Quantitative Analysis of Decoder-Based Generative
  Models" (arXiv 1611.04273), Sec. 2 and 4: geometric averages f_t(z) = p0(z)^(1-b_t) p(x, z)^b_t
  between the prior (or the encoder's q(z|x), "AIS + encoder") and the unnormalised posterior,
  the sigmoid schedule of Grosse et al. (2015), one HMC trajectory per intermediate distribution.
- BDMC: Grosse, Ghahramani & Adams (2015), "Sandwiching the marginal likelihood using
  bidirectional Monte Carlo", Sec. 3: on data simulated from the model, reverse AIS started from
  the exact posterior sample gives a stochastic upper bound on log p(x).
- Appendix D: Kingma & Welling (2014), "Auto-Encoding Variational Bayes", App. D:
  1/p(x) = E_p(z|x)[q(z) / p(x, z)] for any density q, with q fitted to posterior samples.

Conventions: ``x`` is (N, D) float; the chains of a chunk of n examples are (C, n, latent_dim);
log-densities are summed over their event dimensions; everything is in nats per example. A model
is anything with ``decoder_log_prob(x, z)`` (and ``encode(x)`` for the encoder's initial
distribution); one with ``decoder_log_prob_and_grad(x, z)`` (:class:`vae.model.VAE`) gives its
gradient in closed form, others are differentiated by autograd. A model with two stochastic
layers (:class:`vae.objectives.TwoLayerModel`) is sampled in its noise coordinates
(:class:`Whitened`), where its prior is N(0, I) and everything here applies unchanged.

Every estimate is seeded and deterministic: example i draws all its noise from its own generator,
in fixed-size blocks, so how the (examples x chains) grid is cut into chunks changes a result by
float rounding only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from vae.objectives import gaussian_log_prob, is_two_layer, standard_normal_log_prob

Initial = Literal["prior", "encoder"]
INITIALS: tuple[str, ...] = ("prior", "encoder")

# Wu et al.'s step-size adaptation (eval_gen/algorithms/hmc.py): defaults of the public code.
STEP_SIZE = 0.01
STEP_SIZE_MIN, STEP_SIZE_MAX = 1e-4, 0.5
STEP_SIZE_INCREASE, STEP_SIZE_DECREASE = 1.02, 0.98
ACCEPTANCE_SLOWNESS = 0.9
SIGMOID_SCHEDULE_RADIUS = 4.0  # Grosse et al. (2015); Wu et al.'s get_schedule(num, rad=4)
APPENDIX_D_MAX_LATENT_DIM = 4  # AEVB App. D: "reliable only for a sampled space of fewer than 5 dimensions"
FLOAT_BYTES = 4


class DecoderModel(Protocol):
    """What HMC and AIS need of a model with prior p(z) = N(0, I)."""

    latent_dim: int

    def decoder_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over D: x (n, D), z (..., n, latent_dim) -> (..., n), nats."""


class Whitened:
    """A two-stochastic-layer model in the coordinates of its prior's noise, u = (u1, u2) ~ N(0, I):
    z2 = u2 and z1 = m(z2) + exp(v(z2) / 2) * u1, where p(z1|z2) = N(m(z2), diag exp(v(z2))).

    The map u -> (z1, z2) is a bijection under which N(u; 0, I) du = p(z2) p(z1|z2) dz1 dz2, so
    p(x) = E_{u ~ N(0, I)}[p(x | z1(u))]: the model is a :class:`DecoderModel` of latent size
    latent_dim + top_latent_dim (u1's entries first) whose ``decoder_log_prob(x, u)`` is
    log p(x | z1(u)). AIS, BDMC and HMC then run on u with their standard-normal prior, and a
    state u is an exact posterior sample whenever (z1, z2) is one. (Sampling in these coordinates
    is the "non-centred" parameterization of hierarchical models; Papaspiliopoulos, Roberts &
    Skold 2007.)

    ``encode(x)``, the initial distribution of "AIS + encoder", is a diagonal Gaussian in u: for
    u2 q(z2|z1) at z1 = mu1(x), for u1 q(z1|x) mapped through the whitening at z2 = mu2(mu1(x)),
    i.e. mean (mu1 - m) exp(-v/2) and log-variance log_var1 - v. Any normalised initial
    distribution keeps AIS unbiased; this one approximates q(z1, z2|x) pushed to u.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.latent_dim = model.latent_dim + model.top_latent_dim
        self.input_dim = getattr(model, "input_dim", 0)
        self.hidden_dim = getattr(model, "hidden_dim", 0) + getattr(model, "top_hidden_dim", 0)
        self.hidden_layers = getattr(model, "hidden_layers", 1)

    def first_layer(self, u: torch.Tensor) -> torch.Tensor:
        """z1(u): u (..., latent_dim + top_latent_dim) -> (..., latent_dim of z1)."""
        first = self.model.latent_dim
        mean, log_var = self.model.decode_top(u[..., first:])
        return mean + torch.exp(0.5 * log_var) * u[..., :first]

    def decoder_log_prob(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """log p(x | z1(u)): x (n, D), u (..., n, latent_dim) -> (..., n), nats."""
        return self.model.decoder_log_prob(x, self.first_layer(u))

    def decoder_sample(self, u: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x | z1(u)), no gradient: u (..., latent_dim) -> (..., D)."""
        with torch.no_grad():
            return self.model.decoder_sample(self.first_layer(u), generator)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian initial distribution in u described above: x (n, D) -> (mean, log_var), (n, latent_dim)."""
        mu1, log_var1 = self.model.encode(x)
        mu2, log_var2 = self.model.encode_top(mu1)
        mean, log_var = self.model.decode_top(mu2)
        return (torch.cat([(mu1 - mean) * torch.exp(-0.5 * log_var), mu2], -1),
                torch.cat([log_var1 - log_var, log_var2], -1))

    def parameters(self):
        """The model's parameters (their device and dtype are the chains')."""
        return self.model.parameters()


def standard_prior(model):
    """``model`` itself when its prior is N(0, I) on z, its :class:`Whitened` form when it has two
    stochastic layers (:func:`vae.objectives.is_two_layer`)."""
    return Whitened(model) if is_two_layer(model) else model


class GradientError(ValueError):
    """A model's closed-form gradient of log p(x|z) disagrees with autograd's."""


# --------------------------------------------------------------------------------------------
# Gradients, densities along the path, noise
# --------------------------------------------------------------------------------------------


def autograd_log_prob_and_grad(model: DecoderModel, x: torch.Tensor,
                               z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x|z) and its gradient in z by autograd: z (..., n, latent_dim) -> ((..., n), z's shape)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        value = model.decoder_log_prob(x, z)
        (grad,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), grad


def log_prob_and_grad(model: DecoderModel, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x|z) (..., n) and grad_z log p(x|z) (..., n, latent_dim): the model's closed form if
    it has one (``decoder_log_prob_and_grad``), else autograd."""
    closed_form = getattr(model, "decoder_log_prob_and_grad", None)
    if closed_form is None:
        return autograd_log_prob_and_grad(model, x, z)
    return closed_form(x, z)


def check_gradient(model: DecoderModel, x: torch.Tensor, z: torch.Tensor, rtol: float = 1e-3) -> None:
    """Compare a model's closed-form ``decoder_log_prob_and_grad`` with autograd at ``z``.

    Args:
        x: (n, D) data; z: (..., n, latent_dim) points.
        rtol: allowed relative error, |g - g_autograd| <= rtol * (|g_autograd| + 1), elementwise.
    Raises:
        GradientError: the values or the gradients disagree (names the worst element).
    """
    if getattr(model, "decoder_log_prob_and_grad", None) is None:
        return
    value, grad = model.decoder_log_prob_and_grad(x, z)
    reference_value, reference_grad = autograd_log_prob_and_grad(model, x, z)
    for name, found, expected in (("log p(x|z)", value, reference_value), ("grad_z log p(x|z)", grad, reference_grad)):
        error = (found - expected).abs() / (expected.abs() + 1.0)
        if not bool(torch.isfinite(found).all()) or float(error.max()) > rtol:
            worst = int(torch.nan_to_num(error, nan=math.inf).argmax())
            raise GradientError(
                f"{type(model).__name__}.decoder_log_prob_and_grad: {name} disagrees with autograd "
                f"(element {worst}: {float(found.flatten()[worst]):.6g} vs {float(expected.flatten()[worst]):.6g}, "
                f"relative error {float(error.flatten()[worst]):.3g} > {rtol}); HMC needs the gradient of "
                f"the density it corrects with")


def sigmoid_schedule(temperatures: int, radius: float = SIGMOID_SCHEDULE_RADIUS) -> torch.Tensor:
    """Inverse temperatures b_0 = 0 < b_1 < ... < b_T = 1 on the sigmoid schedule (Grosse et al.
    2015; Wu et al. 2017): b_t ~ sigmoid(radius (2t/T - 1)), rescaled to end at 0 and 1.

    Returns (T + 1,) float64. Raises ValueError for T < 1.
    """
    if temperatures < 1:
        raise ValueError(f"temperatures = {temperatures}: expected an integer >= 1")
    if temperatures == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    s = torch.sigmoid(torch.linspace(-radius, radius, temperatures + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


def linear_schedule(temperatures: int) -> torch.Tensor:
    """b_t = t / T, (T + 1,) float64 (Neal 2001's simplest path). Raises ValueError for T < 1."""
    if temperatures < 1:
        raise ValueError(f"temperatures = {temperatures}: expected an integer >= 1")
    return torch.linspace(0.0, 1.0, temperatures + 1, dtype=torch.float64)


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {"sigmoid": sigmoid_schedule, "linear": linear_schedule}


class ChainNoise:
    """The noise of a chunk of examples' chains; example i has its own generator.

    Per example, the stream holds first the initial draws (C, latent_dim), then per HMC step a
    momentum (C, latent_dim) and two uniforms (C, 2) (the Metropolis test's and the step-size
    jitter's), drawn ``BLOCK`` steps at a time: the draws an
    example's chains get do not depend on which other examples share its chunk. Seeds are mixed
    within 32 bits (torch's CPU generator keeps only those). Noise is float32.
    """

    BLOCK = 32

    def __init__(self, seed: int, first: int, examples: int, chains: int, latent_dim: int,
                 device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed((seed * 0x9E3779B1 + first + i) % 2**32)
                           for i in range(examples)]
        self.chains, self.latent_dim, self.device = chains, latent_dim, device
        self.momenta = self.uniforms = None
        self.used = self.BLOCK

    def standard_normal(self) -> torch.Tensor:
        """One (C, n, latent_dim) standard-normal draw (the initial state's noise)."""
        return torch.stack([torch.randn(self.chains, self.latent_dim, generator=g, device=self.device)
                            for g in self.generators], dim=1)

    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next HMC step's momentum (C, n, latent_dim) and two uniforms (C, n) in [0, 1):
        the Metropolis test's and the step-size jitter's."""
        if self.used == self.BLOCK:
            self.momenta = torch.stack([torch.randn(self.BLOCK, self.chains, self.latent_dim, generator=g,
                                                    device=self.device) for g in self.generators], dim=2)
            self.uniforms = torch.stack([torch.rand(self.BLOCK, self.chains, 2, generator=g, device=self.device)
                                         for g in self.generators], dim=2)
            self.used = 0
        self.used += 1
        uniforms = self.uniforms[self.used - 1]
        return self.momenta[self.used - 1], uniforms[..., 0], uniforms[..., 1]


@dataclass
class Point:
    """A state of the chains with the densities HMC and AIS reuse: z (C, n, latent_dim); the
    log-likelihood log p(x|z), log prior log p(z) and log p0(z) of the initial distribution, each
    (C, n); the gradients of log p(x|z) and of log p0(z), each z's shape."""

    z: torch.Tensor
    log_likelihood: torch.Tensor
    grad_log_likelihood: torch.Tensor
    log_prior: torch.Tensor
    log_initial: torch.Tensor
    grad_log_initial: torch.Tensor

    def log_target(self, beta: float) -> torch.Tensor:
        """log f_b(z) = (1 - b) log p0(z) + b (log p(z) + log p(x|z)), (C, n)."""
        return (1.0 - beta) * self.log_initial + beta * (self.log_prior + self.log_likelihood)

    def grad_log_target(self, beta: float) -> torch.Tensor:
        """grad_z log f_b(z), z's shape (grad log p(z) = -z)."""
        return (1.0 - beta) * self.grad_log_initial + beta * (self.grad_log_likelihood - self.z)

    def log_ratio(self) -> torch.Tensor:
        """log p(x, z) - log p0(z), (C, n): the AIS weight's increment per unit of b."""
        return self.log_prior + self.log_likelihood - self.log_initial

    def where(self, keep: torch.Tensor, other: Point) -> Point:
        """This point where ``keep`` (C, n) is true, ``other`` elsewhere."""
        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(keep.view(*keep.shape, *([1] * (a.ndim - keep.ndim))), a, b)
        return Point(*(pick(a, b) for a, b in zip(vars(self).values(), vars(other).values(), strict=True)))


class Path:
    """The densities along the annealing path for one chunk: x (n, D) and the initial
    distribution p0, the prior N(0, I) or a Gaussian q(z|x) with mean and log-variance (n, latent_dim)."""

    def __init__(self, model: DecoderModel, x: torch.Tensor, mean: torch.Tensor | None = None,
                 log_var: torch.Tensor | None = None) -> None:
        self.model, self.x = model, x
        self.mean, self.log_var = mean, log_var
        self.evaluations = 0  # gradient evaluations of log p(x|z), over all chains

    def sample_initial(self, eps: torch.Tensor) -> torch.Tensor:
        """z ~ p0 from standard-normal noise (C, n, latent_dim)."""
        if self.mean is None:
            return eps
        return self.mean + torch.exp(0.5 * self.log_var) * eps

    def point(self, z: torch.Tensor) -> Point:
        """Evaluate every density at z (C, n, latent_dim)."""
        log_likelihood, grad = log_prob_and_grad(self.model, self.x, z)
        self.evaluations += z.shape[0] * z.shape[1]
        log_prior = standard_normal_log_prob(z)
        if self.mean is None:
            return Point(z, log_likelihood, grad, log_prior, log_prior, -z)
        return Point(z, log_likelihood, grad, log_prior, gaussian_log_prob(z, self.mean, self.log_var),
                     (self.mean - z) * torch.exp(-self.log_var))


class StepSizes:
    """Per-chain step sizes (C, n), adapted toward ``target`` acceptance (see the module docstring)."""

    def __init__(self, shape: tuple[int, int], target: float, device: torch.device, dtype: torch.dtype,
                 initial: float = STEP_SIZE, adaptation: float = STEP_SIZE_INCREASE - 1.0) -> None:
        self.value = torch.full(shape, initial, device=device, dtype=dtype)
        self.average = torch.full(shape, target, device=device, dtype=dtype)
        self.target = target
        self.increase, self.decrease = 1.0 + adaptation, 1.0 - adaptation

    def update(self, accepted: torch.Tensor) -> None:
        """Fold one step's acceptances (C, n) bool into the average and move the step sizes."""
        self.average.mul_(ACCEPTANCE_SLOWNESS).add_(accepted.to(self.average.dtype), alpha=1 - ACCEPTANCE_SLOWNESS)
        factor = torch.where(self.average > self.target, self.increase, self.decrease)
        self.value.mul_(factor).clamp_(STEP_SIZE_MIN, STEP_SIZE_MAX)


def hmc_transition(path: Path, current: Point, beta: float, step_size: torch.Tensor,
                   momentum: torch.Tensor, uniform: torch.Tensor,
                   leapfrog_steps: int) -> tuple[Point, torch.Tensor]:
    """One HMC trajectory targeting f_b (Neal 2011, Sec. 5.2): ``leapfrog_steps`` leapfrog steps of
    size ``step_size`` (C, n) from momentum (C, n, latent_dim), then a Metropolis correction
    accepting where uniform < exp(-dH). A trajectory whose energy is not finite is rejected.
    (A step size drawn at random, independently of the state, keeps the kernel reversible:
    Neal 2011, Sec. 4.2; :func:`jittered` draws one.)

    Returns (the new point, accepted (C, n) bool). Exactly ``leapfrog_steps`` gradient evaluations:
    the current point's gradient is reused.
    """
    eps = step_size.unsqueeze(-1)
    p = momentum + 0.5 * eps * current.grad_log_target(beta)
    proposal = current
    for i in range(leapfrog_steps):
        proposal = path.point(proposal.z + eps * p)
        if i < leapfrog_steps - 1:
            p = p + eps * proposal.grad_log_target(beta)
    p = p + 0.5 * eps * proposal.grad_log_target(beta)
    log_accept = (proposal.log_target(beta) - 0.5 * p.pow(2).sum(-1)
                  - current.log_target(beta) + 0.5 * momentum.pow(2).sum(-1))
    accepted = torch.log(uniform.to(log_accept.dtype)) < torch.nan_to_num(log_accept, nan=-math.inf)
    return proposal.where(accepted, current), accepted


def jittered(step_size: torch.Tensor, uniform: torch.Tensor, jitter: float) -> torch.Tensor:
    """step_size * (1 + jitter (2u - 1)): a step size drawn uniformly within +-``jitter`` of the
    adapted one, so that trajectories of one length cannot all return to where they started on a
    near-Gaussian posterior (Neal 2011, Sec. 4.2, "randomizing the stepsize"). (C, n)."""
    if jitter == 0.0:
        return step_size
    return step_size * (1.0 + jitter * (2.0 * uniform.to(step_size.dtype) - 1.0))


# --------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------


def pairs_for_budget(model: DecoderModel, memory_budget_mb: float) -> int:
    """How many (example, chain) pairs fit in ``memory_budget_mb`` of working memory.

    Per pair a leapfrog step holds the decoder's hidden layers and about three D-sized outputs
    (logits, their gradient and the likelihood's terms), plus a dozen latent-sized vectors.
    """
    model = standard_prior(model)
    hidden = getattr(model, "hidden_dim", 0) * getattr(model, "hidden_layers", 1)
    outputs = getattr(model, "input_dim", 0)
    per_pair = (2 * hidden + 3 * outputs + 12 * model.latent_dim + 8) * FLOAT_BYTES
    return max(1, int(memory_budget_mb * 2**20 // per_pair))


def _chunks(examples: int, chains: int, max_pairs: int) -> tuple[range, int]:
    per_chunk = max(1, max_pairs // chains)
    return range(0, examples, per_chunk), per_chunk


def _check_common(x: torch.Tensor, chains: int, leapfrog_steps: int, target_acceptance: float) -> None:
    if x.ndim != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (examples, dimensions)")
    if chains < 1:
        raise ValueError(f"chains = {chains}: expected an integer >= 1")
    if leapfrog_steps < 1:
        raise ValueError(f"leapfrog_steps = {leapfrog_steps}: expected an integer >= 1")
    if not 0.0 < target_acceptance < 1.0:
        raise ValueError(f"target_acceptance = {target_acceptance}: expected a rate strictly between 0 and 1")


def _initial_distribution(model: DecoderModel, x: torch.Tensor, initial: str) -> tuple[torch.Tensor | None, ...]:
    if initial not in INITIALS:
        raise ValueError(f"initial = {initial!r}: expected one of {', '.join(INITIALS)}")
    if initial == "prior":
        return None, None
    if getattr(model, "encode", None) is None:
        raise ValueError(f"initial = 'encoder': {type(model).__name__} has no encoder (use initial = 'prior')")
    with torch.no_grad():
        return model.encode(x)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean of ``values`` (N,) and its standard error, the sample standard deviation (N - 1 in
    the denominator) over sqrt(N), both in float64; the standard error is NaN for N = 1."""
    values = values.double()
    stderr = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), stderr


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/n) sum exp(values) along ``dim``, stable (the max is subtracted)."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


# --------------------------------------------------------------------------------------------
# HMC sampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HMCSamples:
    """Posterior samples from :func:`hmc_sample`: z (samples, chains, N, latent_dim); per example
    the acceptance rate over the kept steps (N,) and the final step sizes (chains, N)."""

    z: torch.Tensor
    acceptance_rate: torch.Tensor
    step_size: torch.Tensor


@torch.no_grad()
def hmc_sample(model: DecoderModel, x: torch.Tensor, samples: int, *, chains: int = 1, leapfrog_steps: int = 10,
               burn_in: int = 100, adapt: bool = True, target_acceptance: float = 0.65,
               step_size: float = STEP_SIZE, adaptation: float = 0.05, jitter: float = 0.2,
               thin: int = 1, initial: Initial = "prior", seed: int = 0, max_pairs: int = 4096,
               gradient_check: bool = True) -> HMCSamples:
    """Draw from the posterior p(z|x) ∝ p(z) p(x|z) by HMC, ``chains`` chains per example.

    Each chain starts from a draw of ``initial`` (the prior N(0, I), or the encoder's q(z|x)), runs
    ``burn_in`` steps, then keeps the state after every ``thin``-th of ``samples * thin`` further steps. With
    ``adapt``, each chain's step size adapts toward ``target_acceptance`` during burn-in only,
    so the kept steps are a fixed, reversible kernel. The rule is AIS's (module docstring) with
    factors 1 +- ``adaptation``: 0.05 by default, so that 100 burn-in steps can move a step
    size by two orders of magnitude (Wu et al.'s 0.02 suits thousands of AIS steps). Each
    trajectory's step size is drawn within +-``jitter`` of the chain's (:func:`jittered`).

    Args:
        model: a :class:`DecoderModel`; x: (N, D) data.
        samples: kept steps per chain.
        max_pairs: bound on examples x chains per chunk (:func:`pairs_for_budget`).
        gradient_check: compare a closed-form gradient with autograd once at the start.
    Returns:
        :class:`HMCSamples`.
    Raises:
        ValueError: a count below 1 (``samples``, ``chains``, ``leapfrog_steps``), a negative
            ``burn_in``, a target outside (0, 1), an unknown ``initial``, x not 2-D.
        GradientError: the model's closed-form gradient disagrees with autograd.
    """
    _check_common(x, chains, leapfrog_steps, target_acceptance)
    model = standard_prior(model)
    if samples < 1 or burn_in < 0 or thin < 1:
        raise ValueError(f"samples = {samples}, burn_in = {burn_in}, thin = {thin}: expected samples >= 1, "
                         "burn_in >= 0 and thin >= 1")
    mean, log_var = _initial_distribution(model, x, initial)
    starts, per_chunk = _chunks(len(x), chains, max_pairs)
    kept, rates, sizes = [], [], []
    for start in starts:
        rows = slice(start, start + per_chunk)
        batch = x[rows]
        path = Path(model, batch)
        noise = ChainNoise(seed, start, len(batch), chains, model.latent_dim, x.device)
        initial_path = Path(model, batch, *(None, None) if mean is None else (mean[rows], log_var[rows]))
        z = initial_path.sample_initial(noise.standard_normal().to(x.dtype))
        if gradient_check and start == 0:
            check_gradient(model, batch[:4], z[:, :4])
        point = path.point(z)
        steps = StepSizes(z.shape[:2], target_acceptance, x.device, x.dtype, step_size, adaptation)
        chunk_samples, accepted_total = [], torch.zeros(z.shape[:2], device=x.device, dtype=x.dtype)
        for step in range(burn_in + samples * thin):
            momentum, uniform, jitter_uniform = noise.step()
            point, accepted = hmc_transition(path, point, 1.0, jittered(steps.value, jitter_uniform, jitter),
                                             momentum.to(x.dtype), uniform, leapfrog_steps)
            if step < burn_in:
                if adapt:
                    steps.update(accepted)
            else:
                if (step - burn_in + 1) % thin == 0:
                    chunk_samples.append(point.z)
                accepted_total += accepted
        kept.append(torch.stack(chunk_samples))
        rates.append((accepted_total / (samples * thin)).mean(0))
        sizes.append(steps.value)
    return HMCSamples(torch.cat(kept, dim=2), torch.cat(rates), torch.cat(sizes, dim=1))


# --------------------------------------------------------------------------------------------
# AIS and BDMC
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AISEstimate:
    """Per-example results of :func:`ais`.

    ``log_likelihood`` (N,): the log-mean-exp of the chains' log-weights, nats; for forward AIS a
    stochastic lower bound on log p(x), for reverse AIS (``reverse_from``) minus it is an upper
    bound (and ``log_likelihood`` holds that upper bound). ``log_weights`` (chains, N),
    ``acceptance_rate`` (N,) over all transitions, ``final_z`` (chains, N, latent_dim): the
    chains' last states. ``leapfrog_steps`` counts gradient evaluations per chain.
    """

    log_likelihood: torch.Tensor
    log_weights: torch.Tensor
    acceptance_rate: torch.Tensor
    final_z: torch.Tensor
    leapfrog_steps: int

    def mean_and_stderr(self) -> tuple[float, float]:
        """Mean over examples and its standard error (std / sqrt(N); NaN for N = 1), nats."""
        return mean_and_stderr(self.log_likelihood)


@torch.no_grad()
def ais(model: DecoderModel, x: torch.Tensor, temperatures: int | torch.Tensor = 1000, *, chains: int = 16,
        leapfrog_steps: int = 10, initial: Initial = "prior", schedule: str = "sigmoid",
        target_acceptance: float = 0.65, step_size: float = STEP_SIZE, jitter: float = 0.0, seed: int = 0,
        max_pairs: int = 4096, reverse_from: torch.Tensor | None = None, gradient_check: bool = True,
        on_step: Callable[[int], None] | None = None) -> AISEstimate:
    """Annealed importance sampling estimate of log p(x) per example (Neal 2001; Wu et al. 2017).

    Forward: z_0 ~ p0 (prior, or the encoder's q(z|x)); for t = 1..T, log w += (b_t - b_{t-1})
    (log p(x, z) - log p0(z)) at the current z, then one HMC trajectory targeting f_{b_t} (none
    after the last). E[w] = p(x), so log-mean-exp over chains is a stochastic lower bound.

    Reverse (``reverse_from`` (N, latent_dim), an exact posterior sample of each example, as BDMC
    has for data simulated from the model): the same from b = 1 down to 0, starting every chain
    at that sample; E[w] = 1 / p(x), so minus the log-mean-exp is a stochastic upper bound.

    Args:
        model: a :class:`DecoderModel` (and an encoder for ``initial="encoder"``); x (N, D).
        temperatures: T, the number of intermediate distributions on ``schedule`` ("sigmoid" or
            "linear"), or the inverse temperatures themselves, (T + 1,) increasing from 0 to 1.
        chains: independent AIS chains per example (Wu et al.: 16).
        leapfrog_steps: per HMC trajectory (Wu et al.: 10).
        target_acceptance: of the per-chain step-size adaptation (Wu et al.: 0.65).
        step_size: every chain's first; jitter: of each trajectory's (:func:`jittered`; Wu et al.: 0).
        max_pairs: bound on examples x chains per chunk (:func:`pairs_for_budget`).
        on_step: called with the number of examples of the chunk after each temperature.
    Returns:
        :class:`AISEstimate`, nats per example.
    Raises:
        ValueError: bad counts or rates, an unknown ``initial`` or ``schedule``, a schedule that
            does not rise from 0 to 1, a ``reverse_from`` of the wrong shape.
        GradientError: the model's closed-form gradient disagrees with autograd.
    """
    _check_common(x, chains, leapfrog_steps, target_acceptance)
    model = standard_prior(model)
    betas = _betas(temperatures, schedule)
    if reverse_from is not None:
        if reverse_from.shape != (len(x), model.latent_dim):
            raise ValueError(f"reverse_from has shape {tuple(reverse_from.shape)}: expected "
                             f"({len(x)}, {model.latent_dim}), one posterior sample per example")
        betas = betas.flip(0)
    mean, log_var = _initial_distribution(model, x, initial)
    starts, per_chunk = _chunks(len(x), chains, max_pairs)
    log_weights, rates, finals = [], [], []
    beta_values = betas.tolist()
    for start in starts:
        rows = slice(start, start + per_chunk)
        batch = x[rows]
        path = Path(model, batch, *(None, None) if mean is None else (mean[rows], log_var[rows]))
        noise = ChainNoise(seed, start, len(batch), chains, model.latent_dim, x.device)
        eps = noise.standard_normal().to(x.dtype)
        if reverse_from is None:
            z = path.sample_initial(eps)
        else:
            z = reverse_from[rows].to(x.dtype).unsqueeze(0).expand(chains, -1, -1).contiguous()
        if gradient_check and start == 0:
            check_gradient(model, batch[:4], z[:, :4])
        point = path.point(z)
        steps = StepSizes(z.shape[:2], target_acceptance, x.device, x.dtype, step_size)
        log_w = torch.zeros(z.shape[:2], device=x.device, dtype=torch.float64)
        accepted_total = torch.zeros(z.shape[:2], device=x.device, dtype=x.dtype)
        for t in range(1, len(beta_values)):
            log_w += (beta_values[t] - beta_values[t - 1]) * point.log_ratio().double()
            if t < len(beta_values) - 1:
                momentum, uniform, jitter_uniform = noise.step()
                point, accepted = hmc_transition(path, point, beta_values[t],
                                                 jittered(steps.value, jitter_uniform, jitter),
                                                 momentum.to(x.dtype), uniform, leapfrog_steps)
                steps.update(accepted)
                accepted_total += accepted
            if on_step is not None:
                on_step(len(batch))
        log_weights.append(log_w)
        rates.append((accepted_total / max(1, len(beta_values) - 2)).mean(0))
        finals.append(point.z)
    log_weights = torch.cat(log_weights, dim=1)
    estimate = log_mean_exp(log_weights, dim=0)
    if reverse_from is not None:
        estimate = -estimate
    return AISEstimate(estimate.to(x.dtype), log_weights, torch.cat(rates), torch.cat(finals, dim=1),
                       (len(beta_values) - 2) * leapfrog_steps)


def _betas(temperatures: int | torch.Tensor, schedule: str) -> torch.Tensor:
    if isinstance(temperatures, torch.Tensor):
        betas = temperatures.double().flatten()
        if len(betas) < 2 or float(betas[0]) != 0.0 or float(betas[-1]) != 1.0 or bool((betas.diff() < 0).any()):
            raise ValueError("temperatures: expected inverse temperatures rising from 0 to 1, "
                             f"got {len(betas)} values from {float(betas[0]):g} to {float(betas[-1]):g}")
        return betas
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule = {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    return SCHEDULES[schedule](temperatures)


@dataclass(frozen=True)
class BDMCBounds:
    """:func:`bdmc`'s results on data simulated from the model, per example (N,), nats:
    ``lower`` (forward AIS) and ``upper`` (reverse AIS from the exact posterior sample)."""

    lower: torch.Tensor
    upper: torch.Tensor
    x: torch.Tensor
    z: torch.Tensor

    @property
    def gap(self) -> float:
        """Mean of upper - lower over the examples: how far AIS may be from log p(x), nats."""
        return float((self.upper.double() - self.lower.double()).mean())

    @property
    def gap_stderr(self) -> float:
        """Standard error of :attr:`gap` over the examples (NaN for one example)."""
        gaps = self.upper.double() - self.lower.double()
        return float(gaps.std() / math.sqrt(len(gaps))) if len(gaps) > 1 else math.nan


def simulate(model: DecoderModel, count: int, seed: int = 0,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Data from the model itself: z ~ N(0, I), x ~ p(x|z) (``model.decoder_sample``).

    Returns (x (count, D), z (count, latent_dim)); z is an exact posterior sample of its x (for a
    two-stochastic-layer model, u of :class:`Whitened`, latent_dim + top_latent_dim wide). z is
    drawn in the dtype of the model's parameters (the default dtype for a model without any).
    """
    model = standard_prior(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    z = torch.randn(count, model.latent_dim, generator=generator, device=device,
                    dtype=None if parameter is None else parameter.dtype)
    return model.decoder_sample(z, generator=generator), z


@torch.no_grad()
def bdmc(model: DecoderModel, count: int, temperatures: int | torch.Tensor = 1000, *, seed: int = 0,
         device: torch.device | str = "cpu", on_step: Callable[[int], None] | None = None,
         **settings) -> BDMCBounds:
    """Bidirectional Monte Carlo (Grosse et al. 2015) on ``count`` examples simulated from the model.

    Forward AIS on x ~ p(x|z), z ~ p(z) bounds log p(x) from below, reverse AIS from that z
    bounds it from above (each in expectation); ``settings`` are :func:`ais`'s. The two runs use
    different seeds. Returns :class:`BDMCBounds`. Raises what :func:`ais` raises.
    """
    x, z = simulate(model, count, seed, device)
    forward = ais(model, x, temperatures, seed=seed + 1, on_step=on_step, **settings)
    reverse = ais(model, x, temperatures, seed=seed + 2, reverse_from=z, on_step=on_step, **settings)
    return BDMCBounds(forward.log_likelihood, reverse.log_likelihood, x, z)


# --------------------------------------------------------------------------------------------
# AEVB Appendix D
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppendixDEstimate:
    """Per-example results of :func:`appendix_d_log_likelihood`: ``log_likelihood`` (N,) nats and
    the HMC acceptance rate (N,) of the posterior samples."""

    log_likelihood: torch.Tensor
    acceptance_rate: torch.Tensor

    def mean_and_stderr(self) -> tuple[float, float]:
        """Mean over examples and its standard error (NaN for one example), nats."""
        return mean_and_stderr(self.log_likelihood)


REG_COVAR = 1e-6  # added to the fitted covariance's diagonal (scikit-learn GaussianMixture's default)


def fitted_log_density(fit: torch.Tensor, points: torch.Tensor, components: int = 1, seed: int = 0) -> torch.Tensor:
    """log q(points) for the density q of Appendix D fitted to posterior samples, per example.

    One component (the default): q = N(mean, cov + REG_COVAR I), the maximum-likelihood Gaussian
    of each example's samples (what scikit-learn's ``GaussianMixture(1, covariance_type="full")``
    fits), computed for all examples at once with ``torch.distributions.MultivariateNormal``.
    More components: a ``GaussianMixture`` per example (scikit-learn, imported then).

    Why a Gaussian and not a KDE: the estimator's variance is finite only when q's tails are
    lighter than the posterior's (E_p[(q/p)^2] < inf needs cov_q < 2 cov_p for Gaussians); a KDE
    widens every sample by its bandwidth and a mixture of many components overfits 50 samples,
    while one full-covariance Gaussian fitted to the samples matches the posterior's spread.

    Args:
        fit: (L, N, latent_dim) samples the density is fitted to, per example.
        points: (M, N, latent_dim) where it is evaluated.
    Returns:
        (M, N) float64, nats.
    """
    fit, points = fit.double().cpu(), points.double().cpu()
    if components == 1:
        mean = fit.mean(0)                                      # (N, d)
        centred = (fit - mean).transpose(0, 1)                  # (N, L, d)
        cov = centred.transpose(1, 2) @ centred / fit.shape[0]  # (N, d, d), the MLE
        cov = cov + REG_COVAR * torch.eye(fit.shape[-1], dtype=cov.dtype)
        return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(points)
    from sklearn.mixture import GaussianMixture

    log_q = torch.empty(points.shape[:2], dtype=torch.float64)
    for i in range(fit.shape[1]):
        mixture = GaussianMixture(n_components=components, covariance_type="full", reg_covar=REG_COVAR,
                                  random_state=seed).fit(fit[:, i].numpy())
        log_q[:, i] = torch.from_numpy(mixture.score_samples(points[:, i].numpy()))
    return log_q


@torch.no_grad()
def appendix_d_log_likelihood(model: DecoderModel, x: torch.Tensor, samples: int = 50, *, chains: int = 10,
                              thin: int = 5, leapfrog_steps: int = 4, burn_in: int = 100,
                              target_acceptance: float = 0.9,
                              initial: Initial = "prior", components: int = 1, seed: int = 0,
                              max_pairs: int = 4096) -> AppendixDEstimate:
    """AEVB's marginal-likelihood estimator (Kingma & Welling 2014, App. D), per example.

    1. Draw ``samples`` posterior samples z ~ p(z|x) by HMC (``chains`` chains, ``burn_in`` steps
       adapting the step size toward ``target_acceptance``, then every ``thin``-th state;
       ``leapfrog_steps`` per trajectory; App. E: 50 samples, 4 leapfrog steps, 90% acceptance).
       The paper does not say how its 50 samples were spaced; 10 chains kept every 5th step
       (the default) gave a mean error of 0.02 nats or less on linear-Gaussian models with
       N_z = 2 and 3, where 5 chains of consecutive steps were biased by -0.08 (the samples too
       correlated: the fitted q too narrow).
    2. Fit a density q(z) to them (:func:`fitted_log_density`: a full-covariance Gaussian, or a
       mixture of ``components``).
    3. Draw ``samples`` fresh posterior samples (the same chains, run on) and take
       log p(x) ~= -log (1/L) sum_l q(z_l) / (p(z_l) p(x|z_l)), from 1/p(x) = E_p(z|x)[q(z) / p(x, z)].

    Returns :class:`AppendixDEstimate`, nats per example.

    Raises:
        ValueError: ``model.latent_dim`` >= 5 (App. D: the estimator is reliable only for a sampled
            space of fewer than 5 dimensions), ``samples`` not a positive multiple of ``chains``,
            or what :func:`hmc_sample` raises.
    """
    model = standard_prior(model)
    if model.latent_dim > APPENDIX_D_MAX_LATENT_DIM:
        raise ValueError(f"latent_dim = {model.latent_dim}: AEVB's Appendix D estimator is reliable only for a "
                         f"latent space of fewer than 5 dimensions (Kingma & Welling 2014, App. D); use AIS")
    if samples < 1 or chains < 1 or samples % chains:
        raise ValueError(f"samples = {samples}, chains = {chains}: expected samples a positive multiple of chains")
    per_chain = samples // chains
    draws = hmc_sample(model, x, 2 * per_chain, chains=chains, leapfrog_steps=leapfrog_steps, burn_in=burn_in,
                       target_acceptance=target_acceptance, thin=thin, initial=initial, seed=seed,
                       max_pairs=max_pairs)
    fit_z = draws.z[:per_chain].flatten(0, 1)    # (samples, N, latent_dim)
    fresh_z = draws.z[per_chain:].flatten(0, 1)  # (samples, N, latent_dim)
    log_q = fitted_log_density(fit_z, fresh_z, components, seed)
    log_joint = (standard_normal_log_prob(fresh_z) + model.decoder_log_prob(x, fresh_z)).double().cpu()
    estimate = -log_mean_exp(log_q - log_joint, dim=0)
    return AppendixDEstimate(estimate.to(x.dtype).to(x.device), draws.acceptance_rate)


__all__ = ["AISEstimate", "AppendixDEstimate", "BDMCBounds", "ChainNoise", "GradientError", "HMCSamples", "INITIALS",
           "Path", "Point", "SCHEDULES", "Whitened", "ais", "appendix_d_log_likelihood", "bdmc", "check_gradient",
           "fitted_log_density", "hmc_sample", "hmc_transition", "jittered", "linear_schedule", "log_mean_exp",
           "log_prob_and_grad", "mean_and_stderr", "pairs_for_budget", "sigmoid_schedule", "simulate", "standard_prior"]
