"""The registered model as MLflow serves it: a pyfunc over the checkpoint, with a signature.

Each version the ``evaluate`` stage registers (:meth:`vae.tracking.Tracker.log_model`) is an MLflow
pyfunc model: the checkpoint ``models/model.pt`` as its artifact ``checkpoint`` (read back by
:func:`vae.load_model`, weights only: nothing in it is executed), this package as its code, a
signature and an input example. So ``mlflow models serve -m models:/vae-mnist@champion
--env-manager local`` and ``mlflow.pyfunc.load_model(...)`` answer the same questions as
:func:`vae.load_model` does.

**Input**: images as rows, shape (N, D) with D = the model's ``input_dim`` (784 for MNIST, 560
for Frey Face), signature dtype float32. JSON numbers of any kind (0/1 integers included) are read
as float32 by the scoring server. A Bernoulli model (binarized MNIST) takes values in {0, 1} only;
a Gaussian model (Frey Face) takes finite values (its grey levels are in [0, 1]). A wrong width, a value a Bernoulli
model cannot take, NaN or infinity, or an unknown parameter is refused with a message naming it
(HTTP 400 from the scoring server, an ``MlflowException`` from ``predict``).

**Outputs**, chosen by the inference parameter ``output`` (MLflow's ``params``):

============================  ==========================  ===========================================
``output``                     shape, dtype                what
============================  ==========================  ===========================================
``log_likelihood`` (default)   (N,) float32                L_k, the importance-sampled log p(x) (Burda
                                                           et al. 2016, Eq. 8), k = ``importance_samples``
                                                           (default 1000), nats per example
``elbo``                       (N,) float32                the ELBO (Kingma & Welling 2014, Eq. 7,
                                                           analytic KL), ``samples`` draws of z per
                                                           example (default 1), nats per example
``latent_mean``                (N, latent_dim) float32     mean of q(z|x)
``latent_log_var``             (N, latent_dim) float32     log-variance of q(z|x)
``reconstruction``             (N, D) float32              E[x|z] at z = the mean of q(z|x)
``prior_sample``               (count, D) float32          E[x|z] for z ~ p(z) = N(0, I); ``count``
                                                           images (default: one per input row; the
                                                           rows' values are not used)
============================  ==========================  ===========================================

A model with two stochastic layers (:class:`vae.model.TwoLayerVAE`) answers the same: L_k and the
ELBO over both layers, ``latent_*`` and ``reconstruction`` of the first layer z1 (q(z1|x)), and
``prior_sample`` drawn ancestrally, z2 ~ N(0, I) then z1 ~ p(z1|z2).

The draws depend on ``seed`` (default 0) only: the same request gives the same numbers, and
``log_likelihood`` equals ``vae.load_model(...).log_likelihood(x, k, seed=seed)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from vae.model import VAE, load_model

OUTPUTS = ("log_likelihood", "elbo", "latent_mean", "latent_log_var", "reconstruction", "prior_sample")
# The inference parameters and their defaults (MLflow's ParamSchema; its types are "string", "long").
PARAMS: dict[str, Any] = {"output": "log_likelihood", "importance_samples": 1000, "samples": 1, "seed": 0,
                          "count": 0}
CHECKPOINT_ARTIFACT = "checkpoint"
# Bounds that keep one request from taking the server's memory or hours (k * N pairs are processed
# in chunks, so the bound on k is on time, not memory).
MAX_IMPORTANCE_SAMPLES, MAX_SAMPLES, MAX_COUNT = 100_000, 10_000, 100_000


def signature(input_dim: int) -> Any:
    """The model signature: input a float32 tensor of shape (-1, ``input_dim``); the inference
    parameters :data:`PARAMS` with their defaults; outputs left undeclared (they depend on ``output``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    params = ParamSchema([ParamSpec(name, "string" if isinstance(default, str) else "long", default)
                          for name, default in PARAMS.items()])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, input_dim))]), params=params)


