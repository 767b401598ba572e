"""The one way collectors build metric families: a table of families, and a round's samples per family.

A collector declares its families once, as ``{name: (type, help)}`` (a counter's name with or
without ``_total``), and keeps one :class:`FamilyBuilder` for its lifetime. Each round it starts a
:class:`Families`, adds samples with label sets interned in the builder's :class:`LabelSets`, and
hands back :meth:`Families.metrics`. The families are prometheus_client ``Metric`` objects holding
the same samples its ``*MetricFamily.add_metric`` would make (same names, label sets, values,
order), built without its per-sample Python code (see :mod:`mlops_obs.metrics._client`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import accumulate
from typing import Any, NamedTuple

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from mlops_obs.metrics._client import MetricMaker, sample
from mlops_obs.metrics.labels import Labels, LabelSets


class Spec(NamedTuple):
    """One family: what ``Metric(name, documentation, type)`` is built from, and its plain samples' name."""

    name: str  # the family's name; a counter's without ``_total``
    type: str
    documentation: str
    sample: str  # the name of its samples: ``name_total`` for a counter, ``name`` otherwise


def spec(key: str, typ: str, documentation: str) -> Spec:
    name = key[:-6] if typ == "counter" and key.endswith("_total") else key
    return Spec(name, typ, documentation, name + "_total" if typ == "counter" else name)


class FamilyBuilder:
    """A collector's family table, label-set cache and ``Metric`` prototypes; one per collector instance.

    ``table`` maps the key a collector adds samples under to ``(type, help)``; families outside the
    table (names made at run time) are added to it with :meth:`declare`.
    """

    __slots__ = ("labels", "make", "sample_names", "specs")

    def __init__(self, table: Mapping[str, tuple[str, str]] | None = None, max_label_sets: int = 50_000) -> None:
        self.specs: dict[str, Spec] = {key: spec(key, typ, doc) for key, (typ, doc) in (table or {}).items()}
        self.sample_names = {key: s.sample for key, s in self.specs.items()}  # looked up for every sample
        self.labels = LabelSets(max_label_sets)
        self.make = MetricMaker()

    def declare(self, key: str, typ: str, documentation: str) -> None:
        if key not in self.specs:
            self.specs[key] = spec(key, typ, documentation)
            self.sample_names[key] = self.specs[key].sample

    def round(self, *present: str) -> Families:
        """A new round; ``present`` are families reported even when they get no sample, in this order."""
        return Families(self, present)

    def metric(self, key: str, samples: list[Sample]) -> Metric:
        s = self.specs[key]
        return self.make(s.name, s.documentation, s.type, samples)


class Families:
    """One round's samples per family, families in the order they were first used (or declared present).

    A family that gets no sample and was not declared present is left out: an unsupported field
    yields no family at all, never an empty one.
    """

    __slots__ = ("_builder", "_lists", "_names", "_specs")

    def __init__(self, builder: FamilyBuilder, present: Iterable[str] = ()) -> None:
        self._builder = builder
        self._specs = builder.specs
        self._names = builder.sample_names
        self._lists: dict[str, list[Sample]] = {key: [] for key in present}

    def present(self, *keys: str) -> None:
        """Report these families from here on, in this order, even if they get no sample."""
        lists = self._lists
        for key in keys:
            if key not in lists:
                lists[key] = []

    def samples(self, key: str) -> list[Sample]:
        """The family's list, to append :func:`mlops_obs.metrics.sample` results to in a hot loop."""
        lst = self._lists.get(key)
        if lst is None:
            lst = self._lists[key] = []
        return lst

    def add(self, key: str, labels: Labels, value: float) -> None:
        lst = self._lists.get(key)
        if lst is None:
            lst = self._lists[key] = []
        lst.append(sample(self._names[key], labels, float(value)))

    def extend(self, key: str, samples: list[Sample]) -> None:
        """Samples built in an earlier round (a cached counter read), appended as they are."""
        lst = self._lists.get(key)
        if lst is None:
            self._lists[key] = samples.copy()  # a copy: the caller keeps its list for later rounds
        else:
            lst.extend(samples)

    def histogram(self, key: str, labels: Labels, counts: list[Any], bounds: tuple[float, ...], total: float) -> None:
        """Buckets, count and sum in prometheus_client's order from per-bucket (non-cumulative) ``counts``,
        one more than ``bounds`` (the last is +Inf)."""
        name = self._specs[key].name
        lst = self.samples(key)
        sets = self._builder.labels.buckets(labels, bounds)
        bucket = name + "_bucket"
        # Cumulative counts as float sums in bucket order (the same additions a running total makes).
        cums = list(accumulate(map(int, counts), initial=0.0))
        lst.extend([sample(bucket, ls, cum) for ls, cum in zip(sets, cums[1:])])
        lst.append(sample(name + "_count", labels, cums[-1]))
        lst.append(sample(name + "_sum", labels, float(total)))

    def items(self) -> Iterable[tuple[str, list[Sample]]]:
        return self._lists.items()

    def metrics(self) -> list[Metric]:
        make, specs = self._builder.make, self._specs
        out = []
        for key, lst in self._lists.items():
            s = specs[key]
            out.append(make(s.name, s.documentation, s.type, lst))
        return out
