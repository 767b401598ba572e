"""Label sets that carry their rendered text, and the bounded cache a collector interns them in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def escape_label_value(v: str) -> str:
    """The text format's escaping of a label value (backslash, double quote, newline)."""
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return v


class Labels(dict[str, str]):
    """An immutable label set that carries its rendered ``k="v",...`` text.

    Why: a collector hands the same label set to many samples (a GPU's ~40 gauges share one), and the
    renderer would otherwise build, sort and escape the text of every sample's labels. Interned
    through :class:`LabelSets`, a set is built once per run (or once per round for churning ones),
    and rendering a sample reads one attribute. A plain ``dict`` everywhere else (prometheus_client,
    tests), so it cannot be changed after its text was rendered.
    """

    __slots__ = ("braced", "text")

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        super().__init__(items)
        self.text = ",".join([f'{k}="{escape_label_value(v)}"' for k, v in sorted(self.items())])
        # What follows the sample name: ``{k="v",...}``, or nothing for the empty set.
        self.braced = f"{{{self.text}}}" if self.text else ""

    def __hash__(self) -> int:  # type: ignore[override]
        # Immutable, so usable as a key; equal sets render the same text, so they hash alike.
        return hash(self.text)

    def _immutable(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Labels are immutable: build a new set with LabelSets.get({**old, ...})")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = __ior__ = _immutable  # type: ignore[assignment]


NO_LABELS = Labels(())


class LabelSets:
    """A collector's interned :class:`Labels`: the same object for the same labels, round after round.

    Held by the collector instance (each runs on its own sampler thread, so nothing is shared) and
    bounded: when a map is full it is cleared and refilled, so label sets that churn (processes that
    come and go) never grow it. ``with_label`` and ``buckets`` remember sets derived from another set
    by (set, name, value), which is cheaper than building and interning a new mapping every round.
    """

    __slots__ = ("_derived", "_max", "_sets")

    def __init__(self, max_sets: int = 50_000) -> None:
        self._max = max_sets
        self._sets: dict[tuple[tuple[str, Any], ...], Labels] = {}
        self._derived: dict[tuple[Any, ...], Any] = {}

    def __len__(self) -> int:
        return len(self._sets) + len(self._derived)

    def get(self, mapping: Mapping[str, Any]) -> Labels:
        """The interned set for ``mapping``, its values turned to ``str``."""
        key = tuple(mapping.items())
        got = self._sets.get(key)
        if got is None:
            if len(self._sets) >= self._max:
                self._sets.clear()
            got = self._sets[key] = Labels([(k, v if type(v) is str else str(v)) for k, v in key])
        return got

    def with_label(self, base: Labels, name: str, value: Any) -> Labels:
        """``base`` plus one label (a phase, a kind, a reason)."""
        v = value if type(value) is str else str(value)
        key = (base, name, v)
        got: Labels | None = self._derived.get(key)
        if got is None:
            got = self._remember(key, self.get({**base, name: v}))
        return got

    def buckets(self, base: Labels, bounds: tuple[float, ...]) -> tuple[Labels, ...]:
        """``base`` plus ``le`` for each histogram bucket bound, then ``+Inf``, as prometheus_client writes them."""
        key = (base, bounds)
        got: tuple[Labels, ...] | None = self._derived.get(key)
        if got is None:
            les = (*(repr(float(b)) for b in bounds), "+Inf")
            got = self._remember(key, tuple(self.get({**base, "le": le}) for le in les))
        return got

    def _remember(self, key: tuple[Any, ...], value: Any) -> Any:
        if len(self._derived) >= self._max:
            self._derived.clear()
        self._derived[key] = value
        return value
