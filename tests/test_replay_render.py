"""The replay's terminal view as pure functions: columns, folding of similar lines, gap markers where a
process's seq jumps, alerts with their state, plain text without colours, --json in the store's schema."""

from __future__ import annotations

from typing import Any

import orjson

from mlops_obs.replay.render import KEYS, Renderer, clock_header, event_lines, json_line, key_fields, ranges, who


def ev(ts: str, msg: str, *, rank: int | None = 0, level: str = "info", seq: int | None = None, kind: str = "log",
       source: str | None = None, node: str = "n1", **fields: Any) -> dict[str, Any]:  # fmt: skip
    src = source or (f"/logs/j-rank{rank}.jsonl" if rank is not None else "/logs/other")
    return {"_id": f"x-{ts}-{rank}-{msg[:5]}", "@timestamp": f"2026-01-02T03:04:{ts}Z", "kind": kind, "job": "j",
            "rank": rank, "node": node, "level": level, "message": msg, "seq": seq, "source": src, "offset": 0,
            "fields": fields}  # fmt: skip


def render(events: list[dict[str, Any]], **kw: Any) -> list[str]:
    r = Renderer(**kw)
    out: list[str] = []
    for e in events:
        out += r.feed(e)
    return out + r.end()


def test_ranges() -> None:
    assert ranges([0, 2, 3, 4, 5, 6, 7]) == "0,2-7"
    assert ranges([5, 1, 1, 2]) == "1-2,5"
    assert ranges([]) == ""


def test_line_columns_are_aligned_and_plain_without_colour() -> None:
    a = event_lines(ev("05.000001", "step", rank=3, step=7, loss=2.5))[0]
    b = event_lines(ev("05.000002", "rank failed", rank=12, level="error", error="boom here"))[0]
    assert a.startswith("03:04:05.000001  rank 3     INFO  step  ")
    assert b.startswith("03:04:05.000002  rank 12    ERROR rank failed  ")
    assert "step=7 loss=2.5" in a and 'error="boom here"' in b
    assert "\x1b[" not in a + b
    coloured = event_lines(ev("05.000002", "x", level="error"), color=True)[0]
    assert "\x1b[31mERROR\x1b[0m" in coloured


def test_approximate_times_are_marked_and_multiline_messages_indented() -> None:
    lines = event_lines(ev("06.000000", "Traceback (most recent call last):\n  File x\nRuntimeError: boom",
                           level="error", ts_source="neighbour"))  # fmt: skip
    assert lines[0].startswith("03:04:06.000000~ rank 0")
    assert "ts_source" not in lines[0]
    assert lines[1].strip() == "File x" and lines[2].strip() == "RuntimeError: boom"
    assert lines[1].index("File") == lines[0].index("Traceback") + 2


def test_similar_lines_fold_with_the_ranks_they_came_from() -> None:
    msgs = [ev(f"07.{r:06d}", f"[rank{r}]: RuntimeError: Connection closed by peer [127.0.0.1]:{20000 + r}",
               rank=r, level="error") for r in (1, 0, 2, 3, 4, 5, 6, 7)]  # fmt: skip
    out = render([ev("06.000000", "starting", rank=1), *msgs, ev("09.000000", "launcher finished", rank=None,
                                                                  kind="launcher")])  # fmt: skip
    assert len(out) == 5, out  # date, starting, the first error, the fold line, the launcher
    assert "[rank1]: RuntimeError" in out[2]
    assert out[3].strip() == "x7 similar on ranks 0,2-7 until 03:04:07.000007"
    assert "launcher" in out[4]


def test_folding_stops_after_the_window_and_at_a_different_line() -> None:
    out = render([ev("01.000000", "step 1"), ev("02.000000", "step 2"), ev("04.500000", "step 3"),
                  ev("04.600000", "saved"), ev("04.700000", "step 4")])  # fmt: skip
    text = "\n".join(out)
    assert "x1 similar on rank 0 until 03:04:02.000000" in text
    assert "step 3" in text and "step 4" in text and "saved" in text
    assert len(render([ev("01.0", "a"), ev("01.1", "a")], fold=False)) == 3


