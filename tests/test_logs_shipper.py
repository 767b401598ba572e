"""The shipper on real files: every rotation kind while writing, awkward lines, disk full on the
state directory, the sidecar collector, the CLI, and the reference workload end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlops_obs.collectors.shipper import ShipperCollector
from mlops_obs.logs.shipper import STATE_FILE, Shipper, ShipperOptions
from mlops_obs.logs.store import EventStore, StoreSink
from tests.conftest import require_binary, wait_for
from tests.logs_helpers import (
    REPO,
    kill9,
    line,
    reconcile,
    run_ship,
    ship_cmd,
    start_ship,
    store_count,
    store_events,
)


def _shipper(tmp_path: Path, sources: list[str], **kw: Any) -> Shipper:
    opts = ShipperOptions(sources=sources, state_dir=tmp_path / "state", scan_interval=0.05, poll_interval=0.01, **kw)
    return Shipper(opts, StoreSink(tmp_path / "store"))


def _once(tmp_path: Path, sources: list[str], **kw: Any) -> Shipper:
    sh = _shipper(tmp_path, sources, **kw)
    sh.run(once=True)
    sh.close()
    return sh


def test_awkward_lines(tmp_path: Path) -> None:
    """CRLF, empty lines, invalid UTF-8 (kept, flagged), raw text with inferred levels, a traceback as one
    error event, a partial last line that is waited for and shipped whole exactly once when its newline
    arrives."""
    logs = tmp_path / "logs"
    logs.mkdir()
    f = logs / "job-rank2.stderr.log"
    f.write_bytes(
        line("s", 1).replace(b"\n", b"\r\n")
        + b"\n\r\n"
        + b"NCCL WARN Call to connect returned Connection refused\n"
        + b'Traceback (most recent call last):\n  File "train.py", line 3, in <module>\nRuntimeError: NCCL error\n'
        + b"bad \xff\xfe bytes\n"
        + line("s", 2)[:40]
    )
    _once(tmp_path, [str(logs / "*")])
    evs = store_events(tmp_path / "store")
    by_msg = {e["message"]: e for e in evs}
    assert len(evs) == 4
    assert by_msg["NCCL WARN Call to connect returned Connection refused"]["level"] == "warning"
    tb = 'Traceback (most recent call last):\n  File "train.py", line 3, in <module>\nRuntimeError: NCCL error'
    assert by_msg[tb]["level"] == "error" and by_msg[tb]["fields"]["lines"] == 3
    bad = by_msg["bad \\xff\\xfe bytes"]
    assert bad["fields"]["invalid_utf8"] is True
    assert bad["job"] == "job" and bad["rank"] == 2  # from the workload's file naming
    with open(f, "ab") as fh:
        fh.write(line("s", 2)[40:])
    _once(tmp_path, [str(logs / "*")])
    reconcile(store_events(tmp_path / "store"), {"s": 2})


def test_ten_megabyte_line_is_split_not_blocking(tmp_path: Path) -> None:
    """A 10 MB line ships as flagged 1 MiB parts that reassemble exactly; the lines after it flow."""
    logs = tmp_path / "logs"
    logs.mkdir()
    big = line("big", 1, blob="x" * (10 << 20))
    (logs / "a.log").write_bytes(line("s", 1) + big + line("s", 2) + line("s", 3))
    sh = _once(tmp_path, [str(logs / "*.log")])
    evs = store_events(tmp_path / "store")
    parts = sorted((e for e in evs if "split" in e["fields"]), key=lambda e: e["offset"])
    assert len(parts) == 11 and parts[-1]["fields"]["split"]["last"] is True
    assert [p["fields"]["split"]["part"] for p in parts] == list(range(11))
    assert "".join(p["message"] for p in parts).encode() + b"\n" == big
    assert sh.stats.lines_split == 1
    reconcile(evs, {"s": 3})


def test_identical_lines_in_same_millisecond_both_kept(tmp_path: Path) -> None:
    """Byte-identical lines are distinct events (identity is the offset, never the content)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    same = line("s", 1)
    (logs / "a.log").write_bytes(same + same)
    _once(tmp_path, [str(logs / "*.log")])
    evs = store_events(tmp_path / "store")
    assert len(evs) == 2 and evs[0]["_id"] != evs[1]["_id"] and evs[0]["message"] == evs[1]["message"]


