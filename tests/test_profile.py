"""``vae.profile`` and ``vae profile``: the shipped named configurations, rewriting params.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vae import profile
from vae.cli import main
from vae.config import Params, load_params, overlay
from vae.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_PARAMS = REPO_ROOT / "params.yaml"
SHIPPED = ["aevb-figure2", "aevb-frey", "aevb-mnist", "iwae-mnist", "iwae-mnist-2layer", "iwae-mnist-static", "quick"]


def flat(params: Params) -> dict:
    return {"profile": params.profile, **params.flat()}


def run_vae(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "VAE_TRACKING": "off",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "vae", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    """A copy of the repository's params.yaml (the quick profile, with its comments)."""
    path = tmp_path / "params.yaml"
    path.write_text(REPO_PARAMS.read_text(encoding="utf-8"), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the shipped profiles


def test_the_shipped_profiles_are_listed():
    assert profile.available() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_and_validates(name):
    chosen = profile.load_profile(name)
    assert chosen.name == name and chosen.description and "\n" not in chosen.description
    params = chosen.params()
    assert isinstance(params, Params) and params.profile == name
    # Each override is a real key whose value the params carry.
    for section, values in chosen.overrides.items():
        for key, value in values.items():
            assert getattr(getattr(params, section), key) == value, f"{name}: {section}.{key}"


def test_quick_is_the_defaults():
    assert profile.load_profile("quick").overrides == {}
    assert profile.load_profile("quick").params() == Params()
    assert load_params(REPO_PARAMS) == profile.load_profile("quick").params()


def test_aevb_mnist():
    params = profile.load_profile("aevb-mnist").params()
    assert (params.data.dataset, params.data.binarization) == ("mnist", "dynamic")
    assert params.data.likelihood == "bernoulli"
    assert (params.model.hidden_dim, params.model.latent_dim, params.model.hidden_layers) == (500, 20, 1)
    assert params.model.init_std == 0.01
    train = params.train
    assert train.optimizer == "adagrad" and train.step_size_candidates == [0.01, 0.02, 0.1]
    assert train.map_prior is True and train.batch_size == 100 and train.samples == 1
    assert train.objective == "elbo" and train.schedule == "constant"
    assert train.training_samples == 10**8 and train.epochs is None
    assert params.evaluate.importance_samples == 5000


def test_aevb_frey():
    params = profile.load_profile("aevb-frey").params()
    assert (params.data.dataset, params.data.binarization) == ("frey", "none")
    assert params.data.likelihood == "gaussian"
    assert (params.model.hidden_dim, params.model.latent_dim) == (200, 2)
    assert params.model.init_std == 0.01
    assert params.train.optimizer == "adagrad" and params.train.map_prior is True
    assert params.train.step_size_candidates == [0.01, 0.02, 0.1]
    assert params.train.training_samples == 10**8 and params.train.epochs is None


def test_iwae_mnist():
    params = profile.load_profile("iwae-mnist").params()
    assert (params.data.dataset, params.data.binarization) == ("mnist", "dynamic")
    assert (params.model.hidden_layers, params.model.hidden_dim, params.model.latent_dim) == (2, 200, 50)
    assert params.model.init_std is None
    train = params.train
    assert train.optimizer == "adam" and train.learning_rate == 1e-3 and train.epsilon == 1e-4
    assert train.batch_size == 20 and train.schedule == "iwae" and train.epochs == 3280
    assert train.training_samples is None and train.step_size_candidates is None
    assert params.evaluate.importance_samples == 5000
    # The authors' protocol (yburda/iwae): their split, rounded rates, output bias, L_5000 on train too.
    assert (params.data.validation_size, params.data.split_order) == (400, "file")
    assert train.schedule_rounding is True and params.model.output_bias_init == "data_mean"
    assert params.evaluate.train_examples is None


def test_iwae_mnist_static_keeps_the_files_split():
    params = profile.load_profile("iwae-mnist-static").params()
    assert (params.data.binarization, params.data.validation_size, params.data.split_order) == ("static", None,
                                                                                                "permuted")
    dynamic = profile.load_profile("iwae-mnist").params()
    assert (params.model, params.train) == (dynamic.model, dynamic.train)
    assert params.evaluate.importance_samples == 5000 and params.evaluate.train_examples is None


def test_iwae_mnist_2layer_is_the_authors_two_layer_model_with_the_same_protocol():
    params = profile.load_profile("iwae-mnist-2layer").params()
    model = params.model
    # yburda/iwae --layers 2: z1 of 100 and z2 of 50; 200-200 between x and z1, 100-100 between z1 and z2.
    assert (model.stochastic_layers, model.latent_dim, model.top_latent_dim) == (2, 100, 50)
    assert (model.hidden_layers, model.hidden_dim, model.top_hidden_dim) == (2, 200, 100)
    one_layer = profile.load_profile("iwae-mnist").params()
    assert (params.data, params.train, params.evaluate) == (one_layer.data, one_layer.train, one_layer.evaluate)
    assert model.output_bias_init == "data_mean" and model.init_std is None
    iwae = overlay(params, {"train": {"objective": "iwae", "samples": 50}})  # Table 1's IWAE row
    assert (iwae.train.objective, iwae.train.samples) == ("iwae", 50)


# --------------------------------------------------------------------------- apply()


def comment_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


@pytest.mark.parametrize("name", ["aevb-mnist", "aevb-frey", "iwae-mnist", "iwae-mnist-static", "iwae-mnist-2layer"])
def test_apply_rewrites_params_keeping_comments(params_copy, name):
    original = params_copy.read_text(encoding="utf-8")
    expected = profile.load_profile(name).params()
    changes = profile.apply(name, params_copy)
    text = params_copy.read_text(encoding="utf-8")
    assert load_params(params_copy) == expected
    # The changed keys, with their old and new values, and nothing else.
    before, after = flat(Params()), flat(expected)
    assert changes == {key: (before[key], after[key]) for key in after if before[key] != after[key]}
    assert changes["profile"] == ("quick", name)
    # Every full-line comment (the header, the notes between keys) and the inline choices survive.
    assert comment_lines(text) == comment_lines(original)
    for inline in ("# adam | adagrad", "# mnist | frey", "# constant | iwae", "# relative to the repository root"):
        assert inline in text
    assert len(text.splitlines()) == len(original.splitlines())


def test_switching_back_to_quick_restores_the_file(params_copy):
    original = params_copy.read_text(encoding="utf-8")
    profile.apply("iwae-mnist", params_copy)
    profile.apply("aevb-mnist", params_copy)
    changes = profile.apply("quick", params_copy)
    assert load_params(params_copy) == Params()
    assert changes["profile"] == ("aevb-mnist", "quick")
    assert params_copy.read_text(encoding="utf-8") == original


def test_apply_again_changes_nothing(params_copy):
    profile.apply("aevb-frey", params_copy)
    text = params_copy.read_text(encoding="utf-8")
    assert profile.apply("aevb-frey", params_copy) == {}
    assert params_copy.read_text(encoding="utf-8") == text


def test_apply_writes_a_new_file(tmp_path):
    path = tmp_path / "params.yaml"
    changes = profile.apply("aevb-mnist", path)
    assert load_params(path) == profile.load_profile("aevb-mnist").params()
    assert changes["train.optimizer"] == (None, "adagrad")  # nothing was there before


def test_unknown_profile_lists_the_available_ones(params_copy):
    original = params_copy.read_text(encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        profile.apply("aevb", params_copy)
    assert str(caught.value) == f"profile 'aevb': unknown; available profiles: {', '.join(SHIPPED)}"
    assert params_copy.read_text(encoding="utf-8") == original


def test_apply_refuses_a_params_file_that_is_not_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        profile.apply("quick", path)
    assert path.read_text(encoding="utf-8") == "train: [1, 2\n"


@pytest.mark.parametrize(("params", "fragment"), [
    ({"train": {"epoch": 3}}, "train.epoch: unknown key (did you mean 'epochs'?)"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer = 'sgd': expected one of adam, adagrad"),
    ({"trian": {"epochs": 3}}, "params.trian: expected a section"),
    ({"train": 3}, "params.train: expected a section"),
])
def test_a_profile_with_a_bad_key_names_its_file(tmp_path, monkeypatch, params, fragment):
    monkeypatch.setattr(profile, "PROFILE_DIR", tmp_path)
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({"description": "broken", "params": params}))
    assert profile.available() == ["broken"]
    with pytest.raises(ConfigError) as caught:
        profile.load_profile("broken").params()
    message = str(caught.value)
    assert str(tmp_path / "broken.yaml") in message
    assert fragment in message


@pytest.mark.parametrize("text", ["just text\n", "params: {}\n", "description: x\nparams: [1]\n"])
def test_a_malformed_profile_file_is_refused(tmp_path, monkeypatch, text):
    monkeypatch.setattr(profile, "PROFILE_DIR", tmp_path)
    (tmp_path / "odd.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"odd\.yaml: expected a mapping with 'description'"):
        profile.load_profile("odd")


# --------------------------------------------------------------------------- the CLI


def test_cli_lists_profiles_with_the_current_one_marked(params_copy):
    profile.apply("iwae-mnist", params_copy)
    result = run_vae(params_copy.parent, "profile")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line[2:].split()[0] for line in lines] == SHIPPED
    marked = SHIPPED.index("iwae-mnist")
    assert [line[0] for line in lines] == ["*" if i == marked else " " for i in range(len(SHIPPED))]
    assert "Burda" in lines[marked] or "IWAE" in lines[marked]


def test_cli_unknown_profile_exits_2(params_copy):
    original = params_copy.read_text(encoding="utf-8")
    result = run_vae(params_copy.parent, "profile", "nosuch")
    assert result.returncode == 2
    assert result.stderr == (f"vae profile: error: profile 'nosuch': unknown; available profiles: "
                             f"{', '.join(SHIPPED)}\n")
    assert result.stdout == ""
    assert params_copy.read_text(encoding="utf-8") == original


def test_cli_show_changes_nothing(params_copy, monkeypatch, capsys):
    monkeypatch.chdir(params_copy.parent)
    original = params_copy.read_text(encoding="utf-8")
    assert main(["profile", "aevb-frey", "--show"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# AEVB paper, Frey Face")
    shown = yaml.safe_load(out)
    assert shown == profile.load_profile("aevb-frey").params().to_dict()
    assert params_copy.read_text(encoding="utf-8") == original


def test_cli_switches_and_reports_the_changes(params_copy, monkeypatch, capsys):
    monkeypatch.chdir(params_copy.parent)
    assert main(["profile", "aevb-mnist"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("params.yaml: profile aevb-mnist (10 values changed)\n")
    assert "  train.optimizer: 'adam' -> 'adagrad'\n" in out
    assert load_params(params_copy).profile == "aevb-mnist"
    assert main(["profile"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in listing if line.startswith("*")] == ["aevb-mnist"]


def test_cli_marks_nothing_when_params_are_broken(params_copy, monkeypatch, capsys):
    monkeypatch.chdir(params_copy.parent)
    params_copy.write_text("train:\n  epochs: ten\n", encoding="utf-8")
    assert main(["profile"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == len(SHIPPED) and not any(line.startswith("*") for line in listing)
