"""Tests of the wake-sleep algorithm (Hinton, Dayan, Frey & Neal 1995; AEVB Sec. 5's baseline):
the decoder sampler, the wake and sleep objectives against their definitions, which parameters
each phase reaches and changes, learning data drawn from a known generative model, the
configuration checks and the report's set-up row.

The train-stage runs (``vae train`` with ``train.algorithm: wake-sleep``, its outputs, MLflow
records and resuming after a kill) are in tests/test_train.py beside AEVB's.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch

from support import REPO_ROOT, generator, one_thread, small_model
from vae import objectives
from vae.config import Params, TrainConfig, load_params, params_from_dict
from vae.data.splits import Split
from vae.errors import ConfigError
from vae.loop import dataset_elbo, wake_sleep_loss
from vae.model import VAE
from vae.report import _training
from vae.train import make_optimizer, train_model

CPU = torch.device("cpu")
D, LATENT, HIDDEN = 20, 2, 16
wake_sleep_model = partial(small_model, input_dim=D, hidden_dim=HIDDEN, latent_dim=LATENT)


@pytest.fixture(autouse=True)
def _torch_on_one_thread():
    """Tiny models run fastest on one thread; the global random state is left as it was."""
    with one_thread():
        yield


def data_for(likelihood: str, count: int = 40, seed: int = 1) -> torch.Tensor:
    values = torch.rand(count, D, generator=generator(seed))
    return torch.bernoulli(values, generator=generator(seed + 1)) if likelihood == "bernoulli" else values


def encoder_and_decoder(model: VAE) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
    """The recognition model's parameters (phi) and the generative model's (theta), by name."""
    named = dict(model.named_parameters())
    encoder = {k: v for k, v in named.items() if k.startswith("encoder")}
    decoder = {k: v for k, v in named.items() if k.startswith("decoder")}
    assert encoder.keys() | decoder.keys() == named.keys() and not encoder.keys() & decoder.keys()
    return encoder, decoder


def snapshot(parameters: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in parameters.items()}


# --------------------------------------------------------------------------------------------
# The decoder sampler and the two objectives, against their definitions
# --------------------------------------------------------------------------------------------


def test_bernoulli_decoder_sample_is_binary_with_the_decoder_means():
    model = wake_sleep_model(likelihood="bernoulli", dtype=torch.float64)
    z = torch.randn(1, LATENT, generator=generator(3), dtype=torch.float64).expand(20000, LATENT)
    x = model.decoder_sample(z, generator(4))
    assert x.shape == (20000, D) and x.dtype == torch.float64 and not x.requires_grad
    assert bool(((x == 0) | (x == 1)).all())
    p = model.decoder_mean(z[:1])[0].detach()
    stderr = (p * (1 - p) / len(x)).sqrt()
    assert bool(((x.mean(0) - p).abs() < 5 * stderr + 1e-12).all())
    torch.testing.assert_close(model.decoder_sample(z, generator(4)), x, rtol=0, atol=0)  # seeded


def test_gaussian_decoder_sample_has_the_decoder_mean_and_variance():
    model = wake_sleep_model(likelihood="gaussian", dtype=torch.float64)
    with torch.no_grad():  # a spread of variances around 1, so the check is not of one number
        model.decoder_log_var.bias.copy_(torch.linspace(-1.0, 1.0, D, dtype=torch.float64))
    n = 40000
    z = torch.randn(1, LATENT, generator=generator(5), dtype=torch.float64).expand(n, LATENT)
    x = model.decoder_sample(z, generator(6))
    logits, log_var = model.decoder_params(z[:1])
    mean, var = torch.sigmoid(logits)[0].detach(), log_var.exp()[0].detach()
    assert x.shape == (n, D) and not x.requires_grad
    assert bool(((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all())
    assert bool(((x.var(0) / var - 1).abs() < 5 * math.sqrt(2 / n)).all())  # s.e. of a sample variance
    assert bool((x < 0).any() and (x > 1).any())  # a Gaussian's draws, not clipped to [0, 1]


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_wake_objective_is_log_p_x_z_at_encoder_samples(likelihood):
    """wake(x) = (1/L) sum_l [log p(x|z_l) + log N(z_l; 0, I)], z_l = mu + sigma * eps_l; its ELBO
    is the shared ELBO code's value for the same noise."""
    model, x, samples = wake_sleep_model(likelihood=likelihood), data_for(likelihood), 3
    wake, elbo = objectives.wake_objective(model, x, samples, generator(7))
    assert wake.shape == elbo.shape == (len(x),) and not elbo.requires_grad
    mu, log_var = model.encode(x)
    eps = torch.randn((samples, *mu.shape), generator=generator(7))
    z = mu + torch.exp(0.5 * log_var) * eps
    by_hand = (model.decoder_log_prob(x, z) - 0.5 * (math.log(2 * math.pi) * LATENT + z.pow(2).sum(-1))).mean(0)
    torch.testing.assert_close(wake, by_hand, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(elbo, objectives.elbo(model, x, samples, generator(7)).detach(), rtol=0, atol=0)


def test_sleep_objective_is_log_q_of_fantasies():
    """sleep = log N(z; mu(x), diag sigma^2(x)) for z ~ N(0, I), x ~ p(x|z), in that order from one generator."""
    model = wake_sleep_model(likelihood="bernoulli")
    sleep = objectives.sleep_objective(model, 64, generator(8))
    stream = generator(8)
    z = torch.randn(64, LATENT, generator=stream)
    x = model.decoder_sample(z, stream)
    assert bool(((x == 0) | (x == 1)).all())  # binary fantasies for a Bernoulli decoder
    mu, log_var = model.encode(x)
    by_hand = torch.distributions.Normal(mu, torch.exp(0.5 * log_var)).log_prob(z).sum(-1)
    assert sleep.shape == (64,)
    torch.testing.assert_close(sleep, by_hand, rtol=1e-6, atol=1e-5)


def test_wake_sleep_draws_wake_then_sleep_from_one_generator():
    model, x = wake_sleep_model(), data_for("bernoulli")
    terms = objectives.wake_sleep(model, x, 2, generator(9))
    stream = generator(9)
    wake, elbo = objectives.wake_objective(model, x, 2, stream)
    sleep = objectives.sleep_objective(model, len(x), stream)
    for got, expected in ((terms.wake, wake), (terms.elbo, elbo), (terms.sleep, sleep)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bad_sample_counts_are_rejected():
    model, x = wake_sleep_model(), data_for("bernoulli")
    with pytest.raises(ValueError, match=r"samples = 0: expected an integer >= 1"):
        objectives.wake_objective(model, x, 0)
    with pytest.raises(ValueError, match=r"count = 0: expected an integer >= 1"):
        objectives.sleep_objective(model, 0)


# --------------------------------------------------------------------------------------------
# Each phase reaches, and changes, only its own parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_wake_gradient_reaches_only_the_decoder_and_sleep_only_the_encoder(likelihood):
    model, x = wake_sleep_model(likelihood=likelihood), data_for(likelihood)
    encoder, decoder = encoder_and_decoder(model)
    assert (likelihood == "gaussian") == any(k.startswith("decoder_log_var") for k in decoder)
    wake, _ = objectives.wake_objective(model, x, 1, generator(10))
    wake.mean().backward()
    assert all(p.grad is None for p in encoder.values())
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in decoder.values())
    model.zero_grad(set_to_none=True)
    objectives.sleep_objective(model, len(x), generator(11)).mean().backward()
    assert all(p.grad is None for p in decoder.values())
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in encoder.values())


