"""The repository stays lint-clean, type-clean, and its generated files current (what CI enforces)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            pytest.skip(f"{name} not installed (pip install -e '.[dev]')")
        return found
    return str(path)


def test_ruff_check_and_format() -> None:
    ruff = _tool("ruff")
    r = subprocess.run([ruff, "check", "mlops_obs", "tests", "benchmarks", "scripts"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([ruff, "format", "--check", "mlops_obs", "tests", "benchmarks", "scripts"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    mypy = _tool("mypy")
    r = subprocess.run([mypy], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_generated_dashboards_and_alerts_are_current() -> None:
    """Committed dashboards/ and alerts/ match what `mlops-obs generate` writes from the definitions."""
    r = subprocess.run([sys.executable, "-m", "mlops_obs", "generate", "--check"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
