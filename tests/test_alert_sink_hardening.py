"""The alert sink under hostile and broken input (issue 11): only JSON, per-alert validation (good
alerts stored, bad ones named in a 4xx), stalled clients, TLS and basic auth from a web config, a
SIGHUP that would drop auth refused, port in use; and real Alertmanager 0.25 posting through TLS and
basic auth, its 4xx for a bad alert not retried."""

from __future__ import annotations

import base64
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from mlops_obs.children import free_port, http_get
from mlops_obs.children.alertmanager import AlertmanagerProcess
from mlops_obs.logs.alerts import AlertIntake, AlertReceiver
from mlops_obs.logs.store import EventStore, StoreSink
from mlops_obs.web import config as web_config
from mlops_obs.web.server import Limits
from tests.conftest import require_binary
from tests.test_exporter_web import HASH, PASSWORD, certs, client_context, write_web_config  # noqa: F401

WAIT = 30.0


def alert(i: int, rank: Any = "3", **over: Any) -> dict[str, Any]:
    labels = {"alertname": "TrainingStalled", "severity": "critical", "job": "train-a", "rank": rank, "node": "n7"}
    a = {"status": "firing", "labels": labels, "annotations": {"summary": f"alert {i}"},
         "startsAt": "2026-01-02T03:04:05.123Z", "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom/graph",
         "fingerprint": f"fp{i:06d}"}  # fmt: skip
    a.update(over)
    return a


def payload(alerts: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"version": "4", "groupKey": "{}:{}", "status": "firing", "receiver": "r", "alerts": alerts})


def post(url: str, body: bytes, ctype: str | None = "application/json", auth: tuple[str, str] | None = None,
         ctx: ssl.SSLContext | None = None) -> tuple[int, str]:  # fmt: skip
    req = urllib.request.Request(url, data=body, method="POST")
    if ctype is not None:
        req.add_header("Content-Type", ctype)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=WAIT, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[AlertReceiver, EventStore]]:
    target = StoreSink(tmp_path / "store")
    s = AlertReceiver(("127.0.0.1", 0), AlertIntake(target)).start()
    yield s, target.store
    s.stop()
    target.close()


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   None, "application/jsonx"])  # fmt: skip
def test_only_json_is_taken(sink: tuple[AlertReceiver, EventStore], ctype: str | None) -> None:
    """What a web page can make a browser post cross-site without a preflight is refused with 415."""
    s, store = sink
    code, text = post(s.url + "/alerts", payload([alert(1)]), ctype)
    assert code == 415 and "application/json" in text
    assert store.count() == 0
    assert post(s.url + "/alerts", payload([alert(1)]), "application/json; charset=utf-8")[0] == 200


def test_one_bad_alert_among_10k_costs_only_itself(sink: tuple[AlertReceiver, EventStore]) -> None:
    """The 9,999 good alerts are stored, the bad one named in a 422 (not retried by Alertmanager);
    the same notification again stores nothing twice."""
    s, store = sink
    alerts = [alert(i) for i in range(10_000)]
    alerts[4321] = alert(4321, rank="²")
    body = payload(alerts)
    code, text = post(s.url + "/alerts", body)
    assert code == 422, text
    assert "stored 9999 of 10000; rejected 1" in text and "alerts[4321]: labels.rank" in text and "'²'" in text
    assert store.count() == 9999
    code, text = post(s.url + "/alerts", body)
    assert code == 422 and "stored 0 of 10000" in text
    assert store.count() == 9999


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"labels": {"alertname": "A", "rank": "²"}}, "labels.rank must be a decimal number"),
        ({"labels": {"alertname": "A", "rank": "1" * 5000}}, "labels.rank must be a decimal number"),
        ({"labels": {"alertname": "A", "rank": "-1"}}, "labels.rank"),
        ({"labels": {"alertname": "A", "rank": "٣"}}, "labels.rank"),
        ({"labels": {"alertname": "A", "rank": 3}}, "labels.rank must be a string"),
        ({"labels": ["a"]}, "labels must be an object"),
        ({"annotations": {"summary": {"deep": 1}}}, "annotations.summary must be a string"),
        ({"startsAt": "yesterday"}, "startsAt is not an RFC 3339 time"),
        ({"startsAt": "9999999-01-01T00:00:00Z"}, "startsAt is not an RFC 3339 time"),
        ({"status": "resolved", "endsAt": "2026-13-45T00:00:00Z"}, "endsAt is not an RFC 3339 time"),
        ({"status": "exploded"}, "status must be firing or resolved"),
    ],
)
def test_hostile_alert_is_rejected_with_a_reason(sink: tuple[AlertReceiver, EventStore], bad: dict[str, Any],
                                                 why: str) -> None:  # fmt: skip
    """A bad alert next to a good one: the good one is stored, the bad one named; the connection answers."""
    s, store = sink
    code, text = post(s.url + "/alerts", payload([alert(0), alert(1, **bad)]))
    assert code == 422 and f"alerts[1]: {why}" in text, text
    assert len(text) < 400  # a 5000-digit rank is not echoed back whole
    assert [e["fields"]["fingerprint"] for e in store.query(kind="alert")] == ["fp000000"]


