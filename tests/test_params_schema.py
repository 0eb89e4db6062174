"""``vae params``: the JSON schema of ``params.yaml`` the models publish, checked against the
committed file and every shipped profile; and the resolved parameters it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from vae import profile
from vae.config import SECTIONS, Params, load_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_vae(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "VAE_TRACKING": "off",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "vae", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    """What ``vae params --schema`` prints (run where there is no params.yaml: it reads none)."""
    result = run_vae(tmp_path_factory.mktemp("schema"), "params", "--schema")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def validator(schema) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)  # a well-formed schema of its declared dialect
    return jsonschema.Draft202012Validator(schema)


def problems(validator, document) -> list[str]:
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def test_the_schema_is_the_models(schema):
    assert schema == json.loads(json.dumps(Params.model_json_schema()))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert list(schema["properties"]) == ["profile", *SECTIONS]
    for section in SECTIONS:  # every knob, documented, and nothing else
        definition = schema["$defs"][type(getattr(Params(), section)).__name__]
        assert list(definition["properties"]) == list(type(getattr(Params(), section)).model_fields)
        assert definition["additionalProperties"] is False
        assert all(knob.get("description") for knob in definition["properties"].values()), section


def test_the_committed_params_file_satisfies_the_schema(validator):
    assert problems(validator, yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))) == []


@pytest.mark.parametrize("name", profile.available())
def test_every_profile_satisfies_the_schema(validator, name):
    assert problems(validator, profile.load_profile(name).params().to_dict()) == []


@pytest.mark.parametrize(("document", "where"), [
    ({"data": {"dataset": "cifar10"}}, "data.dataset"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"learning_rate": True}}, "train.learning_rate"),
    ({"train": {"epoch": 3}}, "train"),  # an unknown key
    ({"trian": {}}, ""),  # an unknown section
    ({"profile": "Bad Name"}, "profile"),
    ({"sweep": {"seeds": [0, 0]}}, "sweep.seeds"),
    ({"sweep": {"settings": {"mnist": {"visualize": {"seed": 1}}}}}, "sweep.settings.mnist"),
    ({"sweep": {"settings": {"mnist": {"train": {"optimizer": "sgd"}}}}}, "sweep.settings.mnist.train.optimizer"),
])
def test_the_schema_rejects_bad_values(validator, document, where):
    found = problems(validator, document)
    assert found and all(problem.startswith(f"{where}: ") for problem in found), found
    assert [line for line in problems(validator, Params().to_dict())] == []


def test_params_prints_the_resolved_parameters(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("train:\n  epochs: 3\nvisualize: ~\n", encoding="utf-8")
    result = run_vae(tmp_path, "params", "--params", str(path))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == load_params(path).to_dict()
    assert yaml.safe_load(result.stdout)["train"]["epochs"] == 3


def test_params_reads_params_yaml_by_default(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    result = run_vae(tmp_path, "params")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == Params().to_dict()


def test_params_refuses_a_bad_file_naming_every_problem(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  dataset: cifar10\ntrain:\n  epoch: 3\n", encoding="utf-8")
    result = run_vae(tmp_path, "params")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("vae params: error: params.yaml: invalid parameters:\n")
    assert "data.dataset = 'cifar10': expected one of mnist, frey" in result.stderr
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in result.stderr


def test_params_help_explains_the_schema(tmp_path):
    result = run_vae(tmp_path, "params", "--help")
    assert result.returncode == 0, result.stderr
    assert "--schema" in result.stdout and "--params" in result.stdout and "JSON schema" in result.stdout
