"""Incident bundles as a third place events come from: ``replay --bundle`` replays what ``replay --store``
replays of the same job, filters and all; ``bundle --opensearch`` writes the bundle ``bundle --store``
writes of the same events, and ``rca --bundle`` gives the same verdict on either; a broken bundle is
one line and exit 4."""

from __future__ import annotations

import gzip
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from mlops_obs.cli import main
from mlops_obs.logs.opensearch import OpenSearchSettings, OpenSearchSink
from mlops_obs.logs.source import EventQuery
from mlops_obs.logs.store import EventStore
from mlops_obs.rca.bundle import Bundle, write_bundle
from mlops_obs.replay.bundle import BundleSource
from mlops_obs.replay.timeline import job_timeline
from tests.fake_opensearch import FakeOpenSearch
from tests.test_replay import (
    alert,
    count_in_order_with_peak,
    log,
    store,  # noqa: F401 - the fixture: a job, another job, launcher, alerts
)

FIXTURES = Path(__file__).parent / "fixtures" / "rca"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def make_bundle(capsys: pytest.CaptureFixture[str], out: Path, *source: str, job: str = "j") -> Path:
    rc, stdout, err = run(capsys, "bundle", *source, "--job", job, "--out", str(out))
    assert rc == 0, err
    assert stdout.startswith(f"wrote {out}")
    return out


QUERIES = [
    ("--job", "j"),
    ("--job", "j", "--rank", "1"),
    ("--job", "j", "--rank", "0", "--node", "n1"),
    ("--job", "j", "--kind", "alert"),
    ("--job", "j", "--kind", "launcher"),
    ("--job", "j", "--level", "warning"),
    ("--job", "j", "--grep", "MEMORY"),
    ("--job", "j", "--limit", "7"),
    ("--job", "j", "--since", "2026-02-03T04:05:10Z", "--until", "2026-02-03T04:05:20.5Z"),
    ("--job", "j", "--around", "2026-02-03T04:05:12Z", "--window", "3s"),
    ("--job", "nosuchjob"),
]


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: " ".join(q))
def test_bundle_replays_as_the_store(
    store: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    query: tuple[str, ...],
) -> None:
    bundle = make_bundle(capsys, tmp_path / "j.tar.gz", "--store", str(store))
    rc_s, want, _ = run(capsys, "replay", "--store", str(store), *query, "--json")
    rc_b, got, err = run(capsys, "replay", "--bundle", str(bundle), *query, "--json")
    assert rc_s == rc_b == 0, err
    assert got == want
    if query[1] == "j" and len(query) == 2:  # the whole job: its logs, launcher and its nodes' alerts
        evs = [orjson.loads(x) for x in got.splitlines()]
        assert {e["kind"] for e in evs} == {"log", "launcher", "alert"} and len(evs) > 180
        keys = [(e["@timestamp"], e["source"], e["offset"]) for e in evs]
        assert keys == sorted(keys)
    # Text output too, byte for byte.
    assert (
        run(capsys, "replay", "--bundle", str(bundle), *query, "--color", "never")[1]
        == run(capsys, "replay", "--store", str(store), *query, "--color", "never")[1]
    )