def test_not_an_alert_at_all_is_one_rejected_entry(sink: tuple[AlertReceiver, EventStore]) -> None:
    s, store = sink
    code, text = post(s.url + "/alerts", payload([alert(0), "x", None, 7]))  # type: ignore[list-item]
    assert code == 422 and "rejected 3" in text and "alerts[2]: must be an object" in text
    assert store.count() == 1


def test_stalled_posts_hold_no_thread_and_block_no_one(sink: tuple[AlertReceiver, EventStore]) -> None:
    """300 clients that send a POST's headers and then nothing: a real webhook still gets through, and
    the server holds them on its loop, not a thread each."""
    s, store = sink
    host, port = s.server_address
    stalled = []
    threads_before = threading.active_count()
    try:
        for _ in range(300):
            c = socket.create_connection((host, port), timeout=WAIT)
            c.sendall(b"POST /alerts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{")  # fmt: skip
            stalled.append(c)
        t0 = time.monotonic()
        assert post(s.url + "/alerts", payload([alert(1)]))[0] == 200
        assert time.monotonic() - t0 < 10.0
        assert threading.active_count() - threads_before < 40
    finally:
        for c in stalled:
            c.close()
    assert store.count() == 1


def test_stalled_body_gets_408_within_the_body_deadline(tmp_path: Path) -> None:
    target = StoreSink(tmp_path / "store")
    s = AlertReceiver(("127.0.0.1", 0), AlertIntake(target), limits=Limits(body_timeout=0.5)).start()
    try:
        with socket.create_connection(s.server_address, timeout=WAIT) as c:
            c.sendall(b"POST /alerts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")  # fmt: skip
            answer = c.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 ")
    finally:
        s.stop()
        target.close()


def test_tls_and_basic_auth(tmp_path: Path, certs: dict[str, Path]) -> None:  # noqa: F811
    wc = web_config.load(write_web_config(certs["dir"] / "alert-sink-web.yml", certs))
    target = StoreSink(tmp_path / "store")
    s = AlertReceiver(("127.0.0.1", 0), AlertIntake(target), web=wc).start()
    try:
        assert s.url.startswith("https://")
        ctx = client_context(certs)
        body = payload([alert(1)])
        assert post(s.url + "/alerts", body, ctx=ctx)[0] == 401
        assert post(s.url + "/alerts", body, ctx=ctx, auth=("prometheus", "wrong"))[0] == 401
        assert post(s.url + "/alerts", body, ctx=ctx, auth=("prometheus", "x" * 100))[0] == 401
        assert target.store.count() == 0
        assert post(s.url + "/alerts", body, ctx=ctx, auth=("prometheus", PASSWORD)) == (200, "stored 1 of 1\n")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            post(s.url.replace("https://", "http://") + "/alerts", body, auth=("prometheus", PASSWORD))
    finally:
        s.stop()
        target.close()


