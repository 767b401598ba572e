"""The shipper's remaining findings of issue 11, each on the real shipper and real files: a file
truncated in place and rewritten with the same banner, stats.json while the sink retries (and the
shipper alerts on those series in promtool), a damaged store (quick_check, ``store check|salvage``),
two shippers on one state directory, ``--once`` without a writable checkpoint, a glob matching nothing."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import yaml

from mlops_obs.collectors.shipper import ShipperCollector
from mlops_obs.logs.shipper import STATE_FILE, STATS_FILE, Shipper, ShipperOptions
from mlops_obs.logs.sink import Stats
from mlops_obs.logs.store import EventStore, StoreSink
from mlops_obs.mixin import config as mixin_config
from mlops_obs.mixin import rules
from mlops_obs.mixin.generate import ALERTS_FILE, RECORDING_FILE
from tests.conftest import require_binary, wait_for
from tests.logs_helpers import REPO, kill9, line, reconcile, run_ship, ship_cmd, start_ship, store_events

BANNER = b"=== trainer log, format 3 ===\n"
COUNTERS = ("mlops_shipper_lines_read", "mlops_shipper_events_shipped", "mlops_shipper_retries",
            "mlops_shipper_dead_letters")  # fmt: skip


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """Truncate and rewrite the same inode (what `> file` in a shell, or a logger reopening with O_TRUNC, does)."""
    ino = path.stat().st_ino
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)
    assert path.stat().st_ino == ino


def test_truncated_in_place_with_the_same_banner_across_a_restart(tmp_path: Path) -> None:
    """Shipped, stopped, truncated and rewritten with the same first line and 3,000 new lines past the
    old offset: the next run ships all 3,000 (the checkpoint's hash of the bytes before its offset
    no longer matches), not only those after the old offset."""
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    f = logs / "train.log"
    f.write_bytes(BANNER + b"".join(line("old", i) for i in range(1, 1001)))
    cmd = ship_cmd([str(logs / "*.log")], store=store, state=state, once=True)
    assert run_ship(cmd).returncode == 0
    old_size = f.stat().st_size
    _rewrite_in_place(f, BANNER + b"".join(line("new", i, pad="x" * 20) for i in range(1, 3001)))
    assert f.stat().st_size > 2 * old_size
    r = run_ship(cmd)
    assert r.returncode == 0, r.stderr
    reconcile(store_events(store), {"old": 1000, "new": 3000})


def test_truncated_in_place_with_the_same_banner_while_followed(tmp_path: Path) -> None:
    """The same while the shipper holds the file open: the bytes before the read position are
    checked on every read, so the rewritten file is let go and read again from its start."""
    logs = tmp_path / "logs"
    logs.mkdir()
    f = logs / "train.log"
    f.write_bytes(BANNER + b"".join(line("old", i) for i in range(1, 1001)))
    opts = ShipperOptions(sources=[str(logs / "*.log")], state_dir=tmp_path / "state", scan_interval=0.05,
                          poll_interval=0.01)  # fmt: skip
    sh = Shipper(opts, StoreSink(tmp_path / "store"))
    try:
        sh.run(once=True)
        _rewrite_in_place(f, BANNER + b"".join(line("new", i, pad="x" * 20) for i in range(1, 3001)))
        sh.run(once=True)
        sh.run(once=True)  # the scan that lets the old content go and adopts the new from offset 0
    finally:
        sh.close()
    reconcile(store_events(tmp_path / "store"), {"old": 1000, "new": 3000})


def test_copytruncate_copy_still_inherits_the_checkpoint(tmp_path: Path) -> None:
    """The bytes check keeps copytruncate right: the copy has the same bytes before the offset, so
    it continues from the checkpoint, and nothing is shipped twice."""
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    f = logs / "train.log"
    f.write_bytes(BANNER + b"".join(line("s", i) for i in range(1, 501)))
    cmd = ship_cmd([str(logs / "train.log*")], store=store, state=state, once=True)
    assert run_ship(cmd).returncode == 0
    with open(f, "ab") as out:
        out.write(b"".join(line("s", i) for i in range(501, 801)))
    (logs / "train.log.1").write_bytes(f.read_bytes())  # copy, then truncate the original
    _rewrite_in_place(f, BANNER + b"".join(line("s", i) for i in range(801, 901)))
    assert run_ship(cmd).returncode == 0
    reconcile(store_events(store), {"s": 900})


def _locked_store(store: Path) -> sqlite3.Connection:
    """Another writer holding the store's write lock (a long transaction of another process)."""
    EventStore(store).close()
    holder = sqlite3.connect(store / "events.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_stats_json_is_written_while_the_sink_retries(tmp_path: Path) -> None:
    """While the store refuses writes the shipper blocks on its one batch; stats.json keeps being
    written, with the sink's error and the growing lag, and the collector says failing."""
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    f = logs / "a.log"
    f.write_bytes(b"".join(line("s", i) for i in range(1, 101)))
    stats = Stats()  # shared by the sink and the shipper, as `mlops-obs ship` wires them
    sink = StoreSink(store, stats=stats)
    sink.store._db.execute("PRAGMA busy_timeout=50")  # each refused attempt returns quickly
    sh = Shipper(ShipperOptions(sources=[str(logs / "*.log")], state_dir=state, scan_interval=0.05,
                                poll_interval=0.01), sink, stats=stats)  # fmt: skip
    sh.run(once=True)  # a first success
    holder = _locked_store(store)
    with open(f, "ab") as out:
        out.write(b"".join(line("s", i) for i in range(101, 201)))
    t = threading.Thread(target=sh.run, daemon=True)
    t.start()
    stats_path = state / STATS_FILE
    try:

        def blocked() -> dict[str, Any] | None:
            try:
                snap = orjson.loads(stats_path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                return None
            return snap if snap.get("sink_error") and snap.get("retries_total", 0) >= 3 else None

        wait_for(blocked, "stats.json naming the sink's error while it retries", timeout=60)
        first = blocked()
        assert first is not None and "database is locked" in first["sink_error"]
        assert sum(first["lag_bytes"].values()) > 0
        wait_for(lambda: (b := blocked()) is not None and b["written_at"] > first["written_at"],
                 "a later stats.json while still blocked", timeout=60)  # fmt: skip
        fams = {m.name: m for m in ShipperCollector({"shipper.state-dir": state}).sample()}
        assert fams["mlops_shipper_failing"].samples[0].value == 1
        holder.execute("ROLLBACK")
        wait_for(lambda: (snap := orjson.loads(stats_path.read_bytes()))["sink_error"] is None
                 and snap["events_shipped_total"] == 200, "the shipper recovering", timeout=60)  # fmt: skip
        fams = {m.name: m for m in ShipperCollector({"shipper.state-dir": state}).sample()}
        assert fams["mlops_shipper_failing"].samples[0].value == 0
    finally:
        sh.stop_event.set()
        t.join(timeout=60)
        holder.close()
        sh.close()
    reconcile(store_events(store), {"s": 200})


def test_stats_json_names_an_opensearch_outage(tmp_path: Path) -> None:
    """The same with OpenSearch down: stats.json names the cause (the status OpenSearch answered)."""
    from tests.fake_opensearch import FakeOpenSearch

    fake = FakeOpenSearch().start()
    logs, state = tmp_path / "logs", tmp_path / "state"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 101)))
    fake.request_faults.extend([503] * 100_000)
    proc = start_ship(ship_cmd([str(logs / "*.log")], opensearch=fake.url, state=state,
                               extra=["--opensearch.backoff-max", "200ms"]))  # fmt: skip
    try:

        def failing() -> bool:
            try:
                snap = orjson.loads((state / STATS_FILE).read_bytes())
            except (OSError, orjson.JSONDecodeError):
                return False
            return bool(snap.get("sink_error")) and sum(snap["lag_bytes"].values()) > 0

        wait_for(failing, "stats.json naming the retrying sink", timeout=60)
        assert "opensearch: bulk request failed (503)" in orjson.loads((state / STATS_FILE).read_bytes())["sink_error"]
        fake.request_faults.clear()
        wait_for(lambda: fake.count() >= 100 and orjson.loads((state / STATS_FILE).read_bytes())["sink_error"] is None,
                 "recovery", timeout=60)  # fmt: skip
    finally:
        kill9(proc)
        fake.stop()


