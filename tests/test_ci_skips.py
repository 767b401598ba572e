"""Under CI a missing tool fails the run: ``tests/conftest.py`` turns skips into failures there.

A small suite in a temporary directory runs with this conftest loaded as a plugin, once as CI and once
not, and the outcome of each kind of skip is read from pytest's own report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parent.parent

SUITE = {
    "test_kinds.py": """
import pytest
from tests.conftest import require_binary

def test_missing_binary():
    require_binary("mlops-obs-no-such-binary")

def test_plain_skip():
    pytest.skip("not here")

@pytest.mark.skipif(True, reason="never here")
def test_skipif():
    pass

@pytest.mark.opensearch
def test_opt_in_opensearch():
    pytest.skip("set MLOPS_OBS_TEST_OPENSEARCH_URL")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False

def test_passes():
    pass
""",
    "test_module_skip.py": """
import pytest
pytest.importorskip("mlops_obs_no_such_module")

def test_never_collected():
    pass
""",
}


def _outcomes(tmp_path: Path, ci: bool) -> dict[str, str]:
    """Test (or module, for a collection-time skip) name -> passed, failed, skipped, xfail or error."""
    for name, text in SUITE.items():
        (tmp_path / name).write_text(text)
    junit = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if k != "MLOPS_OBS_CI"}
    if ci:
        env["MLOPS_OBS_CI"] = "1"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-c", os.devnull,
         f"--rootdir={tmp_path}", "-o", "markers=opensearch: opt-in", f"--junitxml={junit}",
         "--continue-on-collection-errors", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert junit.exists(), r.stdout + r.stderr
    out: dict[str, str] = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        kinds = {child.tag for child in case}
        skipped = case.find("skipped")
        if skipped is not None and skipped.get("type") == "pytest.xfail":
            outcome = "xfail"
        else:
            outcome = next((k for k in ("error", "failure", "skipped") if k in kinds), "passed")
        out[case.get("name") or case.get("classname") or "?"] = outcome
    return out


@pytest.mark.parametrize("ci", [False, True], ids=["local", "CI"])
def test_skips_fail_only_under_ci(tmp_path: Path, ci: bool) -> None:
    got = _outcomes(tmp_path, ci)
    skipped = "failure" if ci else "skipped"
    assert got == {
        "test_missing_binary": skipped,
        "test_plain_skip": skipped,
        "test_skipif": "error" if ci else "skipped",  # skipped in set-up, so an error in set-up
        "test_module_skip": "error" if ci else "skipped",  # a module-level importorskip
        "test_opt_in_opensearch": "skipped",  # the one skip CI allows
        "test_expected_failure": "xfail",
        "test_passes": "passed",
    }
