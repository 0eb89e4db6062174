"""Tests of vae/train.py: resumable training (killed and interrupted processes), the NaN guard,
the MAP prior, the IWAE schedule, training length, step-size selection and early stopping.

Everything runs on tiny models (hidden 16-32 units, latent 2-4) and data the tests make. The
resume tests kill real ``python -m vae train`` processes; the runs they are compared with use the
same CLI in-process, with torch limited to one thread as the subprocesses are (OMP_NUM_THREADS=1),
so both compute the same floating-point operations in the same order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from support import REPO_ROOT, binary_split, generator, grey_split, one_thread, small_model, write_processed
from vae import loop, objectives, tracking
from vae.cli import main
from vae.config import ModelConfig, Params, TrainConfig, params_from_dict
from vae.data.splits import Split, load_splits
from vae.errors import TrainingError
from vae.io import file_sha256
from vae.model import VAE, read_checkpoint
from vae.loop import (
    ResumableState,
    TrainingData,
    dataset_elbo,
    evaluation_passes,
    learning_rate_at,
    run_pass,
    schedule_stage,
)
from vae.train import build_model, fingerprint, make_optimizer, select_step_size, train_model

CPU = torch.device("cpu")
# Every training process of these tests, and the in-process runs they are compared with, use one thread.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The resumed runs: 1200 grey training images (dynamic binarization), 24 steps per pass, 20 passes
# (about 1.5 s of training), so a run killed after its second pass is killed mid-run.
RESUME_EPOCHS = 20


@pytest.fixture(autouse=True)
def _torch_on_one_thread():
    """Tiny models run fastest on one thread, and a busy machine cannot oversubscribe it."""
    with one_thread():
        yield


# --------------------------------------------------------------------------------------------
# Data and parameters the tests make
# --------------------------------------------------------------------------------------------


# grey_split, binary_split and write_processed (data/processed/mnist) are in tests/support.py.


def write_params(root: Path, processed: Path, train: dict | None = None, model: dict | None = None) -> Path:
    """params.yaml for a run whose models and reports go under ``root``."""
    raw = {"paths": {"raw": str(root / "data" / "raw"), "processed": str(processed),
                     "models": str(root / "models"), "reports": str(root / "reports")},
           "model": {"hidden_dim": 32, "latent_dim": 4, **(model or {})},
           "train": {"epochs": RESUME_EPOCHS, "batch_size": 50, "checkpoint_interval": 0,
                     "elbo_eval_size": 100, "device": "cpu", "seed": 5, **(train or {})}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_processed(tmp_path_factory.mktemp("data"))


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("VAE_TRACKING", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_in_process(params: Path) -> int:
    """``vae train`` through the CLI's entry point, in this process, on one thread."""
    with one_thread():
        return main(["train", "--params", str(params), "--no-progress"])


def final_state(root: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(root / "models" / "model.pt")["state_dict"]


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key} differs"


