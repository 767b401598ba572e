"""Shipper collector: the log shipper's health, read from the stats file it writes into its state dir.

The shipper is its own process (it must survive the sidecar's restarts and vice versa), so instead
of a second ``/metrics`` endpoint it writes ``stats.json`` atomically (temp + rename) about once a
second, and the sidecar turns that into ``mlops_shipper_*`` families. A missing file means no
shipper ran here yet: no series, not an error. A stale file is still served (counters stay true);
``mlops_shipper_last_success_timestamp_seconds`` is what alerts on a stuck shipper.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, register
from mlops_obs.config import Setting, parse_optional_path

STATS_FILE = "stats.json"  # the contract with mlops_obs.logs.shipper.STATS_FILE


@register
class ShipperCollector(Collector):
    name = "shipper"
    help = "Log shipper progress from the stats file in --shipper.state-dir."
    settings = (
        Setting(
            "shipper.state-dir",
            parse_optional_path,
            None,
            "State directory of `mlops-obs ship` (its --state) whose stats.json to export.",
            metavar="DIR",
        ),
    )

    def sample(self) -> Iterable[Metric]:
        directory = self.config.get("shipper.state-dir")
        if not directory:
            return []
        try:
            raw = (Path(directory) / STATS_FILE).read_bytes()
        except FileNotFoundError:
            return []
        try:
            stats = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"{Path(directory) / STATS_FILE}: not valid JSON ({e})") from None
        return self.families(stats)

    @staticmethod
    def families(stats: dict[str, object]) -> list[Metric]:
        def num(key: str) -> float:
            v = stats.get(key)
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0

        out: list[Metric] = []
        for key, name, doc in (
            ("lines_read_total", "mlops_shipper_lines_read", "Lines read from the source files."),
            ("events_shipped_total", "mlops_shipper_events_shipped", "Events acknowledged by the sink."),
            ("retries_total", "mlops_shipper_retries", "Sink requests or items retried."),
            ("dead_letters_total", "mlops_shipper_dead_letters",
             "Events rejected by the sink, kept in the dead-letter file."),
        ):  # fmt: skip
            c = CounterMetricFamily(name, doc)
            c.add_metric([], num(key))
            out.append(c)
        lag = GaugeMetricFamily("mlops_shipper_lag_bytes", "Bytes written to a file but not yet acknowledged.",
                                labels=["file"])  # fmt: skip
        lag_map = stats.get("lag_bytes")
        if isinstance(lag_map, dict):
            for path, n in sorted(lag_map.items()):
                if isinstance(n, int | float):
                    lag.add_metric([str(path)], float(n))
        out.append(lag)
        last = stats.get("last_success_timestamp_seconds")
        if isinstance(last, int | float):
            g = GaugeMetricFamily(
                "mlops_shipper_last_success_timestamp_seconds", "Unix time the sink last acknowledged a batch."
            )
            g.add_metric([], float(last))
            out.append(g)
        return out
