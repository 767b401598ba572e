"""alert-sink over real HTTP into the real event store: v4 payloads, idempotent redelivery, bad input."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from mlops_obs.logs.alerts import AlertIntake, AlertReceiver, alert_events
from mlops_obs.logs.store import EventStore, StoreSink


def _payload(status: str = "firing", ends: str = "0001-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "version": "4", "groupKey": "{}:{job=\"train-a\"}", "status": status, "receiver": "critical",
        "groupLabels": {"job": "train-a"}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am",
        "truncatedAlerts": 0,
        "alerts": [{
            "status": status,
            "labels": {"alertname": "TrainingStalled", "severity": "critical", "job": "train-a", "rank": "3",
                       "node": "n7", "instance": "n7:9477"},
            "annotations": {"summary": "Rank 3 of job train-a has stopped making progress", "runbook_url": "x#y"},
            "startsAt": "2026-01-02T03:04:05.123Z", "endsAt": ends, "generatorURL": "http://prom/graph",
            "fingerprint": "abc123",
        }],
    }  # fmt: skip


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[AlertReceiver, EventStore]]:
    target = StoreSink(tmp_path / "store")
    s = AlertReceiver(("127.0.0.1", 0), AlertIntake(target)).start()
    yield s, target.store
    s.stop()
    target.close()


def _post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_redelivery_is_idempotent_and_resolve_is_new(sink: tuple[AlertReceiver, EventStore]) -> None:
    """The same notification twice stores one event; its resolve is a second event at endsAt."""
    s, store = sink
    body = orjson.dumps(_payload())
    assert _post(s.url + "/alerts", body) == (200, "stored 1 of 1\n")
    assert _post(s.url + "/alerts", body) == (200, "stored 0 of 1\n")
    resolved = orjson.dumps(_payload("resolved", "2026-01-02T03:09:00Z"))
    assert _post(s.url + "/alerts", resolved)[0] == 200
    events = store.query(kind="alert")
    assert [e["fields"]["status"] for e in events] == ["firing", "resolved"]
    first = events[0]
    assert first["job"] == "train-a" and first["rank"] == 3 and first["node"] == "n7"
    assert first["level"] == "critical" and first["@timestamp"] == "2026-01-02T03:04:05.123000Z"
    assert first["fields"]["alertname"] == "TrainingStalled" and first["fields"]["labels"]["instance"] == "n7:9477"
    assert first["message"] == "[FIRING] TrainingStalled: Rank 3 of job train-a has stopped making progress"
    assert events[1]["@timestamp"] == "2026-01-02T03:09:00.000000Z" and events[1]["level"] == "info"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{not json", "not JSON"),
        (orjson.dumps({**_payload(), "version": "3"}), "version"),
        (orjson.dumps({**_payload(), "alerts": {}}), "alerts must be a list"),
        (orjson.dumps({**_payload(), "alerts": [{"labels": {}, "status": "firing"}]}), "startsAt"),
    ],
)
def test_bad_payloads_are_rejected_with_a_reason(sink: tuple[AlertReceiver, EventStore], body: bytes, why: str) -> None:
    s, store = sink
    code, text = _post(s.url + "/alerts", body)
    assert code == (422 if why == "startsAt" else 400) and why in text  # 422: the notification parsed, an alert did not
    assert store.count() == 0


def test_store_failure_makes_alertmanager_retry(tmp_path: Path) -> None:
    """A store that cannot write answers 503 (Alertmanager retries) instead of dropping the alert."""

    class Broken:
        def send(self, events: Any, stop: Any) -> int:
            raise OSError("disk full")

        def close(self) -> None:
            pass

    s = AlertReceiver(("127.0.0.1", 0), AlertIntake(Broken())).start()
    try:
        assert _post(s.url + "/alerts", orjson.dumps(_payload()))[0] == 503
    finally:
        s.stop()


def test_events_fit_the_store_schema() -> None:
    events, rejected = alert_events(_payload())
    ev = events[0]
    assert rejected == []
    assert ev["kind"] == "alert" and ev["offset"] == 0 and ev["_id"].startswith("alert-")


def test_cli_without_store_is_one_line_error() -> None:
    out = subprocess.run([sys.executable, "-m", "mlops_obs", "alert-sink"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "store" in out.stderr


def test_opensearch_sink_idempotent_and_503_when_down(tmp_path: Path) -> None:
    """--opensearch: alerts land once (create with our _id); an unavailable cluster answers 503 within the
    deadline, and the redelivery after it recovers is stored."""
    from mlops_obs.commands.alert_sink import ALERT_SINK_SETTINGS
    from mlops_obs.config import resolve
    from mlops_obs.logs.backend import Backend, open_sink
    from tests.fake_opensearch import FakeOpenSearch

    fake = FakeOpenSearch().start()
    cfg = resolve(ALERT_SINK_SETTINGS, {"opensearch": fake.url, "state": str(tmp_path), "opensearch.deadline": "1s",
                                        "opensearch.backoff-max": "0.2s"}, environ={})  # fmt: skip
    target = open_sink(Backend.from_config(cfg))
    s = AlertReceiver(("127.0.0.1", 0), AlertIntake(target, deadline=cfg["opensearch.deadline"])).start()
    try:
        body = orjson.dumps(_payload())
        assert _post(s.url + "/alerts", body)[0] == 200
        assert _post(s.url + "/alerts", body)[0] == 200
        docs = list(fake.all_docs().values())
        assert len(docs) == 1 and docs[0]["kind"] == "alert" and docs[0]["fields"]["alertname"] == "TrainingStalled"
        fake.request_faults.extend([503] * 1000)  # the cluster answers but is unavailable
        resolved = orjson.dumps(_payload("resolved", "2026-01-02T03:09:00Z"))
        assert _post(s.url + "/alerts", resolved)[0] == 503
        fake.request_faults.clear()
        assert _post(s.url + "/alerts", resolved)[0] == 200  # Alertmanager's redelivery
        assert len(fake.all_docs()) == 2
    finally:
        s.stop()
        fake.stop()


def test_cli_receives_and_stops_cleanly(tmp_path: Path) -> None:
    """`mlops-obs alert-sink --store DIR` serves webhooks, and SIGTERM exits 0 with the alert committed."""
    import signal
    import time

    from mlops_obs.children import free_port, http_get

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlops_obs", "alert-sink", f"--web.listen-address=127.0.0.1:{port}",
                             f"--store={tmp_path / 'store'}"], stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_get(f"http://127.0.0.1:{port}/-/ready", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "alert-sink did not start"
            time.sleep(0.1)
        assert _post(f"http://127.0.0.1:{port}/alerts", orjson.dumps(_payload()))[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    with EventStore(tmp_path / "store") as store:
        assert [e["fields"]["alertname"] for e in store.query(kind="alert")] == ["TrainingStalled"]
