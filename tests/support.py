"""What the test modules share: small models and data, synthetic source files, the pipeline in a
temporary copy of the repository, real servers on 127.0.0.1, and the pipeline run through a kill
of each stage.

Test modules import from here (``from support import ...``), never from one another; fixtures and
hooks are in tests/conftest.py. pytest puts tests/ on ``sys.path`` (the rootdir-relative
``prepend`` import mode: tests/ has no ``__init__.py``, so its folder is inserted before
tests/conftest.py and the test modules are imported), in each pytest-xdist worker as well.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.distributions import MultivariateNormal

if TYPE_CHECKING:  # imported where used, so that tests/conftest.py loads even when vae does not import
    from vae.data.splits import Split
    from vae.model import VAE

REPO_ROOT = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "faults"


# --------------------------------------------------------------------------------------------
# Random streams, threads, the dataset mirror
# --------------------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def one_thread():
    """torch on one thread (as subprocesses with OMP_NUM_THREADS=1), the global RNG left as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.set_num_threads(threads)


def dataset_mirror() -> str | None:
    """The dataset mirror tests use: ``VAE_DATA_MIRROR``, else ``../shared/datasets`` beside the
    repository when present, else None (the upstream URLs)."""
    configured = os.environ.get("VAE_DATA_MIRROR", "").strip()
    if configured:
        return configured
    shared = REPO_ROOT.parent / "shared" / "datasets"
    return str(shared) if shared.is_dir() else None


# --------------------------------------------------------------------------------------------
# Small models and data
# --------------------------------------------------------------------------------------------


def small_model(*, input_dim: int = 64, hidden_dim: int = 16, latent_dim: int = 2, hidden_layers: int = 1,
                likelihood: str = "bernoulli", seed: int = 0, dtype: torch.dtype = torch.float32,
                weight_scale: float = 1.0, eval_mode: bool = False) -> VAE:
    """A :class:`vae.model.VAE` with PyTorch's default initialisation drawn after
    ``torch.manual_seed(seed)``, the global random state restored afterwards (the same model for
    the same arguments, whatever ran before).

    Args:
        input_dim, hidden_dim, latent_dim, hidden_layers, likelihood: as for :class:`VAE`.
        seed: seeds the global RNG the initialisation draws from.
        dtype: the parameters' dtype, converted to after scaling (float32 or float64).
        weight_scale: every parameter multiplied by it in float32 before the conversion; sharper
            than the default initialisation (3 to 4), log-weights and decoded images vary more.
        eval_mode: return the model in eval mode (``model.training`` False).

    Returns:
        The model on the CPU.
    """
    from vae.model import VAE

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = VAE(input_dim=input_dim, hidden_dim=hidden_dim, latent_dim=latent_dim,
                    hidden_layers=hidden_layers, likelihood=likelihood)
        if weight_scale != 1.0:
            for parameter in model.parameters():
                parameter.data.mul_(weight_scale)
    model = model.to(dtype)
    return model.eval() if eval_mode else model


