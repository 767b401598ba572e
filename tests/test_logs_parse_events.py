"""The shipper's parser (:class:`mlops_obs.logs.events.LineParser`) over whole files: which lines become
which events, their kinds, times and ``ts_source``, ranks and levels, pending events and flushes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlops_obs.logs.events import LineParser
from mlops_obs.logs.parse import STACK_REQUEST_EVENT, STACK_TRAILER_EVENT
from mlops_obs.workload.capture import MAX_LINE, cri_records

T0 = "2026-01-02T03:04:05.000000Z"


def feed_all(parser: LineParser, data: bytes, flush: bool = True) -> list[dict[str, Any]]:
    """Events of ``data`` fed line by line as the shipper does (empty lines skipped, CR stripped)."""
    out: list[dict[str, Any]] = []
    off = 0
    for raw in data.split(b"\n")[:-1]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line:
            out += parser.feed(line, off)
        off += len(raw) + 1
    if flush:
        out += parser.flush()
    return out


def cri(ts: str, stream: str, text: str, tag: str = "F") -> bytes:
    return f"{ts} {stream} {tag} {text}\n".encode()


def test_a_cri_file_of_a_crashed_rank() -> None:
    tb = [
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "/w/train.py", line 167, in main',
        '[rank1]:     raise RuntimeError(f"injected crash at step {step}")',
        "[rank1]: RuntimeError: injected crash at step 10",
    ]
    data = cri("2026-01-02T03:04:05.100000001Z", "stdout", "starting")
    data += b"".join(cri("2026-01-02T03:04:07.250000000Z", "stderr", t) for t in tb)
    data += cri("2026-01-02T03:04:07.250000000Z", "stderr", "")  # the blank line after a traceback
    data += cri("2026-01-02T03:04:09.5Z", "stdout", "bye")
    p = LineParser("/logs/j-rank1.log", "f" * 20, "", node="n1")
    evs = feed_all(p, data)
    assert [(e["@timestamp"], e["level"], e["rank"], e["message"]) for e in evs] == [
        ("2026-01-02T03:04:05.100000Z", "info", 1, "starting"),
        ("2026-01-02T03:04:07.250000Z", "error", 1, "\n".join(tb)),
        ("2026-01-02T03:04:09.500000Z", "info", 1, "bye"),
    ]
    assert evs[1]["fields"] == {"stream": "stderr", "lines": 4, "block": "rank", "raw": True, "ts_source": "cri"}
    assert [e["_id"] for e in evs] == ["f" * 20 + "-0", "f" * 20 + f"-{data.index(b'2026-01-02T03:04:07')}",
                                       "f" * 20 + f"-{data.index(b'2026-01-02T03:04:09')}"]  # fmt: skip
    assert all(e["job"] == "j" and e["node"] == "n1" and e["kind"] == "log" for e in evs)


def test_rank_prefix_names_the_rank_in_a_combined_file() -> None:
    data = cri(T0, "stderr", "[rank3]: ValueError: bad") + cri(T0, "stderr", "[rank0]: ok")
    evs = feed_all(LineParser("/logs/torchrun.log", "f" * 20, ""), data)
    assert [(e["rank"], e["level"]) for e in evs] == [(3, "error"), (0, "info")]


def test_cri_pieces_are_joined_into_their_line() -> None:
    long = "x" * (3 * MAX_LINE + 7)
    data = cri_records(b"2026-01-02T03:04:05.000000001Z", b"stderr", [long.encode()])
    data += cri_records(b"2026-01-02T03:04:06.000000001Z", b"stdout", [b'{"event": "step", "step": 3}'])
    evs = feed_all(LineParser("/logs/j-rank0.log", "f" * 20, ""), data)
    assert [e["message"] for e in evs] == [long, "step"]
    assert evs[0]["@timestamp"] == "2026-01-02T03:04:05.000000Z" and evs[0]["offset"] == 0
    assert evs[1]["fields"] == {"step": 3, "ts_source": "cri", "stream": "stdout"}  # a record without its own ts


def test_interleaved_streams_do_not_join_and_a_trailing_piece_is_kept() -> None:
    data = cri(T0, "stdout", "half of a ", "P") + cri(T0, "stderr", "other stream") + cri(T0, "stdout", "tail", "P")
    evs = feed_all(LineParser("/logs/j-rank0.log", "f" * 20, ""), data)
    assert [(e["message"], e["fields"].get("partial")) for e in evs] == [
        ("half of a ", True), ("other stream", None), ("tail", True)]  # fmt: skip


def test_docker_lines_join_and_carry_their_time() -> None:
    lines = [
        {"log": "Traceback (most recent call last):\n", "stream": "stderr", "time": "2019-04-26T14:21:16.1Z"},
        {"log": '  File "a.py", line 1, in <module>\n', "stream": "stderr", "time": "2019-04-26T14:21:16.1Z"},
        {"log": "ZeroDivisionError: div", "stream": "stderr", "time": "2019-04-26T14:21:16.1Z"},
        {"log": "ision by zero\n", "stream": "stderr", "time": "2019-04-26T14:21:16.2Z"},
        {"log": "ok\n", "stream": "stdout", "time": "2019-04-26T14:21:17Z"},
    ]
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    evs = feed_all(LineParser("/var/lib/docker/containers/c/c-json.log", "f" * 20, ""), data)
    assert [(e["level"], e["message"], e["fields"]["ts_source"]) for e in evs] == [
        ("error", 'Traceback (most recent call last):\n  File "a.py", line 1, in <module>\n'
                  "ZeroDivisionError: division by zero", "docker"),
        ("info", "ok", "docker"),
    ]  # fmt: skip
    assert evs[0]["@timestamp"] == "2019-04-26T14:21:16.100000Z"


def test_raw_lines_are_timed_by_their_own_stamp_the_follower_the_neighbours_or_the_mtime() -> None:
    p = LineParser("/logs/nccl.txt", "f" * 20, "")
    p.note_read(0, "", False, "2026-01-02T09:00:00.000000Z")
    data = b"no time yet\n2026-01-02T03:04:05.5Z worker ready\nafter it\n"
    evs = feed_all(p, data)
    assert [(e["@timestamp"], e["fields"]["ts_source"]) for e in evs] == [
        ("2026-01-02T09:00:00.000000Z", "mtime"),  # nothing before it: the file's mtime bounds it
        ("2026-01-02T03:04:05.500000Z", "line"),
        ("2026-01-02T03:04:05.500000Z", "neighbour"),
    ]
    off = len(data)
    p.note_read(off, "2026-01-02T03:05:00.000000Z", True, "2026-01-02T03:05:00.000000Z")  # tailing: new bytes
    evs = p.feed(b"written while followed", off) + p.flush()
    assert [(e["@timestamp"], e["fields"]["ts_source"]) for e in evs] == [("2026-01-02T03:05:00.000000Z", "followed")]


def test_records_time_and_normalisation() -> None:
    p = LineParser("/logs/j-rank2.jsonl", "f" * 20, "2026-01-01T00:00:00.000000Z")
    deep = "{" + '"a":{' * 300 + '"x":1' + "}" * 300 + "}"
    lines = [
        '{"ts":"not a time","event":"bad ts","level":"info"}',
        '{"ts":"2026-01-02T03:04:05Z","event":"big rank","rank":12345678901234567890,"level":"info",'
        '"seq":99999999999999999999}',
        deep,
        '{"ts":"2026-01-02T03:04:06Z","event":"nul \\u0000 here","level":"verbose","job":{"x":1},"node":7}',
        '{"ts":"2026-01-02T03:04:07Z","event":"launch","kind":"launcher","level":"info","rank":1}',
        '{"ts":"2026-01-02T03:04:08Z","event":"user kind","kind":"alert","level":"info"}',
    ]
    evs = feed_all(p, "\n".join(lines).encode() + b"\n")
    bad, big, d, nul, launch, user = evs
    assert bad["@timestamp"] == "2026-01-01T00:00:00.000000Z"
    assert bad["fields"] == {"ts_invalid": "not a time", "ts_source": "neighbour"}
    assert big["rank"] is None and big["fields"]["rank_invalid"] == "12345678901234567890"
    assert big["seq"] is None and big["fields"]["seq_invalid"] == "1e+20"  # JSON's big number, as decoded
    orjson.dumps(d)  # storable
    assert d["message"] == "" and isinstance(d["fields"]["a"], dict)
    assert nul["message"] == "nul \x00 here" and nul["level"] == "verbose"
    assert nul["job"] == '{"x":1}' and nul["node"] == "7"
    assert launch["kind"] == "launcher" and launch["rank"] == 1 and "kind" not in launch["fields"]
    assert user["kind"] == "log" and user["fields"]["kind"] == "alert"  # only the file kinds are taken


def _dump(rank: int, reason: str, t: str) -> bytes:
    req = {"ts": t, "event": STACK_REQUEST_EVENT, "reason": reason, "rank": rank, "pid": 42}
    fr = {"backend": "gloo", "pg_status": {"0": {"last_enqueued_collective": 36}}}
    trailer = {"ts": t.replace("05.0", "05.1"), "event": STACK_TRAILER_EVENT, "rank": rank, "pid": 42,
               "flight_recorder": fr}  # fmt: skip
    text = (
        "Thread 0x00007ff4fa9cd6c0 (most recent call first):\n"
        '  File "/w/signals.py", line 160 in _watch\n'
        "\n"
        "Current thread 0x00007ff4fb8aab80 (most recent call first):\n"
        '  File "/usr/lib/python3.11/threading.py", line 327 in wait\n'
        '  File "/w/train.py", line 262 in _hang\n'
        '  File "<frozen runpy>", line 198 in _run_module_as_main\n'
    )
    return orjson.dumps(req) + b"\n" + text.encode() + orjson.dumps(trailer) + b"\n"


def test_each_stack_dump_is_one_stack_event() -> None:
    data = _dump(1, "stall: no rank completed a step for 2.0s", "2026-01-02T03:04:05.000000Z")
    data += _dump(1, "SIGTERM received", "2026-01-02T03:05:05.000000Z")
    data += b'Current thread 0x00007f (most recent call first):\n  File "/w/x.py", line 1 in f\n'  # kill -USR1 by hand
    p = LineParser("/logs/j-rank1.stack", "f" * 20, "")
    p.note_read(0, "", False, "2026-01-02T03:06:00.000000Z")
    evs = feed_all(p, data)
    assert [(e["kind"], e["rank"], e["@timestamp"], e["message"]) for e in evs] == [
        ("stack", 1, "2026-01-02T03:04:05.000000Z", "stack dump: stall: no rank completed a step for 2.0s"),
        ("stack", 1, "2026-01-02T03:05:05.000000Z", "stack dump: SIGTERM received"),
        ("stack", 1, "2026-01-02T03:05:05.100000Z", "stack dump"),
    ]
    f = evs[0]["fields"]
    assert f["threads"] == 2 and f["pid"] == 42 and f["dumped_at"] == "2026-01-02T03:04:05.100000Z"
    assert f["stack"].startswith("Thread 0x00007ff4fa9cd6c0") and "in _hang" in f["stack"]
    assert f["flight_recorder"]["pg_status"]["0"]["last_enqueued_collective"] == 36
    assert evs[2]["fields"]["incomplete"] is True and evs[2]["fields"]["ts_source"] == "neighbour"


def test_pending_events_hold_the_checkpoint_at_their_first_line() -> None:
    p = LineParser("/logs/j-rank0.log", "f" * 20, "2026-01-01T00:00:00.000000Z")
    first = cri(T0, "stdout", "plain")
    tb = cri(T0, "stderr", "Traceback (most recent call last):") + cri(T0, "stderr", '  File "x", line 1, in f')
    evs = feed_all(p, first + tb, flush=False)
    assert [e["message"] for e in evs] == ["plain"]
    assert p.pending_offset == len(first)  # the traceback is not complete: a restart reads it again
    assert p.checkpoint_ts == T0
    evs = p.feed(cri(T0, "stderr", "ValueError: x")[:-1], len(first + tb)) + p.feed(
        b"2026-01-02T03:04:05Z stdout F next", 999
    )
    assert [e["level"] for e in evs] == ["error", "info"] and p.pending_offset is None


def test_parse_of_one_line_is_what_feed_gives_it_alone() -> None:
    p = LineParser("/logs/j-rank0.jsonl", "f" * 20, T0)
    ev = p.parse(b'{"event":"x","level":"warn","ts":"2026-01-02T03:04:05Z"}', 7)
    assert (ev["_id"], ev["level"], ev["message"], ev["@timestamp"]) == ("f" * 20 + "-7", "warning", "x",
                                                                         "2026-01-02T03:04:05.000000Z")  # fmt: skip


lines_strategy = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda t, s, tag: cri("2026-01-02T03:04:05.1Z", s, t, tag),
            st.text(max_size=60),
            st.sampled_from(["stdout", "stderr"]),
            st.sampled_from(["F", "P"]),
        ),
        st.sampled_from(
            [
                b"Traceback (most recent call last):",
                b'  File "x", line 1, in f',
                b"ValueError: v",
                b"[rank2]: boom",
                b"",
                b"h:1:2 [0] NCCL WARN x",
                b'{"event":"e","ts":"x"}',
                b'{"log":"a","stream":"stdout","time":"2019-04-26T14:21:16Z"}',
                orjson.dumps({"ts": T0, "event": STACK_REQUEST_EVENT}),
                orjson.dumps({"ts": T0, "event": STACK_TRAILER_EVENT}),
            ]
        ),
    ).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(lines_strategy, st.sampled_from(["/l/j-rank0.log", "/l/j-rank0.stack", "/l/x.jsonl"]))
def test_any_lines_give_storable_events_each_id_once_and_every_line_covered(lines: list[bytes], path: str) -> None:
    """Whatever the lines, the parser never raises, every event is storable and timed, no ``_id``
    repeats, every event starts at the start of a line, and nothing stays pending after a flush."""
    p = LineParser(path, "f" * 20, "")
    data = b"".join(x + b"\n" for x in lines)
    evs = feed_all(p, data)
    ids = [e["_id"] for e in evs]
    assert len(ids) == len(set(ids))
    starts = set()
    off = 0
    for x in lines:
        starts.add(off)
        off += len(x) + 1
    for e in evs:
        assert e["offset"] in starts
        assert type(e["@timestamp"]) is str and len(e["@timestamp"]) == 27
        assert e["kind"] in ("log", "launcher", "stack")
        assert e["rank"] is None or type(e["rank"]) is int
        orjson.dumps(e)
    assert p.pending_offset is None


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_pending_offset_never_passes_an_unshipped_line(cut: int) -> None:
    """Feeding a file in two halves and restarting from ``pending_offset`` gives the same events as
    feeding it at once (what a shipper restart from its checkpoint does)."""
    tb = (cri(T0, "stderr", "Traceback (most recent call last):") + cri(T0, "stderr", '  File "x", line 1, in f')
          + cri(T0, "stderr", "ValueError: x"))  # fmt: skip
    data = cri(T0, "stdout", "a") + tb + cri(T0, "stdout", "b")
    whole = feed_all(LineParser("/l/j-rank0.log", "f" * 20, ""), data)
    lines = data.split(b"\n")[:-1]
    first = b"".join(x + b"\n" for x in lines[: cut + 1])
    p = LineParser("/l/j-rank0.log", "f" * 20, "")
    got = feed_all(p, first, flush=False)
    resume = p.pending_offset if p.pending_offset is not None else len(first)
    q = LineParser("/l/j-rank0.log", "f" * 20, p.checkpoint_ts)
    rest = feed_all(q, data[resume:])
    rest = [{**e, "_id": f"{'f' * 20}-{e['offset'] + resume}", "offset": e["offset"] + resume} for e in rest]
    assert got + rest == whole


def test_other_programs_records_are_redacted_ours_pass_as_written() -> None:
    p = LineParser("/logs/app.jsonl", "f" * 20, "")
    foreign = b'{"msg":"login with token ghp_abcdefghijklmnopqrstuvwxyz0123456789","password":"hunter2hunter2","t":1}'
    ev = p.feed(foreign, 0)[0]
    assert ev["fields"]["password"] == "[REDACTED]" and ev["fields"]["t"] == 1
    assert "ghp_abcdefghijklmnopqrstuvwxyz0123456789" not in ev["message"] and ev["message"].startswith("login")
    ours = orjson.dumps({"event": "step", "note": "x", "level": "info", "ts": T0, "seq": 1})
    assert p.feed(ours, 200)[0]["fields"] == {"note": "x"}


def _pem_key() -> list[str]:
    """A private key's armour and body as a client would print it (the body is random, not a real key)."""
    import base64
    import os

    body = base64.b64encode(os.urandom(600)).decode()
    return ["-----BEGIN RSA PRIVATE KEY-----", "Proc-Type: 4,ENCRYPTED",
            *(body[i : i + 64] for i in range(0, len(body), 64)), "-----END RSA PRIVATE KEY-----"]  # fmt: skip