def _follow(sh: Shipper) -> threading.Thread:
    t = threading.Thread(target=sh.run, daemon=True)
    t.start()
    return t


def _shipped_offsets(sh: Shipper) -> bool:
    """The shipper acknowledged everything currently in the files it has open."""
    return all(os.fstat(tf.fd).st_size == tf.state.offset for tf in list(sh.files.open.values())) and bool(
        sh.files.open
    )


@pytest.mark.parametrize("kind", ["rename", "rename_out_of_glob", "copytruncate", "truncate", "delete_recreate"])
def test_rotation_while_writing(tmp_path: Path, kind: str) -> None:
    """Each rotation kind mid-stream, the shipper following: every line once, none twice.

    Truncation in place and delete+recreate destroy unread bytes by definition, so (as with any
    shipper) the writer rotates those only after the shipper caught up; rename and copytruncate
    need no such wait.
    """
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "app.log"
    sh = _shipper(tmp_path, [str(logs / "app.log*")])
    t = _follow(sh)
    seq = 0

    def write(n: int, to: Path = path) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            with open(to, "ab") as f:
                f.write(line("s", seq))

    write(300)
    wait_for(lambda: sh.stats.events_shipped >= 1)
    if kind in ("truncate", "delete_recreate"):
        wait_for(lambda: _shipped_offsets(sh))
    if kind == "rename":
        os.rename(path, logs / "app.log.1")
        write(100, logs / "app.log.1")  # the writer's old handle still appends to the renamed file
    elif kind == "rename_out_of_glob":  # drained through the shipper's open descriptor
        (tmp_path / "archive").mkdir()
        os.rename(path, tmp_path / "archive" / "app.log.1")
        write(100, tmp_path / "archive" / "app.log.1")
    elif kind == "copytruncate":
        with open(path, "rb") as src, open(logs / "app.log.1", "wb") as dst:
            dst.write(src.read())
        os.truncate(path, 0)
    elif kind == "truncate":
        os.truncate(path, 0)
    else:
        path.unlink()
    write(300)
    wait_for(lambda: sh.stats.events_shipped >= seq, timeout=30)
    sh.stop_event.set()
    t.join(timeout=30)
    sh.close()
    _once(tmp_path, [str(logs / "app.log*")])  # a restart finds nothing more to ship
    reconcile(store_events(tmp_path / "store"), {"s": seq})


def test_disk_full_on_state_dir_then_space_returns(tmp_path: Path) -> None:
    """ENOSPC on the checkpoint: a clear error, the shipper holds; when space returns, nothing is lost."""
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    state.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 2001)))
    # The checkpoint's temp file is a symlink to /dev/full: the kernel's own ENOSPC on write.
    tmp = state / (STATE_FILE + ".tmp")
    tmp.symlink_to("/dev/full")
    proc = start_ship(ship_cmd([str(logs / "*.log")], store=store, state=state))
    try:
        stats = state / "stats.json"
        wait_for(lambda: stats.exists() and orjson.loads(stats.read_bytes()).get("sink_error"), timeout=60)
        assert "No space left on device" in orjson.loads(stats.read_bytes())["sink_error"]
        with open(logs / "a.log", "ab") as f:  # the job keeps writing meanwhile
            f.write(b"".join(line("s", i) for i in range(2001, 3001)))
        tmp.unlink()  # space returns
        wait_for(lambda: (state / STATE_FILE).exists() and store_count(store) >= 3000, timeout=60)
    finally:
        kill9(proc)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "cannot write checkpoint" in err and "No space left on device" in err
    r = run_ship(ship_cmd([str(logs / "*.log")], store=store, state=state, once=True))
    assert r.returncode == 0, r.stderr
    reconcile(store_events(store), {"s": 3000})


