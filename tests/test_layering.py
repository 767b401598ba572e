"""Which package may import which: the metrics layer and the rank directory stand alone, collectors
stand on them, the exporter runs collectors, and nothing below a command reaches up into the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mlops_obs"

# package -> the mlops_obs packages (first component under mlops_obs) it may import, itself aside.
ALLOWED: dict[str, set[str]] = {
    "metrics": set(),
    "rankdir": set(),
    "instrument": {"rankdir", "config"},  # config: node_name(), the one resolution of a node's name
    "collectors": {"metrics", "rankdir", "config", "logs"},
    "exporter": {"collectors", "metrics", "rankdir", "config", "logs", "web", "__init__"},
}


def _imports(path: Path) -> set[str]:
    """First components under mlops_obs of every import in ``path`` (module level and inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "mlops_obs" else [f"mlops_obs.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mlops_obs":
                out.add(parts[1] if len(parts) > 1 else "__init__")
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(package: str) -> None:
    bad = {}
    for path in sorted((PKG / package).glob("*.py")):
        extra = _imports(path) - ALLOWED[package] - {package, "__version__"}
        if extra:
            bad[str(path.relative_to(ROOT))] = sorted(extra)
    assert bad == {}


COLLECTOR_MODULES = sorted(
    f"mlops_obs.collectors.{p.stem}" for p in (PKG / "collectors").glob("*.py") if p.stem != "__init__"
)


def test_importing_a_collector_runs_no_exporter_code() -> None:
    """Each collector module, imported alone in a fresh interpreter, leaves the exporter package (its
    server, bcrypt, the web config) unimported: collectors stand on the metrics layer, not the exporter."""
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "    bad = sorted(m for m in sys.modules if m == 'mlops_obs.exporter' or m.startswith('mlops_obs.exporter.'))\n"
        "    print(name, ','.join(bad) or '-')\n"
    )
    for module in [*COLLECTOR_MODULES, "mlops_obs.metrics", "mlops_obs.rankdir", "mlops_obs.instrument"]:
        r = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [module, "-"], f"importing {module} imported {r.stdout.split()[1]}"


def test_the_sdk_and_the_rank_directory_do_not_load_the_sidecar() -> None:
    """A training process imports the SDK: it must not pay for collectors, the exporter or prometheus_client."""
    code = (
        "import sys, mlops_obs.instrument, mlops_obs.rankdir\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prometheus_client'"
        " or m.startswith(('mlops_obs.collectors', 'mlops_obs.exporter', 'mlops_obs.metrics'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_exporter_command_knows_every_commands_keys_without_the_cli() -> None:
    """A reload accepts a config file shared between commands: the exporter command collects every
    command's keys from the command modules themselves, the same set the CLI's table gives."""
    from mlops_obs import cli
    from mlops_obs.commands import exporter

    assert exporter.known_keys() == cli.all_setting_keys()
    assert "cli" not in _imports(PKG / "commands" / "exporter.py")
