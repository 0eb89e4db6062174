"""``vae.cli``: the ``vae <stage>`` command line, as a subprocess (``python -m vae``) and in-process.

Every run works in ``tmp_path``: its parameters file points every path there, MLflow at a sqlite
file there, and ``VAE_TRACKING=off``, so nothing is written to the repository.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vae import __version__, datasets
from vae.cli import STAGES, build_parser, main
from vae.data.sources import MIRROR_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE_NAMES = ("download", "binarize", "train", "evaluate", "visualize", "report")


def write_params(tmp_path: Path, overrides: dict | None = None, root: Path | str | None = None) -> Path:
    """A parameters file whose paths all lie under ``root`` (default ``tmp_path``), plus ``overrides``."""
    root = tmp_path if root is None else root
    raw: dict = {"paths": {name: str(Path(root) / name) for name in ("raw", "processed", "models", "reports")}}
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def run_vae(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ,
                   "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "VAE_TRACKING": "off",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                   **(env or {})}
    return subprocess.run([sys.executable, "-m", "vae", *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """In-process runs: the same isolation as the subprocesses, undone afterwards."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("VAE_TRACKING", "off")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # main() sets it otherwise; restored afterwards
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- subprocesses


def test_help_lists_every_stage(tmp_path):
    result = run_vae(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert tuple(STAGES) == STAGE_NAMES
    # One entry per stage, in the order they run, then the sweep's stages, the profile and params commands.
    assert tuple(re.findall(r"^ {4}([\w-]+)", result.stdout, flags=re.MULTILINE)) == (
        *STAGE_NAMES, "sweep-data", "sweep-member", "sweep-report", "profile", "params")
    assert "VAE_DATA_MIRROR" in result.stdout
    assert result.stderr == ""


def test_stage_help_mentions_params(tmp_path):
    result = run_vae(tmp_path, "train", "--help")
    assert result.returncode == 0, result.stderr
    assert "--params" in result.stdout and "params.yaml" in result.stdout
    assert "usage: vae train" in result.stdout


def test_bad_params_exit_2_with_one_clear_error(tmp_path):
    params = write_params(tmp_path, {"train": {"epoch": 3}})
    result = run_vae(tmp_path, "train", "--params", str(params))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("vae train: error: ")
    assert result.stderr.count("error:") == 1
    assert str(params) in result.stderr
    assert re.search(r"\bepoch\b", result.stderr) and "did you mean 'epochs'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert files_under(tmp_path) == ["params.yaml"]  # nothing else written (no models, no mlflow.db)


def test_download_with_an_empty_mirror_fails_cleanly(tmp_path):
    mirror = tmp_path / "empty-mirror"
    mirror.mkdir()
    params = write_params(tmp_path, root=".")  # relative paths, resolved against the working directory
    result = run_vae(tmp_path, "download", "--params", str(params), env={MIRROR_ENV: str(mirror)})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "vae download: error: could not fetch a verified copy of" in result.stderr
    first = datasets.variant("mnist", "dynamic").source.files[0].name
    assert (mirror / "mnist").as_uri() + "/" + first in result.stderr
    assert "ossci-datasets" not in result.stderr  # the mirror replaces the upstream URLs
    assert files_under(tmp_path / "raw") == []  # no file, partial or otherwise
    assert files_under(mirror) == []


# --------------------------------------------------------------------------- in-process


def test_stage_summaries_are_not_cut_mid_parenthesis():
    text = build_parser().format_help()
    assert text.count("(") == text.count(")")


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"vae {__version__}"


@pytest.mark.parametrize("argv", [[], ["fit"], ["train", "--bogus"]])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage: vae" in capsys.readouterr().err


def test_bad_params_in_process(isolated, capsys):
    params = write_params(isolated, {"train": {"epochs": "ten"}, "model": {"latent_dim": 0}})
    assert main(["train", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vae train: error: ") and err.count("error:") == 1
    assert "train.epochs = 'ten'" in err and "model.latent_dim = 0" in err
    assert "Traceback" not in err


def test_missing_params_file(isolated, capsys):
    assert main(["evaluate", "--params", str(isolated / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vae evaluate: error: ") and str(isolated / "nope.yaml") in err


def test_default_params_file_is_read_from_the_working_directory(isolated, capsys):
    (isolated / "params.yaml").write_text("visualize:\n  projection: umap\n", encoding="utf-8")
    assert main(["visualize"]) == 2
    assert "visualize.projection = 'umap'" in capsys.readouterr().err


def test_binarize_without_raw_files(isolated, capsys):
    params = write_params(isolated)
    assert main(["binarize", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vae binarize: error: ") and err.count("error:") == 1
    assert str(isolated / "raw" / "mnist" / "train-images-idx3-ubyte") in err
    assert "vae download" in err
    assert files_under(isolated / "processed") == []


def test_binarize_succeeds_on_synthetic_raw_files(isolated, capsys):
    """The success path: exit 0, the three splits written under paths.processed, a summary printed."""
    raw = isolated / "raw" / "mnist"
    raw.mkdir(parents=True)
    for images, labels, count in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
                                  ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)):
        (raw / images).write_bytes(struct.pack(">IIII", 0x803, count, 28, 28) + bytes(count * 784))
        (raw / labels).write_bytes(struct.pack(">II", 0x801, count) + bytes(range(10)) * (count // 10))
    params = write_params(isolated, {"data": {"train_subset": 30, "eval_subset": 20}})
    assert main(["binarize", "--params", str(params)]) == 0
    assert "train: 30 examples, valid: 20 examples, test: 20 examples (dynamic binarization)" in capsys.readouterr().out
    assert files_under(isolated / "processed") == ["mnist/test.pt", "mnist/train.pt", "mnist/valid.pt"]
