"""Champion and challenger in the MLflow model registry.

Each ``evaluate`` run registers a new version of ``vae-<dataset>`` (:meth:`vae.tracking.Tracker.log_model`)
with its per-example test log-likelihoods as an artifact of its run. :func:`promote_if_better`
decides whether that version becomes the alias ``champion``:

- the first version registered under a name becomes champion (a registered model without a
  champion gets one): the ``evaluate`` stage calls :func:`promote_first` right after registering,
  so ``models:/vae-mnist@champion`` resolves after the first ``dvc repro``;
- otherwise the challenger must beat the champion by more than the **paired standard error** on
  the same test images: with d_i = L_k(x_i; challenger) - L_k(x_i; champion) over the N test
  images, promote iff mean(d) > std(d) / sqrt(N). Pairing removes the between-image variance
  that dominates the unpaired standard errors (per-image L_k ranges over ~100 nats on MNIST).
- When the champion was evaluated on other test images or with another k (new data, other
  evaluation settings), its per-example values are recomputed on the challenger's test images
  with the challenger's k and seed (the caller passes ``reevaluate``).

The alias moves in one registry call (``set_registered_model_alias``), so the model is never
without a champion; a decision is recorded as tags on the challenger's version
(``champion_decision``: promoted | kept | already champion, ``champion_reason``, the numbers).
Calling it again for the same version gives the same decision.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from vae.errors import TrackingError

CHAMPION = "champion"
PER_EXAMPLE_ARTIFACT = "evaluation/log_likelihood_per_example.csv"
# Version tags the evaluate stage writes and the comparison reads.
TEST_SET_TAG = "test_set_sha256"
SAMPLES_TAG = "importance_samples"


@dataclass(frozen=True)
class PairedComparison:
    """Challenger minus champion over the same N test images, nats per example.

    ``difference`` is mean(d_i), ``stderr`` is std(d_i, ddof=1) / sqrt(N).
    """

    difference: float
    stderr: float
    examples: int

    @property
    def better(self) -> bool:
        """True iff the challenger's mean gain exceeds one paired standard error (a tie is not better)."""
        return self.difference > self.stderr

    @classmethod
    def of(cls, challenger: np.ndarray, champion: np.ndarray) -> PairedComparison:
        """Compare per-example L_k arrays of shape (N,), float, one entry per test image in the same order.

        Raises:
            ValueError: the arrays differ in length, hold fewer than 2 values, or hold NaN/inf.
        """
        challenger, champion = np.asarray(challenger, np.float64), np.asarray(champion, np.float64)
        if challenger.shape != champion.shape or challenger.ndim != 1:
            raise ValueError(f"per-example log-likelihoods must be 1-D and of equal length, got "
                             f"{challenger.shape} (challenger) and {champion.shape} (champion)")
        if len(challenger) < 2:
            raise ValueError(f"need at least 2 test images for a paired standard error, got {len(challenger)}")
        if not (np.isfinite(challenger).all() and np.isfinite(champion).all()):
            raise ValueError("per-example log-likelihoods hold NaN or inf")
        d = challenger - champion
        return cls(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d))


@dataclass(frozen=True)
class Decision:
    """What :func:`promote_if_better` did with a version."""

    name: str
    version: str
    promoted: bool
    champion_version: str  # the champion after the decision
    reason: str
    comparison: PairedComparison | None = None


def test_log_likelihoods(client: Any, version: Any) -> np.ndarray:
    """The per-example test L_k of a model version, shape (N,) float64 in test-set order, read
    from its run's ``evaluation/log_likelihood_per_example.csv``.

    Raises:
        TrackingError: the run has no such artifact, or it holds no test rows.
    """
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(version.run_id, PER_EXAMPLE_ARTIFACT, folder)
        except Exception as error:
            raise TrackingError(f"{version.name} version {version.version}: run {version.run_id} has no "
                                f"{PER_EXAMPLE_ARTIFACT} ({error})") from error
        frame = pd.read_csv(path)
    test = frame[frame["split"] == "test"].sort_values("index")
    if test.empty:
        raise TrackingError(f"{version.name} version {version.version}: {PER_EXAMPLE_ARTIFACT} holds no test rows")
    return test["log_likelihood"].to_numpy(np.float64)


