"""The sink layer: one protocol both backends implement fully (the shipper's column batch included),
one place that chooses the backend, delivery bounded in time for the alert intake, and the layering
of the logs package (the shipper knows no concrete sink)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from mlops_obs.config import ConfigError
from mlops_obs.logs.alerts import send_within
from mlops_obs.logs.backend import Backend, open_sink
from mlops_obs.logs.opensearch import OpenSearchSink
from mlops_obs.logs.sink import ParsedEvents, Stats, Stop
from mlops_obs.logs.store import EventStore, StoreSink
from tests.fake_opensearch import FakeOpenSearch
from tests.logs_helpers import REPO


def _batch(n: int, prefix: str = "0123456789abcdef0123", source: str = "/logs/j-rank1.jsonl") -> ParsedEvents:
    b = ParsedEvents()
    for i in range(n):
        b.append({"@timestamp": f"2026-03-04T00:00:{i % 60:02d}.{i:06d}Z", "job": "j", "rank": 1, "node": "n1",
                  "level": "warning" if i % 7 == 0 else "info", "message": f"line {i}", "seq": i + 1,
                  "offset": i * 100, "fields": {"step": i}})  # fmt: skip
    b.runs.append((prefix, source, 0, n))
    return b


def _cfg(**kw: Any) -> dict[str, Any]:
    """The ship command's settings resolved from ``kw`` (``opensearch_password_file`` for
    ``opensearch.password-file``)."""
    from mlops_obs.commands.ship import SHIP_SETTINGS
    from mlops_obs.config import resolve

    return dict(resolve(SHIP_SETTINGS, {k.replace("_", ".", 1).replace("_", "-"): v for k, v in kw.items()},
                        environ={}))  # fmt: skip


def test_both_sinks_take_the_column_batch_and_dicts_alike(tmp_path: Path) -> None:
    """The shipper's ParsedEvents and the same events as dicts store the same events in either backend,
    and a re-send stores nothing new (the idempotence every sink promises)."""
    batch = _batch(50)
    dicts = batch.dicts()
    store = open_sink(Backend(store=tmp_path / "a"))
    assert store.send(batch, threading.Event()) == 50
    assert store.send(batch, threading.Event()) == 0
    store.close()
    with EventStore(tmp_path / "b") as ref:
        ref.put(dicts)
        want = ref.query()
    with EventStore(tmp_path / "a") as got:
        assert got.query() == want

    fake = FakeOpenSearch().start()
    try:
        stats = Stats()
        os_sink = open_sink(Backend.from_config(_cfg(opensearch=fake.url, state=str(tmp_path / "st"))), stats=stats)
        assert os_sink.send(batch, threading.Event()) == 50
        os_sink.send(dicts, threading.Event())  # a repeat answers 409: held once
        docs = fake.all_docs()
        assert fake.count() == 50 and stats.retries == 0
        from mlops_obs.logs.opensearch import event_of  # the document less the fields the sink adds for readers

        assert [
            event_of({"_id": k, "_source": v}) for k, v in sorted(docs.items(), key=lambda kv: kv[1]["offset"])
        ] == sorted(want, key=lambda e: e["offset"])
        os_sink.close()
    finally:
        fake.stop()


def test_backend_choice_is_one_place(tmp_path: Path) -> None:
    """store xor OpenSearch; a default store for ship; OpenSearch needs a state directory to write."""
    with pytest.raises(ConfigError, match="not both"):
        Backend.from_config(_cfg(store=str(tmp_path), opensearch="http://127.0.0.1:9"))
    with pytest.raises(ConfigError, match="--store DIR or --opensearch URL"):
        Backend.from_config(_cfg())
    assert Backend.from_config(_cfg(), default_store=tmp_path / "d").store == tmp_path / "d"
    b = Backend.from_config(_cfg(opensearch="http://127.0.0.1:9"))
    assert b.opensearch is not None and b.opensearch.state_dir is None and str(b) == "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match="needs --state"):
        open_sink(b)
    sink = open_sink(Backend.from_config(_cfg(opensearch="http://127.0.0.1:9", state=str(tmp_path / "s"))))
    assert isinstance(sink, OpenSearchSink) and (tmp_path / "s").is_dir()
    sink.close()
    sink = open_sink(Backend.from_config(_cfg(store=str(tmp_path / "st"))))
    assert isinstance(sink, StoreSink)
    sink.close()
    pw = tmp_path / "missing-password"
    with pytest.raises(ValueError, match="password-file"):
        Backend.from_config(_cfg(opensearch="http://127.0.0.1:9", opensearch_password_file=str(pw)))


def test_store_sink_retries_until_stopped_and_says_why(tmp_path: Path) -> None:
    """A store that cannot write is retried (counted) until stop; Stop carries the SQLite error, which
    the alert intake's bounded send raises as itself (so its 503 names it)."""
    sink = StoreSink(tmp_path, stats=Stats())
    sink.store.close()  # every put now fails with sqlite3.ProgrammingError (a sqlite3.Error)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(Stop) as info:
        sink.send(_batch(3), stop)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert sink.stats is not None and sink.stats.retries >= 2
    with pytest.raises(sqlite3.Error):
        send_within(sink, _batch(3), 0.0)


def test_send_within_times_out_a_sink_without_an_error_of_its_own() -> None:
    class Slow:
        def send(self, events: Any, stop: threading.Event) -> int:
            stop.wait()
            raise Stop() from None

        def close(self) -> None:
            pass

    with pytest.raises(TimeoutError, match=r"within 0\.2s"):
        send_within(Slow(), [], 0.2)


def test_logs_package_is_layered() -> None:
    """sink.py is the ground floor (no sibling imported); the shipper and the alert intake import no
    concrete sink; the store and OpenSearch stand on the sink layer, not on the shipper; only the
    commands know backend.py. Each module is imported in a fresh interpreter, beside what the package
    itself imports (the job-side set-up); tests/test_import_graph.py covers lazy imports too."""
    deps: dict[str, set[str]] = {}
    for name in ("sink", "source", "shipper", "alerts", "store", "opensearch", "backend"):
        code = (
            "import sys, mlops_obs.logs\n"
            "base = set(sys.modules)\n"
            f"import mlops_obs.logs.{name}\n"
            f"print(' '.join(m for m in set(sys.modules) - base if m.startswith('mlops_obs.logs.')))"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert res.returncode == 0, res.stderr
        deps[name] = {m.rsplit(".", 1)[1] for m in res.stdout.split()} - {name}
    assert deps["sink"] == set()
    assert deps["source"] == {"sink"}
    for name in ("shipper", "alerts"):
        assert not deps[name] & {"store", "opensearch", "backend"}, (name, deps[name])
    for name in ("store", "opensearch"):
        assert not deps[name] & {"shipper", "follow", "batch", "backend"}, (name, deps[name])
    assert {"store", "opensearch", "sink", "source"} <= deps["backend"]
