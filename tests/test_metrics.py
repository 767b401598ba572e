"""The metrics layer: prometheus_client's internals in one place (and a loud failure when they change),
families equal to prometheus_client's own, bounded label-set caches, and no module-level caches."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from mlops_obs.metrics import NO_LABELS, FamilyBuilder, Labels, LabelSets, Renderer, _client, render, sample

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_prometheus_client_keeps_what_the_shortcuts_rely_on() -> None:
    """If an upgrade of prometheus_client changes Sample's fields or Metric's attributes, this fails and
    says which shortcut in mlops_obs.metrics._client broke, before any /metrics goes wrong."""
    problems = _client.changes()
    assert problems == [], "prometheus_client changed under mlops_obs.metrics._client:\n" + "\n".join(problems)


def test_the_check_names_what_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check really looks: a Sample with another field list, or a Metric with another attribute, is
    reported with the shortcut that depends on it."""
    monkeypatch.setattr(Sample, "_fields", (*_client.SAMPLE_FIELDS, "created"))
    (msg,) = _client.changes()
    assert "Sample fields" in msg and "'created'" in msg and "tuple.__new__" in msg
    monkeypatch.undo()

    original = Metric.__init__

    def grown(self: Metric, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.exemplars = []  # type: ignore[attr-defined]

    monkeypatch.setattr(Metric, "__init__", grown)
    (msg,) = _client.changes()
    assert "Metric instance attributes" in msg and "exemplars" in msg and "MetricMaker" in msg


def _reg(fams: list[Metric]) -> Any:
    class Reg:
        def collect(self) -> list[Metric]:
            return fams

    return Reg()


def test_families_equal_what_prometheus_client_builds() -> None:
    """The builder's families are the ones the public *MetricFamily classes make: equal objects, the same
    exposition bytes, in declared-present then first-use order, and no family for an unused key."""
    out = FamilyBuilder(
        {
            "t_requests_total": ("counter", "Requests."),
            "t_temperature_celsius": ("gauge", "Temperature."),
            "t_step_seconds": ("histogram", "Step time."),
            "t_unused": ("gauge", "Never reported."),
            "t_empty": ("gauge", "Reported empty."),
        }
    )
    fams = out.round("t_empty")
    gpu0 = out.labels.get({"gpu": "0"})
    fams.add("t_temperature_celsius", gpu0, 41)
    fams.add("t_requests_total", out.labels.get({"code": "200", "path": '/a"b'}), 12)
    fams.histogram("t_step_seconds", out.labels.get({"rank": "0"}), [2, 3, 1], (0.1, 1.0), 3.5)
    ours = fams.metrics()

    t = GaugeMetricFamily("t_temperature_celsius", "Temperature.", labels=["gpu"])
    t.add_metric(["0"], 41)
    c = CounterMetricFamily("t_requests", "Requests.", labels=["code", "path"])
    c.add_metric(["200", '/a"b'], 12)
    h = HistogramMetricFamily("t_step_seconds", "Step time.", labels=["rank"])
    h.add_metric(["0"], [("0.1", 2.0), ("1.0", 5.0), ("+Inf", 6.0)], 3.5)
    theirs = [GaugeMetricFamily("t_empty", "Reported empty."), t, c, h]

    assert [m.name for m in ours] == ["t_empty", "t_temperature_celsius", "t_requests", "t_step_seconds"]
    assert ours == theirs
    assert render(ours) == generate_latest(_reg(theirs))  # type: ignore[arg-type]


def test_a_bad_family_still_raises() -> None:
    """The first build of each family goes through prometheus_client's constructor and its checks."""
    out = FamilyBuilder({"t_value": ("gauge_ish", "Bad type.")})
    fams = out.round()
    fams.add("t_value", NO_LABELS, 1)
    with pytest.raises(ValueError, match="Invalid metric type"):
        fams.metrics()


def test_label_sets_are_interned_immutable_and_bounded() -> None:
    sets = LabelSets(max_sets=8)
    a = sets.get({"gpu": 0, "uuid": "x"})
    assert a is sets.get({"gpu": "0", "uuid": "x"}) or a == sets.get({"gpu": "0", "uuid": "x"})
    assert a is sets.get({"gpu": 0, "uuid": "x"})  # the same mapping: the very same object
    assert a.braced == '{gpu="0",uuid="x"}' and isinstance(a, dict)
    with pytest.raises(TypeError, match="immutable"):
        a["gpu"] = "1"  # type: ignore[index]
    phase = sets.with_label(a, "phase", "forward")
    assert phase == {"gpu": "0", "uuid": "x", "phase": "forward"} and phase is sets.with_label(a, "phase", "forward")
    les = sets.buckets(a, (0.5, 1.0))
    assert [lb["le"] for lb in les] == ["0.5", "1.0", "+Inf"] and les is sets.buckets(a, (0.5, 1.0))
    for i in range(1000):  # label sets that churn (pids come and go) never grow the cache past its bound
        sets.get({"pid": i})
        sets.with_label(a, "pid", i)
    assert len(sets) <= 2 * 8


def test_renderer_caches_are_bounded_and_never_serve_old_text() -> None:
    """A renderer fed ever new families and label sets stays within its bounds, and every render is
    still what prometheus_client writes."""
    r = Renderer()
    for i in range(5000):
        g = GaugeMetricFamily(f"t_churn_{i % 4100}", "Churn.", labels=["pid"])
        g.add_metric([str(i)], float(i))
        assert r.render([g]) == generate_latest(_reg([g]))  # type: ignore[arg-type]
    assert len(r._families) <= 4096 and len(r._labels) <= 50_000 and len(r._values) <= 20_000


def test_sample_is_a_prometheus_client_sample() -> None:
    s = sample("t", Labels([("a", "b")]), 1.5)
    assert s == Sample("t", {"a": "b"}, 1.5) and s.timestamp is None and type(s) is Sample


# Module-level state that is not a cache: the registry collector modules fill when imported.
_ALLOWED_GLOBAL_STATE = {("mlops_obs/collectors/__init__.py", "_REGISTRY")}
_MUTABLE_CALLS = {"dict", "list", "set", "Counter", "defaultdict", "OrderedDict", "deque", "WeakValueDictionary"}


def _module_level_mutables(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:
        targets: list[ast.expr] = []
        value = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        empty = isinstance(value, ast.Dict | ast.List | ast.Set) and not (
            getattr(value, "keys", None) or getattr(value, "elts", None)
        )
        call = (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id in _MUTABLE_CALLS
            and not (value.args or value.keywords)
        )
        if empty or call:
            found += [t.id for t in targets if isinstance(t, ast.Name)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found += [f"global {n}" for n in node.names]
    rel = str(path.relative_to(ROOT))
    return [f"{rel}: {name}" for name in found if (rel, name) not in _ALLOWED_GLOBAL_STATE]


def test_no_module_level_caches_in_collectors_metrics_rankdir_or_exporter() -> None:
    """Caches belong to the object that uses them (a collector, a renderer, a rank directory): no module
    starts empty containers it fills later, and no function rebinds a module global."""
    paths = []
    for pkg in ("collectors", "metrics", "rankdir", "exporter", "instrument"):
        paths += sorted((ROOT / "mlops_obs" / pkg).glob("*.py"))
    found = [f for p in paths if p.name != "fake_nvml.py" for f in _module_level_mutables(p)]
    assert found == []
