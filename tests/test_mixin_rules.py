"""The generated rules, rule tests, Alertmanager config and dashboards, checked with the real validators."""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import yaml

from mlops_obs.cli import main
from mlops_obs.mixin import config as mixin_config
from mlops_obs.mixin import dashboards, grafana, rules
from mlops_obs.mixin.alertmanager import JOB_ROOT_CAUSES, JOB_SYMPTOMS
from mlops_obs.mixin.generate import ALERTS_FILE, RECORDING_FILE, RULE_TESTS_FILE, render_files, write
from mlops_obs.rankdir import cadence
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
CFG = mixin_config.MixinConfig()


def test_committed_files_are_up_to_date(capsys: object) -> None:
    """`mlops-obs generate --check` passes on the repository (CI runs the same)."""
    assert main(["generate", "--check", f"--output-dir={ROOT}"]) == 0


def test_check_works_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --output-dir, --check compares the checkout this package runs from, not the current directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--check"]) == 0
    assert not any(tmp_path.iterdir())


def test_without_a_checkout_output_dir_is_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An installed copy (no checkout to default to) says to pass --output-dir, exit 2, and writes nothing."""
    from mlops_obs.commands import generate

    monkeypatch.setattr(generate, "checkout_root", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert main(["generate"]) == 2
    err = capsys.readouterr().err
    assert "output-dir" in err and "checkout" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


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


def test_fleet_recording_rules_are_tested_on_both_gpu_profiles() -> None:
    """Every rule a fleet view or a GPU alert reads has promtool cases; a rule over series the two GPU
    profiles shape differently (per link or per GPU, every throttle reason or the default's) has a case of
    each shape, expecting the same output: it records the same from a fleet running either."""
    fleet = [*rules.gpu_rules(CFG), *(r for r in rules.recording_rules(CFG) if r.record in (
        rules.JOB_GPU_UTIL, rules.JOB_RANKS, rules.JOB_FAILED_RANKS, rules.STEP_BUCKETS))]  # fmt: skip
    assert len(fleet) == 13
    shaped = {rules.NVLINK_ERRORS, rules.ECC_ERRORS, rules.THROTTLE, *rules.NVLINK_BYTES.values()}
    for r in fleet:
        assert r.cases, r.record
        if r.record in shaped:
            assert len(r.cases) >= 2, r.record
            full, default = r.cases[:2]  # the full profile's shape, then the default's
            assert full.expected == default.expected and set(full.series) != set(default.series), r.record
    nvlink = next(r for r in fleet if r.record == rules.NVLINK_ERRORS)
    assert ["link=" in k for k in nvlink.cases[0].series] == [True] * 3
    assert ["link=" in k for k in nvlink.cases[1].series] == [False]


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
        for case in t.get("alert_rule_test", []):
            seen.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    expected = {a.name: [False] * (1 + len(a.also_quiet)) + [True] * (1 + len(a.also_fires)) for a in rules.alerts(CFG)}
    assert {name: sorted(v) for name, v in seen.items()} == expected


class _Promtool:
    """A ``promtool test rules`` run started in the background, its output in a file."""

    def __init__(self, cwd: Path, out: Path) -> None:
        self.out = out
        with open(out, "wb") as f:
            cmd = [require_binary("promtool"), "test", "rules", Path(RULE_TESTS_FILE).name]
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)

    def result(self, timeout: float = 170) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        return rc, self.out.read_text(errors="replace")[-8000:]


@pytest.fixture(scope="module")
def promtool_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Promtool]]:
    """The rule unit tests against the shipped rules and against the rules scaled 8 times faster, both
    started at once: each is over 40 s of one core of promtool, and the machine has two."""
    d = tmp_path_factory.mktemp("promtool")
    write(d / "scaled", render_files(CFG, time_scale=1 / 8))
    runs = {"shipped": _Promtool(ROOT / "tests/rules", d / "shipped.out"),
            "scaled": _Promtool(d / "scaled" / "tests/rules", d / "scaled.out")}  # fmt: skip
    yield runs
    for r in runs.values():
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def test_promtool_test_rules(promtool_runs: dict[str, _Promtool]) -> None:
    """Prometheus 2.42's rule unit tests pass: every alert fires where it should and only there."""
    rc, out = promtool_runs["shipped"].result()
    assert rc == 0, out


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
    assert "GpuXidCritical" in down["target_matchers"][0] and "TrainingStalled|" in down["target_matchers"][0]
    assert "TrainingNodeDown" not in down["target_matchers"][0] and down["equal"] == ["instance"]
    job = next(i for i in am["inhibit_rules"] if "TrainingRankFailed" in i["source_matchers"][0])
    assert job["equal"] == ["job"] and "TrainingStalled" in job["target_matchers"][0]
    assert inhibits[('severity="critical"',)]["target_matchers"] == ['severity="warning"']


def test_root_causes_are_never_muted_as_their_own_symptoms() -> None:
    """No alert is both a job's root cause and one of the symptoms the root causes mute."""
    assert not set(JOB_ROOT_CAUSES) & set(JOB_SYMPTOMS)


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
        assert not re.search(r'job="', json.dumps(data)), f"{stem} hard-codes a job; selectors are config values"
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


_TOKENS = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?(?:ms|[smhdw])?|[^\d]+")


def _differ_only_by_factor(base: str, fast: str, factor: float) -> None:
    """Every token of ``fast`` equals ``base``'s, except durations and numbers, which are ``factor`` times."""
    a, b = _TOKENS.findall(base), _TOKENS.findall(fast)
    assert len(a) == len(b), (base, fast)
    for x, y in zip(a, b):
        if x == y:
            continue
        assert x[0].isdigit() and y[0].isdigit(), (x, y, base)
        vx = mixin_config.seconds(x) if x[-1].isalpha() else float(x)
        vy = mixin_config.seconds(y) if y[-1].isalpha() else float(y)
        assert abs(vy - vx * factor) <= 1e-9 * max(1.0, vx), (x, y, base)


def test_scaled_rules_differ_only_in_time_constants() -> None:
    """The rules at another time scale are the same expressions with every time constant (and only those)
    multiplied by the factor: one definition, so the scaled copy the e2e tests run cannot drift."""
    factor = 1 / 15
    fast_cfg = mixin_config.scaled(CFG, factor)
    assert mixin_config.scaled(CFG, 1.0) == CFG
    prod, fast = rules.alerts(CFG), rules.alerts(fast_cfg)
    assert [a.name for a in prod] == [a.name for a in fast]
    for p, f in zip(prod, fast):
        _differ_only_by_factor(p.expr, f.expr, factor)
        _differ_only_by_factor(p.for_, f.for_, factor)
    for p, f in zip(rules.recording_rules(CFG), rules.recording_rules(fast_cfg)):
        assert p.record == f.record
        _differ_only_by_factor(p.expr, f.expr, factor)


def test_every_time_constant_is_marked_for_scaling() -> None:
    """A field that holds a duration or seconds is scaled; one forgotten would make the scaled rules differ."""
    import dataclasses

    timed = set(mixin_config.time_fields())
    for f in dataclasses.fields(mixin_config.MixinConfig):
        v = getattr(CFG, f.name)
        looks_timed = (f.name.endswith(("_window", "_seconds", "_lookback", "_interval")) or f.name.startswith("for_")
                       or f.name in ("group_wait",))  # fmt: skip
        assert looks_timed == (f.name in timed), f.name
        if isinstance(v, str) and f.name in timed:
            assert mixin_config.duration(mixin_config.seconds(v)) == v, f.name


def test_scaled_rules_pass_the_same_unit_tests(promtool_runs: dict[str, _Promtool]) -> None:
    """Every alert's cases, on a clock 8 times faster (intervals, evaluation times and time-valued samples
    scaled too), hold against the scaled rules exactly as against the shipped ones."""
    rc, out = promtool_runs["scaled"].result()
    assert rc == 0, out


def test_training_alerts_fire_well_within_the_retention() -> None:
    """A frozen rank's series vanish `training.retention` after its last update: the stall alert fires by
    half of it at the latest, and the node-down lookback covers it. The mixin's retention is the sidecar's."""
    from mlops_obs.exporter import settings

    declared = {s.key: s.default for s in settings()}["training.retention"]
    assert CFG.training_retention_seconds == declared
    scrape = CFG.scrape_interval_seconds
    latest_stall = CFG.training_stall_ceiling_seconds + mixin_config.seconds(CFG.for_stall) + 2 * scrape
    assert latest_stall <= CFG.training_retention_seconds / 2
    assert CFG.training_stall_ceiling_seconds >= CFG.training_stall_floor_seconds
    node_down = next(a for a in rules.alerts(CFG) if a.name == "TrainingNodeDown")
    assert f"[{mixin_config.duration(CFG.training_retention_seconds)}]" in node_down.expr


def _worst_sampler_lead(scrape: float) -> float:
    """The longest a sidecar's round may start before the scrape it serves, at this scrape interval: the
    real sampler's bound, asked with a collector whose last round took forever."""
    from mlops_obs.exporter.sampler import CollectorState, Sampler

    sampler = Sampler([], 1.0, 1e9, structlog.get_logger())
    sampler.states["slow"] = CollectorState(duration=1e9)
    sampler.clock.arrive(0.0)
    sampler.clock.arrive(scrape)
    return sampler.lead()


def test_windows_meet_the_time_to_alert_budgets() -> None:
    """At a 15 s scrape and evaluation, by construction, worst case: a crash, a NaN and a stall alert within
    90 s of the fault; a 2x straggler and a data-bound rank within 5 minutes; every rate window holds 4 scrapes.

    The delays come from the constants that set them. A rank's figures reach its snapshot at its next flush,
    at most ``MAX_FLUSH_INTERVAL`` later (following the sidecar the flush lands just before the round that
    reads it; a rank with no cadence to follow flushes every ``MAX_FLUSH_INTERVAL`` at any phase). The
    sidecar reads the snapshot at its next round, which starts at most ``lead`` before the scrape it serves
    and one scrape interval after the one before. Prometheus then evaluates once per interval, and a rule
    with ``for:`` fires at the first evaluation that much after the one that found it true."""
    scrape, s = CFG.scrape_interval_seconds, mixin_config.seconds
    flush = cadence.MAX_FLUSH_INTERVAL
    lead = _worst_sampler_lead(scrape)
    assert lead <= scrape / 2

    def fires(true_at: float, for_: str) -> float:
        """When an alert fires whose condition holds from ``true_at`` on: the next evaluation, then its
        ``for:`` rounded up to whole evaluations."""
        return true_at + scrape + math.ceil(s(for_) / scrape) * scrape

    # A change reaches Prometheus within: the flush, the round after it, the scrape that round serves.
    scraped = flush + scrape + lead
    # Crash and NaN: the failed state or the non-finite count is scraped, then `for:`.
    assert fires(scraped, CFG.for_training_fault) <= 90
    # Stall: no step for the floor. Meanwhile the peers' wait in the collective, and a healthy rank's
    # last step, must reach an evaluation well inside the floor (or a peer, or a healthy job, looks hung).
    assert fires(CFG.training_stall_floor_seconds, CFG.for_stall) <= 90
    assert scraped + scrape < CFG.training_stall_floor_seconds
    # Windowed symptoms (a data-bound rank; the straggler's ring of recent steps moves sooner): the window
    # holds only post-fault samples once it starts after the last scrape that served pre-fault data (at
    # most flush + lead after the fault); one evaluation records it, the alert's evaluation sees it.
    for window, for_ in ((CFG.training_rate_window, CFG.for_training), (CFG.training_rate_window, CFG.for_straggler)):
        recorded = flush + lead + s(window) + scrape
        assert fires(recorded, for_) <= 300, (window, for_, fires(recorded, for_))
    for window in (CFG.training_rate_window, CFG.node_rate_window, CFG.gpu_error_window):
        assert s(window) >= 4 * scrape, window


def test_rule_tests_follow_overridden_thresholds(tmp_path: Path) -> None:
    """With a user's thresholds and selectors, the generated cases still fire and stay quiet as they should."""
    promtool = require_binary("promtool")
    cfg = mixin_config.MixinConfig(
        straggler_score=0.6, gpu_memory_full_ratio=0.9, temperature_margin_celsius=10.0,
        training_stall_floor_seconds=180.0, checkpoint_stale_seconds=3600.0, exporter_selector='job="gpu-sidecar"',
        instance_labels=("cluster", "instance"), for_training="5m",
    )  # fmt: skip
    files = render_files(cfg)
    for rel in (ALERTS_FILE, RECORDING_FILE):
        (tmp_path / Path(rel).name).write_text(files[rel])
    keep = {"TrainingStalled", "TrainingCheckpointStale", "TrainingStraggler", "GpuMemoryNearFull", "GpuXidCritical",
            "GpuTemperatureNearSlowdown", "MlopsExporterDown", "NodeCpuSaturated", "TrainingNodeDown",
            "TrainingDataLoaderBound"}  # fmt: skip
    spec = rules.rule_tests(cfg, [Path(ALERTS_FILE).name, Path(RECORDING_FILE).name])
    spec["tests"] = [t for t in spec["tests"]
                     if "promql_expr_test" in t or t["alert_rule_test"][0]["alertname"] in keep]  # fmt: skip
    assert len(spec["tests"]) == sum(len(a.cases()) for a in rules.alerts(cfg) if a.name in keep) + sum(
        len(r.cases) for r in rules.recording_rules(cfg)
    )
    (tmp_path / "t.yml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([promtool, "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def test_every_series_the_mixin_reads_is_in_the_contract() -> None:
    """docs/alerts.md lists every series a rule or a panel reads, so the producers know what the alerts need."""
    files = render_files(CFG)
    read: set[str] = set()
    for rel in (ALERTS_FILE, RECORDING_FILE, *(r for r in files if r.startswith("dashboards/"))):
        read |= set(re.findall(r"(?<![:\w])(mlops_[a-z]+_[a-z_]+?)(?:_bucket|_count|_sum)?\b", files[rel]))
    contract = (ROOT / "docs/alerts.md").read_text()
    assert len(read) > 80
    assert sorted(s for s in read if f"`{s}`" not in contract) == []
