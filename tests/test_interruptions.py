"""kill -9 of each stage mid-way, then `dvc repro`: it completes and every output is whole.

A temporary git copy of the repository runs the pipeline on small data (tests/test_pipeline.py's
settings, with a checkpoint after every training pass). Each ``dvc repro`` below kills one stage
with a real SIGKILL (tests/faults/sitecustomize.py) at its second atomic write, once the write's
temporary file is full and before the rename: earlier outputs of the stage are in place, the
rest are not. Half of the kills take the whole process group, ``dvc repro`` included, as a power
cut would. After each kill every file under data/, models/ and reports/ must be whole (it parses
as what its name says); at the end one plain ``dvc repro`` completes the pipeline, leaves no
temporary file, ``dvc status`` is clean, training resumed from its checkpoint and gave the
uninterrupted result, and MLflow holds each run once, finished, with one registered version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_pipeline import SMALL, Pipeline

pytestmark = pytest.mark.e2e

FAULTS = Path(__file__).resolve().parent / "faults"
# (stage, its `vae` arguments, atomic write to die at, kill the process group too)
KILLS = (
    ("download", "download", 2, False),
    ("binarize", "binarize", 2, True),
    ("train", "train", 2, False),  # the pass-1 checkpoint is written, model.pt is not
    ("evaluate", "evaluate", 2, True),
    ("visualize", "visualize", 3, False),
    ("sweep-data@frey", "sweep-data frey", 2, True),
    ("sweep-frey@2-aevb-0", "sweep-member frey 2 aevb 0", 2, False),  # its training, mid-way
    ("sweep-report", "sweep-report", 1, True),
    ("report", "report", 1, False),
)
OUTPUT_FOLDERS = ("data", "models", "reports")
PARAMS = {**SMALL, "train": {**SMALL["train"], "checkpoint_interval": 0}}


def repro(pipe: Pipeline, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``dvc repro`` in its own session (a process-group kill must not reach pytest)."""
    return subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=pipe.root, env={**pipe.env, **env},
                          capture_output=True, text=True, timeout=900, start_new_session=True)


def temporaries(root: Path) -> list[Path]:
    return sorted(path for folder in OUTPUT_FOLDERS for path in (root / folder).rglob(".*.tmp"))


def assert_whole(root: Path) -> int:
    """Every file under the output folders parses as its kind; returns how many were checked.

    Temporaries (``.<name>.<pid>.<random>.tmp``) are not outputs and are skipped."""
    import pandas as pd
    import torch
    from PIL import Image

    from vae.data.download import sha256_of
    from vae.data.sources import BINARIZED_MNIST, FREY, MNIST

    expected = {remote.local_name: remote.sha256 for source in (MNIST, BINARIZED_MNIST, FREY) for remote in source.files}
    checked = 0
    for folder in OUTPUT_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if not path.is_file() or path.name.endswith(".tmp"):
                continue
            where = path.relative_to(root)
            if path.name in expected:
                assert sha256_of(path) == expected[path.name], f"{where}: not the verified download"
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".csv":
                assert len(pd.read_csv(path).columns) > 0, where
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.verify()
            elif path.suffix == ".pt":
                assert isinstance(torch.load(path, map_location="cpu", weights_only=True), dict), where
            elif path.suffix == ".html":
                assert path.read_text().rstrip().endswith("</html>"), f"{where}: cut short"
            elif path.suffix == ".md":
                assert "## " in path.read_text(), f"{where}: cut short"
            else:
                raise AssertionError(f"{where}: an output of a kind this test does not know how to check")
            checked += 1
    return checked


def lock_md5(root: Path, stage: str, suffix: str) -> str:
    outs = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]["outs"]
    return next(out["md5"] for out in outs if out["path"].endswith(suffix))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each stage killed once, in pipeline order, then a plain ``dvc repro``."""
    pipe = Pipeline.copy_of_repository(tmp_path_factory, PARAMS)
    trace = pipe.store.parent / "writes.tsv"
    after_kill = {}
    for stage, arguments, write, group in KILLS:
        fault = f"{arguments}@{write}" + (":group" if group else "")
        result = repro(pipe, PYTHONPATH=str(FAULTS), VAE_FAULT_KILL=fault, VAE_FAULT_TRACE=str(trace))
        written = [line.split("\t")[1] for line in trace.read_text().splitlines()
                   if line.split("\t")[0] == arguments] if trace.exists() else []
        after_kill[stage] = {"returncode": result.returncode, "output": result.stdout + result.stderr,
                             "temporaries": temporaries(pipe.root), "whole": assert_whole(pipe.root),
                             "written": written}
        trace.unlink(missing_ok=True)
    final = repro(pipe)
    return {"pipe": pipe, "after_kill": after_kill, "final": final, "mlflow": mlflow_state(pipe)}


def mlflow_state(pipe: Pipeline) -> dict:
    """The training runs (not children) of the MLflow store and the registered versions of vae-mnist."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pipe.store}", registry_uri=f"sqlite:///{pipe.store}")
    experiment = client.get_experiment_by_name("vae-mnist")
    trained = [run for run in client.search_runs([experiment.experiment_id])
               if "mlflow.parentRunId" not in run.data.tags and "train_seconds" in run.data.metrics]
    return {"trained": [(run.info.run_id, run.info.status) for run in trained],
            "versions": [(v.run_id, v.tags) for v in client.search_model_versions("name='vae-mnist'")]}