@pytest.mark.parametrize("framing", ["cri", "raw"])
def test_a_private_key_printed_over_lines_is_one_event_masked_whole(framing: str) -> None:
    """Redacted a line at a time, only the armour would match: the base64 body lines would be stored."""
    key = _pem_key()
    lines = ["loading credentials", *key, "connected"]
    if framing == "cri":
        data = b"".join(cri(T0, "stderr", x) for x in lines)
    else:
        data = "".join(x + "\n" for x in lines).encode()
    evs = feed_all(LineParser("/logs/j-rank0.log", "f" * 20, ""), data)
    assert [e["message"] for e in evs][0::2] == ["loading credentials", "connected"]
    assert evs[1]["fields"]["block"] == "pem" and evs[1]["fields"]["lines"] == len(key)
    stored = orjson.dumps(evs).decode()
    assert not any(x in stored for x in key[2:-1]), "a line of the key body was stored"
    assert "RSA PRIVATE KEY" in evs[1]["message"] and "[REDACTED]" in evs[1]["message"]


def test_a_pem_block_ends_at_the_first_line_that_is_not_key_material() -> None:
    """A truncated key (no END line) takes no log line after it with it."""
    key = _pem_key()[:5]
    data = "".join(x + "\n" for x in [*key, "step 7 loss=0.25", "step 8 loss=0.24"]).encode()
    evs = feed_all(LineParser("/logs/j-rank0.log", "f" * 20, ""), data)
    assert [e["message"] for e in evs][1:] == ["step 7 loss=0.25", "step 8 loss=0.24"]
    assert evs[0]["fields"]["block"] == "pem" and not any(x in evs[0]["message"] for x in key[2:])