def test_broken_bundles_are_one_line_and_exit_4(
    store: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = make_bundle(capsys, tmp_path / "j.tar.gz", "--store", str(store)).read_bytes()
    cases = {
        "missing": None,
        "garbage": b"not a bundle at all" * 50,
        "truncated": good[: len(good) // 2],
        "scrambled": good[: len(good) // 3] + b"\xff" * 512 + good[len(good) // 3 + 512 :],
        "foreign": gzip.compress(b"\0" * 1024),
    }
    for name, body in cases.items():
        path = tmp_path / f"{name}.tar.gz"
        if body is not None:
            path.write_bytes(body)
        rc, _, err = run(capsys, "replay", "--bundle", str(path), "--job", "j", "--json")
        assert rc == 4, (name, err)
        assert err.count("\n") == 1 and err.startswith("mlops-obs replay: error:") and "Traceback" not in err, name


def test_bundle_is_one_source_among_the_others(
    store: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = make_bundle(capsys, tmp_path / "j.tar.gz", "--store", str(store))
    for other in (
        ("--store", str(store)),
        ("--source", str(tmp_path / "*.log")),
        ("--opensearch", "http://127.0.0.1:9"),
    ):
        rc, _, err = run(capsys, "replay", "--bundle", str(bundle), *other, "--job", "j")
        assert rc == 2 and err.count("\n") == 1 and "--bundle" in err, (other, err)
    rc, _, err = run(capsys, "replay", "--bundle", str(bundle), "--job", "j", "--follow")
    assert rc == 2 and err.count("\n") == 1


def test_replaying_a_bundle_streams_it(tmp_path: Path) -> None:
    """A job's timeline from a bundle twice the size takes about the same memory, a fraction of the
    events as a list: the events member is streamed, never loaded."""
    ranks = 8

    def events(n: int) -> Iterator[dict[str, Any]]:
        for i in range(n // ranks):
            for r in range(ranks):
                yield log(r, i, i * 0.1 + r * 0.001, loss=1.5)
            if i % 1000 == 0:
                yield alert("NodeMemoryLow", i * 0.1 + 0.05, "n1")

    def peak(path: Path) -> tuple[int, int]:
        source = BundleSource(path)
        try:
            return count_in_order_with_peak(job_timeline(source, EventQuery(job="j")))
        finally:
            source.close()

    write_bundle(tmp_path / "small.tar.gz", "j", events(40_000))
    write_bundle(tmp_path / "large.tar.gz", "j", events(80_000))
    n1, small = peak(tmp_path / "small.tar.gz")
    n2, large = peak(tmp_path / "large.tar.gz")
    tracemalloc.start()
    whole = list(events(40_000))
    listed = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del whole
    assert (n1, n2) == (40_000 + 5, 80_000 + 10)
    assert small < listed / 2, (small, listed)
    assert large < small * 1.5, (small, large)


# --- bundle --opensearch --------------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOpenSearch]:
    f = FakeOpenSearch().start()
    yield f
    f.stop()


def _events(b: Bundle) -> list[dict[str, Any]]:
    return list(b.events())


@pytest.mark.parametrize("job", ["crashj", "stallj", "scrash"])
def test_bundle_from_opensearch_equals_the_stores(
    tmp_path: Path, fake: FakeOpenSearch, capsys: pytest.CaptureFixture[str], job: str
) -> None:
    """The same events into the store and OpenSearch (with another job's and a stray node alert beside
    them): the two bundles hold the same events in the same order, and ``rca --bundle`` says the same."""
    src = Bundle(FIXTURES / f"{job}.tar.gz")
    evs = _events(src)
    src.close()
    noise = [{**evs[0], "_id": "noise-1", "job": "someone-else"}]
    with EventStore(tmp_path / "store") as s:
        for i in range(0, len(evs), 7):
            s.put(evs[i : i + 7])
        s.put(noise)
    settings = OpenSearchSettings(url=fake.url, state_dir=tmp_path / "os-state", backoff_max_s=0.05, timeout_s=1.0)
    OpenSearchSink(settings).send(evs + noise, threading.Event())
    a = make_bundle(capsys, tmp_path / "store.tar.gz", "--store", str(tmp_path / "store"), job=job)
    b = make_bundle(capsys, tmp_path / "os.tar.gz", "--opensearch", fake.url, job=job)
    ba, bb = Bundle(a), Bundle(b)
    got, want = _events(bb), _events(ba)
    assert [e["_id"] for e in got] == [e["_id"] for e in want] and got == want
    assert bb.manifest["events"] == ba.manifest["events"]
    assert (bb.manifest["first_event"], bb.manifest["last_event"]) == (ba.manifest["first_event"],
                                                                       ba.manifest["last_event"])  # fmt: skip
    assert bb.manifest["source"] == f"opensearch {fake.url}"
    ba.close()
    bb.close()
    rc_a, out_a, _ = run(capsys, "rca", "--bundle", str(a), "--job", job, "--json")
    rc_b, out_b, _ = run(capsys, "rca", "--bundle", str(b), "--job", job, "--json")
    assert rc_a == rc_b == 1
    va, vb = orjson.loads(out_a), orjson.loads(out_b)
    assert vb["root_cause"] == va["root_cause"] and vb["verdict"] == va["verdict"] == "fault"


def test_bundle_from_opensearch_failures(
    tmp_path: Path, fake: FakeOpenSearch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.tar.gz"
    rc, _, err = run(capsys, "bundle", "--opensearch", fake.url, "--job", "nope", "--out", str(out))
    assert rc == 4 and "no events of job 'nope'" in err and err.count("\n") == 1 and not out.exists()
    rc, _, err = run(capsys, "bundle", "--opensearch", "http://127.0.0.1:9", "--job", "j", "--out", str(out))
    assert rc == 4 and err.count("\n") == 1 and "Traceback" not in err
    rc, _, err = run(capsys, "bundle", "--opensearch", fake.url, "--store", str(tmp_path), "--job", "j",
                     "--out", str(out))  # fmt: skip
    assert rc == 2 and err.count("\n") == 1
