"""The import layering of vae/ and flows/, as pyproject.toml's [tool.importlinter] contracts state it,
checked by the real ``lint-imports`` command; and that the command does fail on a broken layering."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO_ROOT


def lint_imports(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """``lint-imports ARGS`` in ``cwd`` (no cache written), this interpreter's installation first."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert command, "lint-imports is not installed (uv sync --group dev)"
    return subprocess.run([command, "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_layering_contracts_hold() -> None:
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert " BROKEN" not in result.stdout and "KEPT" in result.stdout, result.stdout


def test_a_layering_the_code_breaks_fails_the_command(tmp_path) -> None:
    # vae.config reads the dataset registry: a contract that puts the registry above it must fail.
    config = tmp_path / "broken.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["vae"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "config below the dataset registry"\n'
                      'type = "layers"\ncontainers = ["vae"]\nlayers = ["datasets", "config"]\n')
    result = lint_imports(str(config))
    assert result.returncode != 0, result.stdout + result.stderr
    assert "vae.config is not allowed to import vae.datasets" in result.stdout, result.stdout


def test_an_import_cycle_fails_the_command(tmp_path) -> None:
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "first.py").write_text("from cyclic import second\n")
    (package / "second.py").write_text("def later():\n    from cyclic import first  # inside a function: still an import\n")
    config = tmp_path / "cycles.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["cyclic"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "no cycles"\ntype = "acyclic_siblings"\n'
                      'ancestors = ["cyclic"]\n')
    result = lint_imports(str(config), cwd=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "No cycles are allowed in cyclic" in result.stdout, result.stdout