def current_champion(client: Any, name: str) -> Any | None:
    """The version holding the ``champion`` alias of registered model ``name``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise TrackingError(f"MLflow registry: reading {name}@{CHAMPION} failed: {error}") from error


def comparable(challenger: Any, champion: Any) -> bool:
    """Whether two versions were evaluated on the same test images with the same k (version tags)."""
    keys = (TEST_SET_TAG, SAMPLES_TAG)
    return all(challenger.tags.get(key) is not None and challenger.tags.get(key) == champion.tags.get(key)
               for key in keys)


def _record(client: Any, decision: Decision) -> Decision:
    tags = {"champion_decision": ("promoted" if decision.promoted else
                                  "already champion" if decision.champion_version == decision.version else "kept"),
            "champion_reason": decision.reason, "compared_with_version": decision.champion_version}
    if decision.comparison is not None:
        tags.update({"paired_difference": f"{decision.comparison.difference:.4f}",
                     "paired_stderr": f"{decision.comparison.stderr:.4f}",
                     "paired_examples": str(decision.comparison.examples)})
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, decision.version, key, value)
    return decision


FIRST_REASON = "{name} had no champion: the first model registered becomes champion"


def promote_first(client: Any, name: str, version: str) -> Decision | None:
    """Make ``name`` version ``version`` the ``champion`` when ``name`` has none yet (the first
    version registered; the rule :func:`promote_if_better` starts from). The ``evaluate`` stage
    calls it after registering, so that ``models:/<name>@champion`` resolves after the first
    pipeline run; later versions reach the alias only through a comparison
    (:func:`promote_if_better`, the retraining flow).

    Returns:
        The decision (also recorded as tags on the version), or None when ``name`` already has a
        champion (nothing is changed then).

    Raises:
        TrackingError: the registry cannot be read.
    """
    if current_champion(client, name) is not None:
        return None
    return _first_champion(client, name, str(version))


def _first_champion(client: Any, name: str, version: str) -> Decision:
    client.set_registered_model_alias(name, CHAMPION, version)
    return _record(client, Decision(name, version, True, version, FIRST_REASON.format(name=name)))


def promote_if_better(client: Any, name: str, version: str,
                      reevaluate: Callable[[Any], np.ndarray] | None = None) -> Decision:
    """Make ``name`` version ``version`` the ``champion`` if it beats the current one (module docstring).

    Args:
        client: an ``mlflow.MlflowClient`` on the tracking store that holds the registry.
        name: the registered model, ``vae-<dataset>``.
        version: the challenger's version number.
        reevaluate: called with the champion's model version when the two were not evaluated on
            the same test images with the same k; returns the champion's per-example test L_k on
            the challenger's test images, shape (N,). Without it, such a pair raises.

    Returns:
        The decision, also recorded as tags on the challenger's version.

    Raises:
        TrackingError: the version does not exist, artifacts are missing, or the versions are not
            comparable and no ``reevaluate`` was given.
    """
    from mlflow.exceptions import MlflowException

    try:
        challenger = client.get_model_version(name, str(version))
    except MlflowException as error:
        raise TrackingError(f"MLflow registry: {name} version {version} not found: {error}") from error
    version = str(challenger.version)
    champion = current_champion(client, name)
    if champion is None:
        return _first_champion(client, name, version)
    if str(champion.version) == version:
        return _record(client, Decision(name, version, False, version, "this version already is the champion"))
    scores = test_log_likelihoods(client, challenger)
    if comparable(challenger, champion):
        baseline, how = test_log_likelihoods(client, champion), "the champion's evaluation"
    elif reevaluate is not None:
        baseline, how = np.asarray(reevaluate(champion), np.float64), "the champion re-evaluated on these test images"
    else:
        raise TrackingError(f"{name}: versions {version} and {champion.version} were evaluated on different test "
                            f"images or with different k ({TEST_SET_TAG}, {SAMPLES_TAG} tags differ)")
    try:
        comparison = PairedComparison.of(scores, baseline)
    except ValueError as error:
        raise TrackingError(f"{name}: comparing version {version} with champion {champion.version}: {error}") from error
    numbers = (f"mean paired difference {comparison.difference:+.3f} nats per example, paired standard error "
               f"{comparison.stderr:.3f} over {comparison.examples} test images ({how})")
    if comparison.better:
        client.set_registered_model_alias(name, CHAMPION, version)  # moves the alias in one call
        client.set_model_version_tag(name, str(champion.version), "superseded_by", version)
        return _record(client, Decision(name, version, True, version,
                                        f"beats champion version {champion.version}: {numbers}", comparison))
    return _record(client, Decision(name, version, False, str(champion.version),
                                    f"does not beat champion version {champion.version} by more than the paired "
                                    f"standard error: {numbers}", comparison))


def test_set_fingerprint(x: Any) -> str:
    """SHA-256 (first 16 hex digits) of the test images' values, a (N, D) tensor or array, as float32.

    Two evaluations with equal fingerprints saw the same images in the same order."""
    import hashlib

    values = np.ascontiguousarray(np.asarray(x.cpu() if hasattr(x, "cpu") else x, dtype=np.float32))
    digest = hashlib.sha256(values.tobytes())
    digest.update(str(values.shape).encode())
    return digest.hexdigest()[:16]

