"""docker-compose.yml is valid against the Compose spec and wires the generated files that exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_validates_against_the_compose_spec() -> None:
    tool = Path(sys.executable).parent / "check-jsonschema"
    if not tool.exists():
        pytest.skip("check-jsonschema not installed (pip install -e '.[dev]')")
    r = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_mounts_point_at_files_in_the_repository() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    images = [s.get("image", "") for s in compose["services"].values()]
    assert all(":" in i and not i.endswith(":latest") for i in images if i), images  # pinned images
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
        if "healthcheck" in svc:
            assert svc["healthcheck"]["test"], name


def test_compose_prometheus_config_is_valid_and_loads_the_generated_rules() -> None:
    from tests.conftest import require_binary

    promtool = require_binary("promtool")
    cfg = yaml.safe_load((ROOT / "deploy/compose/prometheus.yml").read_text())
    rule_glob = cfg["rule_files"][0].replace("/etc/prometheus/alerts/", "")
    rules = sorted((ROOT / "alerts").glob(rule_glob))
    assert rules, "no generated rule files match the compose rule_files pattern"
    r = subprocess.run([promtool, "check", "rules", *map(str, rules)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
