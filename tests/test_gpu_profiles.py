"""The series budget: the reference node's body with the GPU collector's default profile, against the
budget and against the full profile it is an aggregation of."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from mlops_obs.collectors.gpu_device import DEFAULT_THROTTLE_REASONS, FULL_ONLY_FAMILIES
from tests.golden_node import node_metrics

# At most this many series for the reference node (8 H100s, host fixtures, the sidecar's own process
# series, 8 ranks) with the sidecar's defaults: docs/gpu.md says what the default profile leaves out.
SERIES_BUDGET = 800

Key = tuple[str, tuple[tuple[str, str], ...]]
_LINE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _series(body: str) -> dict[Key, float | None]:
    """Sample -> value (``None`` where the golden harness masks a clock-dependent value)."""
    out: dict[Key, float | None] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, line
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = None if m.group(3) == "<varies>" else float(m.group(3))
    return out


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[Key, float | None]]:
    """The reference node's body with each profile, host per-core series at the sidecar's default (off)."""
    return {p: _series(node_metrics(tmp_path_factory.mktemp(p), p, per_cpu=False)) for p in ("default", "full")}


def test_default_profile_meets_the_series_budget(bodies: dict[str, dict[Key, float | None]]) -> None:
    """The reference node exports at most SERIES_BUDGET series with the default profile, less than half
    the full profile's, and NVLink is no longer most of them."""
    default, full = bodies["default"], bodies["full"]
    by_prefix = Counter(name.split("_")[1] for name, _ in default)
    assert len(default) <= SERIES_BUDGET, (len(default), dict(by_prefix))
    assert len(default) < len(full) / 2, (len(default), len(full))
    nvlink = sum(1 for name, _ in default if name.startswith("mlops_gpu_nvlink_"))
    assert nvlink == 8 * 3  # transmit, receive and errors, per GPU


def _sum_over(series: dict[Key, float | None], name: str, *drop: str) -> dict[Key, float | None]:
    out: dict[Key, float | None] = defaultdict(float)
    for (n, labels), v in series.items():
        if n == name:
            key = (n, tuple(lb for lb in labels if lb[0] not in drop))
            prev = out[key]
            out[key] = None if prev is None or v is None else prev + v
    return dict(out)


def test_default_body_is_the_full_body_aggregated(bodies: dict[str, dict[Key, float | None]]) -> None:
    """Every default series is the full profile's series, or their sum over the labels the default drops
    (NVLink over link and type, processes over pid); the full profile adds only its own families, the
    aggregate ECC scope and the throttle reasons no alert reads. So a query that aggregates per GPU (or
    per owner) gives the same answer on either."""
    default, full = bodies["default"], bodies["full"]
    summed = {
        "mlops_gpu_nvlink_transmit_bytes_total": ("link",),
        "mlops_gpu_nvlink_receive_bytes_total": ("link",),
        "mlops_gpu_nvlink_errors_total": ("link", "type"),
        "mlops_gpu_process_memory_used_bytes": ("pid",),
        "mlops_gpu_process_utilization_ratio": ("pid",),
    }
    expected: dict[Key, float | None] = {}
    for (name, labels), v in full.items():
        lb = dict(labels)
        if name in summed or name in FULL_ONLY_FAMILIES:
            continue
        if name == "mlops_gpu_ecc_errors_total" and lb["scope"] != "volatile":
            continue
        if name == "mlops_gpu_throttle_seconds_total" and lb["reason"] not in DEFAULT_THROTTLE_REASONS:
            continue
        expected[(name, labels)] = v
    for name, drop in summed.items():
        expected.update(_sum_over(full, name, *drop))
    # Values that are the sidecar's own measurements (its CPU, durations) are masked on both sides; the
    # rest must be equal.
    assert sorted(default) == sorted(expected)
    differ = {k: (v, expected[k]) for k, v in default.items() if v != expected[k]}
    assert differ == {}
    assert {name for name, _ in full if name.startswith("mlops_gpu_")} - {name for name, _ in default} == set(
        FULL_ONLY_FAMILIES
    )


def test_the_golden_file_is_the_full_profile(tmp_path: Path) -> None:
    """``tests/fixtures/golden/node-metrics.txt`` pins the full profile's body (every series the sidecar
    can report); the default profile is pinned through it by the aggregation test above."""
    from tests.golden_node import GOLDEN

    golden = _series(GOLDEN.read_text())
    assert any(dict(lb).get("link") == "17" for name, lb in golden if name == "mlops_gpu_nvlink_errors_total")
    assert {name for name, _ in golden} >= FULL_ONLY_FAMILIES
