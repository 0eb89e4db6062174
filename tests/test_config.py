"""``vae.config``: reading and validating ``params.yaml``."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

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
    expected = {f.name: {g.name for g in dataclasses.fields(getattr(Params(), f.name))}
                for f in dataclasses.fields(Params) if f.name != "profile"}
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
    assert {key.split(".")[0] for key in flat} == {"paths", "data", "model", "train", "evaluate", "visualize"}
    assert len(flat) == sum(len(dataclasses.fields(getattr(Params(), f.name)))
                            for f in dataclasses.fields(Params) if f.name != "profile")


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
    with pytest.raises(dataclasses.FrozenInstanceError):
        Params().train.epochs = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- rejected values


def test_unknown_key_suggests_the_right_one(tmp_path):
    message = config_error(tmp_path, "train:\n  epoch: 10\n")
    assert re.search(r"\bepoch\b", message)  # the key as written ("epochs" alone does not match)
    assert "unknown key" in message and "did you mean 'epochs'" in message
    assert "allowed keys: " + ", ".join(f.name for f in dataclasses.fields(TrainConfig)) in message


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
