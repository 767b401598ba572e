"""Every use of prometheus_client beyond its public API, in one module.

The collectors build ~1,100 samples and ~80 families every second, and prometheus_client's public
constructors run Python code for each (``Metric.__init__`` matches the name against a regular
expression; ``Sample`` is a namedtuple whose ``__new__`` is a Python function). Three shortcuts
skip that work, and each rests on a detail of the installed version:

1. :class:`MetricMaker` builds a ``Metric`` with ``Metric.__new__`` and copies in the instance
   attributes (``vars()``) that the constructor set on a first, validated instance of the same
   (name, help, type): it relies on ``Metric`` keeping its state in its instance ``__dict__``.
2. :func:`sample` builds a ``Sample`` with ``tuple.__new__(Sample, ...)``: it relies on
   ``Sample``'s fields being exactly :data:`SAMPLE_FIELDS`.
3. The renderer (:mod:`mlops_obs.metrics.render`) reads a sample by position (name, labels, value,
   timestamp: the first four of :data:`SAMPLE_FIELDS`), which is faster than by attribute.

:func:`changes` says what no longer holds for the installed prometheus_client, and
``tests/test_metrics_client.py`` fails with its message, so an upgrade that breaks a shortcut is
caught by the test suite, not by a wrong ``/metrics``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

# The fields tuple.__new__ fills, in order; the renderer reads the first four by position.
SAMPLE_FIELDS = ("name", "labels", "value", "timestamp", "exemplar", "native_histogram")
# The instance attributes Metric.__init__ sets, which MetricMaker copies.
METRIC_ATTRIBUTES = ("name", "documentation", "unit", "type", "samples")

_tuple_new = tuple.__new__
_metric_new = Metric.__new__


def sample(name: str, labels: dict[str, str], value: float) -> Sample:
    """``Sample(name, labels, value)``, without the namedtuple's Python-level ``__new__``."""
    return _tuple_new(Sample, (name, labels, value, None, None, None))  # type: ignore[no-any-return]


class MetricMaker:
    """Builds ``Metric(name, documentation, typ)`` holding given samples, validating each (name, help,
    type) once: the first build goes through the constructor (a bad name still raises), later ones
    copy its attributes into a bare instance. One per collector: the prototypes are its own state.
    """

    __slots__ = ("_max", "_protos")

    def __init__(self, max_families: int = 4096) -> None:
        self._protos: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._max = max_families

    def __call__(self, name: str, documentation: str, typ: str, samples: list[Sample]) -> Metric:
        key = (name, documentation, typ)
        proto = self._protos.get(key)
        if proto is None:
            proto = dict(vars(Metric(name, documentation, typ)))
            if len(self._protos) < self._max:
                self._protos[key] = proto
        m = _metric_new(Metric)
        vars(m).update(proto)
        m.samples = samples
        return m


def changes() -> list[str]:
    """What the shortcuts above assume and the installed prometheus_client no longer does; empty when
    all hold. Each entry names the assumption, what was found, and the code that depends on it."""
    import prometheus_client

    version = getattr(prometheus_client, "__version__", None) or _installed_version()
    out: list[str] = []
    fields = tuple(getattr(Sample, "_fields", ()))
    if fields != SAMPLE_FIELDS:
        out.append(
            f"prometheus_client {version}: Sample fields are {fields}, expected {SAMPLE_FIELDS} "
            "(mlops_obs.metrics._client.sample builds samples with tuple.__new__ and the renderer reads "
            "them by position)"
        )
    try:
        attrs = tuple(vars(Metric("mlops_check", "Check.", "gauge")))
    except TypeError:
        attrs = ()
    if sorted(attrs) != sorted(METRIC_ATTRIBUTES):
        out.append(
            f"prometheus_client {version}: Metric instance attributes are {attrs}, expected "
            f"{METRIC_ATTRIBUTES} (mlops_obs.metrics._client.MetricMaker copies them into Metric.__new__ instances)"
        )
    else:
        built = MetricMaker()("mlops_check", "Check.", "counter", [sample("mlops_check_total", {}, 1.0)])
        public = Metric("mlops_check", "Check.", "counter")
        public.add_sample("mlops_check_total", {}, 1.0)
        if vars(built) != vars(public) or built != public:
            out.append(
                f"prometheus_client {version}: a Metric built by MetricMaker differs from the constructor's "
                f"({vars(built)} != {vars(public)})"
            )
    if not out:
        s = sample("mlops_check", {"a": "b"}, 2.0)
        if s != Sample("mlops_check", {"a": "b"}, 2.0) or (s.name, s.labels, s.value, s.timestamp) != tuple(s[:4]):
            out.append(f"prometheus_client {version}: tuple.__new__(Sample, ...) no longer equals Sample(...)")
    return out


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prometheus_client")
    except PackageNotFoundError:
        return "(unknown version)"
