"""The launcher's output capture: a rank's pipes into one CRI-format file, as the kubelet writes pod logs.

Records are checked against the format containerd writes (``<RFC 3339 nano> <stream> <F|P> <text>``,
long lines split in 16 KiB ``P`` pieces, a trailing ``\\r`` dropped, an unterminated last piece left
as ``P``); the threads are driven through real pipes and a real child process.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mlops_obs.workload.capture import MAX_LINE, OutputFile, RankOutput, StreamReader, cri_records
from tests.conftest import wait_for

CRI = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([FP]) (.*)$", re.S)


def records(path: Path) -> list[tuple[str, str, str, bytes]]:
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        m = CRI.match(line)
        assert m, line[:200]
        out.append((m.group(1).decode(), m.group(2).decode(), m.group(3).decode(), m.group(4)))
    return out


def joined(recs: list[tuple[str, str, str, bytes]], stream: str) -> list[bytes]:
    """Lines of ``stream`` with ``P`` pieces joined to the record that ends them, as a reader does."""
    lines, cur = [], b""
    for _, s, tag, text in recs:
        if s != stream:
            continue
        cur += text
        if tag == "F":
            lines.append(cur)
            cur = b""
    if cur:
        lines.append(cur)
    return lines


def test_records_split_long_lines_like_containerd() -> None:
    ts = b"2026-01-02T03:04:05.000000001Z"
    exact = b"x" * MAX_LINE
    long = b"y" * (2 * MAX_LINE + 5)
    out = cri_records(ts, b"stderr", [b"short\r", exact, long, b""], b"tail")
    lines = out.split(b"\n")[:-1]
    assert lines[0] == ts + b" stderr F short"  # CR of a CRLF line dropped
    assert lines[1] == ts + b" stderr F " + exact  # exactly the maximum: one full record
    assert lines[2] == ts + b" stderr P " + b"y" * MAX_LINE
    assert lines[3] == ts + b" stderr P " + b"y" * MAX_LINE
    assert lines[4] == ts + b" stderr F yyyyy"
    assert lines[5] == ts + b" stderr F "  # an empty line stays a record
    assert lines[6] == ts + b" stderr P tail"
    assert len(lines) == 7


def _pump(tmp_path: Path, chunks: list[bytes]) -> list[tuple[str, str, str, bytes]]:
    r, w = os.pipe()
    out = OutputFile(tmp_path / "r.log")
    reader = StreamReader(r, b"stdout", out, "test")
    reader.start()
    for c in chunks:
        os.write(w, c)
    os.close(w)
    reader.join(30)
    assert not reader.is_alive()
    out.close()
    return records(tmp_path / "r.log")


def test_pieces_of_lines_across_reads_are_joined_and_long_lines_split(tmp_path: Path) -> None:
    big = bytes(range(32, 127)) * 1000  # 95 kB, no newline inside
    chunks = [b"first li", b"ne\nsecond\n", big[:40000], big[40000:], b"\nbinary \xff\xfe\x00 ok\n", b"no newline"]
    recs = _pump(tmp_path, chunks)
    assert joined(recs, "stdout") == [b"first line", b"second", big, b"binary \xff\xfe\x00 ok", b"no newline"]
    assert all(len(t) <= MAX_LINE for *_, t in recs)
    assert [t for _, _, tag, t in recs if tag == "P"][:-1] == [big[i : i + MAX_LINE] for i in range(0, 81920, MAX_LINE)]
    assert recs[-1][2:] == ("P", b"no newline")  # the stream ended mid-line: left partial, as containerd does


def test_an_incomplete_line_reaches_the_file_while_the_writer_is_silent(tmp_path: Path) -> None:
    """A rank that hangs mid-line (a prompt, a progress bar) still has that piece on disk."""
    r, w = os.pipe()
    out = OutputFile(tmp_path / "r.log")
    reader = StreamReader(r, b"stderr", out, "test")
    reader.start()
    os.write(w, b"loading shard 3/8 ...")
    wait_for(lambda: (tmp_path / "r.log").stat().st_size > 0, "the partial piece to be flushed")
    os.write(w, b" done\n")
    os.close(w)
    reader.join(30)
    recs = records(tmp_path / "r.log")
    assert [(tag, t) for _, _, tag, t in recs] == [("P", b"loading shard 3/8 ..."), ("F", b" done")]
    assert joined(recs, "stderr") == [b"loading shard 3/8 ... done"]


def test_a_failing_disk_costs_the_output_not_the_writer(tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC: the reader counts the loss and keeps draining, so the
    writer never blocks on a full pipe."""
    r, w = os.pipe()
    out = OutputFile(Path("/dev/full"))
    reader = StreamReader(r, b"stdout", out, "test")
    reader.start()
    data = b"z" * 999 + b"\n"
    for _ in range(4000):  # 4 MB: far more than a pipe holds
        os.write(w, data)
    os.close(w)
    reader.join(30)
    assert not reader.is_alive()
    assert out.lost_bytes > 4_000_000 and out.error == os.strerror(28)
    out.close()


def test_a_real_child_interleaves_both_streams_and_nothing_is_lost_when_it_dies(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "for i in range(2000):\n"
        "    print(f'out {i}')\n"
        "    print(f'err {i}', file=sys.stderr)\n"
        "sys.stdout.write('last words, no newline')\n"
        "sys.stdout.flush()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    path = tmp_path / "job-rank0.log"
    t0 = dt.datetime.now(dt.UTC)
    proc = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=out_w, stderr=err_w)
    os.close(out_w)
    os.close(err_w)
    cap = RankOutput(OutputFile(path), out_r, err_r, "rank0")
    assert proc.wait(60) == -9
    assert cap.join(30)
    t1 = dt.datetime.now(dt.UTC)
    recs = records(path)
    assert joined(recs, "stdout") == [f"out {i}".encode() for i in range(2000)] + [b"last words, no newline"]
    assert joined(recs, "stderr") == [f"err {i}".encode() for i in range(2000)]
    times = [dt.datetime.fromisoformat(ts[:26] + "+00:00") for ts, *_ in recs]
    assert all(t0 - dt.timedelta(seconds=1) <= t <= t1 + dt.timedelta(seconds=1) for t in times)
    per_stream = {s: [ts for ts, st, *_ in recs if st == s] for s in ("stdout", "stderr")}
    assert all(v == sorted(v) for v in per_stream.values())  # each stream's records in time order


def test_capture_keeps_up_with_a_chatty_writer(tmp_path: Path) -> None:
    """The writer's time through the capture stays within a generous factor of writing the file itself
    (``benchmarks/bench_capture.py`` measures it exactly)."""
    lines = 20000
    code = f"import sys\nfor i in range({lines}):\n    print('x' * 100, i, file=sys.stderr)\n"
    t = time.perf_counter()
    with open(tmp_path / "direct.log", "wb") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True)
    direct = time.perf_counter() - t
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=out_w, stderr=err_w)
    os.close(out_w)
    os.close(err_w)
    cap = RankOutput(OutputFile(tmp_path / "piped.log"), out_r, err_r, "rank0")
    assert proc.wait(120) == 0
    piped = time.perf_counter() - t
    assert cap.join(30)
    assert len(joined(records(tmp_path / "piped.log"), "stderr")) == lines
    assert piped < 5 * direct + 2.0, (piped, direct)