def _start_cli(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlops_obs", "alert-sink", f"--web.listen-address=127.0.0.1:{port}",
                             f"--store={tmp_path / 'store'}", *args], stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT
    while True:
        try:
            if http_get(url + "/-/healthy", timeout=1)[0] in (200, 401):
                return proc, url
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "alert-sink did not start"
        time.sleep(0.1)


def test_cli_sighup_keeps_auth_when_the_new_file_would_drop_it(tmp_path: Path) -> None:
    wc = tmp_path / "web.yml"
    write_web_config(wc, None)
    proc, url = _start_cli(tmp_path, f"--web.config.file={wc}")
    try:
        body = payload([alert(1)])
        assert post(url + "/alerts", body)[0] == 401
        wc.write_text("{}\n")  # would serve without auth
        proc.send_signal(signal.SIGHUP)
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        while "reload" not in line:
            line = proc.stderr.readline().decode()
        assert "refused" in line and "basic authentication off" in line
        assert post(url + "/alerts", body)[0] == 401
        assert post(url + "/alerts", body, auth=("prometheus", PASSWORD))[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_cli_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "mlops_obs", "alert-sink", f"--web.listen-address=127.0.0.1:{port}",
                              f"--store={tmp_path / 'store'}"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_cli_bad_web_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    wc = tmp_path / "web.yml"
    wc.write_text("basic_auth_users:\n  alice: plaintext\n")
    out = subprocess.run([sys.executable, "-m", "mlops_obs", "alert-sink", "--web.listen-address=127.0.0.1:0",
                          f"--store={tmp_path / 'store'}", f"--web.config.file={wc}"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "no bcrypt hash" in out.stderr


def _am_post(am: AlertmanagerProcess, alerts: list[dict[str, Any]]) -> None:
    req = urllib.request.Request(am.url + "/api/v2/alerts", data=orjson.dumps(alerts), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        assert r.status == 200


def test_real_alertmanager_through_tls_and_auth_and_a_bad_alert_is_not_retried(
    tmp_path: Path,
    certs: dict[str, Path],  # noqa: F811
) -> None:
    """Alertmanager 0.25 posts to the sink over TLS with basic auth; a group holding a bad alert
    (rank "²") gets a 422 once: its good alert is stored and the group is not re-sent."""
    require_binary("prometheus-alertmanager")
    wc = web_config.load(write_web_config(certs["dir"] / "alert-sink-am.yml", certs))
    target = StoreSink(tmp_path / "store")
    requests: list[int] = []
    seen = threading.Condition()

    class Counting(AlertIntake):
        def handle(self, raw: bytes) -> tuple[int, str]:
            code, text = super().handle(raw)
            with seen:
                requests.append(code)
                seen.notify_all()
            return code, text

    s = AlertReceiver(("127.0.0.1", 0), Counting(target), web=wc).start()
    config = {
        "route": {"receiver": "sink", "group_by": ["group"], "group_wait": "100ms", "group_interval": "1h",
                  "repeat_interval": "4h"},
        "receivers": [{"name": "sink", "webhook_configs": [{
            "url": s.url + "/alerts", "send_resolved": True,
            "http_config": {"basic_auth": {"username": "prometheus", "password": PASSWORD},
                            "tls_config": {"ca_file": str(certs["server_crt"]), "server_name": "localhost"}},
        }]}],
    }  # fmt: skip
    am = AlertmanagerProcess(tmp_path / "am", config).start()
    try:
        _am_post(am, [{"labels": {"alertname": "Bad", "group": "one", "rank": "²"}},
                      {"labels": {"alertname": "Good", "group": "one", "rank": "3"}}])  # fmt: skip
        with seen:
            assert seen.wait_for(lambda: len(requests) >= 1, timeout=WAIT)
        _am_post(am, [{"labels": {"alertname": "Later", "group": "two", "rank": "1"}}])
        with seen:
            assert seen.wait_for(lambda: len(requests) >= 2, timeout=WAIT)
        time.sleep(2.0)  # Alertmanager's first retry of a failed notification comes well within this
        assert requests == [422, 200], requests
        names = sorted(e["fields"]["alertname"] for e in target.store.query(kind="alert"))
        assert names == ["Good", "Later"]
    finally:
        am.stop()
        s.stop()
        target.close()
