"""The evaluator's invariances and edge cases (issue: exact where it can be checked).

The closed-form checks of the estimator (probabilistic PCA, the Gaussian KL) are in
test_objectives.py; here: determinism, chunking invariance, the bound-tightness curve, the
fused evaluation path against the autograd path, float64 against float32, and edge cases.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from support import binary_images, small_model
from vae import objectives
from vae.evaluate import SplitEvaluation, evaluate_split

# Sharper weights than the default init so that log-weights vary (a stricter test).
make_model = partial(small_model, input_dim=784, hidden_dim=48, latent_dim=6, weight_scale=3.0, eval_mode=True)
binary_data = partial(binary_images, seed=1)


def estimate(model, x, k, max_pairs=4096, seed=0, curve=()):
    return objectives.importance_sampled_log_likelihood(model, x, k, max_pairs, seed, curve)


@pytest.mark.parametrize("max_pairs", [1, 7, 64, 250, 1000, 10**6])
def test_chunking_does_not_change_the_estimate(max_pairs: int) -> None:
    """Splitting samples of one example over chunks, or packing many examples in one, changes
    nothing beyond float rounding: each example has its own random stream."""
    model, x = make_model(), binary_data(9)
    reference = estimate(model, x, 120, max_pairs=10**7, curve=(1, 5, 50))
    chunked = estimate(model, x, 120, max_pairs=max_pairs, curve=(1, 5, 50))
    torch.testing.assert_close(chunked.log_likelihood, reference.log_likelihood, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(chunked.elbo, reference.elbo, rtol=2e-6, atol=1e-5)
    for k in (1, 5, 50):
        torch.testing.assert_close(chunked.curve[k], reference.curve[k], rtol=2e-6, atol=1e-5)


def test_same_seed_same_result_other_seed_other_result() -> None:
    model, x = make_model(), binary_data(5)
    first, again, other = estimate(model, x, 30, seed=3), estimate(model, x, 30, seed=3), estimate(model, x, 30, seed=4)
    assert torch.equal(first.log_likelihood, again.log_likelihood)
    assert not torch.equal(first.log_likelihood, other.log_likelihood)


def test_curve_points_equal_separate_evaluations_with_fewer_samples() -> None:
    """curve[k'] uses the first k' samples of the stream, i.e. exactly a run with k'."""
    model, x = make_model(), binary_data(6)
    full = estimate(model, x, 200, max_pairs=64, curve=(1, 3, 50, 200))
    for k in (1, 3, 50):
        separate = estimate(model, x, k, max_pairs=37).log_likelihood
        torch.testing.assert_close(full.curve[k], separate, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(full.curve[200], full.log_likelihood, rtol=0, atol=0)


def test_curve_rises_with_k_and_l1_agrees_with_the_elbo() -> None:
    """Mean over 400 images: L_1 ~ ELBO (within 4 SE of their difference), then non-decreasing."""
    model, x = make_model(), binary_data(400, seed=2)
    result = estimate(model, x, 500, curve=(1, 5, 50, 500))
    diff = result.curve[1] - result.elbo
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff))
    means = [float(result.curve[k].mean()) for k in (1, 5, 50, 500)]
    assert means == sorted(means), means
    assert means[-1] - means[0] > 1.0  # far from flat for this model: the bound tightens


def test_fused_evaluation_path_matches_the_autograd_path() -> None:
    model, x = make_model(), binary_data(4)
    z = torch.randn(7, 4, 6, generator=torch.Generator().manual_seed(5)) * 3
    with torch.enable_grad():
        reference = model.decoder_log_prob(x, z)
    with torch.no_grad():
        fused = model.decoder_log_prob(x, z)
    torch.testing.assert_close(fused, reference.detach(), rtol=1e-5, atol=2e-3)


def test_fused_bernoulli_log_prob_is_finite_and_exact_for_extreme_logits() -> None:
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    logits = torch.tensor([[[-500.0, 500.0, 500.0, -500.0], [-90.0, 85.0, 30.0, -30.0]]]).transpose(0, 1)
    expected = objectives.bernoulli_log_prob(x.double(), logits.double()).float()
    fused = objectives.bernoulli_log_prob_(x, logits.clone())
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-4)


def test_float64_agrees_with_float32() -> None:
    x32 = binary_data(8)
    model32, model64 = make_model(dtype=torch.float32), make_model(dtype=torch.float64)
    result32 = estimate(model32, x32, 300, max_pairs=500, curve=(1, 30))
    result64 = estimate(model64, x32.double(), 300, max_pairs=500, curve=(1, 30))
    torch.testing.assert_close(result64.log_likelihood.float(), result32.log_likelihood, rtol=0, atol=2e-3)
    torch.testing.assert_close(result64.curve[1].float(), result32.curve[1], rtol=0, atol=2e-3)


@pytest.mark.parametrize(("examples", "k", "max_pairs"), [
    (1, 1, 4096),      # one example, k = 1
    (3, 1, 2),         # k = 1 with several chunks of examples
    (1, 5000, 4096),   # one example whose samples need two chunks
    (5, 10, 10**6),    # a set much smaller than one chunk
])
def test_edge_cases_are_finite_and_consistent(examples: int, k: int, max_pairs: int) -> None:
    model, x = make_model(), binary_data(examples)
    result = estimate(model, x, k, max_pairs=max_pairs, curve=(1,))
    assert result.log_likelihood.shape == result.elbo.shape == (examples,)
    assert torch.isfinite(result.log_likelihood).all()
    if k == 1:  # L_1 is the single log-weight: its own curve point
        torch.testing.assert_close(result.curve[1], result.log_likelihood, rtol=0, atol=0)
    else:  # log-mean-exp of k weights is at least any one of them (here the first) minus log k
        assert (result.log_likelihood >= result.curve[1] - math.log(k) - 1e-4).all()


def test_curve_values_outside_one_to_k_are_rejected() -> None:
    model, x = make_model(), binary_data(2)
    for curve in ((0,), (11,)):
        with pytest.raises(ValueError, match="curve"):
            estimate(model, x, 10, curve=curve)


def test_evaluate_split_and_standard_error() -> None:
    model, x = make_model(), binary_data(50)
    result = evaluate_split(model, x, 20, [1, 20], memory_budget_mb=1, seed=0, name="test", progress=False)
    assert set(result.curve) == {1, 20}
    mean, stderr = SplitEvaluation.mean_and_stderr(result.log_likelihood)
    assert mean == pytest.approx(float(result.log_likelihood.double().mean()))
    assert stderr == pytest.approx(float(result.log_likelihood.double().std()) / math.sqrt(50))
    assert math.isnan(SplitEvaluation.mean_and_stderr(result.log_likelihood[:1])[1])
