"""Two stochastic layers (Burda et al. 2016, Sec. 5): the bounds over both layers against closed
forms and Monte Carlo, the MCMC estimators in the prior's noise coordinates, the model and its
checkpoints, and the configuration that builds it.

The closed form is a linear-Gaussian model with two latent layers
(:class:`support.LinearGaussianTwoLayerModel`), whose log p(x) is a Gaussian's log-density.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from support import make_linear_gaussian_two_layer, one_thread, write_processed
from vae import mcmc, objectives
from vae.config import params_from_dict
from vae.errors import ConfigError
from vae.model import VAE, TwoLayerVAE, load_model, save_checkpoint
from vae.train import build_model


def binary_images(count: int, dim: int, seed: int) -> torch.Tensor:
    return torch.bernoulli(torch.rand(count, dim, generator=torch.Generator().manual_seed(seed)))


def small_two_layer(seed: int = 0, dtype: torch.dtype = torch.float64) -> TwoLayerVAE:
    torch.manual_seed(seed)
    return TwoLayerVAE(input_dim=12, hidden_dim=16, latent_dim=4, hidden_layers=2, top_latent_dim=3,
                       top_hidden_dim=8).to(dtype)


# ------------------------------------------------------------------ closed forms, linear-Gaussian


@pytest.mark.parametrize("k", [1, 7, 64])
def test_exact_two_layer_posterior_gives_every_weight_log_marginal(k: int) -> None:
    """With q(z1|x) q(z2|z1) the exact posterior, log w = log p(x) for every sample: L_k, the
    ELBO and the chunked estimate equal the closed form to float64 rounding."""
    model, x = make_linear_gaussian_two_layer(5, 5, 5, 6, diagonal=True)
    exact = model.log_marginal(x)
    g = torch.Generator().manual_seed(1)
    mu, log_var = model.encode(x)
    eps = torch.randn(k, 6, 10, generator=g, dtype=x.dtype)
    log_w = objectives.two_layer_log_weights(model, x, mu, log_var, eps)
    torch.testing.assert_close(log_w, exact.expand(k, -1), rtol=0, atol=1e-9)
    torch.testing.assert_close(objectives.iwae_bound(model, x, k, g), exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(objectives.elbo(model, x, k, g), exact, rtol=0, atol=1e-9)
    estimate = objectives.importance_sampled_log_likelihood(model, x, k, max_pairs=5, curve=[1])
    torch.testing.assert_close(estimate.log_likelihood, exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(estimate.elbo, exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(estimate.curve[1], exact, rtol=0, atol=1e-9)


def test_two_layer_iwae_bound_reaches_the_exact_log_marginal() -> None:
    """An imperfect q (means moved by 0.5 s.d., variances x 1.5) on a non-diagonal model: L_k
    rises with k and L_20000 is within 0.01 nats of the exact log p(x) in the mean over images
    (measured: 0.001), while the ELBO sits clearly below it."""
    model, x = make_linear_gaussian_two_layer(6, 4, 2, 40, seed=3, shift=0.5, inflate=1.5)
    exact = model.log_marginal(x)
    estimate = objectives.importance_sampled_log_likelihood(model, x, 20000, max_pairs=20000, seed=2,
                                                            curve=[1, 10, 100, 1000])
    means = [float(estimate.curve[k].mean()) for k in (1, 10, 100, 1000)] + [float(estimate.log_likelihood.mean())]
    assert means == sorted(means), means
    gap = float((exact - estimate.log_likelihood).mean())
    assert abs(gap) < 0.01, gap
    elbo_gap = float((exact - estimate.elbo).mean())
    assert elbo_gap > 0.1, elbo_gap
    assert float((estimate.log_likelihood - exact).max()) < 0.05  # a lower bound, up to its noise


def test_whitening_is_a_bijection_with_the_prior_s_density() -> None:
    """N(u; 0, I) = p(z2) p(z1|z2) |dz1/du1|: the log-densities differ by sum log s(z2) exactly,
    and p(x|z1(u)) is the decoder's at z1(u)."""
    model, x = make_linear_gaussian_two_layer(6, 4, 2, 5, seed=4)
    view = mcmc.standard_prior(model)
    assert isinstance(view, mcmc.Whitened) and view.latent_dim == 6
    u = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    z1, z2 = view.first_layer(u), u[..., 4:]
    mean, log_var = model.decode_top(z2)
    torch.testing.assert_close(z1, mean + torch.exp(0.5 * log_var) * u[..., :4])
    log_joint_prior = objectives.standard_normal_log_prob(z2) + objectives.gaussian_log_prob(z1, mean, log_var)
    torch.testing.assert_close(objectives.standard_normal_log_prob(u),
                               log_joint_prior + 0.5 * log_var.sum(-1))
    torch.testing.assert_close(view.decoder_log_prob(x, u), model.decoder_log_prob(x, z1))


