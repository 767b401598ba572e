"""Collector registry in node_exporter's style: one module a collector, each enabled by flag.

A collector's :meth:`Collector.sample` runs on the background sampler (never on the scrape path) and
returns prometheus_client metric families, built with a :class:`mlops_obs.metrics.FamilyBuilder` of its
own. Raising marks only that collector failed for the round
(``mlops_scrape_collector_success{collector} 0``); the others are still served.
:class:`CollectorUnavailable` is for a collector that cannot work on this machine at all (no NVML):
it is logged once, not on every round.

Collectors stand on :mod:`mlops_obs.metrics` and :mod:`mlops_obs.rankdir` and import nothing from
:mod:`mlops_obs.exporter`, which runs them. A new collector is a module here, listed in
:data:`BUILTIN_MODULES`, whose class is decorated with :func:`register`.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from prometheus_client.metrics_core import Metric

from mlops_obs.config import Setting, parse_bool
from mlops_obs.rankdir import RankDirectory

# Modules that hold built-in collectors; importing one registers its collectors.
BUILTIN_MODULES: tuple[str, ...] = (
    "mlops_obs.collectors.host",
    "mlops_obs.collectors.gpu",
    "mlops_obs.collectors.training",
    "mlops_obs.collectors.shipper",
    "mlops_obs.collectors.process",
)


class CollectorUnavailable(RuntimeError):
    """The collector cannot run on this machine (missing library, device or file)."""


class Collector(abc.ABC):
    name: ClassVar[str]
    default_enabled: ClassVar[bool] = True
    help: ClassVar[str] = ""
    # Extra settings this collector reads (flags ``--<key>``), resolved with the exporter's config.
    settings: ClassVar[tuple[Setting, ...]] = ()

    def __init__(self, config: Mapping[str, Any], ranks: RankDirectory | None = None) -> None:
        """``config`` is the exporter's resolved settings (shared, and updated in place by a reload);
        ``ranks`` the exporter's one :class:`RankDirectory`, or one made from ``config`` when alone."""
        self.config = config
        self.ranks = ranks if ranks is not None else RankDirectory.from_config(config)

    @abc.abstractmethod
    def sample(self) -> Iterable[Metric]:
        """Read the source and return fresh metric families (called off the scrape path)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles (NVML, threads); called once at shutdown."""


_REGISTRY: dict[str, type[Collector]] = {}


def register(cls: type[Collector]) -> type[Collector]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"collector {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, type[Collector]]:
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    return dict(sorted(_REGISTRY.items()))


def enable_settings() -> tuple[Setting, ...]:
    """``--collector.NAME`` / ``--no-collector.NAME`` for every registered collector."""
    out = []
    for name, cls in available().items():
        state = "enabled" if cls.default_enabled else "disabled"
        out.append(
            Setting(
                f"collector.{name}",
                parse_bool,
                cls.default_enabled,
                f"Enable the {name} collector ({state} by default). {cls.help}".strip(),
                kind="bool",
            )
        )
    return tuple(out)


def collector_settings() -> tuple[Setting, ...]:
    out: list[Setting] = []
    for cls in available().values():
        out.extend(cls.settings)
    return tuple(out)


def build(config: Mapping[str, Any], ranks: RankDirectory | None = None) -> list[Collector]:
    """The enabled collectors, sharing ``ranks`` (one made from ``config`` when not given)."""
    ranks = ranks if ranks is not None else RankDirectory.from_config(config)
    return [cls(config, ranks) for name, cls in available().items() if config.get(f"collector.{name}")]
