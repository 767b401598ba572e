"""A purpose-built Prometheus text-format (0.0.4) writer for prometheus_client metric families.

Why not ``prometheus_client.generate_latest``: it sorts and escapes every label of every sample
through general-purpose helpers (~7 µs a series here), and the sampler renders every collector
once a second, so with 8 GPUs and ~1,100 series that alone would spend ~1.5% of a core. This
writer produces byte for byte the same text (the tests compare the two, and lint it with
``promtool check metrics``) at about a fifth of the cost, by escaping only values that need it and
caching each family's header lines and each label set's rendered, sorted text: the same label sets
come back every round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric

_TYPE_NAMES = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "summary": "summary",
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "histogram",
    "unknown": "untyped",
}

_header_cache: dict[tuple[str, str, str], str] = {}
_HEADER_CACHE_MAX = 4096
# The same label sets come back every round (one per GPU, device, rank...), so their rendered
# ``k="v",...`` text is kept. Bounded: cleared when full, never grows with churn.
_label_cache: dict[tuple[tuple[str, str], ...], str] = {}
_LABEL_CACHE_MAX = 50_000
_value_cache: dict[float, str] = {}
_VALUE_CACHE_MAX = 20_000
# A family's rendered text, kept with the samples it was rendered from. Most families come back
# unchanged round after round (limits, thresholds, identities, and a GPU's counters between two
# ``gpu.counter-interval`` refreshes reuse the very same sample objects), and comparing two sample
# lists is a C-level walk that stops at the first difference, many times cheaper than rendering.
# Equality is the same notion of "same" the label and value caches already use.
_family_cache: dict[tuple[str, str, str], tuple[list[Any], bytes]] = {}
_FAMILY_CACHE_MAX = 4096


def _escape_label_value(v: str) -> str:
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return v


class Labels(dict[str, str]):
    """An immutable label set that carries its rendered ``k="v",...`` text.

    Why: a collector hands the same label set to many samples (a GPU's ~40 gauges share one), and
    the renderer would otherwise build and hash a tuple of its items for every sample to find the
    text in ``_label_cache``. Interned through :func:`labels`, the set is built once per round (or
    once per run) and rendering a sample reads one attribute. A plain ``dict`` everywhere else
    (prometheus_client, tests), so it cannot be changed after its text was rendered.
    """

    __slots__ = ("braced", "text")

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        super().__init__(items)
        self.text = ",".join([f'{k}="{_escape_label_value(v)}"' for k, v in sorted(self.items())])
        # What follows the sample name: ``{k="v",...}``, or nothing for the empty set.
        self.braced = f"{{{self.text}}}" if self.text else ""

    def __hash__(self) -> int:  # type: ignore[override]
        # Immutable, so usable as a key; equal sets render the same text, so they hash alike.
        return hash(self.text)

    def _immutable(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Labels are immutable: build a new set with labels({**old, ...})")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = __ior__ = _immutable  # type: ignore[assignment]


_interned: dict[tuple[tuple[str, str], ...], Labels] = {}
_INTERNED_MAX = 50_000


def labels(mapping: dict[str, Any]) -> Labels:
    """The interned :class:`Labels` for ``mapping`` (values turned to ``str``); bounded like the caches above."""
    key = tuple(mapping.items())
    got = _interned.get(key)
    if got is None:
        if len(_interned) >= _INTERNED_MAX:
            _interned.clear()  # label sets churned (processes came and went): start over
        got = _interned[key] = Labels([(k, v if type(v) is str else str(v)) for k, v in key])
    return got


_family_protos: dict[tuple[str, str, str], dict[str, Any]] = {}
_new_metric = Metric.__new__


def family(name: str, documentation: str, typ: str, samples: list[Any]) -> Metric:
    """``Metric(name, documentation, typ)`` holding ``samples``, without re-validating the name.

    Why: the constructor matches the name against a regular expression every time, and the
    collectors build the same ~80 families every second. The first build of each (name, help,
    type) goes through the constructor (so a bad name still raises); later ones set its fields.
    """
    key = (name, documentation, typ)
    proto = _family_protos.get(key)
    if proto is None:
        proto = dict(vars(Metric(name, documentation, typ)))  # every attribute this prometheus_client sets
        if len(_family_protos) < _HEADER_CACHE_MAX:
            _family_protos[key] = proto
    m = _new_metric(Metric)
    vars(m).update(proto)
    m.samples = samples
    return m


def format_value(v: float) -> str:
    """prometheus_client's ``floatToGoString``, inlined: ``+Inf``, ``-Inf``, ``NaN``, ``1.0``, ``1.2345678e+07``."""
    if v != v:
        return "NaN"
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    s = repr(float(v))
    if v > 0:
        dot = s.find(".")
        # Go switches to exponents sooner than Python.
        if dot > 6:
            mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
            return f"{mantissa}e+{dot - 1:02d}"
    return s


def _cached_value(v: float) -> str:
    """``format_value`` through a bounded cache: thresholds, totals, limits and flags repeat every round."""
    text = _value_cache.get(v)
    if text is None:
        text = format_value(v)
        if v == v:  # NaN never equals itself: caching it would only add keys
            if len(_value_cache) >= _VALUE_CACHE_MAX:
                _value_cache.clear()
            _value_cache[v] = text
    return text


def _header(name: str, mtype: str, documentation: str) -> str:
    key = (name, mtype, documentation)
    h = _header_cache.get(key)
    if h is None:
        doc = documentation.replace("\\", "\\\\").replace("\n", "\\n")
        h = f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n"
        if len(_header_cache) < _HEADER_CACHE_MAX:
            _header_cache[key] = h
    return h


def render(families: Iterable[Metric]) -> bytes:
    """Byte for byte what ``generate_latest`` writes for these families (the tests hold it to that)."""
    out: list[bytes] = []
    append = out.append
    cache = _family_cache
    for metric in families:
        samples = metric.samples
        if type(samples) is not list:
            samples = list(samples)
        key = (metric.name, metric.type, metric.documentation)
        hit = cache.get(key)
        if hit is not None and hit[0] == samples:
            append(hit[1])
            continue
        # Kept encoded: a round of unchanged families is then one join of bytes, not a join of
        # text and an encoding of it (two passes over ~150 KB for 8 GPUs).
        data = _render_family(metric, samples).encode("utf-8")
        if len(cache) >= _FAMILY_CACHE_MAX:
            cache.clear()  # family names churned: start over rather than grow
        cache[key] = (samples.copy(), data)
        append(data)
    return b"".join(out)


def _render_family(metric: Metric, samples: list[Any]) -> str:
    out: list[str] = []
    append = out.append
    labels_get = _label_cache.get
    values_get = _value_cache.get
    mtype = metric.type
    name = metric.name
    if mtype == "counter":
        name += "_total"
    elif mtype == "info":
        name += "_info"
    append(_header(name, _TYPE_NAMES.get(mtype, "untyped"), metric.documentation))
    om: dict[str, list[str]] = {}
    om_names = (metric.name + "_created", metric.name + "_gsum", metric.name + "_gcount")
    # Unpacked in the loop header, caches by bound ``get``: this loop runs for every sample of every
    # family that changed. Whether a sample is OpenMetrics-only is decided once per run of samples
    # that share a name (a family's samples mostly do), by identity.
    prev_name = None
    is_om = False
    for s in samples:
        sname, labels, val, ts = s[0], s[1], s[2], s[3]  # by index: Sample grew fields across versions
        text = values_get(val)
        if text is None:
            text = _cached_value(val)
        if type(labels) is Labels:
            line = f"{sname}{labels.braced} {text}\n"
        elif labels:
            key = tuple(labels.items())
            cached = labels_get(key)
            if cached is not None:
                body = cached
            else:
                body = ",".join([f'{k}="{_escape_label_value(str(v))}"' for k, v in sorted(key)])
                if len(_label_cache) >= _LABEL_CACHE_MAX:
                    _label_cache.clear()  # label sets churned (processes came and went): start over
                _label_cache[key] = body
            line = f"{sname}{{{body}}} {text}\n"
        else:
            line = f"{sname} {text}\n"
        if ts is not None:
            line = f"{line[:-1]} {int(float(ts) * 1000):d}\n"
        if sname is not prev_name:
            prev_name = sname
            is_om = sname in om_names
        if is_om:
            # OpenMetrics-only samples go in a gauge family of their own, as generate_latest does.
            om.setdefault(sname[len(metric.name) :], []).append(line)
        else:
            append(line)
    for suffix, lines in sorted(om.items()):
        append(_header(metric.name + suffix, "gauge", metric.documentation))
        out.extend(lines)
    return "".join(out)
