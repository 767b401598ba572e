"""The central store path end to end: sidecars -> Prometheus in agent mode -> remote write -> VictoriaMetrics,
with vmalert evaluating our rules there, against a local Prometheus scraping the same sidecars.

Every recording rule's output and every dashboard query must give the same answer from both (within a
tolerance: the two scrape the same moving counters at different instants). The sidecars are the fleet
simulator's nodes (bodies rendered by the real exporter), so the GPU, host and training families are all
present. ``KNOWN_DIFFERENCES`` lists the queries whose answers differ by MetricsQL's semantics, and why.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlops_obs.children import ChildServer
from mlops_obs.children.prometheus import PrometheusProcess
from mlops_obs.children.victoriametrics import VictoriaMetricsProcess, VmalertProcess
from mlops_obs.mixin import config as mixin_config
from mlops_obs.mixin import dashboards
from mlops_obs.mixin.generate import ALERTS_FILE, RECORDING_FILE
from mlops_obs.mixin.remote_write import (
    AGENT_FILE,
    SNIPPET_FILE,
    RemoteWriteConfig,
    agent_config,
    remote_write_files,
    vmalert_args,
)
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.timeout(300)

RATE_INTERVAL = "4s"  # Grafana's $__rate_interval at a 1 s scrape interval
# Query -> why VictoriaMetrics answers it differently from Prometheus (MetricsQL semantics).
KNOWN_DIFFERENCES: dict[str, str] = {}
# Series each scraper writes about its own scrape of a target: the agent's and the local Prometheus' differ
# by what they measured, not by how the store answers.
PER_SCRAPER = ("scrape_duration_seconds",)


class PrometheusAgent(PrometheusProcess):
    """Prometheus with ``--enable-feature=agent`` running the generated agent configuration."""

    def __init__(self, workdir: Path, rw: RemoteWriteConfig) -> None:
        super().__init__(workdir, [])
        self.rw = rw

    def config(self) -> dict[str, Any]:
        return agent_config(self.rw)

    def flags(self, config_path: Path) -> list[str]:
        return [
            f"--config.file={config_path}",
            "--enable-feature=agent",
            f"--storage.agent.path={self.workdir / 'wal'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]


def _query(prom: PrometheusProcess, expr: str, at: float) -> list[dict[str, Any]]:
    return list(prom.api("query", query=expr, time=f"{at:.3f}")["result"])


# --- the generated configuration --------------------------------------------------------------------------


def test_generated_agent_and_snippet_pass_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    files = remote_write_files(RemoteWriteConfig(shards=4, shard=1, username="u", password_file="/etc/pw"))
    assert set(files) == {AGENT_FILE, SNIPPET_FILE}
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    agent = files[AGENT_FILE]
    agent["remote_write"][0]["basic_auth"]["password_file"] = str(pw)  # promtool checks the file exists
    path = tmp_path / "agent.yml"
    path.write_text(yaml.safe_dump(agent))
    r = subprocess.run([promtool, "check", "config", "--agent", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "secret" not in path.read_text()  # the password stays in its file
    relabel = agent["scrape_configs"][0]["relabel_configs"]
    assert relabel[0]["action"] == "hashmod" and relabel[0]["modulus"] == 4 and relabel[1]["regex"] == "1"
    # The snippet merged into a full Prometheus that evaluates our rules.
    full = {
        **files[SNIPPET_FILE],
        "rule_files": [str(ROOT / ALERTS_FILE), str(ROOT / RECORDING_FILE)],
        "scrape_configs": agent["scrape_configs"],
    }
    full["remote_write"][0]["basic_auth"]["password_file"] = str(pw)
    path.write_text(yaml.safe_dump(full))
    r = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(ValueError, match="shard"):
        agent_config(RemoteWriteConfig(shards=2, shard=2))


def test_agent_job_name_follows_the_mixin_selector() -> None:
    cfg = mixin_config.MixinConfig(exporter_selector='job="gpu-sidecars", cluster="a"')
    assert agent_config(RemoteWriteConfig(), cfg)["scrape_configs"][0]["job_name"] == "gpu-sidecars"
    assert agent_config(RemoteWriteConfig())["scrape_configs"][0]["honor_labels"] is True


# --- end to end against VictoriaMetrics -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    for b in ("prometheus", "victoria-metrics", "vmalert"):
        require_binary(b)
    import fleet_sim

    from mlops_obs.children.alertmanager import AlertmanagerProcess

    work = tmp_path_factory.mktemp("central")
    tmpl = work / "templates.json"
    tmpl.write_text(json.dumps(fleet_sim.render_templates(ranks=2, gap=1.0)))
    ready = work / "ports.json"
    sim = subprocess.Popen(
        [sys.executable, fleet_sim.__file__, "serve", "--templates", str(tmpl), "--nodes", "3", "--ready", str(ready)]
    )
    started: list[ChildServer] = []
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert sim.poll() is None and time.monotonic() < deadline, "fleet simulator did not start"
            time.sleep(0.05)
        targets = [f"127.0.0.1:{m['port']}" for m in json.loads(ready.read_text())]
        # Windows short enough to be full of data within the test (the comparison is about semantics).
        from mlops_obs.mixin import rules as mixin_rules
        from mlops_obs.mixin.alertmanager import alertmanager_config

        cfg = _short_windows()
        rules = [work / "alerts.yml", work / "recording.yml"]
        rules[0].write_text(yaml.safe_dump(mixin_rules.alert_groups(cfg)))
        rules[1].write_text(yaml.safe_dump(mixin_rules.recording_groups(cfg)))
        am = AlertmanagerProcess(work / "am", alertmanager_config(cfg)).start()
        started.append(am)
        vm = VictoriaMetricsProcess(work / "vm").start()
        started.append(vm)
        vmalert = VmalertProcess(
            work / "vmalert", vmalert_args([str(r) for r in rules], vm.url, am.url, evaluation_interval="1s")
        ).start()
        started.append(vmalert)
        rw = RemoteWriteConfig(
            url=vm.write_url,
            cluster="test",
            targets=tuple(targets),
            scrape_interval="1s",
            batch_send_deadline="200ms",
        )
        agent = PrometheusAgent(work / "agent", rw).start()
        started.append(agent)
        local = PrometheusProcess(work / "local", targets, rule_files=rules).start()
        started.append(local)
        yield {"vm": vm, "local": local, "agent": agent, "cfg": cfg, "targets": targets}
    finally:
        for s in reversed(started):
            s.stop()
        sim.terminate()
        sim.wait(timeout=30)


def _short_windows() -> mixin_config.MixinConfig:
    """The shipped rules on a 1 s clock (as the alert e2e test runs them), every window also capped at 20 s
    so that within the test each rule and panel reads a full window in both stores: the comparison is about
    how the two engines answer, and a window not yet full is where they legitimately differ (docs/scale.md)."""
    import dataclasses

    cfg = mixin_config.scaled(mixin_config.MixinConfig(), 1 / 15)
    cap = {}
    for name in mixin_config.time_fields():
        v = getattr(cfg, name)
        if isinstance(v, str) and not name.startswith(("for_", "group_", "repeat_")):
            cap[name] = mixin_config.duration(min(mixin_config.seconds(v), 20.0))
    return dataclasses.replace(cfg, **cap)


def _normalise(result: list[dict[str, Any]]) -> dict[tuple[tuple[str, str], ...], float]:
    """Label set (without the agent's external label and the metric name) -> value; NaN dropped."""
    out = {}
    for r in result:
        v = float(r["value"][1])
        if math.isnan(v):
            continue
        labels = tuple(sorted((k, x) for k, x in r["metric"].items() if k not in ("cluster", "__name__")))
        out[labels] = v
    return out


def _compare(expr: str, a: dict[Any, float], b: dict[Any, float]) -> str | None:
    if a.keys() != b.keys():
        only_a, only_b = a.keys() - b.keys(), b.keys() - a.keys()
        return f"label sets differ: only Prometheus {sorted(only_a)[:3]}, only VictoriaMetrics {sorted(only_b)[:3]}"
    abs_tol = 3.0 if "time()" in expr else 1e-6  # a heartbeat's age moves with each store's own scrape instant
    for k, v in a.items():
        w = b[k]
        if not (math.isinf(v) and v == w) and not math.isclose(v, w, rel_tol=0.05, abs_tol=abs_tol):
            return f"{dict(k)}: Prometheus {v!r}, VictoriaMetrics {w!r}"
    return None


def _wait_for_rule_outputs(stores: dict[str, Any], records: list[str], timeout: float = 120.0) -> set[str]:
    """Wait until every recording rule with output in the local Prometheus has output in VictoriaMetrics
    (vmalert evaluated it and wrote it back), twice in a row; the rules whose inputs the simulated
    sidecars do not export have output in neither. Returns the rules with output."""
    deadline = time.monotonic() + timeout
    last: set[str] = set()
    while time.monotonic() < deadline:
        at = time.time()
        local = {r for r in records if stores["local"].query(r)}
        both = local and all(stores["vm"].query(r, at) for r in local)
        if both and local == last:
            return local
        last = local if both else set()
        time.sleep(1.0)
    raise AssertionError(f"recording rules never had output in both stores; locally: {sorted(last)}")


def _recording_rules(cfg: mixin_config.MixinConfig) -> list[str]:
    from mlops_obs.mixin import rules

    return [r["record"] for g in rules.recording_groups(cfg)["groups"] for r in g["rules"]]


def test_recording_rules_and_dashboard_queries_agree_on_victoriametrics(stores: dict[str, Any]) -> None:
    cfg = stores["cfg"]
    records = _recording_rules(cfg)
    produced = _wait_for_rule_outputs(stores, records)
    assert len(produced) >= len(records) / 2, sorted(produced)  # most rules' inputs are there
    time.sleep(21)  # every rule's and panel's window (20 s at most) full of data in both stores
    at = time.time() - 2.0  # remote write and vmalert's write-back have delivered up to here
    queries = [("recording", name, name) for name in records]
    for stem, d in dashboards.dashboards(cfg).items():
        for row in d.rows:
            for p in row.panels:
                for q in p.queries:
                    expr = re.sub(
                        r"\$\{?(job|node|rank|gpu)\}?", ".*", q.expr.replace("$__rate_interval", RATE_INTERVAL)
                    )
                    queries.append((stem, p.title, expr))
    differ: dict[str, str] = {}
    empty = []
    worst = (0.0, "")
    for where, title, expr in queries:
        # Alerts' state and scrape health belong to each evaluator and scraper: on a busy machine one of them
        # can be an evaluation behind the other. A difference in semantics persists over fresh instants, so
        # a query counts as differing only if it differs at each of a few instants a second apart.
        for attempt in range(5):
            if attempt:
                time.sleep(1.0)
                at = time.time() - 2.0
            a = _normalise(_query(stores["local"], expr, at))
            b = _normalise(stores["vm"].query(expr, at))
            if expr.startswith(PER_SCRAPER):
                why = None if a.keys() == b.keys() else "label sets differ"
                break
            why = _compare(expr, a, b)
            if why is None:
                break
        if not a and not b:
            empty.append(f"{where}/{title}")
        if why:
            differ[expr] = f"{where}/{title}: {why}"
            continue
        for k in a.keys() & b.keys():
            if "time()" not in expr and not expr.startswith(PER_SCRAPER) and 1e-9 < abs(a[k]) < math.inf:
                worst = max(worst, (abs(b[k] - a[k]) / abs(a[k]), f"{where}/{title}"))
    unexplained = {e: w for e, w in differ.items() if e not in KNOWN_DIFFERENCES}
    assert unexplained == {}, "\n".join(unexplained.values())
    print(
        f"compared {len(queries)} queries; largest relative difference {worst[0]:.2%} ({worst[1]}); "
        f"empty in both: {empty}"
    )
    assert len(empty) < len(queries) / 4, empty  # the comparison compared data, not two empty answers
