"""Tests of vae/model.py: the VAE's shapes and estimators, input validation, checkpoints."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from torch.distributions import Normal

import vae
from support import REPO_ROOT, binary_images, generator, small_model
from vae import objectives
from vae.errors import CheckpointError
from vae.model import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    FLOAT_BYTES,
    VAE,
    load_model,
    read_checkpoint,
    save_checkpoint,
)

INPUT_DIM, HIDDEN_DIM, LATENT_DIM = 784, 32, 4
make_vae = partial(small_model, input_dim=INPUT_DIM, hidden_dim=HIDDEN_DIM, latent_dim=LATENT_DIM)


@pytest.fixture
def model() -> VAE:
    return make_vae()


# --------------------------------------------------------------------------------------------
# Shapes and estimators
# --------------------------------------------------------------------------------------------


def test_encode_and_decode_shapes(model: VAE) -> None:
    mu, log_var = model.encode(binary_images(5))
    assert mu.shape == log_var.shape == (5, LATENT_DIM)
    assert model.decode(torch.zeros(5, LATENT_DIM)).shape == (5, INPUT_DIM)
    assert model.decode(torch.zeros(3, 5, LATENT_DIM)).shape == (3, 5, INPUT_DIM)  # sample dim
    assert model.decoder_log_prob(binary_images(5), torch.zeros(3, 5, LATENT_DIM)).shape == (3, 5)


def test_elbo_is_finite_and_negative_for_binary_x(model: VAE) -> None:
    values = model.elbo(binary_images(5), generator=generator(1))
    assert values.shape == (5,)
    assert torch.isfinite(values).all()
    assert (values < 0).all()
    assert model.elbo(binary_images(5), samples=3, generator=generator(1)).shape == (5,)


def test_log_likelihood_shape(model: VAE) -> None:
    values = model.log_likelihood(binary_images(5), importance_samples=7, seed=2)
    assert values.shape == (5,)
    assert torch.isfinite(values).all()
    assert (values < 0).all()


def test_elbo_matches_its_definition(model: VAE) -> None:
    """Estimator B with one sample: log p(x|z) - KL(q || p), z drawn from the same generator."""
    x = binary_images(4)
    mu, log_var = model.encode(x)
    z = objectives.reparameterize(mu, log_var, 1, generator(3))
    expected = objectives.bernoulli_log_prob(x, model.decode(z))[0] - objectives.gaussian_kl_divergence(mu, log_var)
    torch.testing.assert_close(model.elbo(x, generator=generator(3)), expected)


def test_single_sample_log_likelihood_equals_elbo_in_expectation(model: VAE) -> None:
    """L_1 = ELBO in expectation: 16 images x 50 repeats, tolerance 5 SE of the per-row
    difference (observed: -0.10 +- 0.22 nats)."""
    x = binary_images(16).repeat(50, 1)
    with torch.no_grad():
        elbo = model.elbo(x, generator=generator(4))
    l1 = model.log_likelihood(x, importance_samples=1, seed=5)
    diff = l1 - elbo
    assert abs(float(diff.mean())) < 5 * float(diff.std()) / math.sqrt(len(diff))


def test_importance_sampled_log_likelihood_exceeds_elbo(model: VAE) -> None:
    """E[L_200] >= ELBO; observed L_200 - ELBO = 4.3 +- 0.17 nats (16 images x 50 repeats)."""
    x = binary_images(16).repeat(50, 1)
    with torch.no_grad():
        elbo = model.elbo(x, generator=generator(6))
    l200 = model.log_likelihood(x, importance_samples=200, seed=7)
    diff = l200 - elbo
    assert float(diff.mean()) > 5 * float(diff.std()) / math.sqrt(len(diff))


@pytest.mark.parametrize("training", [True, False])
def test_log_likelihood_runs_in_eval_mode_and_restores_the_flag(model: VAE, training: bool) -> None:
    modes: list[bool] = []
    model.encoder.register_forward_hook(lambda module, args, output: modes.append(module.training))
    model.train(training)
    model.log_likelihood(binary_images(3), importance_samples=4, seed=8)
    assert modes == [False]
    assert model.training is training
    assert all(module.training is training for module in model.modules())
    with pytest.raises(ValueError):  # restored on errors, too
        model.log_likelihood(binary_images(3), importance_samples=0)
    assert model.training is training


def test_log_likelihood_respects_the_memory_budget(model: VAE, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small budget splits the (example, sample) grid; no decoder call exceeds it."""
    budget_mb = 0.2
    max_pairs = model.pairs_for_budget(budget_mb)
    assert max_pairs == 63  # 0.2 MiB / ((2 * 4 + 32 + 784) * 4 bytes)
    pairs: list[int] = []
    decoder_log_prob = model.decoder_log_prob

    def recording(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        pairs.append(z.shape[0] * z.shape[1])
        return decoder_log_prob(x, z)

    monkeypatch.setattr(model, "decoder_log_prob", recording)
    values = model.log_likelihood(binary_images(3), importance_samples=100, memory_budget_mb=budget_mb,
                                  seed=9)
    assert values.shape == (3,)
    assert torch.isfinite(values).all()
    assert max(pairs) <= max_pairs
    assert sum(pairs) == 3 * 100


def test_log_likelihood_is_reproducible_with_a_generator(model: VAE) -> None:
    x = binary_images(3)
    first = model.log_likelihood(x, importance_samples=10, seed=10)
    again = model.log_likelihood(x, importance_samples=10, seed=10)
    other = model.log_likelihood(x, importance_samples=10, seed=11)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "grey values": torch.full((2, INPUT_DIM), 0.5),
    "wrong width": torch.zeros(2, INPUT_DIM - 1),
    "integer dtype": torch.zeros(2, INPUT_DIM, dtype=torch.long),
    "1-D": torch.zeros(INPUT_DIM),
    "3-D": torch.zeros(1, 2, INPUT_DIM),
    "NaN": torch.full((2, INPUT_DIM), math.nan),
}


