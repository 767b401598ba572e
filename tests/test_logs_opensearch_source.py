"""Reading OpenSearch back: the template and ISM bodies OpenSearch accepts, the point-in-time paging in
the store's order (the same files shipped into both), no duplicate across an index boundary after a
retry, follow (by the time each event was stored: late shippers, skewed clocks, the refresh margin,
indices from before the ingest pipeline), the per-rank aggregations, and rca's verdict through
OpenSearch equal to the store's.

Page sizes are small so every read crosses many pages."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from mlops_obs.logs.alerts import alert_events
from mlops_obs.logs.backend import Backend, open_source
from mlops_obs.logs.opensearch import (
    INGESTED,
    MESSAGE_KEYWORD_CHARS,
    OpenSearchSettings,
    OpenSearchSink,
    OpenSearchSource,
    ingest_time_ns,
    ism_policy_body,
    query_body,
    template_body,
)
from mlops_obs.logs.shipper import Shipper, ShipperOptions
from mlops_obs.logs.source import EventQuery
from mlops_obs.logs.store import StoreSink, StoreSource
from tests.conftest import RealOpenSearch, wait_for
from tests.fake_opensearch import KNOWN_TYPES, FakeOpenSearch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "rca"
FILTERED = ("@timestamp", "kind", "job", "rank", "node", "level", "source", "offset", "seq", "step")


@pytest.fixture
def fake() -> Iterator[FakeOpenSearch]:
    f = FakeOpenSearch().start()
    yield f
    f.stop()


def _settings(fake: FakeOpenSearch, tmp_path: Path) -> OpenSearchSettings:
    return OpenSearchSettings(url=fake.url, state_dir=tmp_path / "os-state", backoff_max_s=0.05, timeout_s=1.0)


def _source(fake: FakeOpenSearch, tmp_path: Path, page: int = 7) -> OpenSearchSource:
    return OpenSearchSource(_settings(fake, tmp_path), page_size=page)


# --- the bodies ---------------------------------------------------------------------------------------------


def _types(mapping: dict[str, Any]) -> Iterator[str]:
    for spec in mapping.get("properties", {}).values():
        yield spec.get("type", "object")
        for sub in spec.get("fields", {}).values():
            yield sub["type"]
        yield from _types(spec)


def test_template_is_opensearch_not_elasticsearch() -> None:
    """Every type is one OpenSearch documents (flat_object, 2.7+, for the free-form fields; never
    Elasticsearch's flattened); what replay and rca filter, sort or aggregate on is typed at the top level;
    the ISM policy attaches by its ism_template, not by the index setting templates no longer honour."""
    tpl = template_body("mlops-logs")
    assert "flattened" not in json.dumps(tpl)
    mappings = tpl["template"]["mappings"]
    assert set(_types(mappings)) <= KNOWN_TYPES
    props = mappings["properties"]
    assert props["fields"] == {"type": "flat_object"}
    for f in FILTERED:
        assert props[f]["type"] in ("keyword", "integer", "long", "date_nanos"), f
    assert props["event_id"]["type"] == "keyword"  # the sort's tie-breaker (doc values, not _id field data)
    assert props["message"]["fields"]["raw"]["ignore_above"] == MESSAGE_KEYWORD_CHARS
    assert mappings["dynamic"] is False
    assert not any("index_state_management" in k for k in tpl["template"]["settings"])
    policy = ism_policy_body("mlops-logs", 3 * 86400)["policy"]
    assert policy["ism_template"] == [{"index_patterns": tpl["index_patterns"], "priority": 100}]
    states = {s["name"]: s for s in policy["states"]}
    assert policy["default_state"] in states
    assert states["hot"]["transitions"] == [{"state_name": "delete", "conditions": {"min_index_age": "3d"}}]
    assert states["delete"]["actions"] == [{"delete": {}}]


def test_the_fake_rejects_what_opensearch_rejects(fake: FakeOpenSearch) -> None:
    """The old body (Elasticsearch's flattened) is refused as OpenSearch refuses it: the template test
    above is what stands between the sink and a set-up that retries forever."""
    from opensearchpy import OpenSearch
    from opensearchpy.exceptions import RequestError

    bad = template_body("x")
    bad["template"]["mappings"]["properties"]["fields"] = {"type": "flattened"}
    client = OpenSearch(hosts=[fake.url])
    with pytest.raises(RequestError) as e:
        client.indices.put_index_template(name="x", body=bad)
    assert e.value.error == "mapper_parsing_exception" and "[flattened]" in str(e.value.info)
    client.indices.put_index_template(name="x", body=template_body("x"))


def test_query_body_escapes_the_needle() -> None:
    q = query_body(EventQuery(job="j", ranks=(3, 1), text="a*b?c\\", min_level="error", since="2026-01-01T00:00:00Z"))
    f = q["bool"]["filter"]
    assert {"terms": {"rank": [1, 3]}} in f and {"terms": {"level": ["critical", "error"]}} in f
    assert {"range": {"@timestamp": {"gte": "2026-01-01T00:00:00.000000Z"}}} in f
    wildcard = f[-1]["bool"]["should"][0]["wildcard"]["message.raw"]
    assert wildcard == {"value": "*a\\*b\\?c\\\\*", "case_insensitive": True}
    assert query_body(EventQuery()) == {"match_all": {}}


# --- the same files into the store and OpenSearch -------------------------------------------------------------


def _write_logs(d: Path) -> None:
    """Four ranks writing JSON records with interleaved and equal times, one raw stderr file with a
    traceback and no times, a message longer than message.raw indexes."""
    d.mkdir()
    for r in range(4):
        lines = []
        for i in range(60):
            t = f"2026-03-04T10:00:{i // 2:02d}.{(i % 2) * 500000 + (r % 2) * 1000:06d}Z"  # ranks 0,2 and 1,3 tie
            level = "error" if (r == 2 and i == 50) else "warning" if i % 17 == 0 else "info"
            msg = f"step {i} done" if level == "info" else f"rank {r} trouble at {i} NEEDLE"
            rec: dict[str, Any] = {"event": msg, "ts": t, "job": "j1" if r < 3 else "j2", "rank": r,
                                   "node": f"n{r // 2}", "level": level, "seq": i + 1}  # fmt: skip
            if level == "info":
                rec["step"] = i
                rec["loss"] = 1.0 / (i + 1)
            lines.append(orjson.dumps(rec))
        long = {"event": "x" * (MESSAGE_KEYWORD_CHARS + 5) + " needle", "ts": "2026-03-04T10:00:40.000000Z",
                "job": "j1", "rank": r, "level": "warning"}  # fmt: skip
        lines.append(orjson.dumps(long))
        (d / f"j-rank{r}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "j-rank2.stderr.log").write_text(
        'Traceback (most recent call last):\n  File "train.py", line 3, in <module>\n'
        "RuntimeError: boom NEEDLE\nplain line\n"
    )


def _alerts() -> list[dict[str, Any]]:
    payload = {"version": "4", "receiver": "r", "groupKey": "g", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "RankDown", "job": "j1", "rank": "2", "severity": "critical",
                                        "node": "n1"}, "annotations": {"summary": "rank 2 down"},
         "startsAt": "2026-03-04T10:00:26.250000Z", "fingerprint": "f1"},
        {"status": "firing", "labels": {"alertname": "NodeHot", "node": "n0", "severity": "warning"},
         "annotations": {}, "startsAt": "2026-03-04T10:00:03.100000Z", "fingerprint": "f2"},
    ]}  # fmt: skip
    events, rejected = alert_events(payload)
    assert rejected == []
    return events


def _ship_both(tmp_path: Path, fake: FakeOpenSearch) -> tuple[StoreSource, OpenSearchSource]:
    logs = tmp_path / "logs"
    _write_logs(logs)
    store_sink = StoreSink(tmp_path / "store")
    os_sink = OpenSearchSink(_settings(fake, tmp_path))
    for i, sink in enumerate((store_sink, os_sink)):
        opts = ShipperOptions(sources=[str(logs / "*")], state_dir=tmp_path / f"ship{i}", batch_events=50)
        sh = Shipper(opts, sink)
        sh.run(once=True)
        sink.send(_alerts(), threading.Event())
        sh.close()
    return StoreSource(tmp_path / "store"), _source(fake, tmp_path)


QUERIES = [
    EventQuery(),
    EventQuery(job="j1"),
    EventQuery(job="j1", ranks=(0, 2)),
    EventQuery(node="n1", min_level="warning"),
    EventQuery(min_level="error"),
    EventQuery(kind="alert"),
    EventQuery(text="needle"),  # a long message is matched by the reader itself
    EventQuery(text="NEEDLE", job="j1", limit=5),
    EventQuery(since="2026-03-04T10:00:10Z", until="2026-03-04T10:00:20.5Z"),
    EventQuery(job="j1", limit=23),
    EventQuery(job="nope"),
]


def test_paging_gives_the_stores_order(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """Across ranks, equal times, raw lines and alerts, every filter: OpenSearch read in pages of 7 yields
    exactly what the store yields, in the same order; each point in time is deleted afterwards."""
    store, source = _ship_both(tmp_path, fake)
    total = len(list(store.events(EventQuery())))
    assert total > 240
    for q in QUERIES:
        want = list(store.events(q))
        got = list(source.events(q))
        assert got == want, q
    assert fake.pits == {}
    assert source.requests > total // 7  # really paged
    store.close()
    source.close()


def test_rank_facts_from_aggregations_equal_the_stores(tmp_path: Path, fake: FakeOpenSearch) -> None:
    store, source = _ship_both(tmp_path, fake)
    for job, since, until in (
        ("j1", None, None),
        ("j2", None, None),
        ("j1", "2026-03-04T10:00:05Z", "2026-03-04T10:00:25Z"),
    ):
        before = source.requests
        assert source.rank_facts(job, since=since, until=until) == store.rank_facts(job, since=since, until=until)
        assert source.requests == before + 1  # one aggregation, whatever the job's size
    store.close()


def test_point_in_time_is_a_snapshot_and_is_closed_when_the_reader_stops(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """Beyond the first page the read goes through a point in time: what is stored meanwhile is not
    mixed into it; the point in time is deleted at the end and when the reader stops early; a result
    that fits one page opens none."""
    sink = OpenSearchSink(_settings(fake, tmp_path))
    evs = [_ev(i) for i in range(30)]
    sink.send(evs[::2], threading.Event())
    source = _source(fake, tmp_path, page=4)
    it = source.events(EventQuery())
    first = [next(it) for _ in range(5)]
    sink.send(evs[1::2], threading.Event())  # stored while the reader is between pages
    rest = list(it)
    assert [e["_id"] for e in first + rest] == [e["_id"] for e in evs[::2]]
    assert fake.pits == {}
    it2 = source.events(EventQuery())
    for _ in range(5):  # into the second page: read through a point in time
        next(it2)
    assert len(fake.pits) == 1
    it2.close()  # the caller stops early: the point in time goes too
    assert fake.pits == {}
    assert [e["_id"] for e in source.events(EventQuery())] == [e["_id"] for e in evs]
    opened = fake.pit_requests
    assert len(list(source.events(EventQuery(limit=4)))) == 4 and len(list(source.events(EventQuery(ranks=(0,))))) == 10
    assert fake.pit_requests == opened + 2  # the limited read fit one page; the rank's 10 did not


def _ev(i: int, ts: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"_id": f"id-{i:04d}", "@timestamp": ts or f"2026-03-04T10:00:{i // 10:02d}.{i % 10:06d}Z", "kind": "log",
            "job": "j", "rank": i % 3, "node": "n", "level": "info", "message": f"m{i}", "seq": i, "source": "/l",
            "offset": i, "fields": {"step": i}, **kw}  # fmt: skip


def test_no_duplicate_after_a_retry_across_an_index_boundary(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """Events on both sides of midnight; the first write is applied but its answer lost, and the whole
    batch is sent again later (a restarted shipper): every event stays once, in the index of its own day,
    and the reader yields each once in order across the two indices."""
    days = ["2026-03-04T23:59:59.99999{}Z", "2026-03-05T00:00:00.00000{}Z"]
    evs = [_ev(i, days[i % 2].format(i // 2)) for i in range(20)]
    fake.request_faults.append("timeout")
    fake.timeout_sleep = 2.0
    sink = OpenSearchSink(_settings(fake, tmp_path))
    sink.send(evs, threading.Event())
    OpenSearchSink(_settings(fake, tmp_path)).send(list(reversed(evs)), threading.Event())
    assert fake.statuses[201] == 20 and fake.statuses[409] == 40
    assert {i: len(d) for i, d in fake.indices.items()} == {"mlops-logs-2026.03.04": 10, "mlops-logs-2026.03.05": 10}
    got = [e["_id"] for e in _source(fake, tmp_path, page=3).events(EventQuery())]
    assert got == [e["_id"] for e in sorted(evs, key=lambda e: (e["@timestamp"], e["offset"]))]


def test_equal_sort_keys_are_neither_skipped_nor_repeated(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """Alerts of one notification share time, source and offset: event_id breaks the tie, so pages of one
    still give each once."""
    ts = "2026-03-04T10:00:00.000000Z"
    evs = [_ev(i, ts, kind="alert", source="alertmanager", offset=0) for i in range(6)]
    OpenSearchSink(_settings(fake, tmp_path)).send(evs, threading.Event())
    got = [e["_id"] for e in _source(fake, tmp_path, page=1).events(EventQuery(kind="alert"))]
    assert got == sorted(e["_id"] for e in evs)


def test_follow_yields_what_arrives_once(tmp_path: Path, fake: FakeOpenSearch) -> None:
    sink = OpenSearchSink(_settings(fake, tmp_path))
    sink.send([_ev(i) for i in range(10)], threading.Event())
    source = _source(fake, tmp_path, page=3)
    stop = threading.Event()
    got: list[str] = []
    arrived = threading.Event()

    def reader() -> None:
        for ev in source.follow(EventQuery(job="j"), stop, poll_interval=0.05):
            got.append(ev["_id"])
            if len(got) == 10:
                arrived.set()
            if len(got) == 14:
                stop.set()

    t = threading.Thread(target=reader)
    t.start()
    assert arrived.wait(30)
    # late: two after the newest, one earlier (a lagging shipper, within the look-back), one of another job
    sink.send([_ev(20), _ev(21), _ev(5, "2026-03-04T10:00:00.500000Z") | {"_id": "late"}, _ev(22) | {"job": "k"}],
              threading.Event())  # fmt: skip
    sink.send([_ev(23)], threading.Event())
    t.join(30)
    assert not t.is_alive()
    assert got[:10] == [f"id-{i:04d}" for i in range(10)]
    assert sorted(got[10:]) == sorted(["id-0020", "id-0021", "late", "id-0023"])


def test_open_source_reads_opensearch(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """The backend's one choice: --opensearch gives the OpenSearch source, no state directory needed."""
    from mlops_obs.logs.opensearch import OPENSEARCH_SETTINGS

    cfg = {**{s.key: s.default for s in OPENSEARCH_SETTINGS}, "opensearch": fake.url}
    src = open_source(Backend.from_config(cfg))
    assert isinstance(src, OpenSearchSource)
    assert list(src.events(EventQuery())) == []  # no index yet: nothing, not an error
    assert src.rank_facts("j") == []


# --- rca through OpenSearch ----------------------------------------------------------------------------------


@pytest.mark.parametrize("job", ["crashj", "nanj", "stallj", "scrash"])
def test_rca_verdict_through_opensearch_equals_the_stores(tmp_path: Path, fake: FakeOpenSearch, job: str) -> None:
    """The fixtures' events into the store and OpenSearch: `rca --json` gives the same verdict, evidence
    and timeline either way, the OpenSearch one from aggregations and filtered pages."""
    from mlops_obs.logs.store import EventStore
    from mlops_obs.rca.bundle import Bundle
    from mlops_obs.rca.sources import ChunkStore, SourceFacts
    from mlops_obs.rca.verdict import analyse

    b = Bundle(FIXTURES / f"{job}.tar.gz")
    evs = list(b.events())
    now = b.manifest["created"]
    with EventStore(tmp_path / "store") as s:
        for i in range(0, len(evs), 7):
            s.put(evs[i : i + 7])
    OpenSearchSink(_settings(fake, tmp_path)).send(evs, threading.Event())
    fast = ChunkStore(tmp_path / "store")
    want, _ = analyse(fast, job, now=now)
    source = _source(fake, tmp_path, page=25)
    got, _ = analyse(SourceFacts(source, fake.url), job, now=now)
    assert got.to_json() == want.to_json()
    assert source.requests < 60 + 3 * len(evs) // 25  # aggregations and filtered pages, not a full read
    store = StoreSource(tmp_path / "store")  # a Source without OpenSearch's two aggregations: the generic path
    generic, _ = analyse(SourceFacts(store, "store"), job, now=now)
    assert generic.to_json() == want.to_json()
    store.close()
    fast.close()
    b.close()


def test_rca_cli_with_opensearch(tmp_path: Path, fake: FakeOpenSearch) -> None:
    from mlops_obs.rca.bundle import Bundle

    b = Bundle(FIXTURES / "crashj.tar.gz")
    evs = list(b.events())
    b.close()
    OpenSearchSink(_settings(fake, tmp_path)).send(evs, threading.Event())
    run = [sys.executable, "-m", "mlops_obs", "rca", "--job", "crashj", "--json"]
    r = subprocess.run([*run, "--opensearch", fake.url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    got = json.loads(r.stdout)
    assert got["verdict"] == "fault" and got["root_cause"]["kind"] == "crash"
    r = subprocess.run([*run[:-2], "nope", "--opensearch", fake.url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 4 and "no events of job 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*run, "--opensearch", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([*run, "--opensearch", fake.url, "--store", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2


@pytest.mark.opensearch
def test_real_opensearch_reads_back_as_the_store(real_opensearch: RealOpenSearch, tmp_path: Path) -> None:
    """Against a real cluster (MLOPS_OBS_TEST_OPENSEARCH_URL): the template and ISM policy are accepted,
    the same files read back through a point in time give the store's order for every query, the
    aggregations give the store's rank facts, and rca's verdict is the store's."""
    from mlops_obs.logs.opensearch import setup_names
    from mlops_obs.logs.store import EventStore
    from mlops_obs.rca.bundle import Bundle
    from mlops_obs.rca.sources import ChunkStore, SourceFacts
    from mlops_obs.rca.verdict import analyse

    url, prefix, client = real_opensearch.url, real_opensearch.prefix, real_opensearch.client
    settings = OpenSearchSettings(url=url, state_dir=tmp_path / "st", index_prefix=prefix, verify=False)
    logs = tmp_path / "logs"
    _write_logs(logs)
    b = Bundle(FIXTURES / "crashj.tar.gz")
    evs = list(b.events())
    try:
        for i, sink in enumerate((StoreSink(tmp_path / "store"), OpenSearchSink(settings))):
            sh = Shipper(ShipperOptions(sources=[str(logs / "*")], state_dir=tmp_path / f"ship{i}"), sink)
            sh.run(once=True)
            sink.send(_alerts() + evs, threading.Event())
            sh.close()
        client.indices.refresh(index=f"{prefix}-*")
        template, policy, pipeline = setup_names(prefix)
        assert client.indices.get_index_template(name=template)["index_templates"]
        assert client.transport.perform_request("GET", f"/_plugins/_ism/policies/{policy}")["_id"] == policy
        assert client.transport.perform_request("GET", f"/_ingest/pipeline/{pipeline}")[pipeline]
        hits = client.search(index=f"{prefix}-*", body={"size": 100, "query": {"match_all": {}}})["hits"]["hits"]
        assert hits and all(ingest_time_ns(h["_source"][INGESTED]) for h in hits)  # the cluster's format, read
        store = StoreSource(tmp_path / "store")
        source = OpenSearchSource(settings, page_size=7)
        for q in QUERIES:
            assert list(source.events(q)) == list(store.events(q)), q
        for job in ("j1", "crashj"):
            assert source.rank_facts(job) == store.rank_facts(job)
        now = b.manifest["created"]
        with EventStore(tmp_path / "store2") as s:
            s.put(evs)
        want, _ = analyse(ChunkStore(tmp_path / "store2"), "crashj", now=now)
        got, _ = analyse(SourceFacts(source, url), "crashj", now=now)
        assert got.to_json() == want.to_json()
        store.close()
    finally:
        b.close()


def test_follow_with_a_limit_does_not_yield_the_rest_of_what_was_there(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """--limit caps what is shown of the events present at the start; following then shows only what
    arrives afterwards, as the store's follow does."""
    sink = OpenSearchSink(_settings(fake, tmp_path))
    sink.send([_ev(i) for i in range(12)], threading.Event())
    source = _source(fake, tmp_path, page=5)
    stop = threading.Event()
    got: list[str] = []
    first = threading.Event()

    def reader() -> None:
        for ev in source.follow(EventQuery(job="j", limit=3), stop, poll_interval=0.05):
            got.append(ev["_id"])
            if len(got) == 3:
                first.set()
            if len(got) == 4:
                stop.set()

    t = threading.Thread(target=reader)
    t.start()
    assert first.wait(30)
    sink.send([_ev(30)], threading.Event())
    t.join(30)
    assert not t.is_alive()
    assert got == ["id-0000", "id-0001", "id-0002", "id-0030"]


class _Follower:
    """``source.follow`` in a thread, what it yields collected; polls counted by the fake's searches."""

    def __init__(self, source: OpenSearchSource, query: EventQuery) -> None:
        self.got: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(source, query), daemon=True)
        self._thread.start()

    def _run(self, source: OpenSearchSource, query: EventQuery) -> None:
        for ev in source.follow(query, self.stop, poll_interval=0.02):
            with self._lock:
                self.got.append(ev["_id"])

    def ids(self) -> list[str]:
        with self._lock:
            return list(self.got)

    def wait(self, *ids: str) -> None:
        wait_for(lambda: set(ids) <= set(self.ids()), f"the follower to yield {ids}")

    def wait_polls(self, fake: FakeOpenSearch, n: int) -> None:
        start = fake.searches
        wait_for(lambda: fake.searches >= start + n, f"{n} more polls")

    def close(self) -> list[str]:
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        return self.ids()


def _at(ts: str, i: int, **kw: Any) -> dict[str, Any]:
    return _ev(i, ts, **kw) | {"_id": f"{kw.get('node', 'n')}-{i}"}


def test_follow_shows_an_event_shipped_late_whatever_its_time(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """The 3 a.m. case: a node went dark, its shipper catches up minutes later. Its event, ten minutes
    older than the newest the follower has shown (far beyond the two-minute look-back by event time),
    is yielded once it is stored, and only once over many polls."""
    sink = OpenSearchSink(_settings(fake, tmp_path))
    sink.send([_at(f"2026-03-04T10:00:0{i}.000000Z", i) for i in range(5)], threading.Event())
    follower = _Follower(_source(fake, tmp_path, page=3), EventQuery(job="j"))
    follower.wait(*(f"n-{i}" for i in range(5)))
    sink.send([_at("2026-03-04T10:20:00.000000Z", 10), _at("2026-03-04T10:20:01.000000Z", 11)], threading.Event())
    follower.wait("n-10", "n-11")
    late = _at("2026-03-04T10:10:01.000000Z", 7, node="dark")  # ten minutes before the newest shown
    sink.send([late], threading.Event())
    follower.wait("dark-7")
    sink.send([_at("2026-03-04T10:20:02.000000Z", 12)], threading.Event())
    follower.wait("n-12")
    follower.wait_polls(fake, 25)
    got = follower.close()
    assert got == [*(f"n-{i}" for i in range(5)), "n-10", "n-11", "dark-7", "n-12"]
    assert ingest_time_ns(fake.all_docs()["dark-7"][INGESTED]) is not None  # stamped by the cluster


def test_follow_two_shippers_with_skewed_clocks(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """Node a's clock runs an hour ahead, node b's is right: their events interleave as they are stored,
    every one is yielded once, each poll's in time order, though b's are an hour older than the newest."""
    sink_a = OpenSearchSink(_settings(fake, tmp_path / "a"))
    sink_b = OpenSearchSink(_settings(fake, tmp_path / "b"))
    follower = _Follower(_source(fake, tmp_path), EventQuery(job="j"))
    want: list[str] = []
    for i in range(6):
        a = _at(f"2026-03-04T11:00:{i:02d}.000000Z", i, node="a")
        b = [_at(f"2026-03-04T10:00:{i:02d}.{k:06d}Z", 10 * i + k, node="b") for k in (2, 1)]
        sink_a.send([a], threading.Event())
        follower.wait(a["_id"])
        sink_b.send(b, threading.Event())  # one bulk, so one poll: shown in time order
        follower.wait(*(e["_id"] for e in b))
        want += [a["_id"], b[1]["_id"], b[0]["_id"]]
    follower.wait_polls(fake, 25)
    assert follower.close() == want


def test_follow_margin_covers_documents_searchable_out_of_order(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """A document stamped before one the follower has shown, but searchable only after it (another
    shard's refresh, a bulk still being indexed), is shown when it becomes searchable if it was stamped
    within the margin (10 s) of the newest seen; one stamped longer before is not: the margin's limit,
    as documented."""
    sink = OpenSearchSink(_settings(fake, tmp_path))
    t0 = dt.datetime(2026, 3, 4, 10, 0, tzinfo=dt.UTC)
    fake.clock = lambda: t0 + dt.timedelta(seconds=30)
    sink.send([_at("2026-03-04T09:00:00.000000Z", 1)], threading.Event())
    follower = _Follower(_source(fake, tmp_path), EventQuery(job="j"))
    follower.wait("n-1")
    fake.hold_refresh = True
    fake.clock = lambda: t0  # stamped 30 s before what the follower will have seen: beyond the margin
    sink.send([_at("2026-03-04T09:00:01.000000Z", 2)], threading.Event())
    fake.clock = lambda: t0 + dt.timedelta(seconds=32)  # within it
    sink.send([_at("2026-03-04T09:00:02.000000Z", 3)], threading.Event())
    fake.hold_refresh = False
    fake.clock = lambda: t0 + dt.timedelta(seconds=35)
    sink.send([_at("2026-03-04T09:00:03.000000Z", 4)], threading.Event())
    follower.wait("n-4")
    fake.refresh()
    follower.wait("n-3")
    assert follower.close() == ["n-1", "n-4", "n-3"]  # n-2 came in the same poll as n-3, and was not shown


def test_follow_an_index_from_before_the_pipeline_by_event_time(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """An index created before the ingest pipeline existed keeps no default pipeline: its documents,
    late ones written into it after the upgrade too, carry no ingest time. The follower still shows
    them by the old rule (within two minutes of the newest event time), next to the new index's
    documents followed by ingest time; one older than that in the old index is not shown, as documented."""
    old_sink = OpenSearchSink(dataclasses.replace(_settings(fake, tmp_path / "old"), setup=False))
    fake.templates["mlops-logs"] = template_body("mlops-logs", pipeline=False)  # as an older version left it
    old_sink.send([_at("2026-03-03T23:59:00.000000Z", 1)], threading.Event())
    sink = OpenSearchSink(_settings(fake, tmp_path))  # the upgraded shipper: pipeline and template
    sink.send([_at("2026-03-04T00:00:30.000000Z", 2)], threading.Event())
    assert fake.index_settings["mlops-logs-2026.03.03"] == {"index.refresh_interval": "1s"}
    assert fake.index_settings["mlops-logs-2026.03.04"]["index.default_pipeline"] == "mlops-logs-ingested"
    follower = _Follower(_source(fake, tmp_path), EventQuery(job="j"))
    follower.wait("n-1", "n-2")
    sink.send([_at("2026-03-03T23:59:40.000000Z", 3)], threading.Event())  # late, into the old index
    follower.wait("n-3")
    sink.send([_at("2026-03-03T23:50:00.000000Z", 4)], threading.Event())  # late, beyond the look-back
    sink.send([_at("2026-03-04T00:00:31.000000Z", 5)], threading.Event())  # late by ingest time: shown
    follower.wait("n-5")
    follower.wait_polls(fake, 10)
    docs = fake.all_docs()
    assert INGESTED not in docs["n-3"] and INGESTED in docs["n-5"]
    assert follower.close() == ["n-1", "n-2", "n-3", "n-5"]


@pytest.mark.opensearch
def test_real_opensearch_follow_shows_an_event_shipped_late(real_opensearch: RealOpenSearch, tmp_path: Path) -> None:
    """Against a real cluster: the pipeline the sink installs stamps documents the follower then follows
    by, so an event an hour older than the newest, shipped late, is shown once after the refresh."""
    prefix, client = real_opensearch.prefix, real_opensearch.client
    settings = OpenSearchSettings(url=real_opensearch.url, state_dir=tmp_path / "st", index_prefix=prefix,
                                  verify=False)  # fmt: skip
    sink = OpenSearchSink(settings)
    try:
        sink.send([_at("2026-03-04T11:00:00.000000Z", 1)], threading.Event())
        client.indices.refresh(index=f"{prefix}-*")
        follower = _Follower(OpenSearchSource(settings, page_size=7), EventQuery(job="j"))
        follower.wait("n-1")
        sink.send([_at("2026-03-04T10:00:00.000000Z", 2, node="dark")], threading.Event())
        sink.send([_at("2026-03-04T11:00:01.000000Z", 3)], threading.Event())
        follower.wait("dark-2", "n-3")
        assert sorted(follower.close()) == ["dark-2", "n-1", "n-3"]
    finally:
        sink.close()


def test_ingest_times_as_the_cluster_writes_them() -> None:
    """Java's ZonedDateTime.toString(): no seconds on a whole minute, the fraction in 3, 6 or 9 digits."""
    from tests.fake_opensearch import _java_instant, _millis

    base = 1772618400 * 10**9  # 2026-03-04T10:00:00Z
    assert ingest_time_ns("2026-03-04T10:00Z") == base
    assert ingest_time_ns("2026-03-04T10:00:01Z") == base + 10**9
    assert ingest_time_ns("2026-03-04T10:00:01.5Z") == base + 15 * 10**8
    assert ingest_time_ns("2026-03-04T10:00:01.123Z") == base + 1_123_000_000
    assert ingest_time_ns("2026-03-04T10:00:01.123456Z") == base + 1_123_456_000
    assert ingest_time_ns("2026-03-04T10:00:01.123456789Z") == base + 1_123_456_789
    assert ingest_time_ns("2026-03-04T11:00:01+01:00") == base + 10**9
    assert ingest_time_ns(1772618400123) == base + 123_000_000
    assert ingest_time_ns(None) is None and ingest_time_ns("yesterday") is None
    t = dt.datetime(2026, 3, 4, 10, 0, tzinfo=dt.UTC)
    for us, text in ((0, "2026-03-04T10:00Z"), (120_000, "2026-03-04T10:00:00.120Z"),
                     (123_456, "2026-03-04T10:00:00.123456Z")):  # fmt: skip
        assert _java_instant(t + dt.timedelta(microseconds=us)) == text
        assert ingest_time_ns(text) == base + us * 1000
        assert _millis(text) == (base + us * 1000) // 10**6


def test_after_splits_many_ranks_under_the_clause_limit(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """A job of more ranks than one bool query may hold clauses for: the tails come in several searches."""
    from mlops_obs.logs import opensearch

    sink = OpenSearchSink(_settings(fake, tmp_path))
    sink.send([_ev(i) | {"rank": i} for i in range(9)], threading.Event())
    source = _source(fake, tmp_path)
    old = opensearch.MAX_CLAUSES
    opensearch.MAX_CLAUSES = 4
    try:
        before = fake.searches
        got = list(source.after("j", {r: ("2026-03-04T10:00:00.000005Z" if r % 2 else None) for r in range(9)}))
    finally:
        opensearch.MAX_CLAUSES = old
    assert fake.searches - before == 3
    assert sorted(e["rank"] for e in got) == [0, 2, 4, 5, 6, 7, 8]