def binary_images(count: int, *, input_dim: int = 784, seed: int = 0, probability: float | torch.Tensor = 0.3,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random binary images, shape (count, input_dim), values 0 or 1 in ``dtype``: pixel j is 1
    with ``probability`` (a number, or a tensor of shape (input_dim,)), drawn from ``generator(seed)``."""
    return (torch.rand(count, input_dim, generator=generator(seed)) < probability).to(dtype)


def pixel_probabilities(input_dim: int) -> torch.Tensor:
    """Per-pixel probabilities in [0, 0.5), shape (input_dim,), the same for every ``input_dim``-pixel split."""
    return 0.5 * torch.rand(input_dim, generator=generator(1000 + input_dim))


def grey_split(count: int, dim: int, seed: int) -> Split:
    """Grey uint8 images whose pixels have different mean intensities (dynamic binarization)."""
    from vae.data.splits import Split

    g = generator(seed)
    intensity = torch.rand(dim, generator=generator(1000 + dim))
    images = (255 * intensity * torch.rand(count, dim, generator=g)).round().to(torch.uint8)
    return Split(images, torch.zeros(count, dtype=torch.long), binary=False, binarization="dynamic")


def binary_split(count: int, dim: int, seed: int) -> Split:
    """Binary uint8 images (:func:`binary_images` with :func:`pixel_probabilities`) as a split, labels 0."""
    from vae.data.splits import Split

    images = binary_images(count, input_dim=dim, seed=seed, probability=pixel_probabilities(dim), dtype=torch.uint8)
    return Split(images, torch.zeros(count, dtype=torch.long), binary=True, binarization="dynamic")


# --------------------------------------------------------------------------------------------
# Synthetic source and processed files
# --------------------------------------------------------------------------------------------


def idx_bytes(magic: int, dims: tuple[int, ...], body: bytes) -> bytes:
    """An IDX file (MNIST's format): big-endian uint32 magic and dimensions, then ``body``."""
    return struct.pack(f">{len(dims) + 1}I", magic, *dims) + body


def amat_text(images: np.ndarray) -> bytes:
    """The .amat encoding of binary images (n, 784): one line each, values joined by spaces."""
    return b"".join(b" ".join(b"1" if v else b"0" for v in row) + b"\n" for row in np.asarray(images))


def synthetic_faces(count: int, seed: int = 0) -> np.ndarray:
    """``ff`` as in the real file, uint8 (560, count); face i carries i in its first two pixels."""
    faces = np.random.default_rng(seed).integers(0, 256, size=(count, 560), dtype=np.uint8)
    faces[:, 0] = np.arange(count) % 256
    faces[:, 1] = np.arange(count) // 256
    return faces.T.copy()


def write_processed(folder: Path, train_count: int = 1200, dim: int = 784) -> Path:
    """data/processed/mnist/{train,valid,test}.pt under ``folder`` (grey training images, 100
    binary validation and test images); returns data/processed."""
    processed = folder / "data" / "processed"
    grey_split(train_count, dim, seed=1).save(processed / "mnist" / "train.pt")
    binary_split(100, dim, seed=2).save(processed / "mnist" / "valid.pt")
    binary_split(100, dim, seed=3).save(processed / "mnist" / "test.pt")
    return processed


# --------------------------------------------------------------------------------------------
# The pipeline in a temporary copy of the repository
# --------------------------------------------------------------------------------------------

# AIS, BDMC and (for latent_dim < 5) App. D at their smallest: each runs, in seconds.
SMALL_AIS = {"ais_test_examples": 4, "ais_train_examples": 2, "ais_temperatures": 20, "bdmc_examples": 4,
             "appendix_d_samples": 10}
SMALL = {
    "data": {"train_subset": 2000, "eval_subset": 500},
    "model": {"latent_dim": 2, "hidden_dim": 64},
    # A checkpoint after every pass: tests/test_interruptions.py kills training after the first.
    "train": {"epochs": 2, "elbo_eval_size": 500, "device": "cpu", "log_interval": 5, "checkpoint_interval": 0},
    "evaluate": {"importance_samples": 50, "device": "cpu", **SMALL_AIS},
    "visualize": {"latent_points": 500, "manifold_grid": 8},
}
# The latent-size sweep at its smallest: one tiny Frey Face member (tests/test_sweep_e2e.py runs more).
ONE_MEMBER_SWEEP = {
    "algorithms": ["aevb"], "seeds": [0], "latent_dims": {"mnist": [], "frey": [2]}, "threads": 1,
    "settings": {"mnist": {"data": {"binarization": "dynamic", "train_subset": 600, "eval_subset": 200}},
                 "frey": {"data": {"binarization": "none"}, "model": {"hidden_dim": 32},
                          "train": {"epochs": None, "training_samples": 6000, "curve_points": 5, "elbo_eval_size": 500,
                                    "device": "cpu"},
                          "evaluate": {"importance_samples": 10, "bound_curve": [1, 10], "train_examples": 200,
                                       "device": "cpu"}}}}
SMALL["sweep"] = ONE_MEMBER_SWEEP


def copy_repo(destination: Path) -> None:
    """The repository's files git knows of (tracked, or untracked and not ignored) copied to ``destination``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def git(cwd: Path, *args: str) -> None:
    """``git *args`` in ``cwd`` as a test user; raises CalledProcessError on failure."""
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args],
                   cwd=cwd, check=True, capture_output=True)


def set_params(path: Path, overrides: dict) -> None:
    """Update sections of the params.yaml at ``path`` with ``overrides`` ({section: {key: value}})."""
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def remove_sweep(path: Path) -> None:
    """The dvc.yaml at ``path`` (and its dvc.lock) without the sweep's stages and the other stages'
    dependencies on their outputs (``${paths.<folder>}/sweep...``: visualize's and the report's)."""
    stages = yaml.safe_load(path.read_text())
    stages["stages"] = {name: stage for name, stage in stages["stages"].items() if not name.startswith("sweep")}
    for stage in stages["stages"].values():
        if "deps" in stage:
            stage["deps"] = [dep for dep in stage["deps"] if "}/sweep" not in dep]
    report = stages["stages"]["report"]
    report["params"] = [name for name in report["params"] if name.split(".")[0] != "sweep"]
    path.write_text(yaml.safe_dump(stages, sort_keys=False))
    lock_path = path.with_name("dvc.lock")
    if lock_path.is_file():
        lock = yaml.safe_load(lock_path.read_text())
        lock["stages"] = {name: entry for name, entry in lock["stages"].items() if not name.startswith("sweep")}
        lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))


class Pipeline:
    """A temporary copy of the repository with its own MLflow store."""

    def __init__(self, root: Path, store: Path) -> None:
        self.root, self.store = root, store
        self.env = {**os.environ,
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "DVC_NO_ANALYTICS": "1",
                    "MLFLOW_DISABLE_TELEMETRY": "true"}
        mirror = dataset_mirror()
        if mirror:
            self.env["VAE_DATA_MIRROR"] = mirror

    def dvc(self, *args: str) -> str:
        """``dvc *args`` in the copy; returns stdout + stderr. Raises AssertionError (with the output) if it fails."""
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=self.root, env=self.env,
                                capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{output}"
        return output

    def status(self) -> dict:
        """``dvc status --json``, parsed: {} when every stage is up to date."""
        return json.loads(self.dvc("status", "--json"))

    def json(self, relative: str) -> dict:
        return json.loads((self.root / relative).read_text())

    def output_stamps(self) -> dict[str, dict[str, tuple[int, int]]]:
        """For each stage of dvc.lock, (modification time in ns, inode) of each file of its
        outputs (of an output folder itself when it holds no file), by path relative to the root;
        empty for a stage whose outputs are not there. A stage that ran since an earlier call
        rewrote them (outputs are written to temporaries and renamed), one that did not left
        them as they were."""
        lock = yaml.safe_load((self.root / "dvc.lock").read_text())["stages"]
        stamps: dict[str, dict[str, tuple[int, int]]] = {}
        for stage, entry in lock.items():
            files: dict[str, tuple[int, int]] = {}
            for out in entry.get("outs", []):
                path = self.root / out["path"]
                inside = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
                for file in inside or ([path] if path.is_dir() else []):
                    stat = file.stat()
                    files[str(file.relative_to(self.root))] = (stat.st_mtime_ns, stat.st_ino)
            stamps[stage] = files
        return stamps

    def stages_rerun(self, before: dict[str, dict[str, tuple[int, int]]]) -> set[str]:
        """The stages whose outputs differ from ``before`` (:meth:`output_stamps`): those that ran since."""
        after = self.output_stamps()
        return {stage for stage in set(before) | set(after) if before.get(stage) != after.get(stage)}

    @classmethod
    def copy_of_repository(cls, factory: pytest.TempPathFactory, params: dict | None = None,
                           sweep: bool = True) -> Pipeline:
        """A committed git copy of this repository (``params`` merged into its params.yaml) with
        its own MLflow store; ``sweep=False`` removes the latent-size sweep's stages from its
        dvc.yaml (and the report's dependencies on them), for tests about the rest."""
        root = factory.mktemp("repo")
        copy_repo(root)
        if params:
            set_params(root / "params.yaml", params)
        if not sweep:
            remove_sweep(root / "dvc.yaml")
        git(root, "init", "-q")
        git(root, "add", "-A")
        git(root, "commit", "-qm", "test copy")
        return cls(root, factory.mktemp("store") / "mlflow.db")


# --------------------------------------------------------------------------------------------
# Servers on 127.0.0.1
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(server: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> float:
    """Poll ``url`` until it answers 200; returns the seconds waited.

    Raises:
        AssertionError: the server exited or did not answer in ``timeout`` s (with its log's tail).
    """
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() - started > timeout:
            raise AssertionError(f"{url} did not become healthy:\n" + log.read_text()[-3000:])
        time.sleep(0.5)


@contextlib.contextmanager
def running_mlflow_server(store: Path, cwd: Path, env: dict, *options: str, command: str = "server") -> Iterator[str]:
    """A real ``mlflow server`` (or ``mlflow ui``, its alias the README uses: ``command="ui"``) on
    127.0.0.1 over the SQLite ``store`` (its log beside it); yields its base URL once it answers
    /health, and stops it afterwards."""
    port = free_port()
    log_path = store.parent / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", command, "--backend-store-uri", f"sqlite:///{store}",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *options],
            cwd=cwd, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(server, f"{base}/health", log_path)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)


# --------------------------------------------------------------------------------------------
# The pipeline through a kill -9 of each stage (tests/test_interruptions.py; tests/conftest.py's
# ``interrupted_pipeline`` runs it once for that module and tests/test_pipeline.py)
# --------------------------------------------------------------------------------------------

# (stage, its `vae` arguments, atomic write to die at, kill the process group too)
KILLS = (
    ("download", "download", 2, False),
    ("binarize", "binarize", 2, True),
    ("train", "train", 2, False),  # the pass-1 checkpoint is written, model.pt is not
    ("evaluate", "evaluate", 2, True),
    ("sweep-data@frey", "sweep-data frey", 2, True),
    ("sweep-frey@2-aevb-0", "sweep-member frey 2 aevb 0", 2, False),  # its training, mid-way
    ("visualize", "visualize", 3, False),  # after the sweep's members: its Figure 5 reads them
    ("sweep-report", "sweep-report", 1, True),
    ("report", "report", 1, False),
)
OUTPUT_FOLDERS = ("data", "models", "reports")


def repro(pipe: Pipeline, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``dvc repro`` in its own session (a process-group kill must not reach pytest)."""
    return subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=pipe.root, env={**pipe.env, **env},
                          capture_output=True, text=True, timeout=900, start_new_session=True)


def temporaries(root: Path) -> list[Path]:
    """The atomic writes' temporaries (``.<name>.<pid>.<random>.tmp``) under the output folders."""
    return sorted(path for folder in OUTPUT_FOLDERS for path in (root / folder).rglob(".*.tmp"))


def assert_whole(root: Path) -> int:
    """Every file under the output folders parses as its kind; returns how many were checked.

    Temporaries (``.<name>.<pid>.<random>.tmp``) are not outputs and are skipped.

    Raises:
        AssertionError: a file is damaged, cut short or of a kind this check does not know.
    """
    import pandas as pd
    from PIL import Image

    from vae.data.download import sha256_of
    from vae import datasets

    expected = {remote.local_name: remote.sha256 for source in datasets.sources().values() for remote in source.files}
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


def mlflow_state(pipe: Pipeline) -> dict:
    """The training runs (not children) of the MLflow store, the registered versions of vae-mnist,
    and the runs tagged with the SHA-256 of the repository's models/model.pt (``model_runs``: the
    training run the later stages find, with its tags) and of its reports/metrics.json
    (``metrics_runs``: the run the evaluation logged to)."""
    from mlflow import MlflowClient

    from vae import tracking
    from vae.io import file_sha256

    client = MlflowClient(tracking_uri=f"sqlite:///{pipe.store}", registry_uri=f"sqlite:///{pipe.store}")
    experiment = client.get_experiment_by_name("vae-mnist")
    trained = [run for run in client.search_runs([experiment.experiment_id])
               if "mlflow.parentRunId" not in run.data.tags and "train_seconds" in run.data.metrics]
    curves = {run.info.run_id: {key: sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, key))
                                for key in ("train_elbo", "valid_elbo", "train_elbo_step")} for run in trained}

    def tagged(tag: str, path: str) -> list[list]:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.`{tag}` = '{file_sha256(pipe.root / path)}'")
        return [[run.info.run_id, dict(run.data.tags)] for run in runs]

    return {"trained": [[run.info.run_id, run.info.status] for run in trained], "curves": curves,
            "versions": [[v.run_id, v.tags] for v in client.search_model_versions("name='vae-mnist'")],
            "model_runs": tagged(tracking.MODEL_TAG, "models/model.pt"),
            "metrics_runs": tagged(tracking.METRICS_TAG, "reports/metrics.json")}


def run_interrupted(factory: pytest.TempPathFactory) -> dict:
    """The pipeline on :data:`SMALL` reached through a kill of each stage (:data:`KILLS`, a real
    SIGKILL from tests/faults/sitecustomize.py), in pipeline order, and then two plain ``dvc
    repro`` started at once (one completes the pipeline, the other waits or fails clearly).

    Returns what tests/test_interruptions.py checks, read as the run ended, as plain values
    (tests/conftest.py's ``interrupted_pipeline`` shares them between pytest-xdist's workers as
    JSON; tests/test_pipeline.py goes on with the same repository and changes it)."""
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
    return {"root": str(pipe.root), "store": str(pipe.store), "first_output": pipe.first_output,
            "after_kill": after_kill, "final": final, "snapshot": str(snapshot),
            "temporaries": [str(path) for path in temporaries(pipe.root)], "whole": assert_whole(pipe.root),
            "status": pipe.status(), "lock": (pipe.root / "dvc.lock").read_text(),
            "summary": pipe.json("reports/train_summary.json"),
            "metrics": pipe.json("reports/metrics.json"), "mlflow": mlflow_state(pipe),
            "train_state_left": (pipe.root / "models/train_state.pt").exists()}


def shared_pipeline(run: dict) -> Pipeline:
    """The repository of :func:`run_interrupted` (tests/test_pipeline.py goes on with it);
    ``first_output`` holds the output of every ``dvc repro`` it took."""
    pipe = Pipeline(Path(run["root"]), Path(run["store"]))
    pipe.first_output = run["first_output"]
    return pipe


# --------------------------------------------------------------------------------------------
# The linear-Gaussian model (probabilistic PCA) and its closed forms (float64)
# --------------------------------------------------------------------------------------------


DTYPE = torch.float64


class LinearGaussianModel(nn.Module):
    """p(z) = N(0, I_k), p(x|z) = N(W z + b, sigma^2 I_D), and a diagonal Gaussian q(z|x).

    The exact posterior is N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I; it is
    diagonal, hence representable by q, because W has orthogonal columns. q is that posterior
    with its mean moved by ``shift`` posterior standard deviations and its variance multiplied by
    ``inflate`` (shift=0, inflate=1: q is exact).
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor, sigma: float,
                 shift: float = 0.0, inflate: float = 1.0) -> None:
        super().__init__()
        self.W, self.b, self.sigma = W, b, sigma
        self.W_t = W.T.contiguous()
        self.shift, self.inflate = shift, inflate
        k = W.shape[1]
        self.M = W.T @ W + sigma**2 * torch.eye(k, dtype=W.dtype)
        posterior_cov = sigma**2 * torch.linalg.inv(self.M)
        off_diagonal = posterior_cov - torch.diag(torch.diagonal(posterior_cov))
        assert off_diagonal.abs().max() < 1e-12, "W must have orthogonal columns"
        self.posterior_var = torch.diagonal(posterior_cov)
        self.latent_dim = k

    def decoder_sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x|z) = N(W z + b, sigma^2 I): z (..., k) -> (..., D)."""
        mean = z.to(self.W.dtype) @ self.W_t + self.b
        return mean + self.sigma * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(z|x): mean (batch, k) and variance (batch, k)."""
        mean = torch.linalg.solve(self.M, self.W.T @ (x - self.b).T).T
        return mean, self.posterior_var.expand_as(mean)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self.posterior(x)
        return mean + self.shift * var.sqrt(), torch.log(self.inflate * var)

    def decoder_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        mean = z @ self.W_t + self.b
        return (-0.5 * ((x - mean) / self.sigma) ** 2 - math.log(self.sigma)
                - 0.5 * math.log(2 * math.pi)).sum(-1)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) = log N(x; b, W W^T + sigma^2 I), (batch,)."""
        D = self.W.shape[0]
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(D, dtype=self.W.dtype)
        return MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def kl_to_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z|x)) in closed form, (batch,): log p(x) - ELBO(x)."""
        q_mean, q_log_var = self.encode(x)
        p_mean, p_var = self.posterior(x)
        q_var = q_log_var.exp()
        return 0.5 * (torch.log(p_var / q_var) + (q_var + (q_mean - p_mean) ** 2) / p_var - 1).sum(-1)

    def chi_square(self, x: torch.Tensor) -> torch.Tensor:
        """chi^2(p(z|x) || q(z|x)) = Var_q[w] / p(x)^2 with w = p(x, z) / q(z|x), (batch,).

        Per dimension, int p^2/q dz for p = N(m1, v1), q = N(m2, v2) (needs v2 > v1 / 2) is
        sqrt(v2 / a) / v1 * exp((c^2 / a - 2 m1^2 / v1 + m2^2 / v2) / 2), a = 2/v1 - 1/v2,
        c = 2 m1/v1 - m2/v2; the dimensions multiply. For large k, L_k has variance ~ chi^2 / k
        and bias ~ -chi^2 / (2k) (delta method).
        """
        q_mean, q_log_var = self.encode(x)
        m1, v1 = self.posterior(x)
        m2, v2 = q_mean, q_log_var.exp()
        a = 2 / v1 - 1 / v2
        c = 2 * m1 / v1 - m2 / v2
        log_integral = (0.5 * torch.log(v2 / a) - torch.log(v1)
                        + 0.5 * (c**2 / a - 2 * m1**2 / v1 + m2**2 / v2)).sum(-1)
        return log_integral.exp() - 1


def make_linear_gaussian(D: int, k: int, examples: int, seed: int = 0, shift: float = 0.0,
                         inflate: float = 1.0) -> tuple[LinearGaussianModel, torch.Tensor]:
    """A model with W = Q diag(s) (orthonormal Q, s in [0.5, 2]), sigma = 0.5, and data from it."""
    g = generator(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=DTYPE))
    W = Q * (0.5 + 1.5 * torch.rand(k, generator=g, dtype=DTYPE))
    b = torch.randn(D, generator=g, dtype=DTYPE)
    sigma = 0.5
    z = torch.randn(examples, k, generator=g, dtype=DTYPE)
    x = z @ W.T + b + sigma * torch.randn(examples, D, generator=g, dtype=DTYPE)
    return LinearGaussianModel(W, b, sigma, shift, inflate), x


class LinearGaussianTwoLayerModel(nn.Module):
    """Two stochastic layers, all linear-Gaussian: p(z2) = N(0, I), p(z1|z2) = N(A z2 + a, s1^2 I),
    p(x|z1) = N(B z1 + b, sx^2 I), so p(x) = N(B a + b, B (A A^T + s1^2 I) B^T + sx^2 I) exactly.

    The inference model is a :class:`vae.objectives.TwoLayerModel`'s: q(z1|x) = N(m1(x), diag v1) with
    m1 the exact posterior mean E[z1|x] and v1 the diagonal of Cov[z1|x] times ``inflate``;
    q(z2|z1) = N(m2(z1), diag v2), m2 the exact E[z2|z1] (p(z2|z1, x) = p(z2|z1)) and v2 the
    diagonal of Cov[z2|z1] times ``inflate``, every mean moved by ``shift`` standard deviations.
    With diagonal A and B (``diagonal=True`` in :func:`make_linear_gaussian_two_layer`) the
    posteriors are diagonal, so q is exact for shift 0 and inflate 1 and every importance weight
    equals p(x). float64.
    """

    def __init__(self, A: torch.Tensor, a: torch.Tensor, s1: float, B: torch.Tensor, b: torch.Tensor, sx: float,
                 shift: float = 0.0, inflate: float = 1.0) -> None:
        super().__init__()
        self.A, self.a, self.s1, self.B, self.b, self.sx = A, a, s1, B, b, sx
        self.latent_dim, self.top_latent_dim = A.shape
        d1, d2 = A.shape
        prior_cov = A @ A.T + s1**2 * torch.eye(d1, dtype=A.dtype)          # Cov[z1]
        self.prior_precision = torch.linalg.inv(prior_cov)
        self.cov1 = torch.linalg.inv(B.T @ B / sx**2 + self.prior_precision)  # Cov[z1|x]
        self.cov2 = torch.linalg.inv(torch.eye(d2, dtype=A.dtype) + A.T @ A / s1**2)  # Cov[z2|z1]
        self.shift, self.inflate = shift, inflate

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = ((x - self.b) @ self.B / self.sx**2 + self.a @ self.prior_precision) @ self.cov1
        var = torch.diagonal(self.cov1).expand_as(mean)
        return mean + self.shift * var.sqrt(), torch.log(self.inflate * var)

    def encode_top(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = ((z1 - self.a) @ self.A / self.s1**2) @ self.cov2
        var = torch.diagonal(self.cov2).expand_as(mean)
        return mean + self.shift * var.sqrt(), torch.log(self.inflate * var)

    def decode_top(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = z2 @ self.A.T + self.a
        return mean, torch.full_like(mean, 2 * math.log(self.s1))

    def decoder_log_prob(self, x: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        mean = z1 @ self.B.T + self.b
        return (-0.5 * ((x - mean) / self.sx) ** 2 - math.log(self.sx) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def decoder_sample(self, z1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean = z1 @ self.B.T + self.b
        return mean + self.sx * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x), (batch,) nats."""
        D = self.B.shape[0]
        cov = self.B @ (self.A @ self.A.T + self.s1**2 * torch.eye(self.latent_dim, dtype=self.A.dtype)) @ self.B.T
        cov = cov + self.sx**2 * torch.eye(D, dtype=self.B.dtype)
        return MultivariateNormal(self.B @ self.a + self.b, covariance_matrix=cov).log_prob(x)


