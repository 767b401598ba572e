"""Times as the analysis handles them: the store's canonical strings for order, epoch seconds for
arithmetic, and what a user types on the command line (RFC 3339 or ``15m`` ago, as ``kubectl logs
--since`` takes it).

The store's ``@timestamp`` is fixed-width (``2026-01-02T03:04:05.000006Z``), so string order is time
order and most comparisons need no parsing; only differences and windows go through :func:`epoch`.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from typing import Any

from mlops_obs.logs.sink import format_timestamp

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def epoch(ts: str) -> float:
    """Seconds since the epoch of a store timestamp (or any RFC 3339 string)."""
    if ts.endswith(("Z", "z")):
        ts = ts[:-1] + "+00:00"
    dt = _dt.datetime.fromisoformat(ts)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_dt.UTC)
    return dt.timestamp()


def stamp(seconds: float) -> str:
    """The store's canonical form of an epoch time."""
    return format_timestamp(float(seconds))


def parse_when(value: Any, now: float | None = None) -> str:
    """``--since``/``--until``: RFC 3339 (``2026-01-02T03:04:05Z``), epoch seconds, or a duration ago
    (``15m``, ``2h``, ``90s``, ``1d``); the canonical store timestamp, or ``ValueError`` in one line."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return stamp(float(value))
    s = str(value).strip()
    m = _RELATIVE.match(s)
    if m:
        base = time.time() if now is None else now
        return stamp(base - float(m.group(1)) * _UNITS[m.group(2)])
    try:
        return format_timestamp(s)
    except (ValueError, OverflowError, OSError):
        raise ValueError(
            f"expected an RFC 3339 time (2026-01-02T03:04:05Z) or a duration ago (15m), got {s!r}"
        ) from None


def human_duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3.5 min``, ``2.1 h``: for summaries a person reads."""
    s = abs(seconds)
    if s < 10:
        return f"{seconds:.1f} s"
    if s < 120:
        return f"{seconds:.0f} s"
    if s < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