def _blocked_series(state: Path) -> dict[str, float | dict[str, float]]:
    """The collector's values for a shipper stuck on its sink (see the test below)."""
    out: dict[str, Any] = {}
    for m in ShipperCollector({"shipper.state-dir": state}).sample():
        for s in m.samples:
            if s.labels:
                out.setdefault(s.name, {})[s.labels["file"]] = s.value
            else:
                out[s.name] = s.value
    return out


def test_shipper_alerts_fire_on_the_series_of_a_blocked_shipper(tmp_path: Path) -> None:
    """promtool, the shipped rules, and input series made of what the collector exports for a real
    shipper blocked on a locked store: MlopsShipperFailing and MlopsShipperNotShipping fire, although
    (because) the shipper reads no more lines while blocked. Time is shifted so the last success is
    promtool's time 0; every other value is the collector's, held for 40 minutes."""
    promtool = require_binary("promtool")
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    f = logs / "a.log"
    f.write_bytes(b"".join(line("s", i) for i in range(1, 51)))
    stats = Stats()  # shared by the sink and the shipper, as `mlops-obs ship` wires them
    sink = StoreSink(store, stats=stats)
    sink.store._db.execute("PRAGMA busy_timeout=50")
    sh = Shipper(ShipperOptions(sources=[str(logs / "*.log")], state_dir=state, scan_interval=0.05,
                                poll_interval=0.01), sink, stats=stats)  # fmt: skip
    sh.run(once=True)
    holder = _locked_store(store)
    with open(f, "ab") as out:
        out.write(b"".join(line("s", i) for i in range(51, 101)))
    t = threading.Thread(target=sh.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: (state / STATS_FILE).exists()
                 and orjson.loads((state / STATS_FILE).read_bytes()).get("sink_error"), timeout=60)  # fmt: skip
        series = _blocked_series(state)
    finally:
        sh.stop_event.set()
        t.join(timeout=60)
        holder.close()
        sh.close()
    assert series["mlops_shipper_failing"] == 1 and sum(series["mlops_shipper_lag_bytes"].values()) > 0  # type: ignore[union-attr, arg-type]
    cfg = mixin_config.MixinConfig()
    where = {**rules._scrape_job(cfg), **rules._instance(cfg)}  # the labels the sidecar's scrape adds
    inst = ",".join(f'{k}="{v}"' for k, v in where.items())
    ctx = {f"up{{{inst}}}": "1x40", f'mlops_exporter_node_info{{{inst},node="n1"}}': "1x40"}
    inputs = dict(ctx)
    for name, value in series.items():
        full = name + ("_total" if name in COUNTERS else "")
        if isinstance(value, dict):
            for path, v in value.items():
                inputs[f'{full}{{{inst},file="{path}"}}'] = f"{v:g}x40"
        elif name == "mlops_shipper_last_success_timestamp_seconds":
            inputs[f"{full}{{{inst}}}"] = "0x40"
        else:
            inputs[f"{full}{{{inst}}}"] = f"{value:g}x40"
    tests = []
    for name in ("MlopsShipperFailing", "MlopsShipperNotShipping"):
        alert = next(a for a in rules.alerts(cfg) if a.name == name)
        exp = [{"exp_labels": {**where, "node": "n1", "severity": alert.severity},
                "exp_annotations": {k: rules.render_annotation(v, {"node": "n1"})
                                    for k, v in alert.annotations(cfg).items()}}]  # fmt: skip
        tests.append({"interval": "1m", "input_series": [{"series": k, "values": v} for k, v in inputs.items()],
                      "alert_rule_test": [{"eval_time": "30m", "alertname": name, "exp_alerts": exp}]})  # fmt: skip
    spec = {"rule_files": [str(REPO / ALERTS_FILE), str(REPO / RECORDING_FILE)], "evaluation_interval": "1m",
            "tests": tests}  # fmt: skip
    (tmp_path / "t.yml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([promtool, "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def _damage(db: Path) -> None:
    """Garbage over three pages in the middle of the database file (a bad disk, a stray write): some
    chunks' pages, not the table's root (a damaged root leaves nothing reachable; see docs/logs.md)."""
    size = db.stat().st_size
    garbage = bytes(range(256)) * 16
    with open(db, "r+b") as f:
        for frac in (0.4, 0.5, 0.6):
            f.seek(int(size * frac) // 4096 * 4096)
            f.write(garbage)


def test_damaged_store_stops_the_shipper_and_salvage_copies_what_reads(tmp_path: Path) -> None:
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    f = logs / "a.log"
    f.write_bytes(b"".join(line("s", i, pad="y" * 200) for i in range(1, 5001)))
    cmd = ship_cmd([str(logs / "*.log")], store=store, state=state, once=True, extra=["--ship.batch-events", "100"])
    assert run_ship(cmd).returncode == 0
    with sqlite3.connect(store / "events.sqlite3") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _damage(store / "events.sqlite3")
    checkpoint = (state / STATE_FILE).read_bytes()
    with open(f, "ab") as out:
        out.write(b"".join(line("s", i) for i in range(5001, 5101)))
    r = run_ship(cmd)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "is damaged" in err[0] and "mlops-obs store salvage" in err[0], r.stderr
    assert (state / STATE_FILE).read_bytes() == checkpoint  # nothing moved on
    snap = orjson.loads((state / STATS_FILE).read_bytes())
    assert "is damaged" in snap["sink_error"]  # a crash-looping shipper shows as failing

    mlops = [sys.executable, "-m", "mlops_obs", "store"]
    check = subprocess.run([*mlops, "check", str(store)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "damaged" in check.stderr
    new = tmp_path / "salvaged"
    salvage = subprocess.run([*mlops, "salvage", str(store), str(new)], cwd=REPO, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert salvage.returncode == 0, salvage.stderr
    copied, lost = re.search(
        r"salvaged \d+ chunks \((\d+) events\).*; (\d+) chunks unreadable", salvage.stdout
    ).groups()
    assert int(lost) >= 1 and int(copied) >= 3000, salvage.stdout
    ok = subprocess.run([*mlops, "check", str(new)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "ok" in ok.stdout
    events = store_events(new)  # every query works on the copy
    seqs = [e["seq"] for e in events]
    assert len(seqs) == len(set(seqs)) and set(seqs) <= set(range(1, 5001))
    assert len(seqs) == int(copied)
    again = subprocess.run([*mlops, "salvage", str(store), str(new)], cwd=REPO, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 2 and "already holds events" in again.stderr


def test_salvage_of_a_whole_store_copies_everything(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 2501)))
    assert (
        run_ship(ship_cmd([str(logs / "*")], store=tmp_path / "store", state=tmp_path / "st", once=True)).returncode
        == 0
    )
    r = subprocess.run([sys.executable, "-m", "mlops_obs", "store", "salvage", str(tmp_path / "store"),
                        str(tmp_path / "copy")], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0 and "(2500 events)" in r.stdout and "; 0 chunks unreadable" in r.stdout
    assert store_events(tmp_path / "copy") == store_events(tmp_path / "store")


def test_a_second_shipper_on_the_same_state_dir_refuses(tmp_path: Path) -> None:
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 101)))
    first = start_ship(ship_cmd([str(logs / "*.log")], store=store, state=state))
    try:
        wait_for(lambda: (state / STATE_FILE).exists(), "the first shipper's checkpoint", timeout=60)
        r = run_ship(ship_cmd([str(logs / "*.log")], store=store, state=state, once=True), timeout=60)
        assert r.returncode == 1
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and "in use by another shipper" in err[0] and f"pid {first.pid}" in err[0], r.stderr
        assert first.poll() is None
    finally:
        kill9(first)
    # the kernel dropped the dead shipper's lock: the next one runs
    r = run_ship(ship_cmd([str(logs / "*.log")], store=store, state=state, once=True))
    assert r.returncode == 0, r.stderr
    reconcile(store_events(store), {"s": 100})


def test_once_exits_non_zero_when_it_cannot_checkpoint(tmp_path: Path) -> None:
    """A state directory where the checkpoint cannot be written: `--once` ends (exit 1, one line)
    instead of holding forever; the events it sent are in the store and a later run adds none twice."""
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    state.mkdir()
    (logs / "a.log").write_bytes(b"".join(line("s", i) for i in range(1, 101)))
    tmp = state / (STATE_FILE + ".tmp")
    tmp.symlink_to("/dev/full")
    r = run_ship(ship_cmd([str(logs / "*.log")], store=store, state=state, once=True), timeout=90)
    assert r.returncode == 1
    err = [ln for ln in r.stderr.strip().splitlines() if "mlops-obs ship: error" in ln]
    assert len(err) == 1 and "cannot write the checkpoint" in err[0] and "No space left on device" in err[0]
    tmp.unlink()
    assert run_ship(ship_cmd([str(logs / "*.log")], store=store, state=state, once=True)).returncode == 0
    reconcile(store_events(store), {"s": 100})


def test_a_source_glob_matching_nothing_warns_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.log").write_bytes(line("s", 1))
    missing = str(tmp_path / "nowhere" / "*.log")
    r = run_ship(ship_cmd([missing, str(tmp_path / "logs" / "*.log")], store=tmp_path / "store",
                          state=tmp_path / "state", once=True))  # fmt: skip
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert warnings == [f"mlops-obs ship: warning: --source {missing!r} matches no file yet; following it anyway"]
    reconcile(store_events(tmp_path / "store"), {"s": 1})
