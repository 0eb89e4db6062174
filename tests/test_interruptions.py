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
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_interrupted(factory: pytest.TempPathFactory) -> dict:
    """The pipeline reached through a kill of each stage, in pipeline order, and then two plain
    ``dvc repro`` started at once (one completes the pipeline, the other waits or fails clearly).

    Returns what the tests below check, read as the run ended (tests/test_pipeline.py goes on
    with the same repository, tests/conftest.py's ``interrupted_pipeline``, and changes it)."""
    pipe = Pipeline.copy_of_repository(factory, SMALL)
    trace = pipe.store.parent / "writes.tsv"
    after_kill, outputs = {}, []
    for stage, arguments, write, group in KILLS:
        fault = f"{arguments}@{write}" + (":group" if group else "")
        result = repro(pipe, PYTHONPATH=str(FAULTS), VAE_FAULT_KILL=fault, VAE_FAULT_TRACE=str(trace))
        written = [line.split("\t")[1] for line in trace.read_text().splitlines()
                   if line.split("\t")[0] == arguments] if trace.exists() else []
        after_kill[stage] = {"returncode": result.returncode, "output": result.stdout + result.stderr,
                             "temporaries": temporaries(pipe.root), "whole": assert_whole(pipe.root),
                             "written": written}
        outputs.append(result.stdout + result.stderr)
        trace.unlink(missing_ok=True)
    runs = [subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=pipe.root, env=pipe.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    final = [(run.wait(timeout=900), run.communicate()[0]) for run in runs]
    outputs += [output for _, output in final]
    pipe.first_output = "\n".join(outputs)
    for stage, seen in after_kill.items():  # shown with `pytest -s`: what each kill left
        print(f"kill {stage}: dvc exit {seen['returncode']}; writes done {len(seen['written']) - 1}, killed in "
              f"{Path(seen['written'][-1]).name if seen['written'] else '-'}; temporaries "
              f"{[Path(t).name for t in seen['temporaries']]}; {seen['whole']} whole files")
    print("then two dvc repro at once:", [(code, "ran" if "Running stage" in out else out.strip()[-160:])
                                           for code, out in final])
    snapshot = factory.mktemp("after-the-kills")  # for the uninterrupted twin of the training
    shutil.copy(pipe.root / "params.yaml", snapshot / "params.yaml")
    shutil.copytree(pipe.root / "data/processed/mnist", snapshot / "data/processed/mnist")
    shutil.copy(pipe.root / "models/model.pt", snapshot / "resumed.pt")
    for seen in after_kill.values():
        seen["temporaries"] = [str(path) for path in seen["temporaries"]]
    # Plain values only: tests/conftest.py shares them between pytest-xdist's workers as JSON.
    return {"root": str(pipe.root), "store": str(pipe.store), "first_output": pipe.first_output,
            "after_kill": after_kill, "final": final, "snapshot": str(snapshot),
            "temporaries": [str(path) for path in temporaries(pipe.root)], "whole": assert_whole(pipe.root),
            "status": pipe.dvc("status"), "summary": pipe.json("reports/train_summary.json"),
            "metrics": pipe.json("reports/metrics.json"), "mlflow": mlflow_state(pipe),
            "train_state_left": (pipe.root / "models/train_state.pt").exists()}


def shared_pipeline(run: dict) -> Pipeline:
    """The repository of :func:`run_interrupted` (tests/test_pipeline.py goes on with it)."""
    pipe = Pipeline(Path(run["root"]), Path(run["store"]))
    pipe.first_output = run["first_output"]
    return pipe


@pytest.fixture(scope="module")
def interrupted(interrupted_pipeline: dict) -> dict:
    return {**interrupted_pipeline, "pipe": shared_pipeline(interrupted_pipeline),
            "snapshot": Path(interrupted_pipeline["snapshot"])}


def mlflow_state(pipe: Pipeline) -> dict:
    """The training runs (not children) of the MLflow store and the registered versions of vae-mnist."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pipe.store}", registry_uri=f"sqlite:///{pipe.store}")
    experiment = client.get_experiment_by_name("vae-mnist")
    trained = [run for run in client.search_runs([experiment.experiment_id])
               if "mlflow.parentRunId" not in run.data.tags and "train_seconds" in run.data.metrics]
    curves = {run.info.run_id: {key: sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, key))
                                for key in ("train_elbo", "valid_elbo", "train_elbo_step")} for run in trained}
    return {"trained": [[run.info.run_id, run.info.status] for run in trained], "curves": curves,
            "versions": [[v.run_id, v.tags] for v in client.search_model_versions("name='vae-mnist'")]}


@pytest.mark.parametrize("stage", [kill[0] for kill in KILLS])
def test_each_kill_stops_the_run_and_leaves_only_whole_files(interrupted: dict, stage: str) -> None:
    seen = interrupted["after_kill"][stage]
    _, _, write, group = next(kill for kill in KILLS if kill[0] == stage)
    if group:  # dvc repro died with the stage
        assert seen["returncode"] == -9, seen["output"][-3000:]
    else:  # dvc repro saw its stage die, and said so: DVC runs the stage through $SHELL, which
        # either execs `vae` (DVC sees the signal: -9) or waits for it and exits 128 + 9 = 137
        assert seen["returncode"] != 0, seen["output"][-3000:]
        assert re.search(r"exited with (-9|137)\b", seen["output"]), seen["output"][-3000:]
    assert f"Running stage '{stage}'" in seen["output"]
    # It died at its `write`-th write: the earlier ones completed, the killed one left its temporary.
    assert len(seen["written"]) == write, seen["written"]
    killed = Path(seen["written"][-1])
    assert any(Path(tmp).name.startswith(f".{killed.name}.") for tmp in seen["temporaries"]), seen["temporaries"]
    assert seen["whole"] > 0  # assert_whole ran (it raises on a damaged file) and found outputs


def test_two_repros_started_at_once_complete_the_pipeline_or_fail_clearly(interrupted: dict) -> None:
    """Both started together on the same work tree: one ran the rest of the pipeline (the killed
    report); the other waited and found it up to date, or stopped at DVC's lock having run nothing."""
    final = interrupted["final"]
    ran = [output for code, output in final if code == 0 and "Running stage 'report'" in output]
    assert len(ran) == 1, [output[-2000:] for _, output in final]
    for code, output in final:
        if output is ran[0]:
            continue
        if code == 0:
            assert "Running stage" not in output, output[-2000:]
        else:
            assert "Unable to acquire lock" in output or "is busy" in output, output[-2000:]
            assert "Running stage" not in output, output[-2000:]


def test_repro_after_the_kills_leaves_every_output_whole_and_nothing_stale(interrupted: dict) -> None:
    assert interrupted["temporaries"] == []
    assert interrupted["whole"] > 20
    assert "Data and pipelines are up to date" in interrupted["status"]
    assert interrupted["summary"]["resumed_from_passes"] == [1], "training did not resume from its pass-1 checkpoint"
    assert not interrupted["train_state_left"]


def test_resumed_training_equals_the_uninterrupted_one(interrupted: dict) -> None:
    """The same training, uninterrupted, in a copy of the run's params and data (tracking off): equal weights."""
    import torch

    import vae

    scratch = interrupted["snapshot"]
    result = subprocess.run(["vae", "train"], cwd=scratch, env={**interrupted["pipe"].env, "VAE_TRACKING": "off"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = vae.load_model(scratch / "resumed.pt").state_dict()
    uninterrupted = vae.load_model(scratch / "models/model.pt").state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert json.loads((scratch / "reports/train_summary.json").read_text())["resumed_from_passes"] == []


def test_mlflow_holds_each_run_once_finished_and_registered_once(interrupted: dict) -> None:
    state, summary = interrupted["mlflow"], interrupted["summary"]
    # One training run: the killed one, reopened by the re-run that resumed from its checkpoint.
    assert state["trained"] == [[summary["mlflow_run_id"], "FINISHED"]]
    # Its curves hold each point once: the pass trained again after the kill was not logged twice.
    curves = state["curves"][summary["mlflow_run_id"]]
    assert curves["train_elbo"] == curves["valid_elbo"] == [2000, 4000]
    assert curves["train_elbo_step"] == [500 * (i + 1) for i in range(8)]  # every 5 minibatches of 100
    ((run_id, tags),) = state["versions"]  # the killed evaluate registered nothing, its re-run once
    assert run_id == summary["mlflow_run_id"]
    metrics = interrupted["metrics"]
    assert float(tags["test_log_likelihood"]) == pytest.approx(metrics["test_log_likelihood"], abs=1e-3)
