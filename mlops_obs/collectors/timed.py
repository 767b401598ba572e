"""``Timed``: a value read again at most every so many seconds, or when what it was read for changes.

The collectors keep several such values: a GPU's counters, its slow-moving gauges, its per-process
utilisation and its GPM ratios are re-read once a ``gpu.counter-interval`` and reused in between;
the host's mount table once every ``MOUNT_CACHE_SECONDS``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Timed(Generic[T]):
    """``value``, read at monotonic time ``at`` for ``key``; due again ``interval`` seconds later, or
    as soon as the key differs (the owner of a GPU changed, another procfs root was configured)."""

    __slots__ = ("at", "key", "value")

    def __init__(self, value: T) -> None:
        self.value = value
        self.at = float("-inf")
        self.key: Hashable = None

    def due(self, now: float, interval: float, key: Hashable = None) -> bool:
        return now - self.at >= interval or key != self.key

    def set(self, value: T, now: float, key: Hashable = None) -> T:
        self.value, self.at, self.key = value, now, key
        return value

    def expire(self) -> None:
        """Due at the next look, whatever the interval (the device was lost: read everything afresh)."""
        self.at = float("-inf")