@pytest.mark.parametrize("method", ["elbo", "log_likelihood"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_expectation(model: VAE, method: str, case: str) -> None:
    with pytest.raises(ValueError, match=r"\(batch, 784\)|\{0, 1\}"):
        getattr(model, method)(BAD_INPUTS[case])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["float64", "float16"])
def test_other_float_dtypes_are_converted(model: VAE, dtype: torch.dtype) -> None:
    x = binary_images(3)
    expected = model.elbo(x, generator=generator(12))
    actual = model.elbo(x.to(dtype), generator=generator(12))
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected)
    assert model.log_likelihood(x.to(dtype), importance_samples=4).shape == (3,)


def test_empty_batch_gives_empty_results(model: VAE) -> None:
    x = torch.empty(0, 784)
    assert model.elbo(x).shape == (0,)
    assert model.log_likelihood(x, importance_samples=10).shape == (0,)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = make_vae(seed=1)
    model.train()
    path = tmp_path / "models" / "vae.pt"
    save_checkpoint(model, path, metadata={"epochs": 3, "note": "test"})
    assert sorted(os.listdir(path.parent)) == ["vae.pt"]  # no temporary file left behind

    loaded = load_model(path)
    assert isinstance(loaded, VAE)
    assert not loaded.training
    assert loaded.config() == model.config() == {"input_dim": INPUT_DIM, "hidden_dim": HIDDEN_DIM,
                                                 "latent_dim": LATENT_DIM, "hidden_layers": 1,
                                                 "likelihood": "bernoulli"}
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    x = binary_images(4)
    model.eval()
    with torch.no_grad():
        for a, b in zip(model.encode(x), loaded.encode(x)):
            assert torch.equal(a, b)
        assert torch.equal(model.elbo(x, generator=generator(13)), loaded.elbo(x, generator=generator(13)))
    assert read_checkpoint(path)["metadata"] == {"epochs": 3, "note": "test"}


def test_checkpoint_is_plain_tensors_and_values(tmp_path: Path) -> None:
    path = tmp_path / "vae.pt"
    save_checkpoint(make_vae(), path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT
    assert payload["format_version"] == CHECKPOINT_VERSION
    assert payload["model_config"] == {"input_dim": INPUT_DIM, "hidden_dim": HIDDEN_DIM, "latent_dim": LATENT_DIM,
                                       "hidden_layers": 1, "likelihood": "bernoulli"}
    assert payload["metadata"] == {}
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())