def make_linear_gaussian_two_layer(D: int, d1: int, d2: int, examples: int, *, diagonal: bool = False,
                                   seed: int = 0, shift: float = 0.0,
                                   inflate: float = 1.0) -> tuple[LinearGaussianTwoLayerModel, torch.Tensor]:
    """A :class:`LinearGaussianTwoLayerModel` (s1 = 0.6, sx = 0.5; A and B random, or diagonal with
    entries in [0.5, 2] when ``diagonal``, which needs D = d1 = d2) and ``examples`` draws from it."""
    g = generator(seed)
    if diagonal:
        assert D == d1 == d2, "a diagonal model has D = d1 = d2"
        A = torch.diag(0.5 + 1.5 * torch.rand(d1, generator=g, dtype=DTYPE))
        B = torch.diag(0.5 + 1.5 * torch.rand(D, generator=g, dtype=DTYPE))
    else:
        A = torch.randn(d1, d2, generator=g, dtype=DTYPE) / math.sqrt(d2)
        B = torch.randn(D, d1, generator=g, dtype=DTYPE) / math.sqrt(d1)
    a, b = torch.randn(d1, generator=g, dtype=DTYPE), torch.randn(D, generator=g, dtype=DTYPE)
    s1, sx = 0.6, 0.5
    z2 = torch.randn(examples, d2, generator=g, dtype=DTYPE)
    z1 = z2 @ A.T + a + s1 * torch.randn(examples, d1, generator=g, dtype=DTYPE)
    x = z1 @ B.T + b + sx * torch.randn(examples, D, generator=g, dtype=DTYPE)
    return LinearGaussianTwoLayerModel(A, a, s1, B, b, sx, shift, inflate), x