def _config(optimizer: str) -> TrainConfig:
    return TrainConfig(algorithm="wake-sleep", optimizer=optimizer, map_prior=True, device="cpu")


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_each_phase_changes_only_its_own_parameters(optimizer):
    """The training optimizer (all parameters, MAP weight decay on): a step on the wake loss alone
    changes every decoder tensor and no encoder tensor; a step on the sleep loss alone the reverse."""
    x = data_for("bernoulli")
    for phase in ("wake", "sleep"):
        model = wake_sleep_model(likelihood="bernoulli")
        encoder, decoder = encoder_and_decoder(model)
        before_encoder, before_decoder = snapshot(encoder), snapshot(decoder)
        opt = make_optimizer(_config(optimizer), model.parameters(), 0.01, 50)
        loss = -(objectives.wake_objective(model, x, 1, generator(12))[0] if phase == "wake"
                 else objectives.sleep_objective(model, len(x), generator(12))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        kept, moved = (encoder, decoder) if phase == "wake" else (decoder, encoder)
        kept_before, moved_before = (before_encoder, before_decoder) if phase == "wake" else (before_decoder,
                                                                                              before_encoder)
        assert all(torch.equal(kept[k].detach(), kept_before[k]) for k in kept), phase
        assert all(not torch.equal(moved[k].detach(), moved_before[k]) for k in moved), phase


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_one_optimizer_step_equals_a_wake_step_and_a_sleep_step(optimizer):
    """Training's single step over all parameters on -(wake + sleep) equals a decoder optimizer's
    step on -wake and an encoder optimizer's step on -sleep, same settings, three steps running."""
    config = _config(optimizer)
    joint = wake_sleep_model(likelihood="bernoulli")
    split = copy.deepcopy(joint)
    encoder, decoder = encoder_and_decoder(split)
    one = make_optimizer(config, joint.parameters(), 0.01, 50)
    wake_opt = make_optimizer(config, decoder.values(), 0.01, 50)
    sleep_opt = make_optimizer(config, encoder.values(), 0.01, 50)
    joint_stream, split_stream = generator(13), generator(13)
    for step in range(3):
        x = data_for("bernoulli", seed=20 + step)
        loss, record = wake_sleep_loss(joint, x, config, joint_stream)
        one.zero_grad(set_to_none=True)
        loss.backward()
        one.step()
        wake, elbo = objectives.wake_objective(split, x, config.samples, split_stream)
        sleep = objectives.sleep_objective(split, len(x), split_stream)
        wake_opt.zero_grad(set_to_none=True)
        sleep_opt.zero_grad(set_to_none=True)
        (-wake.mean()).backward()
        (-sleep.mean()).backward()
        wake_opt.step()
        sleep_opt.step()
        torch.testing.assert_close(record, torch.stack([elbo.mean(), wake.mean(), sleep.mean()]).detach())
    for (name, a), b in zip(joint.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------
# Learning data drawn from a known generative model
# --------------------------------------------------------------------------------------------

# The known model: z ~ N(0, I_2), x ~ Bernoulli(sigmoid(W z + b)) over 20 pixels, W large enough
# that z matters (a model that ignores z is several nats worse).
TRUE_W = 3.0 * torch.randn(D, LATENT, generator=generator(100))
TRUE_B = torch.randn(D, generator=generator(101))


def known_model_data(count: int, seed: int) -> torch.Tensor:
    stream = generator(seed)
    z = torch.randn(count, LATENT, generator=stream)
    return torch.bernoulli(torch.sigmoid(z @ TRUE_W.T + TRUE_B), generator=stream)


def as_split(x: torch.Tensor) -> Split:
    return Split(x.to(torch.uint8), torch.full((len(x),), -1), binary=True, binarization="static")


def true_log_likelihood(x: torch.Tensor, samples: int = 20000) -> float:
    """Mean log p(x) under the known model, nats per example: (1/S) sum_s p(x|z_s), z_s ~ p(z),
    by log-sum-exp (accurate to ~0.01 nats with a 2-D latent)."""
    z = torch.randn(samples, LATENT, generator=generator(102))
    logits = (z @ TRUE_W.T + TRUE_B)[:, None, :].expand(-1, len(x), -1)
    log_px_z = objectives.bernoulli_log_prob(x, logits)
    return float((torch.logsumexp(log_px_z, 0) - math.log(samples)).mean())


@torch.no_grad()
def mean_wake_objective(model: VAE, x: torch.Tensor) -> float:
    """Mean log p(x, z) over z ~ q(z|x) with fixed noise (10 samples per example), nats."""
    return float(objectives.wake_objective(model, x, 10, generator(103))[0].mean())


def test_wake_sleep_learns_data_from_a_known_model():
    """500 training and 200 validation examples from the known model; 40 passes of wake-sleep
    (400 steps, under a second). The wake objective and the ELBO (the shared dataset_elbo code)
    rise by several nats, and the ELBO closes most of its gap to the true log p(x)."""
    train_x, valid_x = known_model_data(500, seed=1), known_model_data(200, seed=2)
    model = wake_sleep_model(likelihood="bernoulli")
    before = {"wake": mean_wake_objective(model, train_x), "train": dataset_elbo(model, train_x, 5),
              "valid": dataset_elbo(model, valid_x, 6)}
    config = TrainConfig(algorithm="wake-sleep", epochs=40, batch_size=50, learning_rate=0.01, elbo_eval_size=500,
                         device="cpu", seed=1, checkpoint_interval=0)
    result = train_model(model, as_split(train_x), as_split(valid_x), config, CPU, progress=False)
    after = {"wake": mean_wake_objective(model, train_x), "train": dataset_elbo(model, train_x, 5),
             "valid": dataset_elbo(model, valid_x, 6)}
    truth = true_log_likelihood(train_x)
    # Before: a random decoder, about 13.5 nats per example below; after: within ~0.5 nats of log p(x).
    assert after["wake"] > before["wake"] + 4.0, (before, after)
    assert after["train"] > before["train"] + 3.0, (before, after)
    assert after["valid"] > before["valid"] + 3.0, (before, after)
    assert truth - after["train"] < 0.25 * (truth - before["train"]), (truth, before, after)
    # The stage's own per-pass curve is the same ELBO code and shows the same rise.
    curve = result.epochs
    assert curve["train_elbo"].iloc[-1] > curve["train_elbo"].iloc[0] + 2.0
    assert curve["valid_elbo"].iloc[-1] > curve["valid_elbo"].iloc[0] + 2.0
    # The per-step curve names its columns: the minibatch ELBO and the two phases' objectives.
    steps = result.steps
    assert list(steps.columns) == ["step", "examples_seen", "train_elbo", "wake_objective", "sleep_objective"]
    first, last = steps.iloc[:3].mean(), steps.iloc[-3:].mean()
    assert last["train_elbo"] > first["train_elbo"] + 2.0
    assert last["wake_objective"] > first["wake_objective"] + 2.0
    assert last["sleep_objective"] > first["sleep_objective"] + 0.5


# --------------------------------------------------------------------------------------------
# Configuration and the report
# --------------------------------------------------------------------------------------------


def test_algorithm_defaults_to_aevb_and_accepts_wake_sleep():
    assert TrainConfig().algorithm == "aevb"
    assert load_params(REPO_ROOT / "params.yaml").train.algorithm == "aevb"
    params = params_from_dict({"train": {"algorithm": "wake-sleep", "samples": 2}})
    assert params.train.algorithm == "wake-sleep" and params.flat()["train.algorithm"] == "wake-sleep"


@pytest.mark.parametrize(("train", "message"), [
    ({"algorithm": "wakesleep"}, "train.algorithm = 'wakesleep': expected one of aevb, wake-sleep"),
    ({"algorithm": "wake-sleep", "objective": "iwae", "samples": 5},
     "train.algorithm = 'wake-sleep': not with objective = 'iwae' (wake-sleep trains its own wake and sleep "
     "objectives; the iwae bound is an AEVB objective); expected objective: elbo, or algorithm: aevb"),
    ({"algorithm": 3}, "train.algorithm = 3: expected a string"),
])
def test_bad_algorithm_settings_are_rejected_naming_the_field(train, message):
    with pytest.raises(ConfigError) as caught:
        params_from_dict({"train": train})
    assert message in str(caught.value)


def test_report_names_wake_sleep_as_the_objective():
    summary = {"algorithm": "wake-sleep", "objective": "elbo", "samples": 1, "optimizer": "adagrad",
               "learning_rate": 0.02, "batch_size": 100, "epochs": 3, "examples_seen": 300}
    objective, optimizer, _ = _training(summary, Params())
    assert objective.startswith("wake-sleep (Hinton et al. 1995")
    assert "log p(x, z), z ~ q(z|x)" in objective and "log q(z|x), (z, x) ~ p(z) p(x|z)" in objective
    assert optimizer.startswith("adagrad, step size 0.02")
    aevb, _, _ = _training({**summary, "algorithm": "aevb"}, Params())
    assert aevb.startswith("SGVB ELBO") and "wake" not in aevb
