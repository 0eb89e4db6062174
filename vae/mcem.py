"""Monte Carlo EM (MCEM), the third algorithm of AEVB's Figure 3 (Kingma & Welling 2014, Sec. 5
"Marginal likelihood" and App. E).

MCEM fits the decoder p(x|z) p(z) alone, with no encoder: the E-step draws posterior samples of z
by HMC, the M-step ascends log p(x, z) at those samples. App. E: "for each round [...] 10 HMC
leapfrog steps with a step size tuned automatically for 90% acceptance rate, followed by 5 weight
update steps using the acquired sample. For all algorithms the parameters were updated using the
Adagrad stepsizes (with accompanying annealing schedule)." The paper publishes no code for it;
what it leaves open is decided here as follows, and the report says so:

- **One persistent chain per training example** (:class:`PersistentChains`): a minibatch's round
  moves each of its examples' chains by one HMC trajectory of ``leapfrog_steps`` leapfrog steps
  (:func:`vae.mcmc.hmc_transition`, Metropolis-corrected) targeting p(z|x) under the current
  decoder, and the M-step uses the chains' new states. The chains start from the prior N(0, I).
- **One step size for all chains**, adapted after every round toward ``target_acceptance`` by the
  rule of :mod:`vae.mcmc` (:class:`vae.mcmc.StepSizes`, Wu et al.'s: an exponential moving average of the acceptance rate,
  slowness 0.9, the step size multiplied by 1 +- 0.02 above or below the target, clipped
  to [1e-4, 0.5]). A chain is visited once per pass over the data, too rarely to tune a step size
  of its own; the acceptance rate of a minibatch of 100 chains is a good estimate of the shared
  step size's. Each trajectory's step size is drawn within +-``jitter`` of it
  (:func:`vae.mcmc.jittered`).
- **The M-step**: ``weight_updates`` optimizer steps on the loss -mean_x log p(x, z) of the
  minibatch at its chains' states (the parameter prior, when ``train.map_prior``, is the
  optimizer's weight decay as for AEVB).

A round uses one HMC trajectory, not a chain run to convergence: the chains carry over between
rounds (and the decoder changes little between two visits of an example), which is what makes
MCEM affordable at all; AEVB's Figure 3 caption notes that MCEM is still not an on-line
algorithm and cannot be applied efficiently to the full MNIST set.

Shapes: x (n, D) float; z (n, latent_dim) in :class:`PersistentChains` and (1, n, latent_dim) in
:mod:`vae.mcmc`'s chains; log-densities in nats per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vae import mcmc
from vae.objectives import is_two_layer, standard_normal_log_prob

LEAPFROG_STEPS = 10        # App. E
TARGET_ACCEPTANCE = 0.9    # App. E
WEIGHT_UPDATES = 5         # App. E
STEP_SIZE = mcmc.STEP_SIZE
ADAPTATION = mcmc.STEP_SIZE_INCREASE - 1.0
JITTER = 0.2


@dataclass
class PersistentChains:
    """The E-step's state: one chain per training example and the step size they share.

    ``z`` (N, latent_dim): each example's current posterior sample, in the dtype and on the device
    of the model; ``steps``: the shared step size, a 0-d :class:`vae.mcmc.StepSizes` (float64, CPU)
    holding its target acceptance rate and the moving average it is adapted by.
    """

    z: torch.Tensor
    steps: mcmc.StepSizes

    @property
    def step_size(self) -> torch.Tensor:
        """The shared step size, 0-d float64."""
        return self.steps.value

    @property
    def acceptance(self) -> torch.Tensor:
        """The moving average of the acceptance rate, 0-d float64."""
        return self.steps.average

    @staticmethod
    def _steps(target_acceptance: float, step_size: float) -> mcmc.StepSizes:
        return mcmc.StepSizes((), target_acceptance, torch.device("cpu"), torch.float64, step_size, ADAPTATION)

    @classmethod
    def start(cls, examples: int, latent_dim: int, generator: torch.Generator, *,
              dtype: torch.dtype = torch.float32, target_acceptance: float = TARGET_ACCEPTANCE,
              step_size: float = STEP_SIZE) -> PersistentChains:
        """Chains drawn from the prior N(0, I) with ``generator`` (on its device), their step size
        to be adapted toward ``target_acceptance``.

        Raises:
            ValueError: ``examples`` or ``latent_dim`` below 1, a target outside (0, 1).
        """
        if examples < 1 or latent_dim < 1:
            raise ValueError(f"examples = {examples}, latent_dim = {latent_dim}: expected integers >= 1")
        if not 0.0 < target_acceptance < 1.0:
            raise ValueError(f"target_acceptance = {target_acceptance}: expected a rate strictly between 0 and 1")
        z = torch.randn(examples, latent_dim, generator=generator, device=generator.device).to(dtype)
        return cls(z, cls._steps(target_acceptance, step_size))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors to checkpoint (CPU copies), for :meth:`from_state_dict`."""
        return {"z": self.z.detach().cpu().clone(), "step_size": self.steps.value.clone(),
                "acceptance": self.steps.average.clone(),
                "target_acceptance": torch.tensor(self.steps.target, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> PersistentChains:
        """The chains :meth:`state_dict` saved, ``z`` moved to ``device``.

        Raises:
            ValueError: a key missing or a tensor of the wrong shape.
        """
        keys = {"z", "step_size", "acceptance", "target_acceptance"}
        if keys - set(state) or state["z"].ndim != 2 or any(state[key].ndim for key in keys - {"z"}):
            raise ValueError(f"not a PersistentChains state: keys {sorted(state)} (expected z (examples, "
                             "latent_dim); step_size, acceptance and target_acceptance scalars)")
        steps = cls._steps(float(state["target_acceptance"]), float(state["step_size"]))
        steps.average = state["acceptance"].double().clone()
        return cls(state["z"].to(device), steps)


@dataclass(frozen=True)
class RoundRecord:
    """What one MCEM round reports, detached, nats per example: ``log_joint`` the minibatch mean of
    log p(x, z) at the E-step's samples before the M-step, ``acceptance_rate`` the fraction of its
    chains that moved, ``step_size`` the shared step size the trajectories used."""

    log_joint: float
    acceptance_rate: float
    step_size: float


@torch.no_grad()
def e_step(model: mcmc.DecoderModel, x: torch.Tensor, chains: PersistentChains, index: torch.Tensor,
           generator: torch.Generator, *, leapfrog_steps: int = LEAPFROG_STEPS,
           jitter: float = JITTER) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the chains of examples ``index`` by one HMC trajectory targeting p(z|x) ∝ p(z) p(x|z)
    under the model's current decoder, and adapt the shared step size toward the chains' target
    (:meth:`vae.mcmc.StepSizes.update` with the minibatch's acceptance rate).

    Args:
        model: anything :mod:`vae.mcmc` samples (``decoder_log_prob``; a closed-form gradient if it
            has ``decoder_log_prob_and_grad``).
        x: (n, D) the examples' data; index: (n,) long, their rows in ``chains.z``.
        generator: draws the momenta, the Metropolis uniforms and the step-size jitter (in that order).
    Returns:
        (z (n, latent_dim) the chains' new states, accepted (n,) bool).
    Raises:
        ValueError: ``x`` and ``index`` of different lengths, ``leapfrog_steps`` below 1, a model
            with two stochastic layers.
    """
    if x.ndim != 2 or index.ndim != 1 or len(x) != len(index):
        raise ValueError(f"x {tuple(x.shape)} and index {tuple(index.shape)}: expected (n, D) and (n,)")
    if leapfrog_steps < 1:
        raise ValueError(f"leapfrog_steps = {leapfrog_steps}: expected an integer >= 1")
    if is_two_layer(model):
        raise ValueError("MCEM trains models with one stochastic layer (AEVB App. E); this model has two")
    path = mcmc.Path(model, x)
    current = path.point(chains.z[index].unsqueeze(0).to(x.dtype))
    shape = current.z.shape
    momentum = torch.randn(shape, generator=generator, device=generator.device).to(x.device, x.dtype)
    uniforms = torch.rand((2, *shape[:2]), generator=generator, device=generator.device).to(x.device)
    base = chains.step_size.to(x.device, x.dtype).expand(shape[:2])
    step = mcmc.jittered(base, uniforms[1], jitter)
    new, accepted = mcmc.hmc_transition(path, current, 1.0, step, momentum, uniforms[0], leapfrog_steps)
    chains.z[index] = new.z[0].to(chains.z.dtype)
    chains.steps.update(accepted.double().mean().cpu())
    return new.z[0], accepted[0]


def log_joint(model: mcmc.DecoderModel, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x, z) = log p(x|z) + log N(z; 0, I), (n,) nats, differentiable in the decoder's parameters:
    x (n, D), z (n, latent_dim)."""
    return model.decoder_log_prob(x, z) + standard_normal_log_prob(z)


def mcem_round(model: mcmc.DecoderModel, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               chains: PersistentChains, index: torch.Tensor, generator: torch.Generator, *,
               leapfrog_steps: int = LEAPFROG_STEPS, weight_updates: int = WEIGHT_UPDATES,
               jitter: float = JITTER) -> RoundRecord:
    """One MCEM round on a minibatch (AEVB App. E): :func:`e_step`, then ``weight_updates``
    optimizer steps on -mean_x log p(x, z) at the chains' new states (``optimizer`` holds the
    decoder's parameters; any others get no gradient).

    Args:
        x: (n, D) the minibatch; index: (n,) its examples' rows in ``chains.z``.
    Returns:
        :class:`RoundRecord`; its ``log_joint`` may be non-finite (the caller checks).
    Raises:
        ValueError: what :func:`e_step` raises, ``weight_updates`` below 1.
    """
    if weight_updates < 1:
        raise ValueError(f"weight_updates = {weight_updates}: expected an integer >= 1")
    step_size = float(chains.step_size)
    z, accepted = e_step(model, x, chains, index, generator, leapfrog_steps=leapfrog_steps, jitter=jitter)
    first = math.nan
    for update in range(weight_updates):
        objective = log_joint(model, x, z).mean()
        if update == 0:
            first = float(objective.detach())
        optimizer.zero_grad(set_to_none=True)
        (-objective).backward()
        optimizer.step()
    return RoundRecord(first, float(accepted.double().mean()), step_size)


__all__ = ["JITTER", "LEAPFROG_STEPS", "PersistentChains", "RoundRecord", "TARGET_ACCEPTANCE", "WEIGHT_UPDATES",
           "e_step", "log_joint", "mcem_round"]