def test_gap_marker_where_seq_jumps_and_none_after_a_restart() -> None:
    events = [ev("01.000000", "a", rank=3, seq=39), ev("01.100000", "b", rank=3, seq=40),
              ev("01.200000", "c", rank=3, seq=53), ev("01.300000", "d", rank=2, seq=7),
              ev("01.400000", "restarted", rank=3, seq=1)]  # fmt: skip
    out = render(events)
    gaps = [line.strip() for line in out if "lost" in line]
    assert gaps == ["rank 3: 12 lines lost between seq 40 and 53"]
    assert out.index(next(x for x in out if "lost" in x)) == out.index(next(x for x in out if " c" in x)) - 1
    assert not [x for x in render(events, gaps=False) if "lost" in x]


def test_alerts_show_their_state_and_the_labels_that_place_them() -> None:
    firing = ev("02.000000", "[FIRING] GpuXidCritical: XID 79 on GPU 0", rank=None, kind="alert", level="critical",
                node="n1", source="alertmanager", status="firing", alertname="GpuXidCritical",
                labels={"node": "n1", "gpu": "0", "severity": "critical", "instance": "n1:9477"})  # fmt: skip
    resolved = dict(firing, message="[RESOLVED] GpuXidCritical: XID 79 on GPU 0", level="info",
                    fields={**firing["fields"], "status": "resolved"})  # fmt: skip
    a, b = event_lines(firing)[0], event_lines(resolved)[0]
    assert "ALERT FIRING GpuXidCritical XID 79 on GPU 0" in a and "ALERT RESOLVED GpuXidCritical" in b
    assert a.split()[1] == "n1"
    assert key_fields(firing) == "severity=critical node=n1 gpu=0"
    assert "\x1b[1;35mALERT FIRING GpuXidCritical\x1b[0m" in event_lines(firing, color=True)[0]
    assert len(render([firing, dict(firing, _id="other")])) == 3  # alerts never fold


def test_who_names_rank_launcher_node_or_file() -> None:
    assert who(ev("01.0", "x", rank=4)) == "rank 4"
    assert who(ev("01.0", "x", rank=None, kind="launcher")) == "launcher"
    assert who(ev("01.0", "x", rank=None, node="gpu-7")) == "gpu-7"
    assert who({"source": "/var/log/kern.log"}) == "kern.log"


def test_json_line_is_the_store_schema_in_order() -> None:
    e = ev("01.000000", "x", seq=3, step=1)
    e["extra"] = 1
    got = orjson.loads(json_line(e))
    assert list(got) == list(KEYS) and got["fields"] == {"step": 1}
    assert json_line(e).endswith(b"\n")


def test_order_across_nodes_within_their_clock_bounds_is_marked() -> None:
    """With clock bounds, an event from another node than the one printed before it, closer than the two
    bounds together, gets a ``?`` after its time; the same node, a wider gap, or no bounds: none."""
    ev = [_ev(0.000, "n1", 0, "a"), _ev(0.004, "n2", 1, "b"), _ev(0.010, "n2", 1, "c"), _ev(0.500, "n1", 0, "d")]
    marked = Renderer(clock_bounds={"n1": 0.002, "n2": 0.003})
    lines = [line for e in ev for line in marked.feed(e) if "rank" in line]
    assert [line[15] for line in lines] == [" ", "?", " ", " "], lines
    plain = Renderer()
    assert [line[15] for e in ev for line in plain.feed(e) if "rank" in line] == [" "] * 4
    assert clock_header({"n2": 0.003, "n1": 0.0105}) == (
        "clock bounds (|offset| + max error): n1 \u00b110.5 ms, n2 \u00b13 ms; '?' after a time: order across"
        " nodes uncertain"
    )
    assert "none known" in clock_header({})


def _ev(t: float, node: str, rank: int, msg: str) -> dict[str, Any]:
    return {"@timestamp": f"2026-02-03T04:05:{t:09.6f}Z", "kind": "log", "job": "j", "rank": rank, "node": node,
            "level": "info", "message": msg, "seq": None, "source": f"/l/j-rank{rank}.jsonl", "offset": 0,
            "fields": {}}  # fmt: skip
