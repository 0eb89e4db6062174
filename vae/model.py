"""The AEVB variational autoencoder (Kingma & Welling 2014, Sec. 3 and App. C).

Encoder q(z|x) = N(mu(x), diag exp(log_var(x))); prior p(z) = N(0, I); decoder p(x|z) either
Bernoulli(sigmoid(logits(z))) for binary data or, for real-valued data in [0, 1] (Frey Face),
N(x; sigmoid(logits(z)), diag exp(log_var(z))) with a learned per-pixel log-variance (App. C.2,
means constrained to (0, 1) by a sigmoid as for Frey Face in Sec. 5). Encoder and decoder are MLPs
with ``hidden_layers`` tanh layers. :class:`TwoLayerVAE` adds a second stochastic layer above z
(IWAE's two-stochastic-layer model, Burda et al. 2016, Sec. 5). Checkpoints hold only tensors and
plain values, and :func:`load_model` reads them with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vae import objectives
from vae.datasets import LIKELIHOODS  # the decoder likelihoods the datasets call for
from vae.errors import CheckpointError, shown
from vae.io import atomic_open

CHECKPOINT_FORMAT = "vae-pipeline/checkpoint"
CHECKPOINT_VERSION = 1
FLOAT_BYTES = 4


def _tanh_mlp(first: int, hidden_dim: int, layers: int) -> list[nn.Module]:
    modules: list[nn.Module] = []
    for i in range(layers):
        modules += [nn.Linear(first if i == 0 else hidden_dim, hidden_dim), nn.Tanh()]
    return modules


class VAE(nn.Module):
    """Gaussian-encoder VAE with a Bernoulli or Gaussian decoder and tanh hidden layers.

    Args:
        input_dim: D, pixels per image (784 for MNIST, 560 for Frey Face).
        hidden_dim: tanh units in each hidden layer of the encoder and the decoder.
        latent_dim: N_z, the size of z.
        hidden_layers: hidden layers on each side (AEVB: 1; IWAE's 784-200-200-50 model: 2).
        likelihood: ``bernoulli`` (binary data) or ``gaussian`` (real data in [0, 1]).

    Raises:
        ValueError: a size below 1 or an unknown likelihood.
    """

    stochastic_layers = 1

    def __init__(self, input_dim: int = 784, hidden_dim: int = 500, latent_dim: int = 20,
                 hidden_layers: int = 1, likelihood: str = "bernoulli") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood = {likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")
        if min(input_dim, hidden_dim, latent_dim, hidden_layers) < 1:
            raise ValueError(f"sizes must be >= 1, got input_dim={input_dim}, hidden_dim={hidden_dim}, "
                             f"latent_dim={latent_dim}, hidden_layers={hidden_layers}")
        self.input_dim, self.hidden_dim, self.latent_dim = input_dim, hidden_dim, latent_dim
        self.hidden_layers, self.likelihood = hidden_layers, likelihood
        self.encoder = nn.Sequential(*_tanh_mlp(input_dim, hidden_dim, hidden_layers))
        self.encoder_mean = nn.Linear(hidden_dim, latent_dim)
        self.encoder_log_var = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(*_tanh_mlp(latent_dim, hidden_dim, hidden_layers),
                                     nn.Linear(hidden_dim, input_dim))
        # The Gaussian decoder's second head reads the same last hidden layer as the means.
        self.decoder_log_var = nn.Linear(hidden_dim, input_dim) if likelihood == "gaussian" else None

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as stored in checkpoints."""
        return {"input_dim": self.input_dim, "hidden_dim": self.hidden_dim, "latent_dim": self.latent_dim,
                "hidden_layers": self.hidden_layers, "likelihood": self.likelihood}

    @torch.no_grad()
    def initialize_normal_(self, std: float, generator: torch.Generator | None = None) -> VAE:
        """Draw every weight and bias from N(0, std^2) (AEVB Sec. 5: N(0, 0.01)); returns self."""
        for parameter in self.parameters():
            parameter.normal_(0.0, std, generator=generator)
        return self

    @torch.no_grad()
    def initialize_output_bias_(self, pixel_means: torch.Tensor) -> VAE:
        """Set the decoder's output bias to logit(clip(pixel_means, 0.001, 0.999)), so that before
        training the decoder's mean is the training set's mean image (the IWAE authors' code,
        yburda/iwae ``get_train_bias_np``). ``pixel_means``: (D,) float, each training pixel's
        mean intensity in [0, 1]. Returns self.

        Raises:
            ValueError: ``pixel_means`` is not (D,) or holds values outside [0, 1] or NaN.
        """
        means = torch.as_tensor(pixel_means, dtype=torch.float64)
        if tuple(means.shape) != (self.input_dim,) or not bool(((means >= 0) & (means <= 1)).all()):
            raise ValueError(f"pixel_means: expected ({self.input_dim},) values in [0, 1], got "
                             f"{tuple(means.shape)} from {float(means.min())} to {float(means.max())}")
        clipped = means.clamp(0.001, 0.999)
        output = self.decoder[-1]
        output.bias.copy_(torch.log(clipped / (1 - clipped)).to(output.bias.dtype))
        return self

    def _checked_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate x and return it in the parameters' dtype (0 and 1 are exact in any float type)."""
        if not torch.is_floating_point(x) or x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x: expected a float tensor of shape (batch, {self.input_dim}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        if self.likelihood == "bernoulli" and not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("x: expected values in {0, 1} (binarize grey images first; a Bernoulli "
                             "likelihood of grey values is not a likelihood)")
        if self.likelihood == "gaussian" and not bool(torch.isfinite(x).all()):
            raise ValueError("x: expected finite values")
        return x.to(self.encoder[0].weight.dtype)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) parameters: x (batch, D) float -> (mu, log_var), each (batch, latent_dim)."""
        hidden = self.encoder(x)
        return self.encoder_mean(hidden), self.encoder_log_var(hidden)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the decoder's means: z (..., latent_dim) -> (..., D); sigmoid gives the means
        (the Bernoulli probabilities, or the Gaussian means)."""
        return self.decoder(z)

    def decoder_params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits of the means, log-variance or None for Bernoulli): z (..., latent_dim) -> (..., D) each."""
        hidden = self.decoder[:-1](z)
        log_var = self.decoder_log_var(hidden) if self.decoder_log_var is not None else None
        return self.decoder[-1](hidden), log_var

    def decoder_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z] = sigmoid(logits(z)): z (..., latent_dim) -> (..., D) float in (0, 1)."""
        return torch.sigmoid(self.decode(z))

    @torch.no_grad()
    def decoder_sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x|z), one draw per z: z (..., latent_dim) float -> (..., D) in the parameters' dtype.

        Bernoulli decoder: x_d ~ Bernoulli(sigmoid(logits_d(z))), values in {0, 1}. Gaussian decoder:
        x = sigmoid(logits(z)) + exp(log_var(z) / 2) * eps, eps ~ N(0, I), real values (not clipped
        to [0, 1]: the model's density has support everywhere). No gradient: wake-sleep's sleep
        phase (:func:`vae.objectives.sleep_objective`) treats these fantasies as data.
        """
        logits, log_var = self.decoder_params(z)
        mean = torch.sigmoid(logits)
        if log_var is None:
            return torch.bernoulli(mean, generator=generator)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * log_var) * eps

    def reparameterize(self, mu: torch.Tensor, log_var: torch.Tensor, samples: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + exp(log_var / 2) * eps; see :func:`vae.objectives.reparameterize`."""
        return objectives.reparameterize(mu, log_var, samples, generator)

    def decoder_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels: x (batch, D), z (..., batch, latent_dim) -> (..., batch), nats.

        Bernoulli: minus the binary cross-entropy with logits. Gaussian: log N(x; sigmoid(logits),
        diag exp(log_var)), a density (it can be positive). Without autograd (evaluation) the
        Bernoulli decoder takes a fused path: in-place activations and
        :func:`vae.objectives.bernoulli_log_prob_`, which reads each logit from cache a few
        times instead of from memory, the difference being float rounding (about 1e-4 nats).
        """
        if torch.is_grad_enabled():
            if self.likelihood == "gaussian":
                logits, log_var = self.decoder_params(z)
                return objectives.gaussian_log_prob(x, torch.sigmoid(logits), log_var)
            return objectives.bernoulli_log_prob(x, self.decode(z))
        hidden = z.reshape(-1, self.latent_dim)
        for layer in self.decoder[:-1:2]:  # the Linear of each (Linear, Tanh) pair
            hidden = torch.addmm(layer.bias, hidden, layer.weight.t())
            hidden.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)  # tanh(h) = 2 sigmoid(2h) - 1, vectorised
        shape = (*z.shape[:-1], self.input_dim)
        last = self.decoder[-1]
        logits = torch.addmm(last.bias, hidden, last.weight.t()).view(shape)
        if self.likelihood == "gaussian":
            head = self.decoder_log_var
            log_var = torch.addmm(head.bias, hidden, head.weight.t()).view(shape)
            return objectives.gaussian_log_prob_(x, logits.sigmoid_(), log_var)
        return objectives.bernoulli_log_prob_(x, logits)

    @torch.no_grad()
    def decoder_log_prob_and_grad(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z) and grad_z log p(x|z) in closed form, for HMC and AIS (:mod:`vae.mcmc`).

        One forward and one backward-to-input pass through the decoder's matrices, no autograd
        graph: with h_i = tanh(a_i) the hidden layers and l the logits, the Bernoulli decoder has
        d log p / d l = x - sigmoid(l); the Gaussian one, with m = sigmoid(l) and r = x - m,
        d/dl = r exp(-log_var) m (1 - m) and d/d log_var = (r^2 exp(-log_var) - 1) / 2; then
        back through each layer, d/da_i = d/dh_i (1 - h_i^2).

        Shapes: x (n, D), z (..., n, latent_dim) -> ((..., n), (..., n, latent_dim)); nats.
        """
        flat = z.reshape(-1, self.latent_dim)
        layers = list(self.decoder[:-1:2])  # the Linear of each (Linear, Tanh) pair
        hiddens = []
        hidden = flat
        for layer in layers:
            hidden = torch.addmm(layer.bias, hidden, layer.weight.t()).tanh_()
            hiddens.append(hidden)
        last = self.decoder[-1]
        shape = (*z.shape[:-1], self.input_dim)
        logits = torch.addmm(last.bias, hidden, last.weight.t()).view(shape)
        if self.likelihood == "bernoulli":
            value = (logits * x).sum(-1) - torch.nn.functional.softplus(logits).sum(-1)
            grad_output = torch.sigmoid(logits).neg_().add_(x)
            grad_hidden = grad_output.view(-1, self.input_dim) @ last.weight
        else:
            head = self.decoder_log_var
            log_var = torch.addmm(head.bias, hidden, head.weight.t()).view(shape)
            mean = logits.sigmoid_()
            precision = log_var.neg().exp_()
            residual = x - mean
            weighted = residual * precision
            value = -0.5 * (self.input_dim * objectives.LOG_2PI + log_var.sum(-1) + (residual * weighted).sum(-1))
            grad_logits = weighted.mul_(mean).mul_(1.0 - mean)
            grad_log_var = residual.mul_(residual).mul_(precision).sub_(1.0).mul_(0.5)
            grad_hidden = (grad_logits.view(-1, self.input_dim) @ last.weight
                           + grad_log_var.view(-1, self.input_dim) @ head.weight)
        for layer, hidden in zip(reversed(layers), reversed(hiddens), strict=True):
            grad_hidden = (grad_hidden * (1.0 - hidden * hidden)) @ layer.weight
        return value, grad_hidden.view(z.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Single-sample ELBO per example (the training objective, unchecked input), nats."""
        return objectives.elbo(self, x)

    def elbo(self, x: torch.Tensor, samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """SGVB estimate of the ELBO per example (Kingma & Welling 2014, Eq. 7), analytic KL.

        Args:
            x: (batch, D) float tensor: values in {0, 1} (Bernoulli decoder) or real (Gaussian).
            samples: L, Monte Carlo samples of z per example.
        Returns:
            (batch,) float, nats per example (negative; higher is better).
        Raises:
            ValueError: x is not a float tensor of shape (batch, D), has non-binary values, or
                ``samples < 1``. Other float dtypes are converted to the model's.
        """
        return objectives.elbo(self, self._checked_input(x), samples, generator)

    def log_likelihood(self, x: torch.Tensor, importance_samples: int = 5000,
                       memory_budget_mb: float = 16, seed: int = 0) -> torch.Tensor:
        """Importance-sampled log p(x), L_k (Burda et al. 2016, Eq. 8), per example.

        Args:
            x: (batch, D) float tensor: values in {0, 1} (Bernoulli decoder) or real (Gaussian).
            importance_samples: k; the field reports k = 5000.
            memory_budget_mb: bound on the working memory of one chunk of (example, sample) pairs
                (16 MB suits CPU caches; on a GPU, larger chunks run faster).
            seed: seeds one random stream per example; the result does not depend on batching.
        Returns:
            (batch,) float, nats per example.
        Raises:
            ValueError: bad input, or importance_samples < 1.
        """
        x = self._checked_input(x)
        was_training = self.training
        self.eval()
        try:
            estimate = objectives.importance_sampled_log_likelihood(
                self, x, importance_samples, self.pairs_for_budget(memory_budget_mb), seed)
        finally:
            self.train(was_training)
        return estimate.log_likelihood

    def pairs_for_budget(self, memory_budget_mb: float) -> int:
        """How many (example, sample) pairs fit in ``memory_budget_mb`` of decoder activations.

        Per pair the evaluation holds the noise and z, the decoder's hidden layer and the logits
        (overwritten in place by the log-likelihood): about (2 latent + hidden + D) floats.
        """
        return max(1, int(memory_budget_mb * 2**20 // (self._floats_per_pair() * FLOAT_BYTES)))

    def _floats_per_pair(self) -> int:
        """The floats one (example, sample) pair holds during evaluation (:meth:`pairs_for_budget`)."""
        outputs = self.input_dim * (3 if self.likelihood == "gaussian" else 1)
        return 2 * self.latent_dim + self.hidden_dim * self.hidden_layers + outputs

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder means sigmoid(logits(z)) for z ~ p(z): (count, D) float in (0, 1)."""
        device = next(self.parameters()).device
        z = torch.randn(count, self.latent_dim, generator=generator, device=device)
        return self.decoder_mean(z)


class TwoLayerVAE(VAE):
    """A VAE with two stochastic layers (Burda et al. 2016, Sec. 5; the authors' ``--layers 2``).

    Generative model p(z2) p(z1|z2) p(x|z1): p(z2) = N(0, I); p(z1|z2) = N(m(z2), diag exp(v(z2)))
    through ``hidden_layers`` tanh layers of ``top_hidden_dim`` units; p(x|z1) the decoder of
    :class:`VAE` with z = z1. Inference model q(z1|x) q(z2|z1): q(z1|x) the encoder of
    :class:`VAE`; q(z2|z1) = N(mu2(z1), diag exp(log_var2(z1))) through ``hidden_layers`` tanh
    layers of ``top_hidden_dim`` units. IWAE's model: 784-200-200-100 between x and z1, 100-100-100-50
    between z1 and z2 (``hidden_dim`` 200, ``latent_dim`` 100, ``top_hidden_dim`` 100,
    ``top_latent_dim`` 50, ``hidden_layers`` 2). The authors' Gaussian layers output log sigma
    (``nnet.Exponential``), these log sigma^2: the same family, a factor 2 in one linear layer.

    Everything inherited speaks of the first layer: ``encode`` gives q(z1|x), ``decode`` and
    ``decoder_log_prob`` take z1, ``latent_dim`` is z1's size. The bounds (``elbo``,
    ``log_likelihood`` and :mod:`vae.objectives`) run over both layers; :meth:`sample` draws
    ancestrally from p(z2) p(z1|z2).

    Raises:
        ValueError: a size below 1 or an unknown likelihood.
    """

    stochastic_layers = 2

    def __init__(self, input_dim: int = 784, hidden_dim: int = 200, latent_dim: int = 100,
                 hidden_layers: int = 2, likelihood: str = "bernoulli", top_latent_dim: int = 50,
                 top_hidden_dim: int = 100) -> None:
        super().__init__(input_dim, hidden_dim, latent_dim, hidden_layers, likelihood)
        if min(top_latent_dim, top_hidden_dim) < 1:
            raise ValueError(f"sizes must be >= 1, got top_latent_dim={top_latent_dim}, "
                             f"top_hidden_dim={top_hidden_dim}")
        self.top_latent_dim, self.top_hidden_dim = top_latent_dim, top_hidden_dim
        self.top_encoder = nn.Sequential(*_tanh_mlp(latent_dim, top_hidden_dim, hidden_layers))
        self.top_encoder_mean = nn.Linear(top_hidden_dim, top_latent_dim)
        self.top_encoder_log_var = nn.Linear(top_hidden_dim, top_latent_dim)
        self.top_decoder = nn.Sequential(*_tanh_mlp(top_latent_dim, top_hidden_dim, hidden_layers))
        self.top_decoder_mean = nn.Linear(top_hidden_dim, latent_dim)
        self.top_decoder_log_var = nn.Linear(top_hidden_dim, latent_dim)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as stored in checkpoints (with ``stochastic_layers``: 2)."""
        return {**super().config(), "stochastic_layers": 2, "top_latent_dim": self.top_latent_dim,
                "top_hidden_dim": self.top_hidden_dim}

    def encode_top(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z2|z1): z1 (..., latent_dim) -> (mean, log-variance), each (..., top_latent_dim)."""
        hidden = self.top_encoder(z1)
        return self.top_encoder_mean(hidden), self.top_encoder_log_var(hidden)

    def decode_top(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z1|z2): z2 (..., top_latent_dim) -> (mean, log-variance), each (..., latent_dim)."""
        hidden = self.top_decoder(z2)
        return self.top_decoder_mean(hidden), self.top_decoder_log_var(hidden)

    def _floats_per_pair(self) -> int:
        """:meth:`VAE._floats_per_pair` with the top layer's activations added: its hidden layers on
        both sides, z2's noise and value, p(z1|z2)'s mean and log-variance."""
        return (super()._floats_per_pair() + 2 * self.latent_dim + 2 * self.top_latent_dim
                + 2 * self.top_hidden_dim * self.hidden_layers)

    @torch.no_grad()
    def sample_latents(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z1 ~ p(z1) = E_p(z2)[p(z1|z2)], ancestrally: (count, latent_dim) float."""
        device = next(self.parameters()).device
        z2 = torch.randn(count, self.top_latent_dim, generator=generator, device=device)
        mean, log_var = self.decode_top(z2)
        eps = torch.randn(mean.shape, generator=generator, device=device)
        return mean + torch.exp(0.5 * log_var) * eps

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder means sigmoid(logits(z1)) for z1 ~ p(z1|z2), z2 ~ p(z2): (count, D) float in (0, 1)."""
        return self.decoder_mean(self.sample_latents(count, generator))

    @torch.no_grad()
    def layer_means(self, x: torch.Tensor, samples: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer's posterior mean, for the active units (Burda et al. 2016, Sec. 5.2):
        E_q[z1|x] = mu(x) and E_q[z2|x] = E_q(z1|x)[mu2(z1)], the latter averaged over ``samples``
        draws of z1 (seeded by ``seed``). x (N, D) -> ((N, latent_dim), (N, top_latent_dim)).
        (The authors' code, ``get_units_variances``, takes mu2 at a single draw of z1, which adds
        E_x Var_z1[mu2(z1)] to each unit's variance.)"""
        generator = torch.Generator(device=x.device).manual_seed(seed)
        mu, log_var = self.encode(x)
        total = torch.zeros(len(x), self.top_latent_dim, device=x.device, dtype=mu.dtype)
        for _ in range(samples):
            eps = torch.randn(mu.shape, generator=generator, device=x.device, dtype=mu.dtype)
            total += self.encode_top(mu + torch.exp(0.5 * log_var) * eps)[0]
        return mu, total / samples


def model_from_config(config: dict[str, Any]) -> VAE:
    """The model a checkpoint's ``model_config`` declares: :class:`TwoLayerVAE` when it says
    ``stochastic_layers: 2``, else :class:`VAE` (checkpoints written before two layers existed
    hold no ``stochastic_layers``).

    Raises:
        TypeError, ValueError: unknown or bad arguments.
    """
    config = dict(config)
    layers = config.pop("stochastic_layers", 1)
    if type(layers) is not int or layers not in (1, 2):
        raise ValueError(f"stochastic_layers = {shown(layers)}: expected 1 or 2")
    return TwoLayerVAE(**config) if layers == 2 else VAE(**config)


def save_checkpoint(model: VAE, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` (weights on CPU, constructor arguments, plain metadata) atomically."""
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
               "model_config": model.config(), "state_dict": state, "metadata": metadata or {}}
    with atomic_open(path) as handle:  # a handle keeps the bytes deterministic
        torch.save(payload, handle)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint's payload without building the model.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a checkpoint of this project.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run `vae train` first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights-only errors differ across torch versions
        raise CheckpointError(f"{path}: not a checkpoint of this project "
                              f"(torch.load with weights_only=True failed: {error})") from None
    marker = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(marker, str) or marker != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project "
                              f"(expected format {CHECKPOINT_FORMAT!r})")
    version = payload.get("format_version")  # compared as an int: a tensor's == gives a tensor
    if type(version) is not int or version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {shown(version)}, "
                              f"this code reads version {CHECKPOINT_VERSION}")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> VAE:
    """Load a trained :class:`VAE` (or :class:`TwoLayerVAE`) from a checkpoint of the ``train`` stage.

    The returned module is in eval mode and offers ``encode(x) -> (mu, log_var)``,
    ``decode(z) -> logits``, ``elbo(x)`` and ``log_likelihood(x, importance_samples)`` for x a
    float tensor of shape (batch, D) (binary for a Bernoulli decoder); results in nats per example.

    Raises:
        CheckpointError: the file is missing, is not a checkpoint of this project, or its
            weights do not fit the architecture it declares. Nothing in it is executed.
    """
    payload = read_checkpoint(path)
    config, state = payload.get("model_config"), payload.get("state_dict")
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: damaged checkpoint (model_config and state_dict must be mappings, "
                              f"got {type(config).__name__} and {type(state).__name__})")
    try:
        # The architecture is built without memory first: a damaged size (hidden_dim 2**20, say)
        # must not allocate gigabytes before the weights are found not to fit it.
        with torch.device("meta"):
            expected = {key: tuple(value.shape) for key, value in model_from_config(config).state_dict().items()}
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise CheckpointError(f"{path}: damaged checkpoint (model_config: {error})") from None
    found = {key: tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
             for key, value in state.items()}
    wrong = [key for key in {**expected, **found} if found.get(key) != expected.get(key)]
    if wrong:
        raise CheckpointError(f"{path}: damaged checkpoint (the weights do not fit its model_config: "
                              + "; ".join(f"{shown(key)} is {found.get(key, 'missing')}, expected "
                                          f"{expected.get(key, 'no such weight')}" for key in wrong[:4]) + ")")
    try:
        model = model_from_config(config)
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path}: damaged checkpoint ({error})") from None
    return model.to(device).eval()
