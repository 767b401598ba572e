"""``mlops-obs rca``'s promises as a command: its exit codes, one-line errors and never a traceback,
the Prometheus client's failures (against real sockets), and the text a person reads."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from mlops_obs.logs.store import DB_NAME, EventStore
from mlops_obs.rca.prometheus import Prometheus, PrometheusError
from tests.rca_helpers import Job
from tests.test_rca_patterns import GLOO_CLOSED

ROOT = Path(__file__).resolve().parent.parent


def rca(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "mlops_obs", "rca", *args], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr
    return r


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rca-cli") / "store"
    ok = Job(name="ok", world=2)
    ok.start()
    ok.finish(ok.steps(0, 20, 1.0))
    bad = Job(name="bad", world=2)
    bad.start()
    t = bad.steps(0, 20, 1.0)
    bad.ev(1, t, "rank failed", "error", step=21, error="ValueError: label out of range")
    bad.ev(0, t + 0.3, "rank failed", "error", step=21, error=GLOO_CLOSED)
    odd = Job(name="odd", world=2)
    odd.start()
    t = odd.steps(0, 20, 1.0)
    for r in (0, 1):  # both lost a peer, yet none is missing: nothing says which peer or why
        odd.ev(r, t + r * 0.1, "rank failed", "error", step=21, error=GLOO_CLOSED)
    with EventStore(d) as s:
        s.put(ok.events + bad.events + odd.events)
    return d


def test_exit_codes_by_verdict(store: Path) -> None:
    r = rca("--store", str(store), "--job", "ok")
    assert r.returncode == 0 and r.stdout.startswith("job ok: HEALTHY: every rank (2) finished, last step 20")
    r = rca("--store", str(store), "--job", "bad")
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines()[:2] == [
        f"job bad: FAULT: crash (rank 1, node n1, step 21, {r.stdout.split(', ')[3].split(';')[0]}; confidence high)",
        "  rank 1 crashed at step 21: ValueError: label out of range",
    ]
    assert "peer_lost" in r.stdout
    r = rca("--store", str(store), "--job", "odd", "--json")
    assert r.returncode == 3
    got = orjson.loads(r.stdout)
    assert (got["verdict"], got["root_cause"]["kind"]) == ("unknown", "unknown")
    assert got["root_cause"]["evidence"][0]["rank"] == 0


def test_usage_errors_are_exit_2_in_one_line(store: Path, tmp_path: Path) -> None:
    for args, why in [
        ((), "job: required"),
        (("--job", "bad", "--since", "yesterday"), "since:"),
        (("--job", "bad", "--prometheus", "localhost:9090"), "prometheus:"),
        (("--job", "bad", "--store", str(store), "--bundle", str(tmp_path / "b.tar.gz")), "give one of"),
        (("--job", "bad", "--no-such-flag"), "unrecognized arguments"),
    ]:
        r = rca(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, (args, r.stderr)


@pytest.fixture
def garbage_server() -> Iterator[str]:
    """A real HTTP server on loopback that is not Prometheus (an HTML page for everything)."""

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = b"<html>login</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cannot_run_is_exit_4_in_one_line(store: Path, tmp_path: Path, garbage_server: str) -> None:
    down = f"http://127.0.0.1:{_closed_port()}"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / DB_NAME).write_bytes(b"this is not a database" * 100)
    for args, why in [
        (("--store", str(tmp_path / "nothing"), "--job", "bad"), "no event store there"),
        (("--store", str(corrupt), "--job", "bad"), "cannot read the store"),
        (("--store", str(store), "--job", "missing"), "no events of job 'missing'"),
        (("--store", str(store), "--job", "bad", "--prometheus", down), "Connection refused"),
        (("--store", str(store), "--job", "bad", "--prometheus", garbage_server), "not JSON (is this Prometheus?)"),
        (("--store", str(store), "--job", "bad", "--html", str(tmp_path / "no-dir" / "r.html")), "--html"),
    ]:
        r = rca(*args)
        assert r.returncode == 4 and r.stderr.count("\n") == 1 and why in r.stderr, (args, r.stderr)
    assert not (tmp_path / "nothing").exists()  # reading never creates a store


def test_prometheus_client_errors_name_server_and_query(garbage_server: str) -> None:
    down = Prometheus(f"http://127.0.0.1:{_closed_port()}", timeout=2)
    with pytest.raises(PrometheusError, match=r"^prometheus http://127\.0\.0\.1:\d+: query_range up: .*refused"):
        down.query_range("up", 0, 10, 1)
    with pytest.raises(PrometheusError, match="not JSON"):
        Prometheus(garbage_server).query("up", 0)
    with pytest.raises(PrometheusError, match="expected an http"):
        Prometheus("ftp://x")