def _refuse(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _images(model: VAE, model_input: Any) -> torch.Tensor:
    """``model_input`` (array-like (N, D), any numeric dtype) as a float32 tensor the model accepts.

    Raises:
        MlflowException (INVALID_PARAMETER_VALUE, HTTP 400): not numeric, not (N, D), N = 0, or
            values the model's likelihood cannot take.
    """
    try:
        values = np.asarray(model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input)
        if values.dtype.kind not in "biuf":
            raise ValueError(f"dtype {values.dtype}")
        values = values.astype(np.float32)
    except (TypeError, ValueError) as error:
        raise _refuse(f"input: expected numbers, got {error}") from None
    if values.ndim != 2 or values.shape[1] != model.input_dim or values.shape[0] == 0:
        raise _refuse(f"input: expected rows of {model.input_dim} pixel values, shape (N, {model.input_dim}) "
                      f"with N >= 1; got shape {values.shape}")
    if not np.isfinite(values).all():
        raise _refuse(f"input: {int((~np.isfinite(values)).sum())} values are NaN or infinite; "
                      "expected finite pixel values")
    if model.likelihood == "bernoulli" and not np.isin(values, (0.0, 1.0)).all():
        bad = values[~np.isin(values, (0.0, 1.0))]
        raise _refuse(f"input: this model's decoder is Bernoulli and takes binary pixels (0 or 1) only; "
                      f"{bad.size} values are not, e.g. {float(bad[0])!r} (binarize the images first)")
    return torch.from_numpy(values)


def _params(params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` over :data:`PARAMS`, checked.

    Raises:
        MlflowException (INVALID_PARAMETER_VALUE, HTTP 400): an unknown name or ``output``, or a
            count out of range.
    """
    given = dict(params or {})
    unknown = sorted(set(given) - set(PARAMS))
    if unknown:
        raise _refuse(f"params: unknown {', '.join(unknown)}; expected some of {', '.join(PARAMS)}")
    merged = {**PARAMS, **given}
    if merged["output"] not in OUTPUTS:
        raise _refuse(f"params.output = {merged['output']!r}: expected one of {', '.join(OUTPUTS)}")
    for name, low, high in (("importance_samples", 1, MAX_IMPORTANCE_SAMPLES), ("samples", 1, MAX_SAMPLES),
                            ("count", 0, MAX_COUNT)):
        value = merged[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise _refuse(f"params.{name} = {value!r}: expected an integer from {low} to {high}")
    if not isinstance(merged["seed"], (int, np.integer)) or isinstance(merged["seed"], bool):
        raise _refuse(f"params.seed = {merged['seed']!r}: expected an integer")
    return merged


@torch.no_grad()
def predict(model: VAE, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
    """What the served model answers for ``model_input`` (N, D) and ``params`` (module docstring).

    Returns:
        float32 numpy array: (N,) for ``log_likelihood`` and ``elbo`` (nats per example),
        (N, latent_dim) for ``latent_mean`` and ``latent_log_var``, (N, D) for ``reconstruction``,
        (count or N, D) for ``prior_sample``.

    Raises:
        MlflowException (INVALID_PARAMETER_VALUE, HTTP 400 from the scoring server): bad input or
            parameters (:func:`_images`, :func:`_params`).
    """
    chosen = _params(params)
    x = _images(model, model_input)
    output, seed = chosen["output"], int(chosen["seed"])
    generator = torch.Generator().manual_seed(seed)
    if output == "log_likelihood":
        result = model.log_likelihood(x, int(chosen["importance_samples"]), seed=seed)
    elif output == "elbo":
        result = model.elbo(x, int(chosen["samples"]), generator)
    elif output in ("latent_mean", "latent_log_var"):
        result = model.encode(x)[0 if output == "latent_mean" else 1]
    elif output == "reconstruction":
        result = model.decoder_mean(model.encode(x)[0])
    else:
        result = model.sample(int(chosen["count"]) or len(x), generator)
    return result.float().numpy()


class VAEModel(mlflow.pyfunc.PythonModel):
    """The pyfunc MLflow logs and serves: :func:`predict` over the checkpoint artifact
    (:data:`CHECKPOINT_ARTIFACT`), loaded on CPU by :func:`vae.load_model`."""

    def load_context(self, context: Any) -> None:
        self.model = load_model(Path(context.artifacts[CHECKPOINT_ARTIFACT]))

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        """:func:`predict` (module docstring: inputs, ``params``, outputs, errors). MLflow infers no
        signature from an ``np.ndarray`` hint: the logged one (:func:`signature`) holds."""
        return predict(self.model, model_input, params)
