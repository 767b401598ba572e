"""The generated rules, rule tests, Alertmanager config and dashboards, checked with the real validators."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from mlops_obs.cli import main
from mlops_obs.mixin import config as mixin_config
from mlops_obs.mixin import dashboards, grafana, rules
from mlops_obs.mixin.generate import ALERTS_FILE, RECORDING_FILE, RULE_TESTS_FILE, render_files
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
CFG = mixin_config.MixinConfig()


def test_committed_files_are_up_to_date(capsys: object) -> None:
    """`mlops-obs generate --check` passes on the repository (CI runs the same)."""
    assert main(["generate", "--check", f"--output-dir={ROOT}"]) == 0


def test_check_fails_on_stale_and_missing_files(tmp_path: Path) -> None:
    """--check exits 1 when a generated file was edited by hand or deleted, and 0 after regenerating."""
    assert main(["generate", f"--output-dir={tmp_path}"]) == 0
    assert main(["generate", "--check", f"--output-dir={tmp_path}"]) == 0
    (tmp_path / "dashboards/gpu.json").write_text("{}")
    (tmp_path / ALERTS_FILE).unlink()
    assert main(["generate", "--check", f"--output-dir={tmp_path}"]) == 1
    assert main(["generate", f"--output-dir={tmp_path}"]) == 0
    assert main(["generate", "--check", f"--output-dir={tmp_path}"]) == 0


def test_output_is_deterministic() -> None:
    """Two renders are byte-identical (no timestamps, stable ids and key order)."""
    assert render_files(CFG) == render_files(mixin_config.MixinConfig())


def test_bad_mixin_config_is_one_line_error(tmp_path: Path, capsys: object) -> None:
    """An unknown field in --mixin.config names the field and exits 2."""
    bad = tmp_path / "m.yml"
    bad.write_text("no_such_threshold: 3\n")
    assert main(["generate", "--check", f"--mixin.config={bad}", f"--output-dir={tmp_path}"]) == 2


def test_mixin_config_changes_both_alert_and_panel(tmp_path: Path) -> None:
    """One field (straggler_score) moves the alert threshold and the dashboard threshold line together."""
    (tmp_path / "m.yml").write_text("straggler_score: 0.6\n")
    assert main(["generate", f"--mixin.config={tmp_path / 'm.yml'}", f"--output-dir={tmp_path}"]) == 0
    alerts = yaml.safe_load((tmp_path / ALERTS_FILE).read_text())
    expr = next(r["expr"] for g in alerts["groups"] for r in g["rules"] if r.get("alert") == "TrainingStraggler")
    assert expr.endswith("< 0.6")
    board = json.loads((tmp_path / "dashboards/training.json").read_text())
    panel = next(p for p in board["panels"] if p["title"] == "Straggler score")
    assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] == 0.6


def test_alerts_are_complete() -> None:
    """At least 25 alerts, each with for, severity, summary, description, runbook_url and a runbook section."""
    runbook = (ROOT / "docs/runbooks.md").read_text()
    all_alerts = rules.alerts(CFG)
    assert len(all_alerts) >= 25
    assert len({a.name for a in all_alerts}) == len(all_alerts)
    for a in all_alerts:
        r = a.rule(CFG)
        assert r["for"] and r["labels"]["severity"] in ("critical", "warning", "info"), a.name
        assert r["annotations"]["summary"] and r["annotations"]["description"], a.name
        anchor = r["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert f"\n## {a.name}\n" in runbook and anchor == a.name.lower(), a.name


def test_recording_rule_names_follow_level_metric_operation() -> None:
    for r in rules.recording_rules(CFG):
        assert re.fullmatch(r"[a-z_]+:mlops_[a-z_]+:[a-z0-9_]+", r.record), r.record


def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool")
    out = subprocess.run([promtool, "check", "rules", ALERTS_FILE, RECORDING_FILE], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """The committed promtool tests hold, per alert, one case expecting it and one expecting nothing."""
    tests = yaml.safe_load((ROOT / RULE_TESTS_FILE).read_text())["tests"]
    seen: dict[str, list[bool]] = {}
    for t in tests:
        for case in t["alert_rule_test"]:
            seen.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    expected = {a.name: [False] * (1 + len(a.also_quiet)) + [True] for a in rules.alerts(CFG)}
    assert {name: sorted(v) for name, v in seen.items()} == expected


def test_promtool_test_rules() -> None:
    """Prometheus 2.42's rule unit tests pass: every alert fires where it should and only there."""
    promtool = require_binary("promtool")
    out = subprocess.run([promtool, "test", "rules", Path(RULE_TESTS_FILE).name], cwd=ROOT / "tests/rules",
                         capture_output=True, text=True, timeout=170)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def test_amtool_check_config() -> None:
    amtool = require_binary("amtool")
    out = subprocess.run([amtool, "check-config", "alerts/alertmanager.yml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    am = yaml.safe_load((ROOT / "alerts/alertmanager.yml").read_text())
    assert [r["matchers"] for r in am["route"]["routes"]] == [['severity="critical"'], ['severity="warning"']]
    assert "job" in am["route"]["group_by"]
    inhibits = {tuple(i["source_matchers"]): i for i in am["inhibit_rules"]}
    down = inhibits[('alertname="MlopsExporterDown"',)]
    assert "TrainingStalled" in down["target_matchers"][0] and "GpuXidCritical" in down["target_matchers"][0]
    assert inhibits[('severity="critical"',)]["target_matchers"] == ['severity="warning"']


def test_dashboards_follow_grafana_conventions() -> None:
    """Explicit schemaVersion and uid, $datasource first then chained job/node/rank/gpu, units and modern
    thresholds on every panel, rows, and the ALERTS annotation."""
    for stem, d in dashboards.dashboards(CFG).items():
        data = grafana.render(d)
        assert data["schemaVersion"] == grafana.SCHEMA_VERSION and 0 < len(data["uid"]) <= 40, stem
        names = [v["name"] for v in data["templating"]["list"]]
        assert names == ["datasource", "job", "node", "rank", "gpu"], stem
        queries = {v["name"]: v["query"] for v in data["templating"]["list"]}
        assert "$job" in queries["node"] and "$node" in queries["rank"] and "$node" in queries["gpu"]
        assert data["annotations"]["list"][0]["expr"].startswith("ALERTS")
        assert any(p["type"] == "row" for p in data["panels"]), stem
        for p in data["panels"]:
            if p["type"] == "row":
                continue
            defaults = p["fieldConfig"]["defaults"]
            assert defaults["unit"], (stem, p["title"])
            steps = defaults["thresholds"]["steps"]
            assert steps[0] == {"color": "green", "value": None}, (stem, p["title"])
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["expr"] for t in p["targets"])
    uids = [grafana.render(d)["uid"] for d in dashboards.dashboards(CFG).values()]
    assert len(set(uids)) == len(uids)


def test_rank_panels_link_to_logs() -> None:
    board = grafana.render(dashboards.training_dashboard(mixin_config.MixinConfig(
        opensearch_dashboards_url="https://osd.example:5601")))  # fmt: skip
    links = [lk for p in board["panels"] for lk in p.get("fieldConfig", {}).get("defaults", {}).get("links", [])]
    assert links and all(lk["url"].startswith("https://osd.example:5601/app/discover") for lk in links)
    assert any("${__field.labels.rank}" in lk["url"] for lk in links)


def test_kubernetes_forms_match_the_files() -> None:
    """The PrometheusRule holds the same groups as the rule files; the ConfigMap every dashboard, labelled."""
    files = render_files(CFG)
    pr = yaml.safe_load(files["deploy/kubernetes/prometheus-rule.yaml"])
    assert pr["kind"] == "PrometheusRule" and pr["metadata"]["labels"]["release"]
    groups = yaml.safe_load(files[RECORDING_FILE])["groups"] + yaml.safe_load(files[ALERTS_FILE])["groups"]
    assert pr["spec"]["groups"] == groups
    cms = list(yaml.safe_load_all(files["deploy/kubernetes/grafana-dashboards-configmap.yaml"]))
    assert all(cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1" for cm in cms)
    data = {k: v for cm in cms for k, v in cm["data"].items()}
    assert sorted(data) == sorted(f"{s}.json" for s in dashboards.dashboards(CFG))
    assert json.loads(data["gpu.json"]) == json.loads(files["dashboards/gpu.json"])
    # kubectl apply's last-applied annotation is limited to 256 KiB per object.
    assert all(len(yaml.safe_dump(cm)) < 200_000 for cm in cms)


def test_e2e_profile_changes_only_durations() -> None:
    """The e2e profile's alert expressions differ from production only in windows and thresholds of time."""
    prod = {a.name: a for a in rules.alerts(CFG)}
    fast = {a.name: a for a in rules.alerts(mixin_config.e2e_profile())}
    assert prod.keys() == fast.keys()
    assert fast["TrainingStalled"].for_ == "2s" and prod["TrainingStalled"].for_ == "5m"
    strip = re.compile(r"\[\w+\]|offset \w+|> \d+(\.\d+)?(?=\)|$)")
    for name in prod:
        assert strip.sub("", prod[name].expr) == strip.sub("", fast[name].expr), name


def test_rule_tests_follow_overridden_thresholds(tmp_path: Path) -> None:
    """With a user's thresholds and selectors, the generated cases still fire and stay quiet as they should."""
    promtool = require_binary("promtool")
    cfg = mixin_config.MixinConfig(
        straggler_score=0.6, gpu_memory_full_ratio=0.9, temperature_margin_celsius=10.0,
        training_stall_seconds=1800.0, checkpoint_stale_seconds=3600.0, exporter_selector='job="gpu-sidecar"',
        node_label="node",
    )  # fmt: skip
    files = render_files(cfg)
    for rel in (ALERTS_FILE, RECORDING_FILE):
        (tmp_path / Path(rel).name).write_text(files[rel])
    keep = {"TrainingStalled", "TrainingCheckpointStale", "TrainingStraggler", "GpuMemoryNearFull",
            "GpuTemperatureNearSlowdown", "MlopsExporterDown", "NodeCpuSaturated"}  # fmt: skip
    spec = rules.rule_tests(cfg, [Path(ALERTS_FILE).name, Path(RECORDING_FILE).name])
    spec["tests"] = [t for t in spec["tests"] if t["alert_rule_test"][0]["alertname"] in keep]
    assert len(spec["tests"]) == sum(2 + len(a.also_quiet) for a in rules.alerts(cfg) if a.name in keep)
    (tmp_path / "t.yml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([promtool, "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
