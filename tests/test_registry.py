"""Champion and challenger against a real MLflow registry on a SQLite store the test creates."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vae import registry
from vae.errors import TrackingError

NAME = "vae-mnist"
N = 400


@pytest.fixture
def client(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = mlflow_client.create_experiment("vae-mnist", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow_client.experiment_id = experiment
    mlflow_client.folder = tmp_path
    return mlflow_client


def register(client, test_log_likelihood: np.ndarray, test_set: str = "abc", k: int = 50) -> str:
    """A run holding per-example test L_k as the evaluate stage writes them, registered as a new version."""
    run = client.create_run(client.experiment_id)
    frame = pd.concat([
        pd.DataFrame({"split": "test", "index": range(len(test_log_likelihood)),
                      "log_likelihood": test_log_likelihood, "elbo": test_log_likelihood - 5}),
        pd.DataFrame({"split": "train", "index": range(3), "log_likelihood": [-1.0, -2.0, -3.0], "elbo": -9.0})])
    csv = client.folder / f"{run.info.run_id}.csv"
    frame.to_csv(csv, index=False)
    folder = client.folder / run.info.run_id / "evaluation"
    folder.mkdir(parents=True)
    target = folder / "log_likelihood_per_example.csv"
    csv.rename(target)
    client.log_artifact(run.info.run_id, str(target), "evaluation")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(NAME)
    except Exception:
        pass  # already there
    version = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id,
                                          tags={registry.TEST_SET_TAG: test_set, registry.SAMPLES_TAG: str(k)})
    return str(version.version)


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version)


def tags(client, version: str) -> dict[str, str]:
    return client.get_model_version(NAME, version).tags


@pytest.fixture
def base() -> np.ndarray:
    # Per-image log-likelihoods spread like MNIST's (tens of nats between images).
    return np.random.default_rng(0).normal(-95.0, 25.0, N)


def test_paired_comparison_against_hand_computed_values() -> None:
    comparison = registry.PairedComparison.of(np.array([1.0, 3.0, 5.0, 7.0]), np.array([0.0, 1.0, 2.0, 3.0]))
    # d = [1, 2, 3, 4]: mean 2.5, sample std sqrt(5/3), stderr sqrt(5/3) / 2.
    assert comparison.difference == pytest.approx(2.5)
    assert comparison.stderr == pytest.approx(math.sqrt(5 / 3) / 2)
    assert comparison.examples == 4 and comparison.better
    tie = registry.PairedComparison.of(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    assert tie.difference == 0 and tie.stderr == 0 and not tie.better
    with pytest.raises(ValueError, match="equal length"):
        registry.PairedComparison.of(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        registry.PairedComparison.of(np.array([0.0, np.nan]), np.zeros(2))


def test_pairing_detects_a_gain_far_below_the_unpaired_standard_errors(base) -> None:
    noise = np.random.default_rng(1).normal(0.0, 0.5, N)
    better = base + 0.3 + noise  # 0.3 nats better on every image, +- 0.5 noise
    unpaired = math.hypot(base.std(ddof=1), better.std(ddof=1)) / math.sqrt(N)
    comparison = registry.PairedComparison.of(better, base)
    assert unpaired > 1.0 > 0.3  # the gain is invisible unpaired
    assert comparison.better and comparison.stderr < 0.05


def test_first_model_becomes_champion(client, base) -> None:
    first = register(client, base)
    decision = registry.promote_if_better(client, NAME, first)
    assert decision.promoted and champion(client) == first
    recorded = tags(client, first)
    assert recorded["champion_decision"] == "promoted"
    # Promoted as the first model, without a comparison: compared with itself, no paired numbers.
    assert recorded["compared_with_version"] == first and "paired_difference" not in recorded


def test_better_model_is_promoted_and_the_old_one_marked(client, base) -> None:
    first = register(client, base)
    registry.promote_if_better(client, NAME, first)
    second = register(client, base + 1.0 + np.random.default_rng(2).normal(0, 1.0, N))
    decision = registry.promote_if_better(client, NAME, second)
    assert decision.promoted and champion(client) == second
    assert decision.comparison.difference == pytest.approx(1.0, abs=0.2)
    assert tags(client, first)["superseded_by"] == second
    assert float(tags(client, second)["paired_difference"]) > float(tags(client, second)["paired_stderr"])


def test_worse_model_is_not_promoted_and_says_why(client, base) -> None:
    first = register(client, base)
    registry.promote_if_better(client, NAME, first)
    worse = register(client, base - 0.5 + np.random.default_rng(3).normal(0, 1.0, N))
    decision = registry.promote_if_better(client, NAME, worse)
    assert not decision.promoted and champion(client) == first
    recorded = tags(client, worse)
    assert recorded["champion_decision"] == "kept" and recorded["compared_with_version"] == first
    assert "does not beat champion version" in recorded["champion_reason"]
    assert float(recorded["paired_difference"]) < 0


def test_tie_is_not_promoted(client, base) -> None:
    first = register(client, base)
    registry.promote_if_better(client, NAME, first)
    # Within noise: mean difference below one paired standard error.
    noise = np.random.default_rng(4).normal(0, 1.0, N)
    same = register(client, base + noise - noise.mean())
    decision = registry.promote_if_better(client, NAME, same)
    assert abs(decision.comparison.difference) < 1e-9 and not decision.promoted
    assert champion(client) == first


def test_promotion_is_idempotent(client, base) -> None:
    first = register(client, base)
    registry.promote_if_better(client, NAME, first)
    second = register(client, base + 2.0)
    assert registry.promote_if_better(client, NAME, second).promoted
    again = registry.promote_if_better(client, NAME, second)
    assert not again.promoted and again.champion_version == second and champion(client) == second
    assert tags(client, second)["champion_decision"] == "already champion"
    # A rejected version asked again gets the same answer, and the champion stays.
    worse = register(client, base)
    assert not registry.promote_if_better(client, NAME, worse).promoted
    assert not registry.promote_if_better(client, NAME, worse).promoted
    assert champion(client) == second


def test_other_test_images_need_a_reevaluation(client, base) -> None:
    first = register(client, base, test_set="old-data")
    registry.promote_if_better(client, NAME, first)
    new = register(client, base[:100] + 3.0, test_set="new-data")
    with pytest.raises(TrackingError, match="different test images"):
        registry.promote_if_better(client, NAME, new)
    assert champion(client) == first  # a failed decision leaves the champion in place
    seen = []

    def reevaluate(version):
        seen.append(str(version.version))
        return base[:100]

    decision = registry.promote_if_better(client, NAME, new, reevaluate=reevaluate)
    assert seen == [first] and decision.promoted and champion(client) == new
    # Compared on the challenger's 100 test images (the champion's re-evaluation), not the champion's 400.
    assert tags(client, new)["paired_examples"] == "100" and tags(client, first)["superseded_by"] == new


def test_missing_version_and_missing_artifact_are_clear_errors(client, base) -> None:
    first = register(client, base)
    registry.promote_if_better(client, NAME, first)
    with pytest.raises(TrackingError, match="version 99 not found"):
        registry.promote_if_better(client, NAME, "99")
    run = client.create_run(client.experiment_id)
    bare = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id,
                                       tags={registry.TEST_SET_TAG: "abc", registry.SAMPLES_TAG: "50"})
    with pytest.raises(TrackingError, match="log_likelihood_per_example.csv"):
        registry.promote_if_better(client, NAME, str(bare.version))
    assert champion(client) == first


def test_test_set_fingerprint_tells_images_and_order_apart() -> None:
    x = np.random.default_rng(0).random((10, 784)).astype(np.float32)
    assert registry.test_set_fingerprint(x) == registry.test_set_fingerprint(x.copy())
    assert registry.test_set_fingerprint(x) != registry.test_set_fingerprint(x[::-1])
    assert registry.test_set_fingerprint(x) != registry.test_set_fingerprint(x[:9])
