"""Fault injection for the reference workload: ``--inject KIND[:key=value,...]`` (repeatable).

Each fault reproduces what the real failure does to a training job, and nothing more, so that the
alerts, dashboards and replay detectors are exercised against the evidence they will meet in
production: a NaN loss that the job's own check catches, a slow rank that makes every other rank
wait in the all-reduce, a hung rank that freezes everyone's heartbeat, a crash with a traceback and a
non-zero exit code, a slow input pipeline, a real CUDA out-of-memory error.

Parsing happens in the launcher (so a typo is one line and exit code 2 before any rank starts) and
again in each rank from the same strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# kind -> (required keys, optional keys with defaults)
KINDS: dict[str, tuple[tuple[str, ...], dict[str, float]]] = {
    "nan": (("rank", "step"), {}),
    "straggler": (("rank", "factor"), {}),
    "stall": (("rank", "step"), {"seconds": 0.0}),
    "crash": (("rank", "step"), {}),
    "slow-data": (("rank", "factor"), {}),
    "oom": (("rank", "step"), {}),
}
_INT_KEYS = {"rank", "step"}
_SPEC = re.compile(r"^(?P<kind>[a-z-]+)(?::(?P<params>.*))?$")

# Synthetic batches cost microseconds; ``slow-data`` scales at least this much (a local-disk
# loader's typical per-batch time), so that a factor means something on a toy model too.
SLOW_DATA_FLOOR_SECONDS = 0.001


class FaultError(ValueError):
    """A fault specification that cannot be used; ``str()`` is the one line the user sees."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int = 0
    factor: float = 1.0
    seconds: float = 0.0  # stall only: 0 = until killed

    def __str__(self) -> str:
        if self.kind in ("straggler", "slow-data"):
            return f"{self.kind}:rank={self.rank},factor={self.factor:g}"
        extra = f",seconds={self.seconds:g}" if self.seconds else ""
        return f"{self.kind}:rank={self.rank},step={self.step}{extra}"


def parse_fault(spec: Any) -> Fault:
    """``KIND[:key=value,...]`` -> :class:`Fault`, or :class:`FaultError` naming what is wrong."""
    s = str(spec).strip()
    m = _SPEC.match(s)
    if not m:
        raise FaultError(f"{s!r}: expected KIND:key=value,... with KIND one of {', '.join(KINDS)}")
    kind = m.group("kind")
    if kind not in KINDS:
        raise FaultError(f"{s!r}: unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
    required, optional = KINDS[kind]
    values: dict[str, float] = dict(optional)
    seen: set[str] = set()
    for part in (p.strip() for p in (m.group("params") or "").split(",")):
        if not part:
            continue
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq:
            raise FaultError(f"{s!r}: expected key=value, got {part!r}")
        if key not in required and key not in optional:
            allowed = ", ".join((*required, *optional))
            raise FaultError(f"{s!r}: {kind} takes {allowed}, not {key!r}")
        if key in seen:
            raise FaultError(f"{s!r}: {key} given twice")
        seen.add(key)
        try:
            v = float(int(raw)) if key in _INT_KEYS else float(raw)
        except ValueError:
            want = "an integer" if key in _INT_KEYS else "a number"
            raise FaultError(f"{s!r}: {key} must be {want}, got {raw.strip()!r}") from None
        if key in _INT_KEYS and v < 0:
            raise FaultError(f"{s!r}: {key} must be >= 0, got {int(v)}")
        if key == "factor" and not v >= 1.0:
            raise FaultError(f"{s!r}: factor must be >= 1, got {raw.strip()}")
        if key == "seconds" and not v >= 0.0:
            raise FaultError(f"{s!r}: seconds must be >= 0, got {raw.strip()}")
        values[key] = v
    missing = [k for k in required if k not in seen]
    if missing:
        raise FaultError(f"{s!r}: {kind} needs {', '.join(f'{k}=' for k in missing)}")
    return Fault(
        kind=kind,
        rank=int(values["rank"]),
        step=int(values.get("step", 0)),
        factor=float(values.get("factor", 1.0)),
        seconds=float(values.get("seconds", 0.0)),
    )


def parse_inject(v: Any) -> list[str]:
    """The ``inject`` setting: repeated flags, a YAML list, or ``;``-separated in the environment.

    Values stay strings (validated here) because they travel to the ranks as JSON.
    """
    if v is None:
        return []
    if isinstance(v, str):
        items: Iterable[Any] = [p for p in (x.strip() for x in v.split(";")) if p]
    elif isinstance(v, list | tuple):
        items = v
    else:
        raise ValueError(f"expected a list of KIND:key=value,..., got {type(v).__name__}")
    out = []
    for item in items:
        try:
            out.append(str(parse_fault(item)))
        except FaultError as e:
            raise ValueError(str(e)) from None
    return out


def check_world(faults: Sequence[Fault], world_size: int) -> None:
    """Faults name ranks that exist, and at most one fault of a kind per rank."""
    seen: set[tuple[str, int]] = set()
    for f in faults:
        if f.rank >= world_size:
            raise FaultError(f"{f}: rank {f.rank} does not exist with --world-size={world_size}")
        if (f.kind, f.rank) in seen:
            raise FaultError(f"{f}: more than one {f.kind} fault for rank {f.rank}")
        seen.add((f.kind, f.rank))


class Injector:
    """One rank's faults, consulted by the training loop at fixed points of each step."""

    def __init__(self, faults: Iterable[Fault], rank: int) -> None:
        mine = {f.kind: f for f in faults if f.rank == rank}
        self.nan = mine.get("nan")
        self.stall = mine.get("stall")
        self.crash = mine.get("crash")
        self.oom = mine.get("oom")
        self.straggler_factor = mine["straggler"].factor if "straggler" in mine else 1.0
        self.slow_data_factor = mine["slow-data"].factor if "slow-data" in mine else 1.0

    @property
    def any(self) -> bool:
        return any((self.nan, self.stall, self.crash, self.oom)) or (
            self.straggler_factor != 1.0 or self.slow_data_factor != 1.0
        )

    def at(self, fault: Fault | None, step: int) -> bool:
        return fault is not None and step == fault.step

    def nan_from(self, step: int) -> bool:
        return self.nan is not None and step >= self.nan.step

    def slow_data_delay(self, produced_seconds: float) -> float:
        if self.slow_data_factor == 1.0:
            return 0.0
        return (self.slow_data_factor - 1.0) * max(produced_seconds, SLOW_DATA_FLOOR_SECONDS)

    def straggler_delay(self, compute_seconds: float) -> float:
        if self.straggler_factor == 1.0:
            return 0.0
        return (self.straggler_factor - 1.0) * compute_seconds