@pytest.fixture
def checkpoint_payload(tmp_path: Path) -> dict:
    path = tmp_path / "good.pt"
    save_checkpoint(make_vae(), path)
    return torch.load(path, weights_only=True)


def _save(payload: object, path: Path) -> Path:
    torch.save(payload, path)
    return path


def _assert_refused(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_load_model_refuses_a_missing_file(tmp_path: Path) -> None:
    _assert_refused(tmp_path / "absent.pt", "not found")
    _assert_refused(tmp_path, "not found")  # a directory is not a checkpoint file


def test_load_model_refuses_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=generator(14), dtype=torch.uint8).numpy().tobytes())
    _assert_refused(path, "not a checkpoint")


def test_load_model_refuses_a_dict_without_the_format_marker(tmp_path: Path, checkpoint_payload: dict) -> None:
    _assert_refused(_save(checkpoint_payload["state_dict"], tmp_path / "bare_state_dict.pt"), "format")
    del checkpoint_payload["format"]
    _assert_refused(_save(checkpoint_payload, tmp_path / "no_marker.pt"), "format")
    _assert_refused(_save([1, 2, 3], tmp_path / "list.pt"), "format")


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_load_model_refuses_a_wrong_format_version(tmp_path: Path, checkpoint_payload: dict, version: object) -> None:
    checkpoint_payload["format_version"] = version
    _assert_refused(_save(checkpoint_payload, tmp_path / "version.pt"), "version")


@pytest.mark.parametrize("damage", [
    "hidden_dim mismatch", "latent_dim mismatch", "missing weight", "extra weight",
    "unknown config key", "no model_config", "no state_dict",
])
def test_load_model_refuses_weights_that_do_not_fit_the_config(tmp_path: Path, checkpoint_payload: dict,
                                                                damage: str) -> None:
    config, state = checkpoint_payload["model_config"], checkpoint_payload["state_dict"]
    if damage == "hidden_dim mismatch":
        config["hidden_dim"] = HIDDEN_DIM + 1
    elif damage == "latent_dim mismatch":
        config["latent_dim"] = LATENT_DIM - 1
    elif damage == "missing weight":
        del state["decoder.0.weight"]
    elif damage == "extra weight":
        state["decoder.9.weight"] = torch.zeros(1)
    elif damage == "unknown config key":
        config["depth"] = 2
    elif damage == "no model_config":
        del checkpoint_payload["model_config"]
    else:
        del checkpoint_payload["state_dict"]
    _assert_refused(_save(checkpoint_payload, tmp_path / "damaged.pt"), "damaged")


class PlainObject:
    """A harmless custom class: not a tensor, not a plain value."""

    def __init__(self) -> None:
        self.value = 1


