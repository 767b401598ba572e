"""The sidecar's cadence, published in the rank directory so that ranks flush when it will read them.

The sidecar samples at the rate it is scraped (:mod:`mlops_obs.exporter.sampler`), just ahead of each
expected scrape. A rank that flushed every second would hand over fourteen snapshots nobody reads for
each one a 15 s scrape uses; a rank that flushed rarely at random times would hand over data up to
one flush old. So the sidecar writes :data:`CADENCE_FILE` (a dot file: the snapshot listing skips
it), and each rank's flush thread reads it and flushes just before the sidecar's next round
(:func:`next_flush`), at most every :data:`MAX_FLUSH_INTERVAL` (the heartbeat the stall alert needs,
well inside its 60 s floor) and at least :data:`MIN_FLUSH_INTERVAL` apart.

The file is input to the ranks as much as snapshots are to the sidecar (every pod on the node may be
able to write the directory): it is read through the same guarded read (no links, no special files,
at most :data:`MAX_CADENCE_BYTES`), every field checked, and a file that fails, or that the sidecar
has not refreshed for :data:`CADENCE_MAX_AGE`, is ignored: the rank flushes at its fallback interval.
The worst a planted file can do is move a rank's flushes within [``MIN_FLUSH_INTERVAL``,
``MAX_FLUSH_INTERVAL``].

Version 1 fields: ``v``; ``scrape_interval`` (the learned scrape period in seconds, or ``None`` while
nothing scrapes the sidecar); ``next_scrape`` (Unix time the next scrape is expected, or ``None``);
``lead`` (seconds before it that the sidecar's round starts); ``updated`` (Unix time written).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any, TypedDict

import orjson

from mlops_obs.rankdir.files import Unreadable, read_bytes

CADENCE_FILE = ".sidecar-cadence.json"
CADENCE_VERSION = 1
MAX_CADENCE_BYTES = 4096
# A rank flushes at least this often whatever the sidecar says: a hung rank's last step is in a snapshot
# within this long (the stall alert's floor is 60 s), and a sidecar that starts finds data this fresh.
MAX_FLUSH_INTERVAL = 15.0
# ... and never more often than this, whatever a (possibly planted) file says.
MIN_FLUSH_INTERVAL = 0.05
# A rank's flush starts this long before the sidecar's round, so the round finds it written.
FLUSH_MARGIN = 0.25
# The sidecar rewrites the file at least this often while it runs; an older one is a sidecar gone.
REFRESH_INTERVAL = 60.0
CADENCE_MAX_AGE = 3 * REFRESH_INTERVAL
_MAX_PERIOD = 3600.0
_writes = itertools.count()


class Cadence(TypedDict):
    v: int
    scrape_interval: float | None
    next_scrape: float | None
    lead: float
    updated: float


def make(scrape_interval: float | None, next_scrape: float | None, lead: float, now: float) -> Cadence:
    return {"v": CADENCE_VERSION, "scrape_interval": scrape_interval, "next_scrape": next_scrape, "lead": lead,
            "updated": now}  # fmt: skip


def write(directory: str | os.PathLike[str], cadence: Cadence) -> None:
    """Atomically replace the cadence file (the sidecar's side). The temp file is created new
    (``O_EXCL``) and never through a link, so a name planted in the shared directory redirects nothing.
    Raises ``OSError`` (the directory does not exist yet: the ranks create it)."""
    final = Path(directory) / CADENCE_FILE
    tmp = Path(directory) / f"{CADENCE_FILE}.{os.getpid()}-{next(_writes)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(cadence))
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _number(x: Any, lo: float, hi: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi


def check(doc: Any, now: float) -> Cadence | None:
    """``doc`` as a cadence the rank may follow: version 1, every field of its type and range, refreshed
    within :data:`CADENCE_MAX_AGE`; ``None`` otherwise."""
    if not isinstance(doc, dict) or doc.get("v") != CADENCE_VERSION:
        return None
    updated, period, nxt, lead = doc.get("updated"), doc.get("scrape_interval"), doc.get("next_scrape"), doc.get("lead")
    if not _number(updated, now - CADENCE_MAX_AGE, now + 60.0) or not _number(lead, 0.0, _MAX_PERIOD):
        return None
    if period is None or nxt is None:
        if period is not None or nxt is not None:
            return None
    elif not (_number(period, 0.001, _MAX_PERIOD) and _number(nxt, now - 2 * _MAX_PERIOD, now + 2 * _MAX_PERIOD)):
        return None
    return make(period, nxt, float(lead), float(updated))  # type: ignore[arg-type]


def read(directory: str | os.PathLike[str], now: float) -> Cadence | None:
    """The sidecar's cadence, or ``None`` when there is no usable one (never raises on bad input)."""
    try:
        data = read_bytes(Path(directory) / CADENCE_FILE, MAX_CADENCE_BYTES)
        return check(orjson.loads(data), now)
    except (Unreadable, orjson.JSONDecodeError):
        return None


def next_flush(cadence: Cadence | None, now: float, fallback: float) -> float:
    """Seconds from ``now`` (Unix time) until a rank's next flush.

    Following a scraped sidecar: just before one of its rounds, the next one at least
    :data:`MIN_FLUSH_INTERVAL` away; with a scrape interval over :data:`MAX_FLUSH_INTERVAL`, on an even
    division of it, so the flush before each round still lands just before it. Without a cadence, or
    while nothing scrapes the sidecar: ``fallback``, within the bounds."""
    fallback = min(max(fallback, MIN_FLUSH_INTERVAL), MAX_FLUSH_INTERVAL)
    if cadence is None or cadence["scrape_interval"] is None or cadence["next_scrape"] is None:
        return fallback
    period = cadence["scrape_interval"]
    step = period / math.ceil(period / MAX_FLUSH_INTERVAL) if period > MAX_FLUSH_INTERVAL else period
    step = max(step, MIN_FLUSH_INTERVAL)
    anchor = cadence["next_scrape"] - cadence["lead"] - FLUSH_MARGIN
    k = math.floor((now + MIN_FLUSH_INTERVAL - anchor) / step) + 1
    return min(max(anchor + k * step - now, MIN_FLUSH_INTERVAL), MAX_FLUSH_INTERVAL)
