"""Every alert expression and dashboard query against a real Prometheus scraping real exporters on the fake
GPU backend, one with the default GPU profile and one with the full profile.

The fake node plays a GPU fault for each GPU alert (XIDs and uncorrected ECC errors that keep coming, a
failed and a pending row remap, a narrow PCIe link replaying, NVLink errors, heat, throttling, a full and
an idle GPU, a GPU off the bus) next to two SDK ranks owning GPUs 0 and 1, so the GPU alerts have
something to say. Both
exporters read the same scenario, each scraped by its own Prometheus with the shipped rules on a 1 s
clock (``scaled``, as ``test_alerts_e2e``): every GPU alert and every GPU panel must return data with the
default profile, and the same label sets and values as with the full profile. The alerts and panels that
need a fault this node does not play are listed below, each with why.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlops_obs.children import find_binary
from mlops_obs.children.prometheus import PrometheusProcess
from mlops_obs.mixin import config as mixin_config
from mlops_obs.mixin import dashboards, rules
from mlops_obs.mixin.generate import ALERTS_FILE, RECORDING_FILE, render_files
from tests.conftest import require_binary, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
pytestmark = pytest.mark.timeout(300)
TIME_SCALE = 1 / 15
ROOT = Path(__file__).resolve().parent.parent


# Alerts whose expression returns nothing on this node, and why. GPU alerts must all return data but
# GpuMissing; the others read host, training and pipeline faults this node does not play.
NEEDS_FAULT_GPU = {"GpuMissing": "a GPU vanishing from the driver while the sidecar runs"}
NEEDS_FAULT = {
    **NEEDS_FAULT_GPU,
    "NodeFilesystemFillingUp": "a filling disk",
    "NodeFilesystemAlmostFull": "a full disk",
    "NodeMemoryLow": "memory pressure",
    "NodeMemoryPressure": "memory pressure",
    "NodeIoPressure": "I/O pressure",
    "NodeCpuSaturated": "a saturated CPU",
    "NodeCpuPressure": "CPU pressure",
    "NodeDiskIoSaturated": "a saturated disk",
    "NodeNetworkErrors": "NIC errors",
    "NodeInfinibandErrors": "an InfiniBand HCA with errors",
    "NodeClockSkew": "clock skew",
    "NodeClockNotSynchronising": "an unsynchronised clock",
    "TrainingRankFailed": "a failed rank",
    "TrainingStalled": "a hung rank",
    "TrainingStalledRankMissing": "a hung rank",
    "TrainingNodeDown": "a sidecar going down under a running job",
    "TrainingNonFiniteLoss": "a NaN loss",
    "TrainingStraggler": "a slow rank",
    "TrainingDataLoaderBound": "an input-bound rank",
    "TrainingStepTimeAnomaly": "steps slowing down",
    "TrainingThroughputRegression": "throughput falling",
    "TrainingLowGoodput": "a job wasting its time",
    "TrainingCheckpointStale": "a job not checkpointing for hours",
    "MlopsExporterDown": "a sidecar going down",
    "MlopsCollectorFailing": "a failing collector",
    "MlopsCollectorSlow": "a slow collector",
    "MlopsScrapeSlow": "a slow scrape",
    "MlopsShipperBehind": "a log shipper (none here)",
    "MlopsShipperNotShipping": "a log shipper (none here)",
    "MlopsShipperDeadLetters": "a log shipper (none here)",
    "MlopsShipperFailing": "a log shipper (none here)",
}
# Panels with no data on this node, and why; GPU panels must all have data.
NO_DATA = {
    "Failed ranks": "no rank fails",
    "CUDA memory allocated": "CPU-only ranks",
    "MFU": "the ranks give no FLOPs",
    "Checkpoint duration (p90)": "the ranks do not checkpoint",
    "InfiniBand throughput": "no InfiniBand HCA on this machine",
    "InfiniBand errors": "no InfiniBand HCA on this machine",
    "Lines read / events shipped": "no log shipper",
    "Shipper lag": "no log shipper",
    "Retries and dead letters": "no log shipper",
    "Critical alerts": "counts with `or vector(0)`, but no alert fires within the test",
    "Firing alerts": "no alert has been firing for its `for:` within the test",
}


def _scenario(rank_pids: list[int]) -> dict[str, Any]:
    base: dict[str, Any] = {"fan_speed": 40, "ecc": {"volatile": {"corrected": 1, "uncorrected": 0},
                                                     "aggregate": {"corrected": 7, "uncorrected": 0}}}  # fmt: skip
    faults: list[dict[str, Any]] = [
        {"processes": [{"pid": rank_pids[0], "used_memory": 60_000_000_000, "sm_util": 85}], "xid": [79]},
        {"processes": [{"pid": rank_pids[1], "used_memory": 60_000_000_000, "sm_util": 85}], "xid": [109]},
        {"ecc": {"volatile": {"corrected": 4, "uncorrected": 2}}, "remapped_rows": {"pending": True}},
        {"remapped_rows": {"failure": True}, "pcie_width": 8, "pcie_replays_per_second": 20},
        {"nvlink_errors": {"crc": 1}, "nvlink_errors_per_second": {"crc": 0.2, "replay": 0.1}, "temperature": 88},
        {"throttle": {"thermal": 0.5, "power": 0.2, "board_limit": 0.1, "sync_boost": 0.3}},
        {"memory_used": 84_000_000_000, "utilization": 0, "temperature": 75},
        {"lost": True},
    ]
    devices = []
    for f in faults:
        dev = {**base, **f}
        if "remapped_rows" in f:
            dev["remapped_rows"] = {"correctable": 1, "uncorrectable": 0, "pending": False, "failure": False,
                                    **f["remapped_rows"]}  # fmt: skip
        devices.append(dev)
    return {"devices": devices}


@pytest.fixture(scope="module")
def proms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not find_binary("prometheus"):
        require_binary("prometheus")
    import fleet_sim  # benchmarks/: the fleet simulator's ranks

    from mlops_obs.config import resolve
    from mlops_obs.exporter import Exporter, settings

    work = tmp_path_factory.mktemp("profiles")
    files = render_files(mixin_config.MixinConfig(), time_scale=TIME_SCALE)
    rule_files = []
    for rel in (ALERTS_FILE, RECORDING_FILE):
        rule_files.append(work / Path(rel).name)
        rule_files[-1].write_text(files[rel])
    mp = work / "mp"
    mp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ranks = [subprocess.Popen([sys.executable, "-c", fleet_sim.RANK_CODE, str(r), str(mp), "fleet", "2", "node-a"],
                              env=env) for r in range(2)]  # fmt: skip
    exporters: list[Any] = []
    started: list[PrometheusProcess] = []
    try:
        wait_for(lambda: len(list(mp.glob("*.rank.json"))) == 2, "both ranks' snapshots")
        scenario = work / "node.yaml"
        scenario.write_text(yaml.safe_dump(_scenario([p.pid for p in ranks])))
        out: dict[str, Any] = {"exporters": exporters}
        for profile in ("default", "full"):
            values = {"web.listen-address": "127.0.0.1:0", "sampler.interval": "0.3s", "gpu.backend": "fake",
                      "gpu.fake-scenario": str(scenario), "gpu.profile": profile, "gpu.counter-interval": "1s",
                      "multiproc-dir": str(mp)}  # fmt: skip
            ex = Exporter(resolve(settings(), values, environ={})).start()
            exporters.append(ex)
            target = ex.url.split("//", 1)[1].rstrip("/")
            prom = PrometheusProcess(work / f"prom-{profile}", [target], rule_files=rule_files).start()
            started.append(prom)
            out[profile] = prom
        yield out
    finally:
        for prom in started:
            prom.stop()
        for ex in exporters:
            ex.stop()
        for p in ranks:
            p.terminate()
        for p in ranks:
            p.wait(timeout=30)


def _expand(expr: str) -> str:
    return re.sub(r"\$\{?(job|node|rank|gpu)\}?", ".*", expr.replace("$__rate_interval", "10s"))


def _panel_queries() -> list[tuple[str, str, str]]:
    cfg = mixin_config.scaled(mixin_config.MixinConfig(), TIME_SCALE)
    return [(stem, p.title, _expand(q.expr)) for stem, d in dashboards.dashboards(cfg).items() for row in d.rows
            for p in row.panels for q in p.queries]  # fmt: skip


def _alerts() -> list[rules.Alert]:
    return rules.alerts(mixin_config.scaled(mixin_config.MixinConfig(), TIME_SCALE))


def _normalise(result: list[dict[str, Any]]) -> dict[tuple[tuple[str, str], ...], float]:
    """Label set without the scrape target's address (each Prometheus scrapes its own exporter) -> value."""
    out = {}
    for r in result:
        labels = tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("instance", "node")))
        out[labels] = float(r["value"][1])
    return out


