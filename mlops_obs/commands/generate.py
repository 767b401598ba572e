"""``mlops-obs generate``: write dashboards, rules, rule tests, Alertmanager config and their Kubernetes
forms from the one definition in :mod:`mlops_obs.mixin`; ``--check`` compares instead and fails when the
committed files are stale.

The files belong to a checkout of this repository, so the output directory defaults to the checkout the
package runs from (an editable install), whatever the current directory; an installed copy has no
checkout and must be given ``--output-dir``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlops_obs.config import COMMON_SETTINGS, ConfigError, Setting, parse_bool, parse_optional_path


def _time_scale(v: Any) -> float:
    try:
        x = float(str(v).strip())
    except ValueError:
        raise ValueError(f"expected a number, got {v!r}") from None
    if not 0 < x <= 1000:
        raise ValueError(f"must be greater than 0 and at most 1000, got {v!r}")
    return x


GENERATE_SETTINGS: tuple[Setting, ...] = (
    Setting("output-dir", parse_optional_path, None, "Repository root the files are written under (default: "
            "the checkout this mlops-obs runs from).", metavar="DIR"),
    Setting("check", parse_bool, False, "Write nothing; exit 1 listing every file that is missing or stale.",
            kind="bool"),
    Setting("mixin.config", parse_optional_path, None, "YAML file overriding mixin fields (selectors, "
            "thresholds, URLs); see mlops_obs/mixin/config.py.", metavar="PATH"),
    Setting("mixin.time-scale", _time_scale, 1.0, "Multiply every time constant of the rules (windows, for:, "
            "thresholds in seconds) by this factor: the same rules on a faster clock, for end-to-end tests "
            "(1/15 stands a 1s scrape for the 15s one the rules are sized for).", metavar="FACTOR"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + GENERATE_SETTINGS)


def checkout_root() -> Path | None:
    """The repository this package was installed from in development mode, or ``None``."""
    import mlops_obs

    root = Path(mlops_obs.__file__).resolve().parent.parent
    try:
        project = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if 'name = "mlops-obs"' in project and (root / "mlops_obs" / "mixin").is_dir() else None


def run(cfg: Mapping[str, Any]) -> int:
    import yaml

    from mlops_obs.mixin import config as mixin_config
    from mlops_obs.mixin.generate import render_files, stale, write

    try:
        mcfg = mixin_config.load(cfg.get("mixin.config"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError("mixin.config", str(e).splitlines()[0]) from None
    scale = float(cfg.get("mixin.time-scale") or 1.0)
    root = cfg.get("output-dir") or checkout_root()
    if root is None:
        raise ConfigError("output-dir", "not given, and this mlops-obs is not running from a checkout of its "
                                        "repository; pass the repository root")  # fmt: skip
    root = Path(root)
    if not root.is_dir():
        raise ConfigError("output-dir", f"{root} is not a directory")
    try:
        files = render_files(mcfg, time_scale=scale)
    except (KeyError, ValueError) as e:
        print(f"mlops-obs generate: error: the definition is inconsistent: {e}", file=sys.stderr)
        return 1
    if cfg.get("check"):
        bad = stale(root, files)
        for line in bad:
            print(f"stale: {line}", file=sys.stderr)
        if bad:
            print(f"mlops-obs generate --check: {len(bad)} generated file(s) out of date under {root}; run "
                  "`mlops-obs generate` and commit the result", file=sys.stderr)  # fmt: skip
            return 1
        print(f"mlops-obs generate --check: {len(files)} files up to date under {root}")
        return 0
    try:
        written = write(root, files)
    except OSError as e:
        print(f"mlops-obs generate: error: {e}", file=sys.stderr)
        return 2
    print(f"mlops-obs generate: {len(files)} files under {root}, {len(written)} changed"
          + "".join(f"\n  {w}" for w in written))  # fmt: skip
    return 0
