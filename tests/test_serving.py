"""The registered model's pyfunc (vae/serving.py): each output against the model's own methods on
the same inputs and seed, input conversion and refusals, and the model logged to a real MLflow
store the test creates and read back with ``mlflow.pyfunc.load_model`` (the scoring server itself:
tests/test_pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from support import binary_images, small_model
from vae import serving
from vae.model import save_checkpoint


@pytest.fixture(scope="module")
def bernoulli():
    return small_model(input_dim=64, latent_dim=3, weight_scale=3.0, eval_mode=True)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return binary_images(5, input_dim=64, seed=1).numpy()


@pytest.fixture(scope="module")
def two_layer():
    from vae.model import TwoLayerVAE

    torch.manual_seed(3)
    return TwoLayerVAE(input_dim=64, hidden_dim=16, latent_dim=4, hidden_layers=1, top_latent_dim=2,
                       top_hidden_dim=8).eval()


@torch.no_grad()  # as the server computes (with gradients, float rounding can differ in the last bit)
@pytest.mark.parametrize("model", ["bernoulli", "two_layer"])
def test_each_output_equals_the_models_own_computation(model, images, request) -> None:
    bernoulli = request.getfixturevalue(model)  # the one-stochastic-layer model, or the two-layer one
    x = torch.from_numpy(images)
    expected = {
        "log_likelihood": bernoulli.log_likelihood(x, 300, seed=4),
        "elbo": bernoulli.elbo(x, 7, torch.Generator().manual_seed(4)),
        "latent_mean": bernoulli.encode(x)[0],
        "latent_log_var": bernoulli.encode(x)[1],
        "reconstruction": bernoulli.decoder_mean(bernoulli.encode(x)[0]),
        "prior_sample": bernoulli.sample(5, torch.Generator().manual_seed(4)),
    }
    for output, value in expected.items():
        got = serving.predict(bernoulli, images, {"output": output, "importance_samples": 300, "samples": 7,
                                                  "seed": 4})
        assert got.dtype == np.float32 and got.shape == tuple(value.shape), (output, got.shape)
        np.testing.assert_array_equal(got, value.detach().float().numpy(), err_msg=output)
    # The default output is L_1000 with seed 0; `count` sets how many prior samples.
    np.testing.assert_array_equal(serving.predict(bernoulli, images), bernoulli.log_likelihood(x, 1000, seed=0).numpy())
    assert serving.predict(bernoulli, images[:1], {"output": "prior_sample", "count": 9}).shape == (9, 64)
    # Another seed, other draws (the estimates differ, the deterministic outputs do not).
    assert not np.array_equal(serving.predict(bernoulli, images, {"seed": 1}), serving.predict(bernoulli, images))


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.float64, np.bool_])
def test_any_numeric_dtype_is_converted(bernoulli, images, dtype) -> None:
    np.testing.assert_array_equal(serving.predict(bernoulli, images.astype(dtype), {"output": "latent_mean"}),
                                  serving.predict(bernoulli, images, {"output": "latent_mean"}))
    assert serving.predict(bernoulli, images.astype(dtype).tolist(), {"output": "elbo"}).shape == (5,)


@pytest.mark.parametrize(("change", "params", "message"), [
    (lambda x: x[:, :63], None, r"rows of 64 pixel values.*got shape \(5, 63\)"),
    (lambda x: x[0], None, r"shape \(N, 64\).*got shape \(64,\)"),
    (lambda x: x[:0], None, r"N >= 1"),
    (lambda x: np.where(x == 1, 0.5, x), None, r"Bernoulli and takes binary pixels.*e\.g\. 0\.5"),
    (lambda x: np.where(x == 1, np.nan, x), None, r"NaN or infinite"),
    (lambda x: x.astype(str), None, r"expected numbers"),
    (lambda x: x, {"output": "latent"}, r"params\.output = 'latent': expected one of log_likelihood, elbo"),
    (lambda x: x, {"importance_samples": 0}, r"params\.importance_samples = 0: expected an integer from 1"),
    (lambda x: x, {"samples": 2.5}, r"params\.samples = 2\.5"),
    (lambda x: x, {"k": 5}, r"params: unknown k"),
])
def test_bad_input_is_refused_with_a_message_naming_it(bernoulli, images, change, params, message) -> None:
    with pytest.raises(MlflowException, match=message) as raised:
        serving.predict(bernoulli, change(images.astype(np.float32)), params)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 from the scoring server
    assert raised.value.get_http_status_code() == 400


def test_a_gaussian_model_takes_grey_values_and_refuses_infinity() -> None:
    model = small_model(input_dim=20, latent_dim=2, likelihood="gaussian", eval_mode=True)
    grey = torch.rand(4, 20, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(serving.predict(model, grey.numpy(), {"importance_samples": 50}),
                                  model.log_likelihood(grey, 50, seed=0).numpy())
    with pytest.raises(MlflowException, match="NaN or infinite"):
        serving.predict(model, np.where(grey.numpy() > 0.5, np.inf, grey.numpy()))


def test_signature_declares_float32_rows_and_the_parameters() -> None:
    signature = serving.signature(784)
    [spec] = signature.inputs.inputs
    assert spec.type == np.dtype(np.float32) and spec.shape == (-1, 784)
    assert {param.name: param.default for param in signature.params.params} == serving.PARAMS


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_logged_and_loaded_with_mlflow_it_answers_as_the_checkpoint_does(tmp_path, likelihood) -> None:
    """Tracker.log_model on a real SQLite store: the registered version has the signature and an
    input example, and ``mlflow.pyfunc.load_model`` of ``models:/NAME/1`` answers as the checkpoint."""
    import mlflow

    from vae import tracking

    model = small_model(input_dim=30, latent_dim=2, likelihood=likelihood, weight_scale=2.0, eval_mode=True)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(model, checkpoint)
    x = (binary_images(6, input_dim=30, seed=2) if likelihood == "bernoulli"
         else torch.rand(6, 30, generator=torch.Generator().manual_seed(2))).numpy()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = tracking.create_experiment(client, uri, "serving")
        run = client.create_run(experiment)
        tracker = tracking.Tracker(client, run.info.run_id, uri)
        assert tracker.log_model(checkpoint, "vae-test", {"latent_dim": 2}, x[:2]) == "1"
        loaded = mlflow.pyfunc.load_model("models:/vae-test/1")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 30)
    assert loaded.metadata.saved_input_example_info is not None
    for output in serving.OUTPUTS:
        np.testing.assert_array_equal(loaded.predict(x, params={"output": output, "importance_samples": 40}),
                                      serving.predict(model, x, {"output": output, "importance_samples": 40}))
    with pytest.raises(MlflowException, match="does not match expected shape"):
        loaded.predict(x[:, :29])
    assert client.get_experiment(experiment).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
