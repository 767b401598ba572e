"""The verdict over real runs (the bundles in tests/fixtures/rca were made by `mlops-obs bundle` from this
repository's workload, shipped logs and a real Prometheus) and over jobs written the way torch, NCCL,
the kernel and the alert sink write them, for the kinds a CPU machine cannot produce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlops_obs.logs.store import EventStore
from mlops_obs.rca.bundle import Bundle
from mlops_obs.rca.detectors import DETECTORS
from mlops_obs.rca.metrics import MetricEvidence
from mlops_obs.rca.prometheus import Series
from mlops_obs.rca.sources import ChunkStore, EventStream
from mlops_obs.rca.times import stamp
from mlops_obs.rca.verdict import analyse
from tests.rca_helpers import T0, Job
from tests.test_rca_patterns import GLOO_CLOSED, GLOO_TIMEOUT, NCCL_WATCHDOG

FIXTURES = Path(__file__).parent / "fixtures" / "rca"


def verdict(job: Job, metrics: MetricEvidence | None = None, now: float | None = None) -> dict[str, Any]:
    report, _ = analyse(job.source(), job.name, metrics=metrics, now=stamp(T0 + now) if now is not None else None)
    return report.to_json()


def root(report: dict[str, Any]) -> tuple[str, int | None, int | None]:
    r = report["root_cause"]
    return (r["kind"], r["rank"], r["step"]) if r else (report["verdict"], None, None)


# --- real runs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "want", "symptoms", "other"),
    [
        ("crashj", ("crash", 1, 5), {(0, "peer_lost")}, set()),
        ("nanj", ("nan_loss", 0, 4), {(1, "peer_lost")}, set()),
        ("stallj", ("stall", 1, 5), {(0, "collective_timeout")}, set()),
        ("strag", ("straggler", 1, None), set(), set()),
        ("slow", ("data_starvation", 3, None), set(), set()),
        ("scrash", ("crash", 3, 25), {(0, "peer_lost"), (2, "peer_lost")}, {("straggler", 1)}),
    ],
)
def test_real_runs_from_their_bundles(job: str, want: tuple[Any, ...], symptoms: set[Any], other: set[Any]) -> None:
    b = Bundle(FIXTURES / f"{job}.tar.gz")
    report, _ = analyse(EventStream(b.events), job, metrics=b.metrics(), now=b.manifest["created"])
    got = report.to_json()
    assert root(got) == want, got["root_cause"]
    assert {(s["rank"], s["kind"]) for s in got["symptoms"]} == symptoms
    assert {(o["kind"], o["rank"]) for o in got["other_findings"]} == other
    ev = got["root_cause"]["evidence"]
    assert ev and all(e["source"] in ("log", "alert", "metric", "stack", "launcher") and e["ref"] for e in ev)
    assert got["timeline"] == sorted(got["timeline"], key=lambda e: (e["@timestamp"], e["source"], e["offset"]))
    assert all(e["job"] == job for e in got["timeline"])
    b.close()


def test_store_fast_path_gives_the_verdict_of_a_full_pass(tmp_path: Path) -> None:
    """The chunk queries decode only what the facts need, and agree with reading everything."""
    for job in ("crashj", "nanj", "stallj", "scrash"):
        b = Bundle(FIXTURES / f"{job}.tar.gz")
        evs = list(b.events())
        with EventStore(tmp_path / job) as s:
            for i in range(0, len(evs), 7):  # several puts: several chunks per rank
                s.put(evs[i : i + 7])
        fast = ChunkStore(tmp_path / job)
        a, _ = analyse(fast, job, now=b.manifest["created"])
        c, _ = analyse(EventStream(lambda evs=evs: evs), job, now=b.manifest["created"])  # type: ignore[misc]
        assert a.to_json() == c.to_json(), job
        fast.close()


# --- kinds a CPU machine cannot produce, as their real text reads ------------------------------------


def test_nccl_watchdog_names_the_rank_missing_from_the_collective() -> None:
    j = Job(world=4)
    j.start()
    t = j.steps(0, 99, 1.0)
    j.steps(100, 100, t, ranks=[0, 1, 3])  # rank 2 never finishes step 100
    for r in (0, 1, 3):
        j.ev(
            r, t + 600.1, NCCL_WATCHDOG.replace("Rank 3", f"Rank {r}").replace("rank3", f"rank{r}"), "error", raw=False
        )
    got = verdict(j)
    assert root(got) == ("stall", 2, 100), got["root_cause"]
    assert got["root_cause"]["time"] < stamp(T0 + t + 1)  # the watchdog's start, not its report
    assert {(s["rank"], s["kind"]) for s in got["symptoms"]} == {(0, "collective_timeout"), (1, "collective_timeout"),
                                                                  (3, "collective_timeout")}  # fmt: skip


def test_gpu_xid_on_the_node_explains_the_crash_that_follows() -> None:
    j = Job(world=4, nodes={0: "n1", 1: "n1", 2: "n2", 3: "n2"})
    j.start()
    t = j.steps(0, 40, 1.0)
    j.ev(None, t + 0.2, "NVRM: Xid (PCI:0000:3b:00): 79, pid=1003, GPU has fallen off the bus.", "error",
         node="n2", job=None, source="/var/log/kern.log")  # fmt: skip
    j.ev(3, t + 0.5, "rank failed", "error", step=41, error="RuntimeError: CUDA error: unspecified launch failure")
    for r in (0, 1, 2):
        j.ev(r, t + 1.0, "rank failed", "error", step=41, error=GLOO_CLOSED)
    got = verdict(j)
    assert root(got)[:2] == ("gpu_xid", 3), got["root_cause"]
    assert got["root_cause"]["node"] == "n2"
    assert any("unspecified launch failure" in e["text"] for e in got["root_cause"]["evidence"])
    assert {(s["kind"], s["rank"]) for s in got["symptoms"]} == {("peer_lost", 0), ("peer_lost", 1), ("peer_lost", 2)}


def test_sigkill_under_memory_pressure_is_the_oom_killer() -> None:
    j = Job(world=2)
    j.start()
    t = j.steps(0, 30, 1.0)
    j.alert(t - 20, "NodeMemoryPressure", node="n1")
    j.ev(1, t + 0.3, "rank exited", "error", kind="launcher", source="/logs/launcher.jsonl", exit_code=-9,
         signal="SIGKILL")  # fmt: skip
    j.ev(0, t + 0.4, "rank failed", "error", step=31, error=GLOO_CLOSED)
    got = verdict(j)
    assert root(got)[:2] == ("oom_killed", 1), got["root_cause"]
    assert {e["source"] for e in got["root_cause"]["evidence"]} >= {"alert", "launcher"}


def test_disk_full_and_cuda_oom_are_their_own_kinds() -> None:
    for text, kind in (("OSError: [Errno 28] No space left on device: '/ckpt/step_30.pt'", "disk_full"),
                       ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.", "oom")):  # fmt: skip
        j = Job(world=2)
        j.start()
        t = j.steps(0, 30, 1.0)
        j.ev(0, t, "rank failed", "error", step=31, error=text)
        j.ev(1, t + 0.5, "rank failed", "error", step=31, error=GLOO_CLOSED)
        assert root(verdict(j)) == (kind, 0, 31)


def test_everyone_timing_out_with_nobody_missing_is_a_collective_timeout_at_low_confidence() -> None:
    j = Job(world=2)
    j.start()
    t = j.steps(0, 10, 1.0)
    for r in (0, 1):
        j.ev(r, t + 5, "rank failed", "error", step=11, error=GLOO_TIMEOUT)
    got = verdict(j)
    assert (got["verdict"], root(got)[0], got["root_cause"]["confidence"]) == ("fault", "collective_timeout", "low")


def test_an_error_that_names_nothing_is_unknown_with_its_evidence() -> None:
    j = Job(world=2)
    j.start()
    t = j.steps(0, 10, 1.0)
    j.ev(1, t, "lost the plot", "error")
    j.steps(11, 12, t + 0.1, ranks=[0])
    got = verdict(j, now=t + 1)
    assert (got["verdict"], root(got)[:2]) == ("unknown", ("unknown", 1))
    assert "lost the plot" in got["root_cause"]["evidence"][0]["text"]


def test_a_silent_job_is_a_stall_and_the_stacks_name_the_rank() -> None:
    j = Job(world=2)
    j.start()
    t = j.steps(0, 20, 1.0)
    assert root(verdict(j, now=t + 5)) == ("healthy", None, None)  # still within its cadence
    hung = verdict(j, now=t + 900)
    assert (root(hung), hung["root_cause"]["confidence"]) == (("stall", None, None), "low")
    for r, name in ((0, "faulthandler-allreduce.txt"), (1, "faulthandler-hang.txt")):
        j.ev(r, t + 60, (FIXTURES / name).read_text(), "warning", kind="stack", source=f"/logs/j-rank{r}.stack")
    got = verdict(j, now=t + 900)
    assert (root(got), got["root_cause"]["confidence"]) == (("stall", 1, 21), "high")
    assert "`_hang` at hang.py:8" in got["root_cause"]["summary"]
    assert "`all_reduce` at torch/distributed/distributed_c10d.py:3252" in got["root_cause"]["summary"]


def test_healthy_job_and_other_findings() -> None:
    j = Job(world=2)
    j.start()
    t = j.steps(0, 20, 1.0)
    j.finish(t)
    assert verdict(j) == {**verdict(j), "verdict": "healthy", "root_cause": None, "symptoms": [], "other_findings": []}
    # An alert about another node or another job is not this job's.
    j.alert(t - 1, "GpuXidCritical", node="elsewhere")
    j.alert(t - 1, "TrainingNonFiniteLoss", rank=0, job="other-job")
    assert verdict(j)["verdict"] == "healthy"
    j.alert(t - 5, "GpuThermalThrottling", node="n1")
    got = verdict(j)
    assert (got["verdict"], root(got)[0]) == ("fault", "thermal_throttle")


# --- metric detectors on series shaped as Prometheus returns them -------------------------------------


def _series(name: str, points: list[tuple[float, float]], **labels: str) -> Series:
    return Series({"__name__": name, "instance": "n2:9477", **labels}, [(T0 + t, v) for t, v in points])


def test_metric_xid_counter_appearing_at_one_is_an_xid() -> None:
    j = Job(world=2, nodes={0: "n1", 1: "n2"})
    j.start()
    t = j.steps(0, 30, 1.0)
    j.ev(1, t + 1, "rank failed", "error", step=31, error="RuntimeError: CUDA error: an illegal memory access")
    j.ev(0, t + 1.5, "rank failed", "error", step=31, error=GLOO_CLOSED)
    m = MetricEvidence(start=T0 - 600, end=T0 + t + 300, step=1.0)
    m.series["training"] = [_series("mlops_training_steps_total", [(1, 0), (t, 31)], job="j", rank="1", node="n2")]
    m.series["gpu"] = [
        _series("mlops_gpu_xid_errors_total", [(t + 0.5, 1), (t + 2, 1)], gpu="0", xid="79"),  # appears at 1
        _series("mlops_gpu_utilization_ratio", [(1, 0.9), (t, 0.9)], gpu="0", job="j", rank="1"),
    ]
    m.queries = {"training": "q-training", "gpu": "q-gpu"}
    got = verdict(j, metrics=m)
    assert root(got)[:2] == ("gpu_xid", 1), got["root_cause"]
    assert any(e["source"] == "metric" and e["ref"] == "q-gpu" for e in got["root_cause"]["evidence"])


def test_exporter_down_is_node_down_only_when_its_ranks_went_silent_with_it() -> None:
    j = Job(world=2, nodes={0: "n1", 1: "n2"})
    j.start()
    t = j.steps(0, 30, 1.0)
    j.steps(31, 40, t, ranks=[0])
    j.ev(0, t + 0.6, "rank failed", "error", step=41, error=GLOO_TIMEOUT)
    m = MetricEvidence(start=T0 - 600, end=T0 + t + 300, step=1.0)
    m.series["training"] = [_series("mlops_training_steps_total", [(1, 0), (t, 31)], job="j", rank="1", node="n2")]
    m.series["up"] = [_series("up", [(1, 1), (t - 1, 1), (t + 1, 0), (t + 10, 0)])]
    m.queries = {"up": "up{...}"}
    got = verdict(j, metrics=m)
    assert root(got)[0] == "node_down" and got["root_cause"]["node"] == "n2", got["root_cause"]


def test_every_detector_is_registered_once_with_a_known_evidence_need() -> None:
    names = [d.name for d in DETECTORS]
    assert len(names) == len(set(names)) and len(names) >= 12
    assert {d.needs for d in DETECTORS} <= {"logs", "metrics"}


# --- alerts ---------------------------------------------------------------------------------------------


def test_every_mixin_alert_is_evidence_of_a_kind_or_listed_as_not() -> None:
    from mlops_obs.mixin.config import MixinConfig
    from mlops_obs.mixin.rules import alerts
    from mlops_obs.rca.detectors.alerts import ALERT_KINDS, NOT_EVIDENCE, kind_of

    names = {a.name for a in alerts(MixinConfig())}
    assert not set(ALERT_KINDS) & set(NOT_EVIDENCE)
    assert names - set(ALERT_KINDS) - set(NOT_EVIDENCE) == set(), "classify these alerts for rca"
    assert set(ALERT_KINDS) | set(NOT_EVIDENCE) == names, "rca lists alerts the mixin no longer defines"
    for name in NOT_EVIDENCE:  # not evidence, even where a shape for other rule sets' names would match
        assert kind_of(name) is None
    assert kind_of("NodeDown") == ("node_down", "fault")  # another rule set's name, by its shape


@pytest.mark.parametrize(
    ("alert", "labels", "want"),
    [
        ("TrainingRankFailed", {"rank": 1, "node": "n2"}, ("crash", 1)),
        ("TrainingNodeDown", {"rank": 1, "node": "n2"}, ("node_down", 1)),
        ("TrainingStalledRankMissing", {}, ("stall", None)),
        ("GpuMissing", {"node": "n2"}, ("gpu_xid", None)),
    ],
)
def test_mixin_alerts_name_their_kind(alert: str, labels: dict[str, Any], want: tuple[str, int | None]) -> None:
    j = Job(world=2, nodes={0: "n1", 1: "n2"})
    j.start()
    t = j.steps(0, 20, 1.0)
    j.alert(t + 1, alert, job=j.name, severity="critical", **labels)
    got = verdict(j, now=t + 2)  # before the silence alone would read as a hang
    assert (got["verdict"], root(got)[:2]) == ("fault", want), got["root_cause"]
    assert got["root_cause"]["evidence"][0]["source"] == "alert"


def test_pipeline_alerts_are_not_a_verdict() -> None:
    j = Job(world=2, nodes={0: "n1", 1: "n2"})
    j.start()
    t = j.steps(0, 20, 1.0)
    j.finish(t)
    j.alert(t - 5, "MlopsExporterDown", node="n2", severity="critical")
    j.alert(t - 5, "TrainingThroughputRegression", job=j.name)
    assert verdict(j)["verdict"] == "healthy"