def _empty(prom: PrometheusProcess) -> tuple[set[str], set[str]]:
    """The alerts whose expression, and the panels none of whose queries, return anything now."""
    alerts = {a.name for a in _alerts() if not prom.query(a.expr)}
    panels: dict[str, bool] = {}
    for _, title, expr in _panel_queries():
        panels[title] = panels.get(title, False) or bool(prom.query(expr))
    return alerts, {t for t, has in panels.items() if not has}


def _fault_again(proms: dict[str, Any]) -> None:
    """The faults that are events, once more on both sidecars' fakes: an XID of each kind, an uncorrected
    ECC error (the alerts on them look at one error window; a fault that stopped is rightly quiet)."""
    from mlops_obs.collectors.fake_nvml import FakeNvml
    from mlops_obs.collectors.gpu import GpuCollector

    for ex in proms["exporters"]:
        gpu = next(c for c in ex.collectors if isinstance(c, GpuCollector))
        fake = gpu.nvml.lib
        assert isinstance(fake, FakeNvml)
        fake.inject_xid(0, 79)
        fake.inject_xid(1, 109)
        fake.devices[2]["ecc"]["volatile"]["uncorrected"] += 1


def _gpu_alert(name: str) -> bool:
    return name.startswith("Gpu")


def _gpu_panel(title: str) -> bool:
    return title in {p.title for row in dashboards.gpu_dashboard(mixin_config.MixinConfig()).rows for p in row.panels}


