"""The line parser's pure parts (:mod:`mlops_obs.logs.parse`): formats, times, blocks.

Example-based tests on real text (containerd's and Docker's formats, torch's and NCCL's output,
faulthandler's dumps) and property tests with hypothesis: no input makes the parser raise, every CRI
record reads back as written.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlops_obs.logs.parse import (
    Block,
    canonical_time,
    line_level,
    line_time,
    rank_prefix,
    read_line,
    record_kind,
)
from mlops_obs.logs.redact import plain_value
from mlops_obs.workload.capture import cri_records


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("2026-01-02T03:04:05.123456789Z", "2026-01-02T03:04:05.123456Z"),  # nanoseconds truncated
        ("2026-01-02T03:04:05Z", "2026-01-02T03:04:05.000000Z"),
        ("2026-01-02T03:04:05.5Z", "2026-01-02T03:04:05.500000Z"),  # Go's RFC3339Nano trims zeros
        ("2026-01-02T05:04:05.1+02:00", "2026-01-02T03:04:05.100000Z"),
        ("2026-01-02T00:30:00-01:30", "2026-01-02T02:00:00.000000Z"),
        ("2026-01-02 03:04:05,250Z", "2026-01-02T03:04:05.250000Z"),
        ("2026-01-02T03:04:05.000006Z", "2026-01-02T03:04:05.000006Z"),
        (1767323045.5, "2026-01-02T03:04:05.500000Z"),
        ("2026-01-02T03:04:05", None),  # no zone: a local time of an unknown zone
        ("2026-13-02T03:04:05Z", None),
        ("not a time", None),
        (99999999999999999999, None),
        (True, None),
        (None, None),
        ({"a": 1}, None),
    ],
)
def test_canonical_time(raw: Any, want: str | None) -> None:
    assert canonical_time(raw) == want


def test_line_time_only_with_a_zone() -> None:
    assert line_time("2026-01-02T03:04:05.1Z worker 3 ready") == "2026-01-02T03:04:05.100000Z"
    assert line_time("[2026-01-02 03:04:05,123+00:00] INFO x") == "2026-01-02T03:04:05.123000Z"
    assert line_time("2026-01-02 03:04:05,123 INFO x") is None
    assert line_time("I1206 18:44:12.715298 glog has no year") is None
    assert line_time("step 2026-01-02T03:04:05Z in the middle") is None


def test_cri_lines() -> None:
    line = read_line(b"2026-12-07T17:05:45.125770619Z stderr F [rank1]: RuntimeError: injected crash")
    assert (line.fmt, line.stream, line.partial) == ("cri", "stderr", False)
    assert line.ts == "2026-12-07T17:05:45.125770Z" and line.payload == b"[rank1]: RuntimeError: injected crash"
    p = read_line(b"2016-10-06T00:17:10.113242941Z stdout P part one ")
    assert (p.fmt, p.partial, p.payload) == ("cri", True, b"part one ")
    empty = read_line(b"2016-10-06T00:17:10.1+00:00 stdout F ")
    assert (empty.fmt, empty.payload, empty.ts) == ("cri", b"", "2016-10-06T00:17:10.100000Z")
    tagged = read_line(b"2016-10-06T00:17:10Z stdout F:x text")  # more tags after ':' (reserved by CRI)
    assert (tagged.fmt, tagged.payload) == ("cri", b"text")
    inner = read_line(b'2026-01-02T03:04:05Z stdout F {"event":"step","ts":"2026-01-02T03:04:04.000000Z"}')
    assert inner.fmt == "cri" and inner.record == {"event": "step", "ts": "2026-01-02T03:04:04.000000Z"}
    assert read_line(b"2026-01-02T03:04:05Z stdin F x").fmt == "raw"
    assert read_line(b"2026-01-02 03:04:05Z stdout F x").fmt == "raw"  # CRI times have the T


def test_docker_lines() -> None:
    full = read_line(
        b'{"log":"Traceback (most recent call last):\\n","stream":"stderr","time":"2019-04-26T14:21:16.123456789Z"}'
    )
    assert (full.fmt, full.stream, full.partial, full.payload) == (
        "docker",
        "stderr",
        False,
        b"Traceback (most recent call last):",
    )
    assert full.ts == "2019-04-26T14:21:16.123456Z"
    part = read_line(b'{"log":"abc","stream":"stdout","time":"2019-04-26T14:21:16Z"}')
    assert part.partial and part.payload == b"abc"
    bad = read_line(b'{"log":"x\\n","stream":"stdout","time":"yesterday"}')
    assert bad.fmt == "docker" and bad.ts is None and bad.envelope_ts_invalid == "yesterday"
    # a record that happens to have a "log" key is not Docker's
    ours = read_line(b'{"log":"x","event":"e","level":"info","ts":"2026-01-02T03:04:05.000000Z","seq":1}')
    assert ours.fmt == "json"


def test_json_and_raw_lines() -> None:
    assert read_line(b'{"event":"x"}').record == {"event": "x"}
    for raw in (b"[1,2]", b"{broken", b"plain text", b"\xff\xfe", b"", b"{}x"):
        line = read_line(raw)
        assert line.fmt in ("raw", "json") and line.payload == raw
    assert read_line(b"{}").fmt == "json"


def test_record_kind() -> None:
    assert record_kind({"kind": "launcher"}) == "launcher"
    for k in ("alert", "stack", "log", None, 3, "something"):
        assert record_kind({"kind": k}) is None


timestamps = st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(9998, 12, 31))


@settings(max_examples=300, deadline=None)
@given(timestamps, st.integers(min_value=0, max_value=999), st.sampled_from([b"stdout", b"stderr"]),
       st.binary(max_size=50_000).filter(lambda b: b"\n" not in b))  # fmt: skip
def test_cri_records_read_back_as_written(when: dt.datetime, ns: int, stream: bytes, text: bytes) -> None:
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%f").encode() + b"%03dZ" % ns
    records = cri_records(stamp, stream, [text]).split(b"\n")[:-1]
    got = [read_line(r) for r in records]
    assert all(g.fmt == "cri" and g.stream == stream.decode() for g in got)
    assert [g.partial for g in got] == [True] * (len(got) - 1) + [False]
    joined = b"".join(g.payload for g in got)
    assert joined == (text[:-1] if text.endswith(b"\r") else text)
    assert got[0].ts == when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_no_bytes_make_the_line_reader_raise(raw: bytes) -> None:
    line = read_line(raw.replace(b"\n", b""))
    assert line.fmt in ("cri", "docker", "json", "raw")
    if line.record is not None:
        orjson.dumps(plain_value(line.record))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=80).filter(lambda t: "\n" not in t), max_size=30))
def test_blocks_never_raise_and_keep_every_line(lines: list[str]) -> None:
    block: Block | None = None
    kept: list[str] = []
    for text in lines:
        if block is not None and block.accepts(text):
            block.add(text)
            continue
        if block is not None:
            kept += block.lines
        block = Block.start(text)
        if block is None:
            kept.append(text)
    if block is not None:
        kept += block.lines
    assert kept == lines


def join(lines: list[str], stream: str | None = None) -> list[tuple[str, str, str]]:
    """(kind or 'line', level, text) of the events ``lines`` make, as the parser groups them."""
    out: list[tuple[str, str, str]] = []
    block: Block | None = None
    for text in lines:
        if block is not None:
            if block.accepts(text, stream):
                block.add(text)
                continue
            out.append((block.kind, block.level, block.text()))
            block = None
        block = Block.start(text, stream)
        if block is None:
            out.append(("line", line_level(text), text))
    if block is not None:
        out.append((block.kind, block.level, block.text()))
    return out


TRACEBACK = """Traceback (most recent call last):
  File "/app/train.py", line 12, in <module>
    main()
  File "/app/train.py", line 8, in main
    raise ValueError("bad batch")