@pytest.fixture(scope="module")
def reference(processed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run: its final weights and its ELBO curve."""
    root = tmp_path_factory.mktemp("uninterrupted")
    params = write_params(root, processed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAE_TRACKING", "off")
        assert train_in_process(params) == 0
    assert not (root / "models" / "train_state.pt").exists()
    summary = json.loads((root / "reports" / "train_summary.json").read_text())
    assert summary["epochs"] == RESUME_EPOCHS
    return {"state": final_state(root), "curve": pd.read_csv(root / "reports" / "elbo_curve.csv"),
            "outputs": output_bytes(root)}


# The train stage's DVC outputs (dvc.yaml), relative to the run's root.
TRAIN_OUTPUTS = ("models/model.pt", "reports/train_summary.json", "reports/elbo_curve.csv", "reports/train_steps.csv")


def output_bytes(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in TRAIN_OUTPUTS}


def assert_same_outputs(root: Path, expected: dict[str, bytes]) -> None:
    """The train stage's outputs under ``root`` are those of ``expected`` byte for byte: a resumed
    training writes what an uninterrupted one writes (no wall time, resumption or run id in them),
    so DVC records the same hashes for both."""
    assert [name for name, data in output_bytes(root).items() if data != expected[name]] == []


def start_training(root: Path, params: Path, tracking: bool = False) -> subprocess.Popen:
    environment = {**os.environ, **ONE_THREAD, "VAE_TRACKING": "on" if tracking else "off",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "vae", "train", "--params", str(params), "--no-progress"],
                            cwd=root, env=environment, stdout=subprocess.DEVNULL,
                            stderr=open(root / "stderr.txt", "w"))


def signal_after_checkpoint(process: subprocess.Popen, path: Path, passes: int, sig: int,
                            timeout: float = 300) -> bool:
    """Send ``sig`` once the resumable checkpoint at ``path`` records at least ``passes`` passes;
    True when it was sent mid-run.

    The trainer is frozen (SIGSTOP) while the checkpoint is read and the signal sent, and only
    continued (SIGCONT) after, so it cannot finish its remaining passes between the check and the
    signal. On a busy machine this process can still be descheduled long enough for the trainer
    to run to its last passes between two checks; then nothing is sent and False is returned
    (the signal would land at the very end of the run, which tests nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended (status {process.returncode}) before it was stopped"
        process.send_signal(signal.SIGSTOP)
        try:
            done = 0
            if path.is_file():
                with contextlib.suppress(Exception):  # a checkpoint being replaced: try again
                    done = torch.load(path, weights_only=True)["progress"]["passes_done"]
            if done >= RESUME_EPOCHS // 2:
                return False
            if done >= passes:
                process.send_signal(sig)  # delivered when the process continues
                return True
        finally:
            process.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"no checkpoint with {passes} passes at {path} after {timeout} s")


def stop_mid_run(root: Path, params: Path, sig: int, tracking: bool = False, attempts: int = 3) -> tuple[int, str]:
    """Start ``vae train``, send ``sig`` once two passes are checkpointed (and fewer than half of
    them: else start again, up to ``attempts`` times); (exit status, stderr)."""
    for _ in range(attempts):
        process = start_training(root, params, tracking)
        try:
            sent = signal_after_checkpoint(process, root / "models" / "train_state.pt", passes=2, sig=sig)
            status = process.wait(timeout=60) if sent else None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if sent:
            return status, (root / "stderr.txt").read_text()
        for leftover in (root / "models").iterdir():  # a run too far along: start afresh
            leftover.unlink()
    pytest.fail(f"the trainer reached half its passes before this process could signal it, {attempts} times")


def assert_interrupted_state(root: Path) -> dict:
    assert not (root / "models" / "model.pt").exists()
    assert not (root / "reports" / "train_summary.json").exists()
    state = torch.load(root / "models" / "train_state.pt", weights_only=True)
    assert 2 <= state["progress"]["passes_done"] < RESUME_EPOCHS
    return state


# --------------------------------------------------------------------------------------------
# Resuming after a kill, an interrupt, or with a checkpoint of other parameters
# --------------------------------------------------------------------------------------------


def test_resume_after_kill_9_gives_the_uninterrupted_result(reference, processed, isolated, capsys):
    root = isolated / "run"
    params = write_params(root, processed)
    status, _ = stop_mid_run(root, params, signal.SIGKILL)
    assert status == -signal.SIGKILL  # it was running and the kill ended it
    state = assert_interrupted_state(root)
    done = state["progress"]["passes_done"]

    assert train_in_process(params) == 0
    out = capsys.readouterr().out
    assert f"resuming from {root / 'models' / 'train_state.pt'}: pass {done} of {RESUME_EPOCHS}" in out
    assert_same_state(final_state(root), reference["state"])
    assert not (root / "models" / "train_state.pt").exists()
    summary = json.loads((root / "reports" / "train_summary.json").read_text())
    assert summary["epochs"] == RESUME_EPOCHS
    # The ELBO curve carries on: every evaluated pass, the same values as without the kill.
    curve = pd.read_csv(root / "reports" / "elbo_curve.csv")
    columns = ["epoch", "examples_seen", "train_elbo", "valid_elbo", "learning_rate"]
    pd.testing.assert_frame_equal(curve[columns], reference["curve"][columns])
    assert_same_outputs(root, reference["outputs"])


def test_resume_after_kill_9_logs_each_curve_point_once(processed, isolated, monkeypatch):
    """Killed after pass 3 was logged but before its checkpoint replaced pass 2's (at the third
    checkpoint write: tests/faults/sitecustomize.py), the resumed run trains pass 3 again; the
    MLflow run holds every curve point once, at the steps of an uninterrupted run."""
    from mlflow import MlflowClient

    root = isolated / "run"
    params = write_params(root, processed, train={"epochs": 5})
    store = f"sqlite:///{root / 'mlflow.db'}"
    arguments = ["train", "--params", str(params), "--no-progress"]
    killed = subprocess.run([str(Path(sys.executable).parent / "vae"), *arguments], cwd=root, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, **ONE_THREAD, "VAE_TRACKING": "on", "MLFLOW_TRACKING_URI": store,
                                 "PYTHONPATH": str(REPO_ROOT / "tests" / "faults"),
                                 "VAE_FAULT_KILL": f"{' '.join(arguments)}@3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = torch.load(root / "models" / "train_state.pt", weights_only=True)
    assert state["progress"]["passes_done"] == 2
    run_id = state["mlflow_run_id"]
    client = MlflowClient(tracking_uri=store)
    assert [m.step for m in client.get_metric_history(run_id, "valid_elbo")] == [1200, 2400, 3600]

    monkeypatch.setenv("VAE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert train_in_process(params) == 0
    # The resumed run is the killed one, found by the checkpoint's hash; it says where it resumed.
    assert tracking.training_run_id(root / "models" / "model.pt") == run_id
    tags = client.get_run(run_id).data.tags
    assert tags[tracking.RESUMED_TAG] == "2"
    assert tags[tracking.MODEL_TAG] == file_sha256(root / "models" / "model.pt")
    assert client.get_run(run_id).data.metrics["train_seconds"] > 0
    summary = json.loads((root / "reports" / "train_summary.json").read_text())
    assert not {"mlflow_run_id", "resumed_from_passes", "train_seconds"} & set(summary)
    per_pass = [1200 * (i + 1) for i in range(5)]  # steps: training examples seen
    for key in ("train_elbo", "valid_elbo", "test_elbo_curve", "learning_rate"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == per_pass, key
    steps = [m.step for m in client.get_metric_history(run_id, "train_elbo_step")]
    assert len(steps) == len(set(steps)), "train_elbo_step points logged twice"


def test_resume_after_ctrl_c_gives_the_uninterrupted_result(reference, processed, isolated, capsys):
    root = isolated / "run"
    params = write_params(root, processed)
    status, stderr = stop_mid_run(root, params, signal.SIGINT)
    assert status == 130, stderr
    assert "vae train: interrupted" in stderr and "Traceback" not in stderr
    assert_interrupted_state(root)
    assert not [p.name for p in (root / "models").iterdir() if p.name != "train_state.pt"]  # no temporary left

    assert train_in_process(params) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_same_state(final_state(root), reference["state"])
    assert not (root / "models" / "train_state.pt").exists()


def test_checkpoint_of_other_parameters_is_ignored(reference, processed, isolated, capsys):
    """A state written under another seed (same shapes, so it *could* be loaded) is not resumed."""
    root = isolated / "run"
    params = write_params(root, processed)
    other = params_from_dict(yaml.safe_load(params.read_text()))
    other = other.replace(train=other.train.replace(seed=other.train.seed + 1, epochs=2))
    train_file = processed / "mnist" / "train.pt"
    state = ResumableState(root / "models" / "train_state.pt", fingerprint(other, train_file, CPU))
    splits = load_splits(processed / "mnist")
    with one_thread():
        train_model(build_model(other, 784), splits["train"], splits["valid"], other.train, CPU,
                    progress=False, state=state)
    assert torch.load(state.path, weights_only=True)["progress"]["passes_done"] == 1

    assert train_in_process(params) == 0
    captured = capsys.readouterr()
    assert "written for other data or parameters; starting from scratch" in captured.err
    assert "resuming from" not in captured.out
    assert_same_state(final_state(root), reference["state"])
    assert not state.path.exists()


def test_fingerprint_follows_what_changes_the_result(tmp_path):
    data = tmp_path / "train.pt"
    data.write_bytes(b"some data")
    base = Params(train=TrainConfig(device="cpu", checkpoint_interval=60))
    same = fingerprint(base, data, CPU)
    # Where checkpoints go and how often do not change the result.
    assert fingerprint(base.replace(train=base.train.replace(checkpoint_interval=0, device="auto")), data, CPU) == same
    assert fingerprint(base, data, torch.device("cuda")) != same
    assert fingerprint(base.replace(train=base.train.replace(seed=1)), data, CPU) != same
    assert fingerprint(base.replace(model=base.model.replace(latent_dim=4)), data, CPU) != same
    assert fingerprint(base.replace(data=base.data.replace(train_subset=10)), data, CPU) != same
    # The top layer's sizes build nothing in a one-stochastic-layer model; with two, they do.
    top = base.model.replace(top_latent_dim=7, top_hidden_dim=9)
    assert fingerprint(base.replace(model=top), data, CPU) == same
    two = base.replace(model=base.model.replace(stochastic_layers=2))
    assert len({same, fingerprint(two, data, CPU), fingerprint(two.replace(model=top.replace(stochastic_layers=2)),
                                                               data, CPU)}) == 3
    data.write_bytes(b"other data")
    assert fingerprint(base, data, CPU) != same


def test_resumable_state_ignores_damaged_and_foreign_files(tmp_path, capsys):
    path = tmp_path / "train_state.pt"
    state = ResumableState(path, "abc")
    assert state.load() is None  # none yet
    state.save({"progress": {"passes_done": 3}})
    assert state.load()["progress"] == {"passes_done": 3}
    assert ResumableState(path, "other").load() is None
    assert "written for other data or parameters" in capsys.readouterr().err
    path.write_bytes(b"not a checkpoint")
    assert state.load() is None
    assert "unreadable training checkpoint" in capsys.readouterr().err
    torch.save({"format": "something else"}, path)
    assert state.load() is None
    assert "not a training checkpoint of this version" in capsys.readouterr().err
    state.remove()
    assert not path.exists()
    state.remove()  # removing nothing is fine


# --------------------------------------------------------------------------------------------
# Small in-process training runs
# --------------------------------------------------------------------------------------------

SMALL_DIM = 64  # small_model's (tests/support.py) default input size: 64 pixels, 16 hidden units, 2 latent dims


def small_config(**changes) -> TrainConfig:
    defaults = {"batch_size": 50, "epochs": 3, "elbo_eval_size": 100, "device": "cpu", "seed": 1,
                "checkpoint_interval": 0, "learning_rate": 0.01}
    return TrainConfig(**{**defaults, **changes})


@pytest.fixture(scope="module")
def small_splits() -> tuple[Split, Split]:
    return grey_split(100, SMALL_DIM, seed=11), binary_split(50, SMALL_DIM, seed=12)


def parameters_of(model: VAE) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


class CountingObjective:
    """Wraps ``loop.minibatch_objective``: records each minibatch's size; NaN at call ``poison``."""

    def __init__(self, poison: int | None = None) -> None:
        self.sizes: list[int] = []
        self.poison = poison
        self.original = loop.minibatch_objective

    def __call__(self, model, x, config, generator):
        self.sizes.append(len(x))
        values = self.original(model, x, config, generator)
        return values * math.nan if len(self.sizes) == self.poison else values


def test_cli_reports_a_diverging_run_without_a_traceback(processed, isolated, capsys):
    root = isolated / "run"
    params = write_params(root, processed, train={"learning_rate": 1e6, "epochs": 3})
    assert train_in_process(params) == 1
    err = capsys.readouterr().err
    assert re.search(r"^vae train: error: non-finite loss at step \d+ \(pass 1, learning rate 1e\+06\); "
                     r"no checkpoint had been written yet\. Try a smaller train\.learning_rate$", err, re.MULTILINE), err
    assert "Traceback" not in err
    assert not (root / "models" / "model.pt").exists()
    assert not (root / "reports" / "train_summary.json").exists()


def test_non_finite_loss_names_its_step_and_keeps_the_last_checkpoint(small_splits, tmp_path, monkeypatch):
    """Two steps per pass (100 examples, batch 50); the 5th minibatch's loss is NaN: step 5, pass 3."""
    objective = CountingObjective(poison=5)
    monkeypatch.setattr(loop, "minibatch_objective", objective)
    state = ResumableState(tmp_path / "train_state.pt", "fingerprint")
    model = small_model()
    with pytest.raises(TrainingError) as caught:
        train_model(model, *small_splits, small_config(epochs=5), CPU, progress=False, state=state)
    message = str(caught.value)
    assert message.startswith("non-finite loss at step 5 (pass 3, learning rate 0.01); ")
    assert f"the last good checkpoint {state.path} is kept" in message
    saved = torch.load(state.path, weights_only=True)
    assert saved["progress"]["passes_done"] == 2 and saved["progress"]["step"] == 4
    assert all(torch.isfinite(value).all() for value in saved["model"].values())
    assert objective.sizes == [50] * 6  # the pass with the NaN ran to its end, then stopped


def poison_after_pass(model: VAE, epoch: int):
    """An ``on_evaluation`` callback that sets a decoder weight to NaN after pass ``epoch``."""
    def poison(row, points):
        if row["epoch"] == epoch:
            with torch.no_grad():
                model.decoder[0].weight.fill_(math.nan)
    return poison


def test_non_finite_parameters_are_never_checkpointed(small_splits, tmp_path):
    """Parameters that turn NaN after pass 2 while every loss of the pass was finite: the
    checkpoint of pass 1 stays, readable and finite, and the error names the step."""
    state = ResumableState(tmp_path / "train_state.pt", "fingerprint")
    model = small_model()
    poison = poison_after_pass(model, 2)

    with pytest.raises(TrainingError, match=r"\bstep 4\b.*pass 2"):
        train_model(model, *small_splits, small_config(epochs=5), CPU, on_evaluation=poison,
                    progress=False, state=state)
    saved = torch.load(state.path, weights_only=True)
    assert saved["progress"]["passes_done"] == 1
    assert all(torch.isfinite(value).all() for value in saved["model"].values())


def test_non_finite_parameters_without_a_due_checkpoint_stop_at_the_next_step(small_splits, tmp_path):
    state = ResumableState(tmp_path / "train_state.pt", "fingerprint")
    model = small_model()
    poison = poison_after_pass(model, 2)

    with pytest.raises(TrainingError, match=r"^non-finite loss at step 5 \(pass 3.*no checkpoint had been written"):
        train_model(model, *small_splits, small_config(epochs=5, checkpoint_interval=10**6), CPU,
                    on_evaluation=poison, progress=False, state=state)
    assert not state.path.exists()


# --------------------------------------------------------------------------------------------
# The MAP prior on the parameters
# --------------------------------------------------------------------------------------------


def penalized_loss(model: VAE, x: torch.Tensor, seed: int, examples: int) -> torch.Tensor:
    """-mean ELBO + ||theta||^2 / (2N): minus the log N(0, I) prior of the parameters over N."""
    loss = -objectives.elbo(model, x, 1, generator(seed)).mean()
    return loss + sum(p.pow(2).sum() for p in model.parameters()) / (2 * examples)


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_map_prior_equals_an_explicit_gaussian_penalty(optimizer):
    """Three steps of make_optimizer(map_prior=True) on the ELBO loss equal three steps of the
    plain optimizer on loss + ||theta||^2 / (2N); N = 3 makes the prior's pull visible."""
    examples, rate = 3, 0.05
    x = binary_split(8, SMALL_DIM, seed=21).values().double()
    with_prior = small_model(seed=2).double()
    explicit = copy.deepcopy(with_prior)
    without = copy.deepcopy(with_prior)
    config = small_config(optimizer=optimizer, map_prior=True)
    optimizers = [(with_prior, make_optimizer(config, with_prior.parameters(), rate, examples), False),
                  (explicit, make_optimizer(config.replace(map_prior=False), explicit.parameters(), rate,
                                            examples), True),
                  (without, make_optimizer(config.replace(map_prior=False), without.parameters(), rate,
                                           examples), False)]
    assert optimizers[0][1].defaults["weight_decay"] == pytest.approx(1 / examples)
    assert optimizers[1][1].defaults["weight_decay"] == 0.0
    assert isinstance(optimizers[0][1], torch.optim.Adam if optimizer == "adam" else torch.optim.Adagrad)
    for step in range(3):
        for model, opt, penalize in optimizers:
            loss = penalized_loss(model, x, step, examples) if penalize else \
                -objectives.elbo(model, x, 1, generator(step)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), b, c in zip(with_prior.named_parameters(), explicit.parameters(), without.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert max(float((a - c).detach().abs().max()) for a, c in zip(with_prior.parameters(), without.parameters())) > 1e-3


def test_first_adagrad_step_with_map_prior_matches_the_closed_form():
    """Adagrad's first step: theta - lr * g / (sqrt(g^2) + eps), g = dloss/dtheta + theta / N."""
    examples, rate = 2, 0.1
    x = binary_split(8, SMALL_DIM, seed=22).values().double()
    model = small_model(seed=3).double()
    before = [p.detach().clone() for p in model.parameters()]
    loss = -objectives.elbo(model, x, 1, generator(0)).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    opt = make_optimizer(small_config(optimizer="adagrad", map_prior=True, epsilon=1e-3), model.parameters(),
                         rate, examples)
    opt.zero_grad()
    (-objectives.elbo(model, x, 1, generator(0)).mean()).backward()
    opt.step()
    for p, theta, grad in zip(model.parameters(), before, grads):
        g = grad + theta / examples
        torch.testing.assert_close(p.detach(), theta - rate * g / (g.abs() + 1e-3), rtol=1e-10, atol=1e-12)


def test_make_optimizer_options():
    params = [torch.nn.Parameter(torch.zeros(3))]
    adam = make_optimizer(small_config(optimizer="adam"), params, 0.5, 10)
    assert adam.defaults["betas"] == (0.9, 0.999) and adam.defaults["lr"] == 0.5
    assert adam.defaults["weight_decay"] == 0.0 and adam.defaults["eps"] == 1e-8
    assert make_optimizer(small_config(optimizer="adam", epsilon=1e-4), params, 0.5, 10).defaults["eps"] == 1e-4
    assert make_optimizer(small_config(optimizer="adagrad", map_prior=True), params, 0.5, 10).defaults[
        "weight_decay"] == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------
# The IWAE schedule and the evaluated passes
# --------------------------------------------------------------------------------------------


def test_schedule_stages():
    passes = [0, 1, 3, 4, 12, 13, 39, 40, 3279]
    assert [schedule_stage(p) for p in passes] == [0, 1, 1, 2, 2, 3, 3, 4, 7]
    assert sum(3**i for i in range(8)) == 3280
    stages = [schedule_stage(p) for p in range(3280)]
    assert [stages.count(i) for i in range(8)] == [3**i for i in range(8)]  # 3^i passes in stage i
    assert stages == sorted(stages)


def test_learning_rate_schedule():
    iwae, constant = TrainConfig(schedule="iwae"), TrainConfig()
    for i in range(8):
        first_pass = (3**i - 1) // 2
        assert learning_rate_at(iwae, 1e-3, first_pass) == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)
        assert learning_rate_at(constant, 1e-3, first_pass) == 1e-3
    assert learning_rate_at(iwae, 1e-3, 3279) == pytest.approx(1e-4, rel=1e-12)  # the last stage: 10^(-7/7)


def test_rounded_schedule_gives_the_iwae_authors_rates():
    """yburda/iwae experiments.py: stage i runs 3^i passes at 1e-4 * round(10 ** (1 - i/7.), 1)."""
    rounded = TrainConfig(schedule="iwae", schedule_rounding=True)
    stage_starts = [(3**i - 1) // 2 for i in range(8)]
    rates = [learning_rate_at(rounded, 1e-3, first) for first in stage_starts]
    assert rates == pytest.approx([1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4], rel=1e-12)
    # Constant within a stage, for its 3^i passes; the unrounded schedule differs from stage 1 on.
    for i, first in enumerate(stage_starts):
        assert {learning_rate_at(rounded, 1e-3, p) for p in range(first, first + 3**i)} == {rates[i]}
    unrounded = TrainConfig(schedule="iwae")
    assert learning_rate_at(unrounded, 1e-3, 1) == pytest.approx(7.1969e-4, rel=1e-4) != rates[1]
    with pytest.raises(ValueError, match="schedule_rounding"):
        TrainConfig(schedule_rounding=True)  # rounds the iwae schedule only


def test_training_follows_the_iwae_schedule(small_splits):
    rows: list[dict] = []
    train_model(small_model(), *small_splits, small_config(schedule="iwae", epochs=5, learning_rate=0.002), CPU,
                on_evaluation=lambda row, points: rows.append(row), progress=False)
    rate = 0.002 * 10 ** (-1 / 7)
    assert [row["learning_rate"] for row in rows] == pytest.approx([0.002, rate, rate, rate, 0.002 * 10 ** (-2 / 7)])


def test_evaluation_passes_when_few():
    assert evaluation_passes(7, 200) == set(range(1, 8))
    assert evaluation_passes(200, 200) == set(range(1, 201))
    assert evaluation_passes(1, 1) == {1}


@pytest.mark.parametrize(("passes", "points"), [(201, 200), (3280, 200), (10**6, 50), (30, 5)])
def test_evaluation_passes_when_many(passes, points):
    chosen = sorted(evaluation_passes(passes, points))
    assert len(chosen) <= points + 1
    assert chosen[0] == 1 and chosen[-1] == passes
    assert all(1 <= p <= passes for p in chosen)
    # Log-spaced: (almost) as many evaluations in each factor of the range once rounding no longer merges them.
    ratio = passes ** (1 / (points - 1))
    large = [p for p in chosen if p * (ratio - 1) >= 2]
    assert len(large) >= 2
    for a, b in zip(large, large[1:]):
        assert b / a == pytest.approx(ratio, rel=0.5 * (ratio - 1))


def test_evaluation_passes_of_the_iwae_schedule():
    chosen = sorted(evaluation_passes(3280, 200))
    decade = [p for p in chosen if 100 <= p < 1000]
    assert abs(len(decade) - 199 / math.log10(3280)) <= 2  # ~57 per factor of 10


# --------------------------------------------------------------------------------------------
# Training length
# --------------------------------------------------------------------------------------------


def test_training_samples_end_with_a_partial_pass_and_a_partial_minibatch(small_splits, monkeypatch):
    """100 examples, batch 30, 250 samples: passes of 100, 100 and 50 examples; minibatches
    30, 30, 30, 10 | 30, 30, 30, 10 | 30, 20: 10 steps."""
    objective = CountingObjective()
    monkeypatch.setattr(loop, "minibatch_objective", objective)
    rows: list[dict] = []
    result = train_model(small_model(), *small_splits,
                         small_config(epochs=None, training_samples=250, batch_size=30, log_interval=3), CPU,
                         on_evaluation=lambda row, points: rows.append(row), progress=False)
    assert objective.sizes == [30, 30, 30, 10] * 2 + [30, 20]
    progress = result.progress
    assert (progress.examples_seen, progress.step, progress.passes_done) == (250, 10, 3)
    assert [row["examples_seen"] for row in rows] == [100, 200, 250]
    assert result.epochs["examples_seen"].tolist() == [100, 200, 250]
    # The per-step curve: windows of 3 steps within each pass, ending at the pass's last example.
    assert result.steps["step"].tolist() == [3, 4, 7, 8, 10]
    assert result.steps["examples_seen"].tolist() == [90, 100, 190, 200, 250]


def test_epochs_count_whole_passes(small_splits, monkeypatch):
    objective = CountingObjective()
    monkeypatch.setattr(loop, "minibatch_objective", objective)
    result = train_model(small_model(), *small_splits, small_config(epochs=2, batch_size=40), CPU, progress=False)
    assert objective.sizes == [40, 40, 20] * 2
    assert (result.progress.examples_seen, result.progress.step) == (200, 6)


def test_training_is_reproducible_and_seeded(small_splits):
    first = train_model(small_model(), *small_splits, small_config(), CPU, progress=False).model
    again = train_model(small_model(), *small_splits, small_config(), CPU, progress=False).model
    other = train_model(small_model(), *small_splits, small_config(seed=2), CPU, progress=False).model
    assert_same_state(parameters_of(again), parameters_of(first))
    assert not torch.equal(other.decoder[0].weight, first.decoder[0].weight)


# --------------------------------------------------------------------------------------------
# Step-size selection
# --------------------------------------------------------------------------------------------


def test_select_step_size_keeps_the_best_and_leaves_the_model_alone(small_splits, capsys):
    train, _ = small_splits
    candidates = [1e-4, 0.02, 1e30]  # too small, good, diverging
    config = small_config(optimizer="adagrad", step_size_candidates=candidates, step_size_selection_samples=250)
    model = small_model(seed=4)
    before = parameters_of(model)
    data = TrainingData(train, CPU)
    train_x = data.fixed(100, generator(9))
    best, scores = select_step_size(model, data, config, train_x, progress=False)
    assert_same_state(parameters_of(model), before)
    assert model.training
    assert list(scores) == ["0.0001", "0.02", "1e+30"]
    assert scores["1e+30"] == -math.inf
    assert math.isfinite(scores["0.0001"]) and math.isfinite(scores["0.02"])
    assert scores["0.02"] > scores["0.0001"] + 1.0
    assert best == 0.02 == max(candidates, key=lambda c: scores[f"{c:g}"])
    assert "step size 0.02: train ELBO" in capsys.readouterr().out
    # Each score is what its candidate reached: 250 examples from the initial parameters, then the ELBO.
    replica = copy.deepcopy(model)
    optimizer = make_optimizer(config, replica.parameters(), 0.02, len(data))
    stream = torch.Generator().manual_seed(config.seed + 7)
    run_pass(replica, optimizer, data, 100, config, stream)
    run_pass(replica, optimizer, data, 100, config, stream)
    run_pass(replica, optimizer, data, 50, config, stream)
    replica.eval()
    assert dataset_elbo(replica, train_x, config.seed + 2) == scores["0.02"]


def test_select_step_size_fails_when_every_candidate_diverges(small_splits):
    train, _ = small_splits
    config = small_config(optimizer="adagrad", step_size_candidates=[1e30, 1e31], step_size_selection_samples=50)
    data = TrainingData(train, CPU)
    with pytest.raises(TrainingError, match=r"every step size diverged"):
        select_step_size(small_model(), data, config, data.fixed(50, generator(9)), progress=False)


def test_training_uses_the_selected_step_size(small_splits):
    config = small_config(optimizer="adagrad", step_size_candidates=[1e-4, 0.02], step_size_selection_samples=100,
                          learning_rate=0.5, epochs=1)
    result = train_model(small_model(seed=4), *small_splits, config, CPU, progress=False)
    assert result.progress.learning_rate == 0.02
    assert set(result.progress.step_size_trials) == {"0.0001", "0.02"}
    assert result.epochs["learning_rate"].tolist() == [0.02]


# --------------------------------------------------------------------------------------------
# Early stopping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patience", [1, 3])
def test_early_stopping_keeps_the_best_pass(patience):
    """20 training examples, a large step: the validation ELBO soon stops improving."""
    train = binary_split(20, SMALL_DIM, seed=31)
    valid = binary_split(100, SMALL_DIM, seed=32)
    model = small_model(seed=0, hidden_dim=32, latent_dim=4)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    valid_elbos: dict[int, float] = {}

    def record(row, points):
        seen[row["epoch"]] = parameters_of(model)
        valid_elbos[row["epoch"]] = row["valid_elbo"]

    epochs = 300
    config = small_config(learning_rate=0.03, batch_size=20, epochs=epochs, elbo_eval_size=20, curve_points=epochs,
                          early_stopping_patience=patience)
    result = train_model(model, train, valid, config, CPU, on_evaluation=record, progress=False)
    progress = result.progress
    last = max(seen)
    assert progress.stopped_early and progress.passes_done == last < epochs
    best = max(valid_elbos, key=valid_elbos.get)
    assert progress.best_pass == best and progress.best_valid_elbo == valid_elbos[best]
    assert last - best == patience  # `patience` evaluations without a better one
    assert_same_state(parameters_of(result.model), seen[best])
    assert not torch.equal(seen[last]["decoder.0.weight"], seen[best]["decoder.0.weight"])
    assert not result.model.training


def test_without_patience_training_runs_to_the_end(small_splits):
    result = train_model(small_model(), *small_splits, small_config(epochs=4), CPU, progress=False)
    assert not result.progress.stopped_early and result.progress.passes_done == 4


# --------------------------------------------------------------------------------------------
# The model the stage builds
# --------------------------------------------------------------------------------------------


def test_build_model_is_seeded_and_uses_init_std():
    params = Params(model=ModelConfig(hidden_dim=16, latent_dim=2, hidden_layers=2, init_std=0.01))
    first, again = build_model(params, SMALL_DIM), build_model(params, SMALL_DIM)
    assert_same_state(parameters_of(again), parameters_of(first))
    assert first.hidden_layers == 2 and first.likelihood == "bernoulli"
    weights = torch.cat([p.detach().flatten() for p in first.parameters()])
    assert float(weights.std()) == pytest.approx(0.01, rel=0.05)
    frey = params_from_dict({"data": {"dataset": "frey", "binarization": "none"}, "model": {"hidden_dim": 16}})
    assert build_model(frey, 560).likelihood == "gaussian"
    default = build_model(Params(model=ModelConfig(hidden_dim=16, latent_dim=2)), SMALL_DIM)
    assert float(default.encoder[0].weight.detach().abs().max()) <= 1 / math.sqrt(SMALL_DIM)  # PyTorch's U(-1/sqrt(in), .)
    assert float(default.encoder[0].weight.detach().std()) > 0.05  # 1/8 / sqrt(3) = 0.072, not 0.01


def test_output_bias_starts_at_the_logit_of_the_training_mean_image():
    """yburda/iwae get_train_bias_np: -log(1 / clip(mean over training images, 0.001, 0.999) - 1),
    per pixel; the decoder's mean image before training is then the training mean (where not clipped)."""
    images = torch.zeros(4, SMALL_DIM, dtype=torch.uint8)
    images[:, 1] = 255                                    # always on: clipped to 0.999
    images[:2, 2] = 255                                   # on in half the images: 0.5
    images[:1, 3] = 51                                    # grey 0.2 in one of four: 0.05
    train = Split(images, torch.zeros(4, dtype=torch.int64), binary=False, binarization="dynamic")
    params = Params(model=ModelConfig(hidden_dim=16, latent_dim=2, output_bias_init="data_mean"))
    bias = build_model(params, SMALL_DIM, train).decoder[-1].bias.detach().double()
    expected = torch.full((SMALL_DIM,), math.log(0.001 / 0.999), dtype=torch.float64)  # never on: clipped to 0.001
    expected[1], expected[2], expected[3] = math.log(0.999 / 0.001), 0.0, math.log(0.05 / 0.95)
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-6)
    # Binary images count as they are; the rest of the model is the default initialisation's.
    binary = Split((images > 0).to(torch.uint8), torch.zeros(4, dtype=torch.int64), binary=True, binarization="static")
    assert float(build_model(params, SMALL_DIM, binary).decoder[-1].bias[3].detach()) == pytest.approx(math.log(0.25 / 0.75))
    default = build_model(Params(model=ModelConfig(hidden_dim=16, latent_dim=2)), SMALL_DIM)
    assert_same_state({k: v for k, v in parameters_of(default).items() if k != "decoder.2.bias"},
                      {k: v for k, v in parameters_of(build_model(params, SMALL_DIM, train)).items()
                       if k != "decoder.2.bias"})
    with pytest.raises(ValueError, match="needs the training split"):
        build_model(params, SMALL_DIM)


# --------------------------------------------------------------------------------------------
# Wake-sleep (train.algorithm: wake-sleep) through the train stage: outputs, MLflow, resuming,
# the NaN guard, step-size selection. Its objectives are tested in tests/test_wake_sleep.py.
# --------------------------------------------------------------------------------------------

WAKE_SLEEP = {"algorithm": "wake-sleep"}
WAKE_SLEEP_STEP_COLUMNS = ["step", "examples_seen", "train_elbo", "wake_objective", "sleep_objective"]


def test_wake_sleep_run_writes_the_usual_outputs_and_records_the_algorithm(processed, isolated, monkeypatch):
    """``vae train`` with MLflow on: the checkpoint, both curves, the summary, and the algorithm in
    the summary, the checkpoint's metadata, the MLflow params, tags and run name; the per-step
    wake and sleep objectives go to MLflow under their own names beside the minibatch ELBO."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("VAE_TRACKING", "on")
    root = isolated / "run"
    params = write_params(root, processed, train={**WAKE_SLEEP, "epochs": 3, "log_interval": 8})
    assert train_in_process(params) == 0
    reports = root / "reports"
    summary = json.loads((reports / "train_summary.json").read_text())
    assert summary["algorithm"] == "wake-sleep" and summary["objective"] == "elbo" and summary["epochs"] == 3
    assert read_checkpoint(root / "models" / "model.pt")["metadata"]["algorithm"] == "wake-sleep"
    assert not (root / "models" / "train_state.pt").exists()
    curve = pd.read_csv(reports / "elbo_curve.csv")
    assert curve["epoch"].tolist() == [1, 2, 3]
    for column in ("train_elbo", "valid_elbo", "test_elbo"):
        assert curve[column].map(math.isfinite).all() and (curve[column] < 0).all(), column
    steps = pd.read_csv(reports / "train_steps.csv")
    assert list(steps.columns) == WAKE_SLEEP_STEP_COLUMNS
    assert steps["step"].tolist() == list(range(8, 73, 8))  # 24 steps per pass, 3 windows of 8 each
    assert steps[WAKE_SLEEP_STEP_COLUMNS[2:]].map(math.isfinite).all().all()

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(tracking.training_run_id(root / "models" / "model.pt"))
    assert tracking.RESUMED_TAG not in run.data.tags  # it ran uninterrupted
    assert run.data.params["train.algorithm"] == "wake-sleep"
    assert run.data.tags["algorithm"] == "wake-sleep"
    assert run.data.tags["mlflow.runName"].endswith("-wake-sleep")
    for name, column in (("train_elbo_step", "train_elbo"), ("wake_objective_step", "wake_objective"),
                         ("sleep_objective_step", "sleep_objective")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert [step for step, _ in history] == steps["examples_seen"].tolist(), name
        assert [value for _, value in history] == pytest.approx(steps[column].tolist(), rel=1e-6), name
    assert len(client.get_metric_history(run.info.run_id, "test_elbo_curve")) == 3


@pytest.fixture(scope="module")
def wake_sleep_reference(processed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted wake-sleep run: its final weights and both curves."""
    root = tmp_path_factory.mktemp("wake-sleep-uninterrupted")
    params = write_params(root, processed, train=WAKE_SLEEP)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAE_TRACKING", "off")
        assert train_in_process(params) == 0
    return {"state": final_state(root), "curve": pd.read_csv(root / "reports" / "elbo_curve.csv"),
            "steps": pd.read_csv(root / "reports" / "train_steps.csv"), "outputs": output_bytes(root)}


def test_wake_sleep_resume_after_kill_9_gives_the_uninterrupted_result(wake_sleep_reference, processed, isolated,
                                                                       capsys):
    root = isolated / "run"
    params = write_params(root, processed, train=WAKE_SLEEP)
    status, _ = stop_mid_run(root, params, signal.SIGKILL)
    assert status == -signal.SIGKILL
    done = assert_interrupted_state(root)["progress"]["passes_done"]

    assert train_in_process(params) == 0
    assert f"pass {done} of {RESUME_EPOCHS}" in capsys.readouterr().out
    assert_same_state(final_state(root), wake_sleep_reference["state"])
    summary = json.loads((root / "reports" / "train_summary.json").read_text())
    assert summary["algorithm"] == "wake-sleep"
    assert_same_outputs(root, wake_sleep_reference["outputs"])
    columns = ["epoch", "examples_seen", "train_elbo", "valid_elbo", "test_elbo", "learning_rate"]
    pd.testing.assert_frame_equal(pd.read_csv(root / "reports" / "elbo_curve.csv")[columns],
                                  wake_sleep_reference["curve"][columns])
    pd.testing.assert_frame_equal(pd.read_csv(root / "reports" / "train_steps.csv"), wake_sleep_reference["steps"])


def test_fingerprint_tells_wake_sleep_from_aevb(tmp_path):
    data = tmp_path / "train.pt"
    data.write_bytes(b"some data")
    aevb = Params(train=TrainConfig(device="cpu"))
    wake_sleep = aevb.replace(train=aevb.train.replace(algorithm="wake-sleep"))
    assert fingerprint(wake_sleep, data, CPU) != fingerprint(aevb, data, CPU)


def test_wake_sleep_nan_in_the_sleep_phase_names_its_step(small_splits, tmp_path, monkeypatch):
    """A NaN sleep objective at the 5th minibatch (the data's ELBO still finite at that step):
    training stops naming step 5, pass 3, and the checkpoint of pass 2 stays, finite."""
    calls = []
    original = objectives.wake_sleep

    def poisoned(model, x, samples, generator):
        calls.append(len(x))
        terms = original(model, x, samples, generator)
        return replace(terms, sleep=terms.sleep * math.nan) if len(calls) == 5 else terms

    monkeypatch.setattr(objectives, "wake_sleep", poisoned)
    state = ResumableState(tmp_path / "train_state.pt", "fingerprint")
    with pytest.raises(TrainingError) as caught:
        train_model(small_model(), *small_splits, small_config(**WAKE_SLEEP, epochs=5), CPU, progress=False,
                    state=state)
    assert str(caught.value).startswith("non-finite loss at step 5 (pass 3, learning rate 0.01); ")
    assert f"the last good checkpoint {state.path} is kept" in str(caught.value)
    saved = torch.load(state.path, weights_only=True)
    assert saved["progress"]["passes_done"] == 2
    assert all(torch.isfinite(value).all() for value in saved["model"].values())
    assert calls == [50] * 6


def test_wake_sleep_selects_its_step_size_by_training_elbo(small_splits):
    config = small_config(**WAKE_SLEEP, optimizer="adagrad", step_size_candidates=[1e-4, 0.05],
                          step_size_selection_samples=1000, epochs=1)
    result = train_model(small_model(seed=4), *small_splits, config, CPU, progress=False)
    trials = result.progress.step_size_trials
    assert result.progress.learning_rate == 0.05 and trials["0.05"] > trials["0.0001"] + 1.0
    assert result.epochs["learning_rate"].tolist() == [0.05]
    assert list(result.steps.columns) == WAKE_SLEEP_STEP_COLUMNS