def test_every_alert_and_panel_returns_data_with_the_default_profile(proms: dict[str, Any]) -> None:
    """With the default profile every GPU alert (but GpuMissing) fires on its fault and every GPU panel has
    data; the other alerts and panels that return nothing are the listed ones, for the listed reasons."""
    prom = proms["default"]
    last: tuple[set[str], set[str]] = (set(), set())

    def settled() -> bool:
        nonlocal last
        _fault_again(proms)
        last = _empty(prom)
        alerts, panels = last
        gpu_ok = {a for a in alerts if _gpu_alert(a)} == set(NEEDS_FAULT_GPU) and not any(map(_gpu_panel, panels))
        return gpu_ok and alerts <= set(NEEDS_FAULT) and panels <= set(NO_DATA)

    try:
        wait_for(settled, "every GPU alert and panel to return data", timeout=180, interval=1.0)
    except AssertionError:
        alerts, panels = last
        unlisted = sorted(a for a in alerts - set(NEEDS_FAULT_GPU) if _gpu_alert(a) or a not in NEEDS_FAULT)
        raise AssertionError(f"no data: alerts {unlisted}, panels {sorted(panels - set(NO_DATA))}"
                             ) from None  # fmt: skip
    assert set(NEEDS_FAULT) <= {a.name for a in _alerts()} and set(NO_DATA) <= {t for _, t, _ in _panel_queries()}


def test_both_profiles_give_the_same_answers(proms: dict[str, Any]) -> None:
    """Every GPU alert and every query of the GPU dashboard, and the overview's GPU panels, give the same
    label sets and the same values whichever profile the sidecar runs: the queries aggregate what the
    profiles shape differently. Values agree within 25 % (the two sidecars read a moving counter at
    different instants, each once a second, into 10 s rate windows on a busy machine; a profile that got it
    wrong is off by a factor, as 18 links are), counts of injected events within 3, once both stores hold
    a full error window of data (a window still filling is extrapolated differently)."""
    window = mixin_config.seconds(mixin_config.scaled(mixin_config.MixinConfig(), TIME_SCALE).gpu_error_window)
    for prom in (proms["default"], proms["full"]):
        prom.wait_for(f"min(count_over_time(up[{window + 10:g}s]))", lambda r: bool(r) and float(r[0]["value"][1])
                      >= window + 5, timeout=180)  # fmt: skip

    def full_fires() -> bool:
        _fault_again(proms)
        return not {a for a in _empty(proms["full"])[0] if _gpu_alert(a)} - set(NEEDS_FAULT_GPU)

    wait_for(full_fires, "the full profile's GPU alerts", timeout=180, interval=1.0)
    _fault_again(proms)
    queries = [(a.name, a.expr) for a in _alerts() if _gpu_alert(a.name)]
    events = {"GpuXidCritical", "GpuXidError", "GpuEccUncorrectedErrors", "XID errors", "ECC errors"}
    queries += [(title, expr) for stem, title, expr in _panel_queries()
                if stem == "gpu" or title in ("GPUs", "Mean GPU utilisation")]  # fmt: skip
    differ: dict[str, str] = {}
    for title, expr in queries:
        tol = 3.0 if title in events else 1e-9
        for _attempt in range(5):  # an evaluation of one Prometheus can be a second behind the other's
            a, b = _normalise(proms["default"].query(expr)), _normalise(proms["full"].query(expr))
            why = None
            if a.keys() != b.keys():
                why = f"label sets differ: default only {sorted(a.keys() - b.keys())[:2]}, full only " \
                      f"{sorted(b.keys() - a.keys())[:2]}"  # fmt: skip
            else:
                bad = [(k, a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=0.25, abs_tol=tol)]
                why = f"values differ: {bad[:2]}" if bad else None
            if why is None:
                break
            time.sleep(1.0)
        if why:
            differ[f"{title}: {expr[:100]}"] = why
    assert differ == {}, "\n".join(f"{k}: {v}" for k, v in differ.items())
