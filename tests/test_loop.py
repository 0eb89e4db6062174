"""Tests of vae/loop.py: the training loop with only the hooks each test needs, and no tracking.

Tiny models (64 pixels, 16 hidden units, 2 latent dimensions) on data the tests make, on one
thread: evaluation rows at exactly the evaluation passes, every evaluation seen by a hook,
checkpoint and resume ending with the parameters of an uninterrupted run (bit for bit), and
early stopping keeping the best validated parameters.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from support import REPO_ROOT, binary_split, grey_split, one_thread, small_model
from vae.config import TrainConfig
from vae.errors import TrainingError
from vae.loop import (
    STATE_FORMAT,
    STATE_VERSION,
    Checkpointing,
    EarlyStopping,
    Evaluation,
    Hook,
    Progress,
    ResumableState,
    Run,
    TrainingData,
    evaluation_passes,
    fit,
    restore,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _torch_on_one_thread():
    with one_thread():
        yield


def config(**changes) -> TrainConfig:
    defaults = {"batch_size": 30, "epochs": 6, "elbo_eval_size": 100, "device": "cpu", "seed": 3,
                "checkpoint_interval": 0, "learning_rate": 0.01, "log_interval": 2}
    return TrainConfig(**{**defaults, **changes})


class Trainer:
    """What one run needs: a fresh model, Adam, the training data, the generator, the evaluation sets."""

    def __init__(self, settings: TrainConfig, train_count: int = 100, seed: int = 0) -> None:
        self.config = settings
        self.model = small_model(seed=seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate)
        self.data = TrainingData(grey_split(train_count, 64, seed=21), CPU)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.train_x = self.data.fixed(min(settings.elbo_eval_size, len(self.data)),
                                       torch.Generator().manual_seed(settings.seed + 1))
        self.valid_x = binary_split(50, 64, seed=22).values()

    def evaluation(self) -> Evaluation:
        return Evaluation(self.train_x, self.valid_x)

    def fit(self, hooks: list[Hook], **kwargs) -> Run:
        return fit(self.model, self.optimizer, self.data, self.config, hooks, generator=self.generator, **kwargs)


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def assert_same_parameters(actual: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = actual.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), f"{key} differs"


def test_the_loop_imports_no_tracking():
    code = "import sys, vae.loop; print(sorted(m for m in sys.modules if m in ('vae.tracking', 'mlflow')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_evaluation_rows_at_exactly_the_evaluation_passes():
    """20 passes, 5 curve points: the rows are those of the log-spaced passes and the last, each
    at the examples seen after its pass, with finite ELBOs and the pass's step size."""
    trainer = Trainer(config(epochs=20, curve_points=5))
    run = trainer.fit([trainer.evaluation()])
    expected = sorted(evaluation_passes(20, 5))
    assert expected == [1, 2, 4, 9, 20]
    rows = run.progress.epoch_rows
    assert [row["epoch"] for row in rows] == expected
    assert [row["examples_seen"] for row in rows] == [100 * p for p in expected]
    assert all(math.isfinite(row["train_elbo"]) and math.isfinite(row["valid_elbo"]) for row in rows)
    assert all(row["learning_rate"] == 0.01 and "test_elbo" not in row for row in rows)
    assert run.progress.passes_done == 20 and run.progress.step == 20 * 4  # 30 + 30 + 30 + 10 per pass
    best = max(rows, key=lambda row: row["valid_elbo"])
    assert (run.progress.best_pass, run.progress.best_valid_elbo) == (best["epoch"], best["valid_elbo"])


def test_a_hook_sees_every_evaluation_and_every_step_row_once():
    class Recorder(Hook):
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.rows: list[dict] = []
            self.points: list[tuple] = []

        def on_start(self, run: Run) -> None:
            self.calls.append("start")

        def on_pass_end(self, run: Run) -> None:
            self.calls.append(f"pass {run.progress.passes_done}")

        def on_evaluation(self, run: Run, row: dict) -> None:
            self.calls.append(f"evaluation {row['epoch']}")
            self.rows.append(row)
            self.points += run.points

        def on_end(self, run: Run) -> None:
            self.calls.append("end" + (" (failed)" if run.failed else ""))

    trainer = Trainer(config(epochs=12, curve_points=4))
    recorder = Recorder()
    run = trainer.fit([trainer.evaluation(), recorder])
    evaluated = sorted(evaluation_passes(12, 4))
    assert [row["epoch"] for row in recorder.rows] == evaluated
    assert recorder.rows == run.progress.epoch_rows
    # The evaluation comes before the recorder's own on_pass_end of that pass.
    assert recorder.calls == ["start", *[call for p in range(1, 13) for call in
                                         ([f"evaluation {p}"] if p in evaluated else []) + [f"pass {p}"]], "end"]
    # Each per-step row reaches exactly one evaluation: (examples_seen, bound) of the rows since the previous one.
    assert recorder.points == [row[1:] for row in run.progress.step_rows]
    assert run.progress.step_rows[-1][:2] == (48, 1200)


