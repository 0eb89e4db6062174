"""``vae.config``: reading and validating ``params.yaml``."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from vae.config import (
    BINARIZATIONS,
    DATASETS,
    DEVICES,
    OPTIMIZERS,
    PROJECTIONS,
    DataConfig,
    Params,
    TrainConfig,
    load_params,
    params_from_dict,
)
from vae.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    message = str(caught.value)
    assert str(path) in message  # every message names the file
    return message


# --------------------------------------------------------------------------- the repository's file


def test_repository_params_equal_the_defaults():
    loaded = load_params(REPO_PARAMS)
    assert loaded == Params()
    assert loaded.to_dict() == Params().to_dict()


def test_repository_params_set_every_key():
    """params.yaml spells out every parameter (so a reader sees all knobs in one place)."""
    import yaml

    raw = yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))
    expected = {name: set(type(getattr(Params(), name)).model_fields) for name in Params.model_fields
                if name != "profile"}
    assert raw.pop("profile") == "quick"
    assert {section: set(values) for section, values in raw.items()} == expected


def test_flat_keys():
    params = Params(train=TrainConfig(epochs=7))
    flat = params.flat()
    assert flat["train.epochs"] == 7
    assert flat["train.learning_rate"] == 0.001
    assert flat["data.train_subset"] is None
    assert flat["paths.raw"] == "data/raw"
    assert all(key.count(".") == 1 for key in flat)
    assert {key.split(".")[0] for key in flat} == {"paths", "data", "model", "train", "evaluate", "visualize", "sweep"}
    assert len(flat) == sum(len(type(getattr(Params(), name)).model_fields)
                            for name in Params.model_fields if name != "profile")


# --------------------------------------------------------------------------- accepted values


def test_partial_file_fills_in_defaults(tmp_path):
    params = load_params(write(tmp_path, """
        train:
          epochs: 3
        data:
          train_subset: 2000
    """))
    assert params.train == TrainConfig(epochs=3)
    assert params.data == DataConfig(train_subset=2000)
    assert params.model == Params().model


@pytest.mark.parametrize("written", ["1e-3", "1.0e-3", "0.001", "'1e-3'"])
def test_learning_rate_forms(tmp_path, written):
    params = load_params(write(tmp_path, f"train:\n  learning_rate: {written}\n"))
    assert params.train.learning_rate == 0.001
    assert isinstance(params.train.learning_rate, float)


def test_integer_for_a_float_becomes_a_float(tmp_path):
    params = load_params(write(tmp_path, "train:\n  learning_rate: 1\n"))
    assert params.train.learning_rate == 1.0 and isinstance(params.train.learning_rate, float)


def test_null_section_means_defaults(tmp_path):
    params = load_params(write(tmp_path, "train:\nmodel: ~\n"))
    assert params == Params()


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_means_defaults(tmp_path, text):
    assert load_params(write(tmp_path, text)) == Params()


def test_null_subsets_accepted(tmp_path):
    params = load_params(write(tmp_path, "data:\n  train_subset: null\n  eval_subset: ~\n"))
    assert params.data.train_subset is None and params.data.eval_subset is None


def test_every_allowed_choice_is_accepted():
    for optimizer in OPTIMIZERS:
        assert params_from_dict({"train": {"optimizer": optimizer}}).train.optimizer == optimizer
    for device in DEVICES:
        params = params_from_dict({"train": {"device": device}, "evaluate": {"device": device}})
        assert params.train.device == params.evaluate.device == device
    for projection in PROJECTIONS:
        assert params_from_dict({"visualize": {"projection": projection}}).visualize.projection == projection
    assert params_from_dict({"data": {"dataset": DATASETS[0], "binarization": BINARIZATIONS[0]}}).data == DataConfig()


def test_zero_seed_accepted():
    assert params_from_dict({"train": {"seed": 0}, "data": {"split_seed": 0}}).train.seed == 0


def test_params_are_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        Params().train.epochs = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- rejected values


def test_unknown_key_suggests_the_right_one(tmp_path):
    message = config_error(tmp_path, "train:\n  epoch: 10\n")
    assert re.search(r"\bepoch\b", message)  # the key as written ("epochs" alone does not match)
    assert "unknown key" in message and "did you mean 'epochs'" in message
    assert "allowed keys: " + ", ".join(TrainConfig.model_fields) in message


def test_unknown_key_is_named_with_its_section(tmp_path):
    assert "train.epoch" in config_error(tmp_path, "train:\n  epoch: 10\n")


def test_unknown_section(tmp_path):
    message = config_error(tmp_path, "trian:\n  epochs: 10\n")
    assert "trian" in message and "unknown section" in message and "did you mean 'train'" in message
    assert "allowed sections: profile, paths, data, model, train, evaluate, visualize" in message


def test_unknown_key_without_a_close_match(tmp_path):
    message = config_error(tmp_path, "model:\n  zzz: 1\n")
    assert "zzz" in message and "did you mean" not in message and "latent_dim, hidden_dim" in message


@pytest.mark.parametrize(("line", "fragment"), [
    ("epochs: ten", "train.epochs = 'ten': expected an integer"),
    ("epochs: 2.5", "train.epochs = 2.5: expected an integer"),
    ("batch_size: true", "train.batch_size = True: expected an integer"),
    ("learning_rate: fast", "train.learning_rate = 'fast': expected a number"),
    ("learning_rate: true", "train.learning_rate = True: expected a number"),
    ("optimizer: 3", "train.optimizer = 3: expected a string"),
])
def test_wrong_type(tmp_path, line, fragment):
    assert fragment in config_error(tmp_path, f"train:\n  {line}\n")


def test_wrong_type_for_an_optional_integer(tmp_path):
    assert "data.train_subset = 'all': expected an integer or null" in config_error(
        tmp_path, "data:\n  train_subset: all\n")


@pytest.mark.parametrize(("section", "key", "value"), [
    ("train", "epochs", 0),
    ("train", "batch_size", -5),
    ("train", "learning_rate", 0.0),
    ("train", "learning_rate", -0.1),
    ("model", "latent_dim", 0),
    ("data", "validation_size", 0),
    ("data", "train_subset", 0),
    ("data", "eval_subset", -1),
    ("evaluate", "importance_samples", 0),
    ("visualize", "samples_grid", 0),
])
def test_non_positive_sizes(tmp_path, section, key, value):
    assert f"{section}.{key} = {value!r}: expected a finite number > 0" in config_error(
        tmp_path, f"{section}:\n  {key}: {value}\n")


def test_negative_seed(tmp_path):
    assert "data.split_seed = -1: expected a finite number >= 0" in config_error(tmp_path, "data:\n  split_seed: -1\n")


@pytest.mark.parametrize(("section", "key", "value", "allowed"), [
    ("train", "optimizer", "sgd", OPTIMIZERS),
    ("train", "device", "tpu", DEVICES),
    ("evaluate", "device", "gpu", DEVICES),
    ("data", "dataset", "cifar10", DATASETS),
    ("data", "binarization", "threshold", BINARIZATIONS),
    ("visualize", "projection", "umap", PROJECTIONS),
])
def test_value_outside_its_allowed_set(tmp_path, section, key, value, allowed):
    message = config_error(tmp_path, f"{section}:\n  {key}: {value}\n")
    assert f"{section}.{key} = {value!r}: expected one of {', '.join(allowed)}" in message


def test_several_problems_in_one_message(tmp_path):
    message = config_error(tmp_path, """
        data:
          dataset: cifar10
        model:
          latent_dim: -2
        train:
          epochs: ten
          batch_size: true
        visualize:
          projection: umap
    """)
    for fragment in ("data.dataset = 'cifar10'", "model.latent_dim = -2", "train.epochs = 'ten'",
                     "train.batch_size = True", "visualize.projection = 'umap'"):
        assert fragment in message
    assert message.count("\n") >= 5


def test_type_error_and_bad_choice_in_one_section_both_reported(tmp_path):
    message = config_error(tmp_path, "train:\n  epochs: ten\n  optimizer: sgd\n")
    assert "train.epochs = 'ten'" in message and "train.optimizer = 'sgd'" in message


@pytest.mark.parametrize("written", [".nan", "nan", ".inf"])
def test_nan_learning_rate_rejected(tmp_path, written):
    assert "train.learning_rate" in config_error(tmp_path, f"train:\n  learning_rate: {written}\n")


def test_section_that_is_not_a_mapping(tmp_path):
    message = config_error(tmp_path, "train: 5\n")
    assert "'train'" in message and "mapping" in message


def test_file_that_is_not_a_mapping(tmp_path):
    assert "mapping" in config_error(tmp_path, "- a\n- b\n")


def test_yaml_syntax_error(tmp_path):
    message = config_error(tmp_path, "train:\n  epochs: [1, 2\n")
    assert "not valid YAML" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_params(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(caught.value) and "--params" in str(caught.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        params_from_dict({"train": {"epochs": -1}})


# --------------------------------------------------------------------------- cross-field checks


@pytest.mark.parametrize(("text", "fragment"), [
    ("data:\n  dataset: frey\n  binarization: dynamic\n",
     "data.binarization = 'dynamic': dataset 'frey' allows none"),
    ("data:\n  dataset: frey\n  binarization: static\n",
     "data.binarization = 'static': dataset 'frey' allows none"),
    ("data:\n  binarization: none\n",
     "data.binarization = 'none': dataset 'mnist' allows dynamic, static"),
    ("data:\n  binarization: static\n  validation_size: 5000\n",
     "data.validation_size = 5000: the static binarization's files fix the split (50000 / 10000 / 10000); "
     "expected null"),
    ("data:\n  test_size: 1000\n",
     "data.test_size = 1000: MNIST has a fixed test set of 10000 images; expected null"),
    ("train:\n  epochs: 10\n  training_samples: 100000\n",
     "train.epochs = 10: set exactly one of epochs and training_samples (training_samples = 100000)"),
    ("train:\n  epochs: null\n",
     "train.epochs = None: set exactly one of epochs and training_samples (training_samples = None)"),
    ("train:\n  objective: iwae\n  samples: 1\n",
     "train.samples = 1: the iwae objective with k = 1 is the ELBO; expected k > 1"),
    ("train:\n  step_size_candidates: [0.01, 0, 0.1]\n",
     "train.step_size_candidates = [0.01, 0, 0.1]: expected a list of finite numbers > 0"),
    ("train:\n  step_size_candidates: [-0.01]\n",
     "train.step_size_candidates = [-0.01]: expected a list of finite numbers > 0"),
    ("train:\n  step_size_candidates: 0.01\n",
     "train.step_size_candidates = 0.01: expected a list of numbers or null"),
    ("train:\n  map_prior: 'yes'\n", "train.map_prior = 'yes': expected true or false"),
    ("train:\n  map_prior: 1\n", "train.map_prior = 1: expected true or false"),
    ("train:\n  schedule: cosine\n", "train.schedule = 'cosine': expected one of constant, iwae"),
    ("train:\n  objective: vimco\n", "train.objective = 'vimco': expected one of elbo, iwae"),
    ("train:\n  epsilon: 0\n", "train.epsilon = 0.0: expected a finite number > 0"),
    ("train:\n  checkpoint_interval: -1\n", "train.checkpoint_interval = -1: expected a finite number >= 0"),
    ("train:\n  early_stopping_patience: 0\n", "train.early_stopping_patience = 0: expected a finite number > 0"),
    ("model:\n  init_std: 0\n", "model.init_std = 0.0: expected a finite number > 0"),
    ("model:\n  hidden_layers: 0\n", "model.hidden_layers = 0: expected a finite number > 0"),
    ("profile: Bad Name\n", "profile = 'Bad Name': expected a profile name (lower-case letters, digits, hyphens)"),
    ("profile: 3\n", "profile = 3: expected a profile name"),
])
def test_cross_field_and_new_checks(tmp_path, text, fragment):
    assert fragment in config_error(tmp_path, text)


def test_several_cross_field_problems_in_one_message(tmp_path):
    message = config_error(tmp_path, """
        data:
          dataset: frey
          binarization: dynamic
        train:
          epochs: null
          objective: iwae
          samples: 1
    """)
    assert "data.binarization = 'dynamic'" in message
    assert "train.epochs = None" in message and "train.samples = 1" in message


@pytest.mark.parametrize("raw", [
    {"data": {"dataset": "frey", "binarization": "none", "validation_size": 300, "test_size": 300}},
    {"data": {"binarization": "static"}},
    {"data": {"validation_size": 5000}},
    {"train": {"epochs": None, "training_samples": 3_000_000}},
    {"train": {"objective": "iwae", "samples": 5, "schedule": "iwae"}},
    {"train": {"objective": "elbo", "samples": 1}},
    {"train": {"step_size_candidates": [0.01, 0.02, 0.1], "map_prior": True, "optimizer": "adagrad"}},
    {"model": {"init_std": 0.01, "hidden_layers": 2}, "train": {"early_stopping_patience": 3, "epsilon": 1e-4}},
    {"profile": "aevb-mnist"},
    {"profile": "my-run-2"},
])
def test_valid_combinations_are_accepted(raw):
    params = params_from_dict(raw)
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert getattr(getattr(params, section), key) == value
        else:
            assert getattr(params, section) == values


def test_map_prior_reads_yaml_booleans(tmp_path):
    assert load_params(write(tmp_path, "train:\n  map_prior: true\n")).train.map_prior is True
    assert load_params(write(tmp_path, "train:\n  map_prior: false\n")).train.map_prior is False


def test_step_size_candidates_become_floats(tmp_path):
    candidates = load_params(write(tmp_path, "train:\n  step_size_candidates: [0.01, 1]\n")).train.step_size_candidates
    assert candidates == [0.01, 1]


def test_likelihood_follows_the_binarization():
    assert DataConfig().likelihood == "bernoulli"
    assert DataConfig(binarization="static").likelihood == "bernoulli"
    assert DataConfig(dataset="frey", binarization="none").likelihood == "gaussian"
