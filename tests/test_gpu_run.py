"""benchmarks/gpu_run.py, the prepared GPU run (issue 20), in its ``--device cpu --tiny`` mode, so that
the script cannot rot between the sessions that are lent a GPU.

One test: small processed splits written here, ``--prepare``'s file made from them, then the script
run as a subprocess with the packages the device machine's image lacks (dvc, prefect, mlflow,
pydantic, ...) made unimportable, on one thread, with a tiny budget. It must write its table and
JSON, run or skip (with the reason) every part, pass the equality checks of the variants the CPU can
run, and skip the CUDA-only ones with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import torch

from support import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_run.py"
# Not in the device image (or not needed by the script): importing any of them must fail the run.
ABSENT = ("mlflow", "dvc", "prefect", "pydantic", "pydantic_core", "ruamel", "pandas", "sklearn", "matplotlib",
          "tabulate", "yaml")
# A None in sys.modules makes ``import name`` raise ImportError and importlib.util.find_spec(name)
# return None, as for a package that is not installed.
BLOCKED_START = f"""
import runpy, sys
for name in {ABSENT!r}:
    sys.modules[name] = None
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_run_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_writes_every_part(tmp_path) -> None:
    from vae.data.splits import Split

    gpu_run = _load_script()
    assert 'run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_run.py --out $OUT --budget-s 540",' in gpu_run.__doc__
    assert 'carry=["gpu_data"], timeout_s=600)' in gpu_run.__doc__
    assert "/gpu_data/" in (REPO_ROOT / ".gitignore").read_text().splitlines()

    # Processed splits in the binarize stage's format: grey training images, binary test images.
    generator = torch.Generator().manual_seed(0)
    processed = tmp_path / "processed"
    processed.mkdir()
    grey = torch.randint(0, 256, (1000, 784), dtype=torch.uint8, generator=generator)
    Split(grey, torch.zeros(1000, dtype=torch.long), False, "dynamic").save(processed / "train.pt")
    binary = (torch.rand(100, 784, generator=generator) < 0.2).to(torch.uint8)
    Split(binary, torch.zeros(100, dtype=torch.long), True, "dynamic").save(processed / "test.pt")
    data = gpu_run.prepare_data(processed, tmp_path / "gpu_data" / "mnist.npz")

    out = tmp_path / "out"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_START, "--device", "cpu", "--tiny", "--budget-s", "5", "--threads", "1",
         "--data", str(data), "--processed", str(tmp_path / "absent"), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {"gpu_run.md", "gpu_run.json", "gpu_run.log"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "gpu_run.json").read_text())
    assert record["tiny"] and record["device"]["type"] == "cpu"
    assert str(data) in record["data"] and "1000 training images" in record["data"], record["data"]

    for name in ("aevb-mnist", "iwae-mnist"):
        variants = record["training"][name]
        eager = variants["eager"]
        assert eager["status"] == "ok" and eager["check"]["passed"], eager
        assert eager["steps_per_s"] > 0
        assert variants["graph"]["status"] == "skipped" and "CUDA" in variants["graph"]["reason"]
        compiled = variants["compile"]
        if compiled["status"] == "ok":  # --compile on: the check must have passed
            assert compiled["check"]["passed"], compiled
        else:
            assert compiled["status"] == "skipped" and compiled["reason"], compiled

    for part in ("evaluator", "ais", "schedule"):
        assert record[part].get("status") in ("ok", "skipped"), (part, record[part])
        if record[part]["status"] == "skipped":
            assert record[part].get("reason"), (part, record[part])
    evaluator = record["evaluator"]
    assert evaluator["status"] == "ok" and evaluator["examples"] >= 1, evaluator
    schedule = record["schedule"]
    if schedule["status"] == "ok":
        assert schedule["variant"] == "eager" and schedule["steps"] > 0, schedule
    assert all(target["met"] is None for target in record["targets"])  # checked on CUDA only

    table = (out / "gpu_run.md").read_text()
    for row in ("| 1 training | aevb-mnist", "| 1 training | iwae-mnist", "| 2 evaluator |", "| 3 AIS |",
                "| 4 schedule |"):
        assert row in table, table
    assert "| 1 training | iwae-mnist (784-200-200-50, adam, batch 20), graph | skipped: CUDA graphs" in table
    assert seconds < 120, f"the tiny run took {seconds:.0f} s"


def test_the_schedule_and_models_are_the_profiles() -> None:
    """Part 4 runs the profile's protocol: the authors' rounded rates (vae.loop.learning_rate_at),
    2980 steps per pass (59,600 images at batch 20), the output bias at the logit of the training
    mean image; ``--schedule-profile iwae-mnist-2layer`` builds the two-stochastic-layer model."""
    from vae import profile

    gpu_run = _load_script()
    firsts = [gpu_run.schedule_learning_rate((3**i - 1) // 2) for i in range(8)]
    assert [round(rate, 10) for rate in firsts] == [1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4]
    assert gpu_run.FULL_STEPS_PER_PASS == 2980 and gpu_run.SCHEDULE_PASSES == 3280
    means = torch.linspace(0.0, 1.0, 784, dtype=torch.float64)
    for name, spec in gpu_run.SCHEDULE_SPECS.items():
        params = profile.load_profile(name).params()
        model = gpu_run.build_model(spec, 0, means)
        assert model.config() == {**model.config(), "hidden_dim": params.model.hidden_dim,
                                  "latent_dim": params.model.latent_dim, "hidden_layers": params.model.hidden_layers}
        assert model.stochastic_layers == params.model.stochastic_layers
        assert (spec.batch, spec.epsilon, spec.output_bias_init) == (params.train.batch_size, params.train.epsilon, True)
        clipped = means.clamp(0.001, 0.999)
        torch.testing.assert_close(model.decoder[-1].bias.double(), torch.log(clipped / (1 - clipped)),
                                   rtol=0, atol=1e-5)
    assert gpu_run.IWAE_2LAYER.architecture == "784-200-200-100-100-100-50"