def test_collector_exports_shipper_stats(tmp_path: Path) -> None:
    """The sidecar's shipper collector turns stats.json into the mlops_shipper_* families."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 101)) + b"\npartial")
    _once(tmp_path, [str(logs / "*.log")])
    fams = {m.name: m for m in ShipperCollector({"shipper.state-dir": tmp_path / "state"}).sample()}
    value = {n: m.samples[0].value for n, m in fams.items() if m.samples and n != "mlops_shipper_lag_bytes"}
    assert value["mlops_shipper_lines_read"] == 101 and value["mlops_shipper_events_shipped"] == 100
    assert value["mlops_shipper_retries"] == 0 and value["mlops_shipper_dead_letters"] == 0
    assert value["mlops_shipper_last_success_timestamp_seconds"] > time.time() - 600
    lag = fams["mlops_shipper_lag_bytes"].samples
    assert [(s.labels["file"], s.value) for s in lag] == [(str(logs / "a.log"), len(b"partial"))]
    assert ShipperCollector({"shipper.state-dir": tmp_path / "nothing"}).sample() == []
    (tmp_path / "state" / "stats.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"stats\.json"):
        list(ShipperCollector({"shipper.state-dir": tmp_path / "state"}).sample())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "source: give at least one --source GLOB"),
        (["--source", "x", "--opensearch", "ftp://h"], "opensearch: expected an http:// or https:// URL"),
        (["--source", "x", "--store", "s", "--opensearch", "http://h:9200"], "store: give --store or --opensearch"),
        (["--source", "x", "--ship.batch-events", "0"], "ship.batch-events: must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path: Path, args: list[str], message: str) -> None:
    """Bad flags: one line naming the setting, exit 2."""
    r = subprocess.run([sys.executable, "-m", "mlops_obs", "ship", *args], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    """A damaged checkpoint stops the shipper with a message saying what to do; no silent re-ship."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / STATE_FILE).write_text("{garbage")
    r = run_ship(ship_cmd(["x"], store=tmp_path / "store", state=tmp_path / "state", once=True))
    assert r.returncode == 1 and "checkpoint" in r.stderr and "unreadable" in r.stderr


def test_once_after_the_workload_returns_every_line(tmp_path: Path) -> None:
    """`mlops-obs workload` then `mlops-obs ship --once` into the store: a query returns every line."""
    logs = tmp_path / "logs"
    w = subprocess.run(
        [sys.executable, "-m", "mlops_obs", "workload", "--world-size", "2", "--steps", "6", "--log-every", "1",
         "--log-dir", str(logs), "--job", "wl", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert w.returncode == 0, w.stderr[-2000:]
    written = {p.name: p.read_bytes().splitlines() for p in sorted(logs.glob("*-rank*.jsonl"))}
    assert len(written) == 2 and all(written.values())
    r = run_ship(ship_cmd([str(logs / "*")], store=tmp_path / "store", state=tmp_path / "state", once=True))
    assert r.returncode == 0, r.stderr
    with EventStore(tmp_path / "store") as s:
        launcher = s.query(job="wl", kind="launcher")
        assert [e["message"] for e in launcher][:3] == ["launcher starting", "rank started", "rank started"]
        assert [e["fields"]["exit_code"] for e in launcher if e["message"] == "rank exited"] == [0, 0]
        for rank in (0, 1):
            evs = s.query(job="wl", rank=rank, kind="log")
            lines = [orjson.loads(x) for x in written[f"wl-rank{rank}.jsonl"]]
            assert [e["seq"] for e in evs if e["seq"] is not None] == [x["seq"] for x in lines]
            assert [e["message"] for e in evs if e["seq"] is not None] == [x["event"] for x in lines]
            assert {e["fields"]["run_id"] for e in evs if e["seq"] is not None} == {lines[0]["run_id"]}
        assert len(s.query(job="wl", text="step")) == sum(1 for x in written.values() for ln in x if b'"step"' in ln)


def test_broad_glob_never_ships_the_store_or_state(tmp_path: Path) -> None:
    """`--source 'dir/**'` around the store and state dirs ships only the logs, not our database."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 51)))
    for _ in range(2):  # the second run sees the database and checkpoint already there
        r = run_ship(ship_cmd([str(tmp_path / "**")], store=tmp_path / "store", state=tmp_path / "state", once=True))
        assert r.returncode == 0, r.stderr
    evs = store_events(tmp_path / "store")
    assert {e["source"] for e in evs} == {str(logs / "a.log")}
    reconcile(evs, {"s": 50})


def test_exporter_serves_shipper_metrics_and_promtool_accepts_them(
    start_exporter: Callable[..., Any], tmp_path: Path
) -> None:
    """The real sidecar with --shipper.state-dir serves the mlops_shipper_* series, lint-clean."""
    promtool = require_binary("promtool")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 11)))
    _once(tmp_path, [str(logs / "*.log")])
    ex = start_exporter(**{"collector.gpu": False, "shipper.state-dir": tmp_path / "state"})
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(ex.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        if "mlops_shipper_events_shipped_total" in text:
            break
        time.sleep(0.1)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["mlops_shipper_events_shipped"].samples[0].value == 10
    assert fams["mlops_shipper_lag_bytes"].samples[0].labels["file"] == str(logs / "a.log")
    ok = {s.labels["collector"]: s.value for s in fams["mlops_scrape_collector_success"].samples}
    assert ok["shipper"] == 1
    shipper_text = "".join(ln + "\n" for ln in text.splitlines() if "mlops_shipper_" in ln)
    r = subprocess.run([promtool, "check", "metrics"], input=shipper_text.encode(), capture_output=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), (r.stdout + r.stderr).decode()


def _hostile_corpus() -> list[bytes]:
    """Lines that each once stopped a shipper somewhere (issue 11), with ordinary ones between them."""
    deep_obj = b"{" + b'"a":{' * 300 + b'"x":1' + b"}" * 300 + b"}"
    deep_arr = b'{"event":"deep list","v":' + b"[" * 1000 + b"]" * 1000 + b"}"
    too_deep = b"[" * 2000 + b"]" * 2000  # beyond what the JSON decoder takes: raw text
    return [
        deep_obj,
        deep_arr,
        too_deep,
        b'{"ts":"not a time","event":"malformed ts","level":"info"}',
        b'{"ts":99999999999999999999,"event":"ts out of range","level":"info"}',
        b'{"ts":"2026-01-01T00:00:00Z","event":"20-digit rank","rank":12345678901234567890,"level":"info"}',
        b'{"ts":"2026-01-01T00:00:00Z","event":"rank as text","rank":"\xc2\xb2","seq":"x","level":7}',
        b'{"ts":"2026-01-01T00:00:00Z","event":"nul \\u0000 in json","level":"info"}',
        b"raw with a nul \x00 byte",
        b'{"event":"invalid utf8 \xff\xfe in json","level":"info"}',
        b"raw \xff\xfe invalid utf8",
        b'{"ts":"2026-01-01T00:00:00Z","event":{"not":"a string"},"job":["x"],"node":{"n":1},"level":"info"}',
        b'{"log":"docker line with a bad time\\n","stream":"stderr","time":"yesterday"}',
        b"2026-01-01T00:00:00.1Z stdout X a CRI-looking line with a bad tag",
        b"9999-99-99T99:99:99Z stdout F an impossible CRI time",
        b'{"event":"big numbers","f":1e308,"i":18446744073709551615,"level":"info","ts":"2026-01-01T00:00:00Z"}',
        b"{" * 5000,
        b'{"kind":"alert","event":"a log record claiming to be an alert","level":"critical"}',
        b"x" * (10 << 20),  # a 10 MB line
        b'{"event":"last ordinary line","level":"info","ts":"2026-01-01T00:00:01Z"}',
    ]


def test_hostile_corpus_ships_every_line_exactly_once_and_never_stops(tmp_path: Path) -> None:
    """Each line of the corpus is shipped (one event, or the 1 MiB parts of the 10 MB line) exactly once
    into the store, by `ship --once` (exit 0) and again by a second run (nothing new, nothing twice);
    every stored event has a usable time, never the time of shipping."""
    logs = tmp_path / "logs"
    logs.mkdir()
    corpus = _hostile_corpus()
    ordinary = [line("s", i) for i in range(1, len(corpus) + 1)]
    data = b"".join(bad + b"\n" + ok for bad, ok in zip(corpus, ordinary, strict=True))
    (logs / "hostile-rank0.jsonl").write_bytes(data)
    t_written = time.time()
    for _ in range(2):
        r = run_ship(ship_cmd([str(logs / "*")], store=tmp_path / "store", state=tmp_path / "state", once=True))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
    evs = store_events(tmp_path / "store")
    starts, off = [], 0
    for raw in data.split(b"\n")[:-1]:
        starts.append(off)
        off += len(raw) + 1
    firsts = sorted(e["offset"] for e in evs if "split" not in e["fields"] or e["fields"]["split"]["part"] == 0)
    assert firsts == starts  # every line once, in its own event
    parts = [e for e in evs if "split" in e["fields"]]
    assert len(parts) == 10 and sum(len(e["message"]) for e in parts) == 10 << 20
    reconcile([e for e in evs if e["fields"].get("stream") == "s"], {"s": len(ordinary)})
    shipped_after = t_written + 1.0
    for e in evs:
        src = e["fields"].get("ts_source")
        assert src in (None, "record", "neighbour", "mtime", "line", "docker", "cri"), e
        if src == "mtime":
            assert e["@timestamp"] <= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(shipped_after))
    by = {e["message"]: e for e in evs}
    big = by["20-digit rank"]
    assert big["rank"] is None and big["fields"]["rank_invalid"] == "12345678901234567890"
    assert by["malformed ts"]["fields"]["ts_invalid"] == "not a time"
    assert by["a log record claiming to be an alert"]["kind"] == "log"
    assert by["invalid utf8 \ufffd\ufffd in json"]["fields"]["invalid_utf8"] is True
    assert by["docker line with a bad time"]["fields"]["ts_invalid"] == "yesterday"


def test_a_live_cri_file_is_joined_and_timed_while_followed(tmp_path: Path) -> None:
    """Followed live: a traceback written line by line to a CRI file is one error event with the time of
    its first line, once the file goes quiet; a raw file's lines get the time they were first read."""
    logs = tmp_path / "logs"
    logs.mkdir()
    cri_file, raw_file = logs / "live-rank3.log", logs / "live.txt"
    cri_file.write_bytes(b"2026-01-02T03:04:05.000000001Z stdout F started\n")
    raw_file.write_bytes(b"old line, read from the backlog\n")
    sh = _shipper(tmp_path, [str(logs / "*")])
    t = threading.Thread(target=sh.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: store_count(tmp_path / "store") == 2, "the backlog")
        tb = ["Traceback (most recent call last):", '  File "train.py", line 9, in <module>', "ValueError: boom"]
        with open(cri_file, "ab") as f:
            for i, text in enumerate(tb):
                f.write(f"2026-01-02T03:04:06.{i:09d}Z stderr F {text}\n".encode())
                f.flush()
        before = time.time()
        with open(raw_file, "ab") as f:
            f.write(b"written while followed\n")
        wait_for(lambda: store_count(tmp_path / "store") == 4, "the traceback and the new raw line")
        after = time.time()
    finally:
        sh.stop_event.set()
        t.join(30)
        sh.close()
    evs = {e["message"].split("\n")[0]: e for e in store_events(tmp_path / "store")}
    tbe = evs["Traceback (most recent call last):"]
    assert (tbe["level"], tbe["rank"], tbe["@timestamp"]) == ("error", 3, "2026-01-02T03:04:06.000000Z")
    assert tbe["message"] == "\n".join(tb) and tbe["fields"]["ts_source"] == "cri"
    old, new = evs["old line, read from the backlog"], evs["written while followed"]
    assert old["fields"]["ts_source"] == "mtime" and new["fields"]["ts_source"] == "followed"
    from mlops_obs.rca.times import epoch

    assert before - 0.5 <= epoch(new["@timestamp"]) <= after + 0.5