ValueError: bad batch""".splitlines()


def test_a_python_traceback_is_one_error_event() -> None:
    got = join(["step 5 done", *TRACEBACK, "next line"])
    assert got == [("line", "info", "step 5 done"), ("traceback", "error", "\n".join(TRACEBACK)),
                   ("line", "info", "next line")]  # fmt: skip


def test_a_chained_traceback_stays_one_event_and_a_second_crash_does_not_join() -> None:
    chained = [*TRACEBACK, "", "During handling of the above exception, another exception occurred:", "",
               *TRACEBACK[:-1], "KeyError: 'x'"]  # fmt: skip
    got = join([*chained, "", *TRACEBACK])
    assert [(k, lv) for k, lv, _ in got] == [("traceback", "error"), ("traceback", "error")]
    assert got[0][2] == "\n".join(chained)


def test_torch_rank_blocks_carry_their_rank_and_worst_level() -> None:
    block = [
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "/w/train.py", line 167, in main',
        '[rank1]:     raise RuntimeError(f"injected crash at step {step}")',
        "[rank1]: RuntimeError: injected crash at step 10",
        "",
        "[rank1]: At:",
    ]
    got = join([*block, "[rank0]: something else", "plain"])
    assert got[0] == ("rank", "error", "\n".join(block))
    assert got[1] == ("rank", "info", "[rank0]: something else")
    assert rank_prefix(block[0]) == 1 and rank_prefix("[Rank 12]: x") == 12 and rank_prefix("rank1: x") is None
    b = Block.start(block[0])
    assert b is not None and b.rank == 1


def test_rank_lines_far_apart_in_time_are_two_events() -> None:
    b = Block.start("[rank0]:[W1207 17:05:45.1 x.cpp:1] Warning: one", "stderr", "2026-01-02T03:04:05.000000Z")
    assert b is not None
    assert b.accepts("[rank0]: next", "stderr", "2026-01-02T03:04:06.500000Z")
    assert not b.accepts("[rank0]: much later", "stderr", "2026-01-02T03:05:06.000000Z")
    assert not b.accepts("[rank0]: other stream", "stdout", "2026-01-02T03:04:05.000000Z")


def test_nccl_warn_blocks_and_glog_levels() -> None:
    lines = [
        "n1:5939:6010 [2] NCCL INFO Channel 00/0 : 2[2] -> 3[3] via P2P/IPC",
        "n1:5939:6010 [2] NCCL WARN Call to ibv_create_qp failed with error Cannot allocate memory",
        "n1:5939:6010 [2] NCCL INFO transport/net_ib.cc:1089 -> 2",
        "n1:5939:6010 [2] NCCL INFO transport/net.cc:839 -> 2",
        "n1:5940:6011 [3] NCCL INFO other process",
    ]
    got = join(lines)
    assert got[0] == ("line", "info", lines[0])
    assert got[1] == ("nccl", "warning", "\n".join(lines[1:4]))
    assert got[2] == ("line", "info", lines[4])
    watchdog = ("[rank3]:[E1206 18:44:12.715298746 ProcessGroupNCCL.cpp:607] [Rank 3] Watchdog caught collective "
                "operation timeout: WorkNCCL(SeqNum=7753, OpType=ALLREDUCE) ran for 600061 milliseconds")  # fmt: skip
    assert line_level(watchdog) == "error"
    assert line_level("[rank0]:[W1206 18:44:12.7 x.cpp:1] Warning: y") == "warning"


def test_faulthandler_dumps_are_one_event() -> None:
    dump = [
        "Fatal Python error: Segmentation fault",
        "",
        "Current thread 0x00007f1ed1c0db80 (most recent call first):",
        '  File "/tmp/rcas/hang.py", line 8 in _hang',
        '  File "/tmp/rcas/hang.py", line 11 in <module>',
        "",
        "Extension modules: numpy.core._multiarray_umath, torch._C (total: 2)",
    ]
    got = join(["before", *dump, "after"])
    assert got == [("line", "info", "before"), ("faulthandler", "critical", "\n".join(dump)),
                   ("line", "info", "after")]  # fmt: skip