@pytest.mark.parametrize("initial", ["prior", "encoder"])
def test_ais_on_two_layers_matches_the_exact_log_marginal(initial: str) -> None:
    """AIS in the noise coordinates (Wu et al. 2017's estimator, unchanged) recovers the closed
    form of a two-layer linear-Gaussian model: the mean error over 16 images within 0.05 nats
    + 3 s.e. (test_mcmc.py's tolerance for one layer)."""
    model, x = make_linear_gaussian_two_layer(6, 4, 2, 16, seed=5, shift=0.5, inflate=1.5)
    estimate = mcmc.ais(model, x, 300, chains=16, initial=initial, seed=1)
    error = estimate.log_likelihood - model.log_marginal(x)
    assert abs(float(error.mean())) <= 0.05 + 3 * float(error.std() / 4), error
    assert estimate.final_z.shape == (16, 16, 6)


def test_bdmc_brackets_a_two_layer_model_s_log_likelihood() -> None:
    """On data simulated from a two-layer VAE, forward and reverse AIS in u (the reverse chains
    start at the exact posterior u) each agree with L_20000 of the same images, a near-exact log
    p(x) for this small model, within 0.1 nats + 3 s.e., and their gap is within 0.1 + 3 s.e."""
    model = small_two_layer(seed=2)
    bounds = mcmc.bdmc(model, 8, 200, chains=8, seed=3, leapfrog_steps=5)
    assert bounds.x.shape == (8, 12) and bounds.z.shape == (8, 7)
    reference = model.log_likelihood(bounds.x, 20000)
    for bound in (bounds.lower, bounds.upper):
        error = bound - reference
        assert abs(float(error.mean())) <= 0.1 + 3 * float(error.std() / math.sqrt(8)), error
    assert abs(bounds.gap) <= 0.1 + 3 * bounds.gap_stderr, bounds.gap


# ------------------------------------------------------------------ the model's ELBO by Monte Carlo


def test_two_layer_elbo_agrees_with_a_monte_carlo_estimate_of_the_same_bound() -> None:
    """The ELBO over both layers against a Monte Carlo estimate of E_q[log p(x, z1, z2) - log q(z1,
    z2|x)] written independently with torch.distributions (ancestral draws from q, every density
    a Normal's or a Bernoulli's log_prob): equal within four standard errors per image, and below
    L_1000."""
    model = small_two_layer(seed=1)
    x = binary_images(5, 12, seed=0).double()
    samples = 20000
    torch.manual_seed(7)
    with torch.no_grad():
        mu, log_var = model.encode(x)
        q1 = Normal(mu, torch.exp(0.5 * log_var))
        z1 = q1.sample((samples,))
        mu2, log_var2 = model.encode_top(z1)
        q2 = Normal(mu2, torch.exp(0.5 * log_var2))
        z2 = q2.sample()
        mean, log_var_p = model.decode_top(z2)
        logits = model.decode(z1)
        reference = (Bernoulli(logits=logits).log_prob(x).sum(-1)
                     + Normal(mean, torch.exp(0.5 * log_var_p)).log_prob(z1).sum(-1)
                     + Normal(0.0, 1.0).log_prob(z2).sum(-1) - q1.log_prob(z1).sum(-1) - q2.log_prob(z2).sum(-1))
        ours = objectives.elbo(model, x, samples, torch.Generator().manual_seed(8))
        per_draw = torch.stack([objectives.elbo(model, x, 1, torch.Generator().manual_seed(s)) for s in range(500)])
    spread = torch.sqrt(reference.var(0) / samples + per_draw.var(0) / samples)
    z = (ours - reference.mean(0)) / spread
    assert float(z.abs().max()) < 4.0, z
    assert bool((ours < model.log_likelihood(x, 1000)).all())


