"""kill -9 of each stage mid-way, then `dvc repro`: it completes and every output is whole.

A temporary git copy of the repository runs the pipeline on small data (tests/support.py's
``SMALL``, with a checkpoint after every training pass; ``support.run_interrupted``, run once for
this module and tests/test_pipeline.py by tests/conftest.py's ``interrupted_pipeline``). Each
``dvc repro`` kills one stage with a real SIGKILL (tests/faults/sitecustomize.py) at its second atomic write, once the write's
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
import subprocess
from pathlib import Path

import pytest

from support import KILLS, shared_pipeline
from vae import tracking

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def interrupted(interrupted_pipeline: dict) -> dict:
    return {**interrupted_pipeline, "pipe": shared_pipeline(interrupted_pipeline),
            "snapshot": Path(interrupted_pipeline["snapshot"])}


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
    # The stage ran (its process traced its writes) and died at its `write`-th write: the earlier
    # ones completed, the killed one left its temporary.
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
    assert interrupted["status"] == {}  # `dvc status --json`: every stage up to date
    # The resumption is the run's record (MLflow), not the outputs': they equal an uninterrupted run's.
    ((_, tags),) = interrupted["mlflow"]["model_runs"]
    assert tags[tracking.RESUMED_TAG] == "1", "training did not resume from its pass-1 checkpoint"
    assert "resumed_from_passes" not in interrupted["summary"]
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
    # Equal files, not only equal weights: DVC records the same hash for both.
    assert (scratch / "resumed.pt").read_bytes() == (scratch / "models/model.pt").read_bytes()
    assert json.loads((scratch / "reports/train_summary.json").read_text()) == interrupted["summary"]


def test_mlflow_holds_each_run_once_finished_and_registered_once(interrupted: dict) -> None:
    state = interrupted["mlflow"]
    # One training run: the killed one, reopened by the re-run that resumed from its checkpoint, and
    # the one tagged with the checkpoint's hash (by which the later stages found it).
    ((trained, _),) = state["model_runs"]
    assert state["trained"] == [[trained, "FINISHED"]]
    # The evaluation logged to it (it tagged it with the hash of metrics.json: visualize and report found it so).
    assert [run_id for run_id, _ in state["metrics_runs"]] == [trained]
    # Its curves hold each point once: the pass trained again after the kill was not logged twice.
    curves = state["curves"][trained]
    assert curves["train_elbo"] == curves["valid_elbo"] == [2000, 4000]
    assert curves["train_elbo_step"] == [500 * (i + 1) for i in range(8)]  # every 5 minibatches of 100
    ((run_id, tags),) = state["versions"]  # the killed evaluate registered nothing, its re-run once
    assert run_id == trained
    metrics = interrupted["metrics"]
    assert float(tags["test_log_likelihood"]) == pytest.approx(metrics["test_log_likelihood"], abs=1e-3)