def test_checkpoint_and_resume_end_with_the_uninterrupted_parameters(tmp_path):
    """Stopped after pass 3 (its checkpoint not yet written), resumed from pass 2's checkpoint in
    a fresh model, optimizer and generator: the same parameters, curves and per-step rows."""
    settings = config(epochs=6)
    uninterrupted = Trainer(settings)
    reference = uninterrupted.fit([uninterrupted.evaluation()])

    class Stop(Exception):
        pass

    class StopAfter(Hook):
        def on_pass_end(self, run: Run) -> None:
            if run.progress.passes_done == 3:
                raise Stop

    state = ResumableState(tmp_path / "train_state.pt", "fingerprint")
    interrupted = Trainer(settings)
    with pytest.raises(Stop):
        interrupted.fit([interrupted.evaluation(), StopAfter(), Checkpointing(state, 0, {"note": "kept"})])
    payload = state.load()
    assert (payload["format"], payload["format_version"]) == (STATE_FORMAT, STATE_VERSION)
    assert list(payload) == ["format", "format_version", "fingerprint", "model", "optimizer", "generator",
                             "progress", "best_model", "note"]
    assert payload["progress"]["passes_done"] == 2 and payload["best_model"] is None

    resumed = Trainer(settings, seed=1)  # other initial parameters: the checkpoint replaces them
    progress = Progress(**payload["progress"])
    best_model = restore(payload, resumed.model, resumed.optimizer, resumed.generator)
    run = resumed.fit([resumed.evaluation(), Checkpointing(state, 0)], progress=progress, best_model=best_model)
    assert_same_parameters(resumed.model, uninterrupted.model.state_dict())
    assert without_seconds(run.progress.epoch_rows) == without_seconds(reference.progress.epoch_rows)
    assert run.progress.step_rows == reference.progress.step_rows
    assert (run.progress.step, run.progress.examples_seen) == (reference.progress.step, reference.progress.examples_seen)
    assert torch.equal(resumed.generator.get_state(), uninterrupted.generator.get_state())
    # The last pass writes no checkpoint: the file still holds pass 5's state.
    assert state.load()["progress"]["passes_done"] == 5


@pytest.mark.parametrize("patience", [1, 3])
def test_early_stopping_keeps_the_best_parameters(patience):
    """20 training examples and a large step: the validation ELBO soon stops improving."""
    settings = config(learning_rate=0.03, batch_size=20, epochs=300, elbo_eval_size=20, curve_points=300,
                      early_stopping_patience=patience)
    trainer = Trainer(settings, train_count=20)
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshots(Hook):
        def on_evaluation(self, run: Run, row: dict) -> None:
            seen[row["epoch"]] = {key: value.clone() for key, value in run.model.state_dict().items()}

    run = trainer.fit([trainer.evaluation(), EarlyStopping(patience), Snapshots()])
    progress = run.progress
    last = max(seen)
    assert progress.stopped_early and progress.passes_done == last < 300
    best = max(progress.epoch_rows, key=lambda row: row["valid_elbo"])["epoch"]
    assert progress.best_pass == best and last - best == patience
    assert_same_parameters(trainer.model, seen[best])
    assert run.best_model is not None and not torch.equal(seen[last]["decoder.0.weight"], seen[best]["decoder.0.weight"])


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    """Parameters turned NaN after pass 2's evaluation: the check before pass 2's checkpoint
    stops training, naming the step, and pass 1's checkpoint stays."""

    class Poison(Hook):
        def on_evaluation(self, run: Run, row: dict) -> None:
            if row["epoch"] == 2:
                with torch.no_grad():
                    run.model.decoder[0].weight.fill_(math.nan)

    state = ResumableState(tmp_path / "train_state.pt", "fingerprint")
    trainer = Trainer(config(epochs=5))
    with pytest.raises(TrainingError, match=rf"non-finite parameters after step 8 \(pass 2.*{state.path} is kept"):
        trainer.fit([trainer.evaluation(), Poison(), Checkpointing(state, 0)])
    assert state.load()["progress"]["passes_done"] == 1