def test_two_layer_bounds_send_gradients_to_every_parameter() -> None:
    model = small_two_layer(dtype=torch.float32)
    x = binary_images(4, 12, seed=1)
    for bound in (objectives.elbo(model, x, 2), objectives.iwae_bound(model, x, 5)):
        model.zero_grad()
        (-bound.mean()).backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert not missing, missing


def test_two_layer_log_likelihood_does_not_depend_on_chunking() -> None:
    model = small_two_layer(dtype=torch.float32).eval()
    x = binary_images(6, 12, seed=2)
    small, large = model.log_likelihood(x, 300, memory_budget_mb=0.001), model.log_likelihood(x, 300, 64)
    torch.testing.assert_close(small, large, rtol=0, atol=1e-4)


def test_a_gaussian_decoder_with_two_layers_gives_consistent_bounds() -> None:
    """Grey data (Frey Face's decoder) under two stochastic layers: the evaluation's fused density
    equals the autograd one, L_2000 sits above the ELBO (averaged over the same 2000 samples; measured
    0.5 nats on 6 images), and AIS from the encoder lands within 1 nat of L_2000 on a small
    untrained model."""
    torch.manual_seed(4)
    model = TwoLayerVAE(input_dim=10, hidden_dim=12, latent_dim=3, hidden_layers=1, likelihood="gaussian",
                        top_latent_dim=2, top_hidden_dim=6).double().eval()
    x = torch.rand(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z1 = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        fused = model.decoder_log_prob(x, z1)
    torch.testing.assert_close(fused, model.decoder_log_prob(x, z1).detach())
    estimate = objectives.importance_sampled_log_likelihood(model, x, 2000)
    assert float((estimate.log_likelihood - estimate.elbo).mean()) > 0.1
    assert bool(torch.isfinite(estimate.log_likelihood).all())
    ais = mcmc.ais(model, x, 100, chains=8, initial="encoder", seed=3)
    assert abs(float((ais.log_likelihood - estimate.log_likelihood).mean())) < 1.0


# ------------------------------------------------------------------ the model, checkpoints, config


def test_two_layer_model_samples_and_layer_means() -> None:
    model = small_two_layer(dtype=torch.float32)
    assert model.stochastic_layers == 2 and VAE.stochastic_layers == 1
    images = model.sample(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 12) and bool(((images > 0) & (images < 1)).all())
    x = binary_images(7, 12, seed=3)
    first, second = model.layer_means(x, samples=16)
    torch.testing.assert_close(first, model.encode(x)[0])
    assert second.shape == (7, 3)
    one_draw = model.layer_means(x, samples=1, seed=5)[1]
    assert not torch.allclose(one_draw, second)  # an average over draws of z1, not mu2 at one draw


def test_two_layer_checkpoint_round_trip(tmp_path) -> None:
    model = small_two_layer(dtype=torch.float32)
    save_checkpoint(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert type(loaded) is TwoLayerVAE and loaded.config() == model.config()
    x = binary_images(3, 12, seed=4)
    torch.testing.assert_close(loaded.log_likelihood(x, 50), model.eval().log_likelihood(x, 50))


def test_config_builds_the_two_layer_model_and_refuses_wake_sleep() -> None:
    params = params_from_dict({"model": {"stochastic_layers": 2, "latent_dim": 6, "hidden_dim": 10,
                                         "hidden_layers": 2, "top_latent_dim": 3, "top_hidden_dim": 5}})
    model = build_model(params, 12)
    assert type(model) is TwoLayerVAE
    assert (model.latent_dim, model.top_latent_dim, model.top_hidden_dim, model.hidden_layers) == (6, 3, 5, 2)
    assert type(build_model(params_from_dict({}), 12)) is VAE
    with pytest.raises(ConfigError, match=r"train.algorithm = 'wake-sleep'.*stochastic_layers: 1"):
        params_from_dict({"model": {"stochastic_layers": 2}, "train": {"algorithm": "wake-sleep"}})
    for bad in (3, 0, True, "2"):
        with pytest.raises(ConfigError, match=r"model.stochastic_layers"):
            params_from_dict({"model": {"stochastic_layers": bad}})
    with pytest.raises(ValueError, match="two stochastic layers"):
        objectives.wake_sleep(small_two_layer(dtype=torch.float32), binary_images(2, 12, seed=0))


# ------------------------------------------------------------------ every stage, in this process


def test_two_layer_model_runs_through_train_evaluate_visualize_and_report(tmp_path, monkeypatch) -> None:
    """train, evaluate (L_k, AIS, BDMC, active units per layer), visualize and report on tiny data
    with a two-stochastic-layer model; what each writes names both layers."""
    from vae import evaluate, report, train, visualize

    monkeypatch.setenv("VAE_TRACKING", "off")
    processed = write_processed(tmp_path / "data", train_count=300)
    root = tmp_path / "run"
    params = params_from_dict({
        "paths": {"raw": str(root / "raw"), "processed": str(processed), "models": str(root / "models"),
                  "reports": str(root / "reports")},
        "model": {"stochastic_layers": 2, "latent_dim": 4, "hidden_dim": 16, "top_latent_dim": 2, "top_hidden_dim": 8},
        "train": {"epochs": 2, "batch_size": 50, "elbo_eval_size": 100, "device": "cpu", "objective": "iwae",
                  "samples": 3},
        "evaluate": {"importance_samples": 20, "bound_curve": [1, 20], "train_examples": 50, "device": "cpu",
                     "ais_test_examples": 3, "ais_train_examples": 2, "ais_temperatures": 5, "bdmc_examples": 2},
        "visualize": {"latent_points": 100}})
    with one_thread():
        summary = train.run(params, progress=False)
        metrics = evaluate.run(params, progress=False, register=False)
        figures = visualize.run(params, progress=False)
        report.run(params, progress=False)
    assert (summary["stochastic_layers"], summary["top_latent_dim"], summary["top_hidden_dim"]) == (2, 2, 8)
    assert type(load_model(root / "models/model.pt")) is TwoLayerVAE
    assert metrics["stochastic_layers"] == 2 and len(metrics["active_units_per_layer"]) == 2
    assert sum(metrics["active_units_per_layer"]) == metrics["active_units"]
    variances = json.loads((root / "reports/active_units.json").read_text())
    assert [len(layer) for layer in variances["unit_variances_per_layer"]] == [4, 2]
    for key in ("test_log_likelihood", "test_elbo", "test_ais_log_likelihood", "bdmc_lower", "bdmc_upper"):
        assert math.isfinite(metrics[key]) and metrics[key] < 0, (key, metrics[key])
    assert metrics["test_log_likelihood"] >= metrics["bound_curve"]["1"]
    assert "test_appendix_d_log_likelihood" not in metrics  # 6 latent dimensions: App. D does not apply
    assert "manifold" not in figures and {"samples", "reconstructions", "latent_space"} <= set(figures)
    text = (root / "reports/report.md").read_text()
    assert "784-16-4-8-2: two stochastic layers z1 (4) and z2 (2)" in text
    assert "IWAE (k = 3), 2 stochastic layers" in text
    assert "in z1 + z2" in text