class FileCreator:
    """Unpickling this calls open(path, 'w'), creating ``path``: code execution on load."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def test_load_model_refuses_a_custom_class_instance(tmp_path: Path, checkpoint_payload: dict) -> None:
    checkpoint_payload["metadata"] = {"object": PlainObject()}
    _assert_refused(_save(checkpoint_payload, tmp_path / "object.pt"), "weights_only")
    _assert_refused(_save(PlainObject(), tmp_path / "bare_object.pt"), "weights_only")


def test_load_model_executes_nothing_from_a_malicious_pickle(tmp_path: Path, checkpoint_payload: dict) -> None:
    """A checkpoint that is valid apart from a payload that creates a file when unpickled."""
    marker = tmp_path / "pwned"
    checkpoint_payload["metadata"] = {"payload": FileCreator(marker)}
    path = _save(checkpoint_payload, tmp_path / "malicious.pt")
    _assert_refused(path, "weights_only")
    assert not marker.exists()

    # The payload is live: an unsafe load of the same bytes does create its marker.
    control = tmp_path / "control"
    unsafe = pickle.dumps({"payload": FileCreator(control)})
    pickle.loads(unsafe)["payload"].close()
    assert control.exists()


# --------------------------------------------------------------------------------------------
# The package and the memory budget
# --------------------------------------------------------------------------------------------


def test_load_model_is_exported_from_the_package() -> None:
    assert vae.load_model is load_model
    assert "load_model" in vae.__all__
    with pytest.raises(AttributeError):
        vae.no_such_attribute  # noqa: B018


def test_importing_vae_does_not_import_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys, vae; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=60,
    )
    assert result.stdout.strip() == "False"


def test_pairs_for_budget_is_linear_in_the_budget(model: VAE) -> None:
    per_pair = (2 * LATENT_DIM + HIDDEN_DIM + INPUT_DIM) * FLOAT_BYTES
    for budget_mb in (1, 3.5, 256, 4096):
        assert model.pairs_for_budget(budget_mb) == int(budget_mb * 2**20 // per_pair)
    base = model.pairs_for_budget(64)
    for factor in (2, 10, 100):
        assert abs(model.pairs_for_budget(64 * factor) - factor * base) <= factor


@pytest.mark.parametrize("budget_mb", [0, 1e-9, 1e-3])
def test_pairs_for_budget_is_at_least_one(model: VAE, budget_mb: float) -> None:
    assert model.pairs_for_budget(budget_mb) == 1


# --------------------------------------------------------------------------------------------
# The Gaussian decoder (Frey Face; AEVB App. C.2)
# --------------------------------------------------------------------------------------------

GAUSSIAN_DIM = 20


def gaussian_vae(seed: int = 0, hidden_layers: int = 1) -> VAE:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return VAE(GAUSSIAN_DIM, HIDDEN_DIM, LATENT_DIM, hidden_layers=hidden_layers, likelihood="gaussian")


def grey_values(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, GAUSSIAN_DIM, generator=generator(seed))


@pytest.mark.parametrize("hidden_layers", [1, 2])
@pytest.mark.parametrize("sample_shape", [(), (7,), (2, 3)])
def test_gaussian_decoder_log_prob_is_the_normal_density(hidden_layers: int, sample_shape: tuple[int, ...]) -> None:
    """log N(x; sigmoid(logits), exp(log_var)) summed over pixels, with and without autograd (the
    latter takes the fused in-place path); float64 so that both agree to rounding."""
    model = gaussian_vae(hidden_layers=hidden_layers).double()
    x = grey_values(5).double()
    z = 1.5 * torch.randn(*sample_shape, 5, LATENT_DIM, generator=generator(1), dtype=torch.float64)
    logits, log_var = model.decoder_params(z)
    assert logits.shape == log_var.shape == (*sample_shape, 5, GAUSSIAN_DIM)
    expected = Normal(torch.sigmoid(logits), torch.exp(0.5 * log_var)).log_prob(x).sum(-1).detach()
    with torch.enable_grad():
        autograd = model.decoder_log_prob(x, z)
    assert autograd.requires_grad
    with torch.no_grad():
        fused = model.decoder_log_prob(x, z)
    assert autograd.shape == fused.shape == (*sample_shape, 5)
    torch.testing.assert_close(autograd.detach(), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-10)
    assert torch.equal(logits, model.decoder_params(z)[0])  # the fused path did not overwrite shared tensors


def test_gaussian_decoder_learns_a_per_pixel_variance() -> None:
    model = gaussian_vae()
    assert model.decoder_log_var is not None and model.decoder_log_var.out_features == GAUSSIAN_DIM
    assert make_vae().decoder_log_var is None
    with torch.no_grad():  # a sharp decoder: the density exceeds 1, so log p(x|z) > 0
        model.decoder_log_var.bias.fill_(-8.0)
        model.decoder_log_var.weight.zero_()
        z = torch.zeros(1, LATENT_DIM)
        x = model.decoder_mean(z)
        assert float(model.decoder_log_prob(x, z)) == pytest.approx(GAUSSIAN_DIM * 0.5 * (8.0 - math.log(2 * math.pi)),
                                                                    rel=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["elbo", "log_likelihood"])
def test_gaussian_model_rejects_non_finite_x(bad: float, method: str) -> None:
    x = grey_values(3)
    x[1, 4] = bad
    with pytest.raises(ValueError, match="finite"):
        getattr(gaussian_vae(), method)(x)


def test_gaussian_model_accepts_grey_values_and_its_estimators_run() -> None:
    model = gaussian_vae()
    x = grey_values(6)
    elbo = model.elbo(x, samples=3, generator=generator(2))
    assert elbo.shape == (6,) and torch.isfinite(elbo).all()
    log_likelihood = model.log_likelihood(x, importance_samples=20, seed=3)
    assert log_likelihood.shape == (6,) and torch.isfinite(log_likelihood).all()
    estimate = objectives.importance_sampled_log_likelihood(model, x, 20, seed=3, curve=[1, 5])
    torch.testing.assert_close(estimate.log_likelihood, log_likelihood)
    assert set(estimate.curve) == {1, 5}


def test_gaussian_importance_sampled_log_likelihood_exceeds_the_elbo() -> None:
    """E[L_500] >= ELBO, paired per example over 16 values x 20 repeats (observed gaps: 0.46 nats,
    SE 0.005 against the estimate's own ELBO and 0.03 against a separate single-sample ELBO)."""
    model = gaussian_vae()
    x = grey_values(16).repeat(20, 1)
    estimate = objectives.importance_sampled_log_likelihood(model, x, 500, seed=5)
    gap = estimate.log_likelihood - estimate.elbo
    assert float(gap.mean()) > 5 * float(gap.std()) / math.sqrt(len(gap))
    with torch.no_grad():
        elbo = model.elbo(x, generator=generator(6))
    gap = estimate.log_likelihood - elbo
    assert float(gap.mean()) > 5 * float(gap.std()) / math.sqrt(len(gap))


def test_gaussian_checkpoint_round_trip(tmp_path: Path) -> None:
    model = gaussian_vae(hidden_layers=2)
    save_checkpoint(model, tmp_path / "frey.pt")
    loaded = load_model(tmp_path / "frey.pt")
    assert loaded.config() == {"input_dim": GAUSSIAN_DIM, "hidden_dim": HIDDEN_DIM, "latent_dim": LATENT_DIM,
                               "hidden_layers": 2, "likelihood": "gaussian"}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_unknown_likelihood_and_bad_depth_are_refused() -> None:
    with pytest.raises(ValueError, match="likelihood = 'poisson'"):
        VAE(10, 4, 2, likelihood="poisson")
    with pytest.raises(ValueError, match="hidden_layers=0"):
        VAE(10, 4, 2, hidden_layers=0)


# --------------------------------------------------------------------------------------------
# Deeper MLPs (IWAE's 784-200-200-50 model)
# --------------------------------------------------------------------------------------------


def test_two_hidden_layers_have_the_right_shapes() -> None:
    model = VAE(INPUT_DIM, HIDDEN_DIM, LATENT_DIM, hidden_layers=2)
    linear = [(m.in_features, m.out_features) for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert linear == [(INPUT_DIM, HIDDEN_DIM), (HIDDEN_DIM, HIDDEN_DIM)]
    assert [type(m).__name__ for m in model.encoder] == ["Linear", "Tanh", "Linear", "Tanh"]
    assert (model.encoder_mean.in_features, model.encoder_mean.out_features) == (HIDDEN_DIM, LATENT_DIM)
    assert (model.encoder_log_var.in_features, model.encoder_log_var.out_features) == (HIDDEN_DIM, LATENT_DIM)
    decoder = [(m.in_features, m.out_features) for m in model.decoder if isinstance(m, torch.nn.Linear)]
    assert decoder == [(LATENT_DIM, HIDDEN_DIM), (HIDDEN_DIM, HIDDEN_DIM), (HIDDEN_DIM, INPUT_DIM)]
    assert [type(m).__name__ for m in model.decoder] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    expected = (INPUT_DIM * HIDDEN_DIM + HIDDEN_DIM) + (HIDDEN_DIM * HIDDEN_DIM + HIDDEN_DIM) \
        + 2 * (HIDDEN_DIM * LATENT_DIM + LATENT_DIM) \
        + (LATENT_DIM * HIDDEN_DIM + HIDDEN_DIM) + (HIDDEN_DIM * HIDDEN_DIM + HIDDEN_DIM) \
        + (HIDDEN_DIM * INPUT_DIM + INPUT_DIM)
    assert sum(p.numel() for p in model.parameters()) == expected
    mu, log_var = model.encode(binary_images(3))
    assert mu.shape == log_var.shape == (3, LATENT_DIM)
    per_pair = (2 * LATENT_DIM + 2 * HIDDEN_DIM + INPUT_DIM) * FLOAT_BYTES
    assert model.pairs_for_budget(1) == 2**20 // per_pair


@pytest.mark.parametrize("hidden_layers", [1, 2])
def test_fused_bernoulli_decoder_matches_the_autograd_path(hidden_layers: int) -> None:
    """Without autograd the Bernoulli decoder computes tanh as 2 sigmoid(2h) - 1 in place and
    log sigmoid instead of softplus: the same log p(x|z) to float32 rounding (~1e-4 nats of ~500)."""
    with torch.random.fork_rng():
        torch.manual_seed(hidden_layers)
        model = VAE(INPUT_DIM, HIDDEN_DIM, LATENT_DIM, hidden_layers=hidden_layers).initialize_normal_(0.3, generator(7))
    x = binary_images(6, seed=8)
    z = 2 * torch.randn(4, 6, LATENT_DIM, generator=generator(9))
    with torch.enable_grad():
        autograd = model.decoder_log_prob(x, z).detach()
    with torch.no_grad():
        fused = model.decoder_log_prob(x, z)
    assert fused.shape == autograd.shape == (4, 6)
    assert float(autograd.abs().min()) > 50  # not a trivially small value
    torch.testing.assert_close(fused, autograd, rtol=1e-6, atol=1e-4)
    # And the autograd path is minus the binary cross-entropy with the decoder's logits.
    expected = -torch.nn.functional.binary_cross_entropy_with_logits(
        model.decode(z), x.expand(4, 6, INPUT_DIM), reduction="none").sum(-1).detach()
    torch.testing.assert_close(autograd, expected, rtol=1e-6, atol=1e-4)


# --------------------------------------------------------------------------------------------
# N(0, std^2) initialisation (AEVB Sec. 5)
# --------------------------------------------------------------------------------------------


def test_initialize_normal_draws_every_parameter_from_n_0_std() -> None:
    """Each tensor's mean within 5 SE of 0 and its standard deviation within 5 SE of ``std``
    (the SE of a sample standard deviation is std / sqrt(2n)); pooled over all ~60k values, 1 %."""
    std = 0.05
    model = VAE(INPUT_DIM, HIDDEN_DIM, LATENT_DIM, hidden_layers=2, likelihood="gaussian")
    default_weight = model.encoder[0].weight.detach().clone()
    assert model.initialize_normal_(std, generator(10)) is model
    for name, parameter in model.named_parameters():
        values = parameter.detach().double().flatten()
        n = values.numel()
        assert abs(float(values.mean())) < 5 * std / math.sqrt(n), name
        if n >= 2:
            assert abs(float(values.std()) / std - 1) < 5 / math.sqrt(2 * n) + 0.5 / n, name
    pooled = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    assert pooled.numel() > 50_000
    assert abs(float(pooled.std()) / std - 1) < 0.01
    assert abs(float(pooled.mean())) < 5 * std / math.sqrt(pooled.numel())
    # Not PyTorch's default U(-1/sqrt(784), 1/sqrt(784)), whose standard deviation is 0.0206.
    assert abs(float(default_weight.std()) - 1 / math.sqrt(3 * INPUT_DIM)) < 0.001
    assert abs(float(model.encoder[0].weight.detach().std()) - std) < 0.001


def test_initialize_normal_is_deterministic_given_the_generator() -> None:
    first = make_vae(seed=1).initialize_normal_(0.01, generator(11))
    again = make_vae(seed=2).initialize_normal_(0.01, generator(11))  # other default weights, same draw
    other = make_vae(seed=1).initialize_normal_(0.01, generator(12))
    for key, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert not torch.equal(other.encoder[0].weight, first.encoder[0].weight)
