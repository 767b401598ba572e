"""The OpenSearch sink against a local _bulk endpoint: the per-item error matrix, 413 splitting,
resets, a timeout after the write was applied, setup (ingest pipeline + template + ISM); and a real
cluster when ``MLOPS_OBS_TEST_OPENSEARCH_URL`` is set."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from mlops_obs.logs.opensearch import (
    INGESTED,
    PIPELINE_NAME,
    POLICY_NAME,
    TEMPLATE_NAME,
    OpenSearchSettings,
    OpenSearchSink,
    bulk_lines,
    chunk_by_bytes,
    index_for,
    ingest_pipeline_body,
    ingest_time_ns,
    setup_names,
)
from mlops_obs.logs.shipper import Shipper, ShipperOptions
from mlops_obs.logs.sink import DEAD_LETTER_FILE, Stats
from tests.conftest import RealOpenSearch, wait_for
from tests.fake_opensearch import FakeOpenSearch
from tests.logs_helpers import line, reconcile, run_ship, ship_cmd


@pytest.fixture
def fake() -> Iterator[FakeOpenSearch]:
    f = FakeOpenSearch().start()
    yield f
    f.stop()


def _events(n: int, stream: str = "s", day: str = "2026-03-04") -> list[dict[str, Any]]:
    return [
        {"_id": f"fid-{i}", "@timestamp": f"{day}T00:00:00.{i:06d}Z", "kind": "log", "job": "j", "rank": 0,
         "node": "n", "level": "info", "message": "m", "seq": i, "source": "/l", "offset": i * 10,
         "fields": {"stream": stream}}
        for i in range(1, n + 1)
    ]  # fmt: skip


def _sink(fake: FakeOpenSearch, tmp_path: Path, **kw: Any) -> tuple[OpenSearchSink, Stats]:
    stats = Stats()
    settings = OpenSearchSettings(url=fake.url, state_dir=tmp_path, backoff_max_s=0.05, timeout_s=1.0, **kw)
    return OpenSearchSink(settings, stats=stats), stats


def test_index_and_body_shape() -> None:
    """create actions carry our _id and the daily index of the event's own timestamp."""
    ev = _events(1)[0]
    (chunk,) = bulk_lines([ev], "mlops-logs")
    action, doc, _ = chunk.split(b"\n")
    assert orjson.loads(action) == {"create": {"_index": "mlops-logs-2026.03.04", "_id": "fid-1"}}
    assert "_id" not in orjson.loads(doc) and orjson.loads(doc)["seq"] == 1
    assert index_for("p", "2025-12-31T23:59:59.999999Z") == "p-2025.12.31"
    assert chunk_by_bytes([b"x" * 10] * 5, 25) == [(0, 2), (2, 4), (4, 5)]