@pytest.mark.parametrize("stage", [kill[0] for kill in KILLS])
def test_each_kill_stops_the_run_and_leaves_only_whole_files(interrupted: dict, stage: str) -> None:
    seen = interrupted["after_kill"][stage]
    _, _, write, group = next(kill for kill in KILLS if kill[0] == stage)
    if group:  # dvc repro died with the stage
        assert seen["returncode"] == -9, seen["output"][-3000:]
    else:  # dvc repro saw its stage die, and said so
        assert seen["returncode"] != 0 and f"exited with -{9}" in seen["output"], seen["output"][-3000:]
    assert f"Running stage '{stage}'" in seen["output"]
    # It died at its `write`-th write: the earlier ones completed, the killed one left its temporary.
    assert len(seen["written"]) == write, seen["written"]
    killed = Path(seen["written"][-1])
    assert any(tmp.name.startswith(f".{killed.name}.") for tmp in seen["temporaries"]), seen["temporaries"]
    assert seen["whole"] > 0  # assert_whole ran (it raises on a damaged file) and found outputs


def test_repro_after_the_kills_completes_every_stage(interrupted: dict) -> None:
    final = interrupted["final"]
    output = final.stdout + final.stderr
    assert final.returncode == 0, output[-3000:]
    pipe = interrupted["pipe"]
    assert temporaries(pipe.root) == []
    assert assert_whole(pipe.root) > 20
    assert "Data and pipelines are up to date" in pipe.dvc("status")
    summary = pipe.json("reports/train_summary.json")
    assert summary["resumed_from_passes"] == [1], "training did not resume from its pass-1 checkpoint"
    assert not (pipe.root / "models/train_state.pt").exists()


def test_resumed_training_equals_the_uninterrupted_one(interrupted: dict, tmp_path: Path) -> None:
    """The same training, uninterrupted, in a scratch folder (tracking off): equal weights."""
    import shutil

    import torch

    import vae

    pipe = interrupted["pipe"]
    shutil.copy(pipe.root / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(pipe.root / "data/processed/mnist", tmp_path / "data/processed/mnist")
    result = subprocess.run(["vae", "train"], cwd=tmp_path, env={**pipe.env, "VAE_TRACKING": "off"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = vae.load_model(pipe.root / "models/model.pt").state_dict()
    uninterrupted = vae.load_model(tmp_path / "models/model.pt").state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert json.loads((tmp_path / "reports/train_summary.json").read_text())["resumed_from_passes"] == []


def test_mlflow_holds_each_run_once_finished_and_registered_once(interrupted: dict) -> None:
    pipe, state = interrupted["pipe"], interrupted["mlflow"]
    summary = pipe.json("reports/train_summary.json")
    # One training run: the killed one, reopened by the re-run that resumed from its checkpoint.
    assert state["trained"] == [(summary["mlflow_run_id"], "FINISHED")]
    ((run_id, tags),) = state["versions"]  # the killed evaluate registered nothing, its re-run once
    assert run_id == summary["mlflow_run_id"]
    metrics = pipe.json("reports/metrics.json")
    assert float(tags["test_log_likelihood"]) == pytest.approx(metrics["test_log_likelihood"], abs=1e-3)


def test_two_repros_started_at_once_one_waits_or_fails_clearly(interrupted: dict) -> None:
    """Runs last: it changes the evaluation's k and starts two `dvc repro` in the same work tree."""
    pipe = interrupted["pipe"]
    params = yaml.safe_load((pipe.root / "params.yaml").read_text())
    params["evaluate"]["importance_samples"] = 20
    (pipe.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs = [subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=pipe.root, env=pipe.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    results = [(run.wait(timeout=900), run.communicate()[0]) for run in runs]
    succeeded = [output for code, output in results if code == 0]
    failed = [output for code, output in results if code != 0]
    assert succeeded, [output[-2000:] for _, output in results]
    for output in failed:  # DVC's repository lock: a clear message, and it ran nothing
        assert "Unable to acquire lock" in output or "is busy" in output, output[-2000:]
        assert "Running stage" not in output, output[-2000:]
    assert temporaries(pipe.root) == []
    assert assert_whole(pipe.root) > 20
    assert pipe.json("reports/metrics.json")["importance_samples"] == 20
    assert "Data and pipelines are up to date" in pipe.dvc("status")