def test_setup_installs_template_and_ism_policy(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """The template maps our fields; the ISM policy deletes after the retention; a rerun is fine."""
    sink, _ = _sink(fake, tmp_path, retention_s=7 * 86400)
    sink.send(_events(1), threading.Event())
    tpl = fake.templates[TEMPLATE_NAME]
    assert tpl["index_patterns"] == ["mlops-logs-*"]
    assert tpl["template"]["mappings"]["properties"]["rank"] == {"type": "integer"}
    policy = fake.policies[POLICY_NAME]["policy"]
    assert policy["states"][0]["transitions"][0]["conditions"] == {"min_index_age": "7d"}
    sink2, _ = _sink(fake, tmp_path, retention_s=7 * 86400)
    sink2.send(_events(2), threading.Event())  # policy exists with this retention: left as it is
    assert fake.count() == 2 and fake.policy_seq_no[POLICY_NAME] == 0 and not fake.change_policy_calls


def test_setup_installs_the_ingest_pipeline_new_indices_run(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """The pipeline stamps each document with the cluster's time of ingest; the template names it as
    the default pipeline and maps the field as a date; the names follow the prefix; a deployment whose
    installed pipeline differs (an older version's) gets the current one at the next start."""
    assert setup_names("mlops-logs") == (TEMPLATE_NAME, POLICY_NAME, PIPELINE_NAME)
    assert setup_names("other")[2] == "other-ingested"
    fake.pipelines[PIPELINE_NAME] = {"processors": [{"set": {"field": "x", "value": 1}}]}  # an older body
    sink, _ = _sink(fake, tmp_path)
    sink.send(_events(3), threading.Event())
    assert fake.pipelines[PIPELINE_NAME] == ingest_pipeline_body("mlops-logs")
    tpl = fake.templates[TEMPLATE_NAME]["template"]
    assert tpl["settings"]["index.default_pipeline"] == PIPELINE_NAME
    assert tpl["mappings"]["properties"][INGESTED] == {"type": "date"}
    stamps = [ingest_time_ns(d[INGESTED]) for d in fake.all_docs().values()]
    assert all(stamps) and len(stamps) == 3
    _sink(fake, tmp_path)[0].send(_events(4), threading.Event())  # a rerun: the same bodies again
    assert fake.pipelines[PIPELINE_NAME] == ingest_pipeline_body("mlops-logs") and fake.count() == 4


def test_a_refused_pipeline_is_a_warning_and_the_template_names_none(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """A role without cluster_manage_pipelines: naming a pipeline that is not there would fail every
    write into the new indices (as the fake shows first), so the template names none and shipping goes
    on, the documents without an ingest time (followers fall back to event time). One an administrator
    installed is used all the same."""
    fake.templates["x"] = {"index_patterns": ["x-*"], "template": {"settings": {"index.default_pipeline": "nope"}}}
    from opensearchpy import OpenSearch

    resp = OpenSearch(hosts=[fake.url]).bulk(body=b'{"create":{"_index":"x-1","_id":"a"}}\n{"m":1}\n')
    assert resp["items"][0]["create"]["status"] == 400
    assert "pipeline with id [nope] does not exist" in resp["items"][0]["create"]["error"]["reason"]
    del fake.templates["x"]

    fake.refuse_pipelines = True
    sink, stats = _sink(fake, tmp_path / "a")
    sink.send(_events(2), threading.Event())
    assert fake.count() == 2 and stats.retries == 0 and stats.dead_letters == 0
    assert "index.default_pipeline" not in fake.templates[TEMPLATE_NAME]["template"]["settings"]
    assert not any(INGESTED in d for d in fake.all_docs().values())
    fake.pipelines[PIPELINE_NAME] = ingest_pipeline_body("mlops-logs")  # installed by an administrator
    sink, stats = _sink(fake, tmp_path / "b")
    sink.send(_events(3, day="2026-03-05"), threading.Event())
    assert fake.templates[TEMPLATE_NAME]["template"]["settings"]["index.default_pipeline"] == PIPELINE_NAME
    assert stats.retries == 0 and all(INGESTED in d for d in fake.indices["mlops-logs-2026.03.05"].values())


def test_a_changed_retention_updates_the_policy_and_its_indices(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """The create answers 409 once the policy exists: a new retention must not be ignored for good."""
    _sink(fake, tmp_path, retention_s=7 * 86400)[0].send(_events(1), threading.Event())
    _sink(fake, tmp_path, retention_s=90 * 86400)[0].send(_events(2), threading.Event())
    policy = fake.policies[POLICY_NAME]["policy"]
    assert policy["states"][0]["transitions"][0]["conditions"] == {"min_index_age": "90d"}
    assert fake.policy_seq_no[POLICY_NAME] == 1
    assert fake.change_policy_calls == [("mlops-logs-*", {"policy_id": POLICY_NAME})]
    assert fake.count() == 2


def test_item_error_matrix(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """429 and 5xx items are retried, 409 counts as done, 400 is dead-lettered with its reason."""
    evs = _events(10)
    # item order: 1:429 2:500 3:503 4:409 5:400 6..10 fine; the retries then succeed
    fake.item_faults.extend([429, 500, 503, 409, 400])
    sink, stats = _sink(fake, tmp_path)
    sink.send(evs, threading.Event())
    docs = fake.all_docs()
    assert sorted(docs) == sorted(f"fid-{i}" for i in range(1, 11) if i != 5)
    assert stats.retries >= 1 and stats.dead_letters == 1
    dead = [orjson.loads(x) for x in (tmp_path / DEAD_LETTER_FILE).read_bytes().splitlines()]
    assert len(dead) == 1 and dead[0]["event"]["_id"] == "fid-5" and dead[0]["status"] == 400
    assert "mapper_parsing_exception" in dead[0]["reason"]
    reconcile([*docs.values(), *(d["event"] for d in dead)], {"s": 10})


def test_sink_error_names_the_cause_while_it_lasts(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """A sink that retries says why (the answer OpenSearch gave), and says nothing once a batch goes through."""
    fake.request_faults.extend([503] * 100_000)
    sink, stats = _sink(fake, tmp_path)
    sender = threading.Thread(target=sink.send, args=(_events(5), threading.Event()))
    sender.start()
    try:
        wait_for(lambda: stats.sink_error is not None, "a named sink error", timeout=30)
        assert stats.sink_error is not None and stats.sink_error.startswith("opensearch: bulk request failed (503)")
    finally:
        fake.request_faults.clear()
        sender.join(timeout=60)
    assert not sender.is_alive() and fake.count() == 5 and stats.sink_error is None

    class Recorded(Stats):
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "sink_error":
                errors.append(value)
            super().__setattr__(name, value)

    errors: list[str | None] = []
    sink.stats = Recorded()
    errors.clear()  # the dataclass's own None
    fake.item_faults.extend([429])
    sink.send(_events(3, day="2026-03-05"), threading.Event())
    assert fake.count() == 8
    assert errors[0] is not None and errors[0].startswith("opensearch: 1 of 3 documents refused for now (429 ")
    assert errors[-1] is None


def test_request_level_faults_are_retried(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """A reset connection, a 503 and a 429 on the whole request: retried until acknowledged."""
    fake.request_faults.extend(["reset", 503, 429])
    sink, stats = _sink(fake, tmp_path)
    sink.send(_events(50), threading.Event())
    assert fake.count() == 50 and stats.retries == 3 and fake.bulk_requests == 4


def test_timeout_after_write_applied_gives_409_not_duplicates(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """The write lands but the answer times out; the retry is answered 409 and nothing doubles."""
    fake.request_faults.append("timeout")
    fake.timeout_sleep = 2.0
    sink, stats = _sink(fake, tmp_path)
    sink.send(_events(20), threading.Event())
    assert fake.count() == 20 and fake.statuses[409] == 20 and stats.retries == 1


def test_413_splits_the_batch(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """413 halves the request until it fits; a single document too large is dead-lettered."""
    evs = _events(64)
    evs[10]["message"] = "x" * 5000
    fake.max_body_bytes = 4000
    sink, stats = _sink(fake, tmp_path)
    sink.send(evs, threading.Event())
    assert fake.count() == 63 and stats.dead_letters == 1
    dead = orjson.loads((tmp_path / DEAD_LETTER_FILE).read_bytes().splitlines()[0])
    assert dead["status"] == 413 and dead["event"]["_id"] == "fid-11"


def test_body_cap_bounds_requests(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """Bodies are capped by bytes: 1000 events with a 20 KiB cap take many requests, none too big."""
    fake.max_body_bytes = 20 << 10
    sink, _ = _sink(fake, tmp_path, max_body_bytes=20 << 10)
    sink.send(_events(1000), threading.Event())
    assert fake.count() == 1000 and fake.statuses[413] == 0 and fake.bulk_requests > 10


def test_shipper_cli_into_opensearch_with_faults(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """`mlops-obs ship --once --opensearch` through injected faults: exact, and dead letters kept."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 3001)))
    fake.request_faults.extend(["reset", 502])
    fake.item_faults.extend([429] * 5 + [400] + [503] * 5)
    r = run_ship(ship_cmd([str(logs / "*.log")], opensearch=fake.url, state=tmp_path / "state", once=True,
                          extra=["--opensearch.backoff-max", "50ms"]))  # fmt: skip
    assert r.returncode == 0, r.stderr
    dead = [orjson.loads(x)["event"] for x in (tmp_path / "state" / DEAD_LETTER_FILE).read_bytes().splitlines()]
    assert len(dead) == 1
    from opensearchpy import OpenSearch

    hits = OpenSearch(hosts=[fake.url]).search(index="mlops-logs-*", body={"size": 10000})["hits"]["hits"]
    assert {h["_index"] for h in hits} == {index_for("mlops-logs", h["_source"]["@timestamp"]) for h in hits}
    reconcile([*(h["_source"] for h in hits), *dead], {"s": 3000})
    stats = orjson.loads((tmp_path / "state" / "stats.json").read_bytes())
    assert stats["retries_total"] >= 3 and stats["dead_letters_total"] == 1


@pytest.mark.opensearch
def test_real_opensearch_roundtrip(real_opensearch: RealOpenSearch, tmp_path: Path) -> None:
    """Against a real cluster: setup, ship twice (idempotent), search finds every line once."""
    prefix, client = real_opensearch.prefix, real_opensearch.client
    settings = OpenSearchSettings(url=real_opensearch.url, state_dir=tmp_path, index_prefix=prefix, verify=False)
    sink = OpenSearchSink(settings)
    evs = _events(500)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 501)))
    sh = Shipper(ShipperOptions(sources=[str(logs / "*.log")], state_dir=tmp_path / "st"), sink)
    try:
        sh.run(once=True)
        sink.send(evs[:1], threading.Event())
        client.indices.refresh(index=f"{prefix}-*")
        hits = client.search(index=f"{prefix}-*", body={"size": 1000, "query": {"match_all": {}}})["hits"]["hits"]
        reconcile([h["_source"] for h in hits if h["_source"]["fields"].get("stream") == "s" and
                   h["_source"]["source"] != "/l"], {"s": 500})  # fmt: skip
    finally:
        sh.close()


def test_dead_letter_not_doubled_by_a_crash_before_checkpoint(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """Killed after dead-lettering but before the checkpoint: the re-sent batch's rejected event is
    not written to the dead-letter file a second time."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 201)))
    cmd = ship_cmd([str(logs / "*.log")], opensearch=fake.url, state=tmp_path / "state", once=True)
    fake.item_faults.append(400)  # a mapping error is deterministic: the same item fails each time
    assert run_ship(cmd, fault="acked:1").returncode == -9
    fake.item_faults.append(400)
    r = run_ship(cmd)
    assert r.returncode == 0, r.stderr
    dead = [orjson.loads(x)["event"] for x in (tmp_path / "state" / DEAD_LETTER_FILE).read_bytes().splitlines()]
    assert len(dead) == 1 and fake.statuses[400] == 2
    reconcile([*fake.all_docs().values(), *dead], {"s": 200})


def test_a_refused_retention_update_is_a_warning_and_shipping_goes_on(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """A role that may create a policy but not change one: the events still go, the policy stays."""
    _sink(fake, tmp_path, retention_s=7 * 86400)[0].send(_events(1), threading.Event())
    fake.refuse_policy_changes = True
    sink, stats = _sink(fake, tmp_path, retention_s=90 * 86400)
    sink.send(_events(2), threading.Event())
    assert fake.count() == 2 and stats.retries == 0
    assert fake.policies[POLICY_NAME]["policy"]["states"][0]["transitions"][0]["conditions"] == {"min_index_age": "7d"}


class _Said:
    """A logger recording what the sink says (``say`` calls ``log.<level>(msg, **kw)``)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda msg, **kw: self.lines.append((level, msg, kw))

    def count(self, level: str, text: str) -> int:
        return sum(1 for lv, msg, _ in self.lines if lv == level and text in msg)


class _RecordedStats(Stats):
    """Stats remembering every ``sink_error`` set (the cause is cleared once the batch goes through)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "sink_error" and value is not None:
            self.__dict__.setdefault("errors", []).append(value)
        super().__setattr__(name, value)

    @property
    def errors(self) -> list[str]:
        return list(self.__dict__.get("errors", []))


def _recorded_sink(fake: FakeOpenSearch, tmp_path: Path, **kw: Any) -> tuple[OpenSearchSink, _RecordedStats, _Said]:
    stats, said = _RecordedStats(), _Said()
    settings = OpenSearchSettings(url=fake.url, state_dir=tmp_path, backoff_max_s=0.05, timeout_s=1.0, **kw)
    return OpenSearchSink(settings, log=said, stats=stats), stats, said  # type: ignore[arg-type]


def _delete_pipeline(fake: FakeOpenSearch) -> None:
    """By hand, through the API, as an operator would (``DELETE _ingest/pipeline/<id>``)."""
    from opensearchpy import OpenSearch

    OpenSearch(hosts=[fake.url]).transport.perform_request("DELETE", f"/_ingest/pipeline/{PIPELINE_NAME}")
    assert PIPELINE_NAME not in fake.pipelines


def test_the_fake_fails_writes_past_a_deleted_pipeline_as_opensearch_does(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """What the sink recognises, as OpenSearch's IngestService answers it: each item of an index whose
    default pipeline was deleted fails with 400 illegal_argument_exception "pipeline with id [..] does
    not exist"; a bulk action naming "pipeline": "_none" is written past it; deleting a pipeline that
    is not there is a 404 resource_not_found_exception."""
    from opensearchpy import OpenSearch
    from opensearchpy.exceptions import NotFoundError

    _sink(fake, tmp_path)[0].send(_events(1), threading.Event())
    _delete_pipeline(fake)
    client = OpenSearch(hosts=[fake.url])
    item = client.bulk(body=bulk_lines(_events(2), "mlops-logs")[1])["items"][0]["create"]
    why = f"pipeline with id [{PIPELINE_NAME}] does not exist"
    assert item["status"] == 400 and item["error"] == {"type": "illegal_argument_exception", "reason": why}
    item = client.bulk(body=bulk_lines(_events(2), "mlops-logs", pipeline="_none")[1])["items"][0]["create"]
    assert item["status"] == 201 and INGESTED not in fake.indices["mlops-logs-2026.03.04"]["fid-2"]
    with pytest.raises(NotFoundError) as e:
        client.transport.perform_request("DELETE", f"/_ingest/pipeline/{PIPELINE_NAME}")
    assert e.value.error == "resource_not_found_exception"


def test_a_pipeline_deleted_mid_run_is_reinstalled_and_nothing_is_dead_lettered(
    fake: FakeOpenSearch, tmp_path: Path
) -> None:
    """A running shipper whose pipeline an operator deletes: the next writes fail for want of it; the
    sink re-installs it and re-sends them, so the later events reach the index stamped with their
    ingest time, none dead-lettered, and the cause was named in stats while it lasted."""
    logs = tmp_path / "logs"
    logs.mkdir()
    f = logs / "a.log"
    f.write_bytes(b"".join(line("s", i) for i in range(1, 101)))
    sink, stats, said = _recorded_sink(fake, tmp_path / "state")
    sh = Shipper(ShipperOptions(sources=[str(logs / "*.log")], state_dir=tmp_path / "state", scan_interval=0.05,
                                poll_interval=0.01), sink, stats=stats)  # fmt: skip
    t = threading.Thread(target=sh.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: stats.events_shipped == 100, "the first 100 events shipped")
        _delete_pipeline(fake)
        with open(f, "ab") as out:
            out.write(b"".join(line("s", i) for i in range(101, 301)))
        wait_for(lambda: stats.events_shipped == 300, "the events written after the deletion shipped")
    finally:
        sh.stop_event.set()
        t.join(timeout=60)
        sh.close()
    assert not t.is_alive()
    docs = list(fake.all_docs().values())
    reconcile(docs, {"s": 300})
    assert all(ingest_time_ns(d.get(INGESTED)) for d in docs)  # the later ones too: re-sent through it
    assert fake.pipelines[PIPELINE_NAME] == ingest_pipeline_body("mlops-logs")
    assert stats.dead_letters == 0 and not (tmp_path / "state" / DEAD_LETTER_FILE).exists()
    assert stats.retries >= 1 and stats.sink_error is None
    cause = f"opensearch: ingest pipeline {PIPELINE_NAME} was missing: re-installed"
    assert any(e.startswith(cause) for e in stats.errors)
    assert said.count("warning", "ingest pipeline missing") == 1 and said.count("info", "re-installed") == 1


def test_a_refused_reinstall_ships_past_the_pipeline_and_says_so_once(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """The pipeline deleted, and the role may not install it (403): the documents are written past it
    ("pipeline": "_none": no ingest time, followers go by event time), not dead-lettered and not held;
    one warning for the whole occurrence, however many batches; every recheck period the sink writes
    normally and tries again, and uses the pipeline once an administrator put it back."""
    sink, stats, said = _recorded_sink(fake, tmp_path)
    sink.send(_events(2), threading.Event())
    fake.refuse_pipelines = True
    _delete_pipeline(fake)
    puts = fake.pipeline_puts
    sink.send(_events(10)[2:5], threading.Event())  # fails for want of it, re-install refused, sent past it
    assert fake.pipeline_puts == puts + 1 and fake.count() == 5 and stats.dead_letters == 0
    assert [INGESTED in fake.all_docs()[f"fid-{i}"] for i in range(1, 6)] == [True, True, False, False, False]
    assert stats.sink_error is None and any(
        f"ingest pipeline {PIPELINE_NAME} missing, re-install refused (403" in e for e in stats.errors)  # fmt: skip
    bulks = fake.bulk_requests
    sink.send(_events(10)[5:7], threading.Event())  # within the recheck period: straight past it
    assert fake.count() == 7 and fake.bulk_requests == bulks + 1 and fake.pipeline_puts == puts + 1
    sink.pipeline_recheck_s = 0.0
    sink._bypass_until = 0.0  # the recheck period over
    sink.send(_events(10)[7:8], threading.Event())  # tries again: refused again, sent past it again
    assert fake.count() == 8 and fake.pipeline_puts == puts + 2 and stats.dead_letters == 0
    assert said.count("warning", "ingest pipeline missing: every write") == 1
    assert said.count("warning", "not re-installed: shipping without it") == 1
    fake.pipelines[PIPELINE_NAME] = ingest_pipeline_body("mlops-logs")  # an administrator put it back
    sink.send(_events(10)[8:], threading.Event())
    assert all(INGESTED in fake.all_docs()[f"fid-{i}"] for i in (9, 10))
    assert said.count("info", "ingest pipeline working again") == 1 and stats.dead_letters == 0


def test_a_reinstall_failing_with_5xx_is_retried_then_ships_past_the_pipeline(
    fake: FakeOpenSearch, tmp_path: Path
) -> None:
    """A re-install answered 5xx holds the documents and tries again (a transient one gets the
    pipeline back); one that keeps failing past the bound ships them without it."""
    sink, stats, _ = _recorded_sink(fake, tmp_path)
    sink.send(_events(1), threading.Event())
    _delete_pipeline(fake)
    fake.pipeline_faults.extend([503, 500])
    sink.send(_events(3)[1:], threading.Event())
    assert fake.pipelines[PIPELINE_NAME] and all(INGESTED in d for d in fake.all_docs().values())
    assert any("re-install failed (503 process_cluster_event_timeout_exception)" in e for e in stats.errors)
    sink.send(_events(4)[3:], threading.Event())  # a normal write through it: the occurrence is over

    _delete_pipeline(fake)
    fake.pipeline_faults.extend([500] * 1000)
    sink.pipeline_tries, sink.pipeline_patience_s = 3, 0.0
    sink.send(_events(6, day="2026-03-05"), threading.Event())
    assert fake.count() == 10 and stats.dead_letters == 0
    assert not any(INGESTED in d for d in fake.indices["mlops-logs-2026.03.05"].values())
    assert any("re-install failed 3 times (500 illegal_state_exception)" in e for e in stats.errors)


def test_setup_with_a_pipeline_api_that_keeps_failing_ships_without_the_pipeline(
    fake: FakeOpenSearch, tmp_path: Path
) -> None:
    """Every PUT _ingest/pipeline answered 500 (no ingest info): set-up tries a bounded number of
    times, then installs the template without a default pipeline, as for a refusal, and the events
    go (without an ingest time) instead of waiting for ever; the ISM policy is installed as usual."""
    fake.pipeline_faults.extend([500] * 1000)
    sink, stats, said = _recorded_sink(fake, tmp_path)
    sink.pipeline_tries, sink.pipeline_patience_s = 3, 0.0  # the bound, without its 30 s of patience
    sink.send(_events(4), threading.Event())
    assert fake.pipeline_puts == 3 and fake.count() == 4 and PIPELINE_NAME not in fake.pipelines
    assert "index.default_pipeline" not in fake.templates[TEMPLATE_NAME]["template"]["settings"]
    assert POLICY_NAME in fake.policies and not any(INGESTED in d for d in fake.all_docs().values())
    assert stats.retries == 2 and stats.dead_letters == 0 and stats.sink_error is None
    assert any("setup failed" in e and "illegal_state_exception" in e for e in stats.errors)
    assert said.count("warning", "ingest pipeline not installed: its API keeps failing") == 1


def test_setup_retries_a_transient_pipeline_5xx_and_installs_it(fake: FakeOpenSearch, tmp_path: Path) -> None:
    """Two 5xx answers (a cluster-manager task timing out, then no ingest info) at the default bound:
    retried with the set-up, the pipeline installed at the third try and named by the template."""
    fake.pipeline_faults.extend([503, 500])
    sink, stats, said = _recorded_sink(fake, tmp_path)
    sink.send(_events(3), threading.Event())
    assert fake.pipeline_puts == 3 and fake.pipelines[PIPELINE_NAME] == ingest_pipeline_body("mlops-logs")
    assert fake.templates[TEMPLATE_NAME]["template"]["settings"]["index.default_pipeline"] == PIPELINE_NAME
    assert all(INGESTED in d for d in fake.all_docs().values()) and fake.count() == 3
    assert stats.retries == 2 and said.count("warning", "ingest pipeline not installed") == 0


@pytest.mark.opensearch
def test_real_opensearch_a_deleted_pipeline_is_reinstalled_or_written_past(
    real_opensearch: RealOpenSearch, tmp_path: Path
) -> None:
    """Against a real cluster, what the fake claims: writes into an index whose default pipeline was
    deleted fail per item with the error the sink recognises; the sink re-installs it and the documents
    are stamped; with set-up off it writes them past it ("pipeline": "_none"), unstamped, none dead-lettered."""
    url, prefix, client = real_opensearch.url, real_opensearch.prefix, real_opensearch.client
    pipeline = setup_names(prefix)[2]
    stats = Stats()
    sink = OpenSearchSink(OpenSearchSettings(url=url, state_dir=tmp_path, index_prefix=prefix, verify=False,
                                             backoff_max_s=0.2), stats=stats)  # fmt: skip
    try:
        sink.send(_events(2), threading.Event())
        client.transport.perform_request("DELETE", f"/_ingest/pipeline/{pipeline}")
        item = client.bulk(body=bulk_lines(_events(3)[2:], prefix)[0])["items"][0]["create"]
        assert item["status"] == 400 and item["error"]["type"] == "illegal_argument_exception"
        assert item["error"]["reason"] == f"pipeline with id [{pipeline}] does not exist"
        sink.send(_events(5)[2:], threading.Event())
        assert client.transport.perform_request("GET", f"/_ingest/pipeline/{pipeline}")[pipeline]
        client.transport.perform_request("DELETE", f"/_ingest/pipeline/{pipeline}")
        no_setup = OpenSearchSink(OpenSearchSettings(url=url, state_dir=tmp_path, index_prefix=prefix, verify=False,
                                                     backoff_max_s=0.2, setup=False), stats=stats)  # fmt: skip
        no_setup.send(_events(8)[5:], threading.Event())
        client.indices.refresh(index=f"{prefix}-*")
        hits = client.search(index=f"{prefix}-*", body={"size": 100})["hits"]["hits"]
        stamped = {h["_id"]: INGESTED in h["_source"] for h in hits}
        assert stamped == {f"fid-{i}": i <= 5 for i in range(1, 9)} and stats.dead_letters == 0
    finally:
        sink.close()
