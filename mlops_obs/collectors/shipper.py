"""Shipper collector: the log shipper's health, read from the stats file it writes into its state dir.

The shipper is its own process (it must survive the sidecar's restarts and vice versa), so instead
of a second ``/metrics`` endpoint it writes ``stats.json`` atomically (temp + rename) about once a
second, also while its sink retries, and a shipper that fails to start puts its error there. The
sidecar turns that into ``mlops_shipper_*`` families. A missing file means no shipper ran here yet:
no series, not an error. A stale file is still served (counters stay true);
``mlops_shipper_last_success_timestamp_seconds`` with the lag, and ``mlops_shipper_failing`` (the
file names an error), are what alert on a stuck shipper.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, register
from mlops_obs.config import Setting, parse_optional_path
from mlops_obs.metrics import NO_LABELS, FamilyBuilder
from mlops_obs.rankdir import RankDirectory

STATS_FILE = "stats.json"  # the contract with mlops_obs.logs.shipper.STATS_FILE

# stats.json key of each counter -> its family.
_COUNTERS = {
    "lines_read_total": "mlops_shipper_lines_read",
    "events_shipped_total": "mlops_shipper_events_shipped",
    "retries_total": "mlops_shipper_retries",
    "dead_letters_total": "mlops_shipper_dead_letters",
}
FAMILIES: dict[str, tuple[str, str]] = {
    "mlops_shipper_lines_read": ("counter", "Lines read from the source files."),
    "mlops_shipper_events_shipped": ("counter", "Events acknowledged by the sink."),
    "mlops_shipper_retries": ("counter", "Sink requests or items retried."),
    "mlops_shipper_dead_letters": ("counter", "Events rejected by the sink, kept in the dead-letter file."),
    "mlops_shipper_lag_bytes": ("gauge", "Bytes written to a file but not yet acknowledged."),
    "mlops_shipper_last_success_timestamp_seconds": ("gauge", "Unix time the sink last acknowledged a batch."),
    "mlops_shipper_failing": ("gauge", "1 while an error holds the shipper (sink, checkpoint, start); stats.json "
                              "names it."),
}  # fmt: skip


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

    def __init__(self, config: Mapping[str, Any], ranks: RankDirectory | None = None) -> None:
        super().__init__(config, ranks)
        self.out = FamilyBuilder(FAMILIES)

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

    def families(self, stats: dict[str, object]) -> list[Metric]:
        def num(key: str) -> float:
            v = stats.get(key)
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0

        fams = self.out.round()
        for key, name in _COUNTERS.items():
            fams.add(name, NO_LABELS, num(key))
        fams.present("mlops_shipper_lag_bytes")
        lag_map = stats.get("lag_bytes")
        if isinstance(lag_map, dict):
            intern = self.out.labels.get
            for path, n in sorted(lag_map.items()):
                if isinstance(n, int | float):
                    fams.add("mlops_shipper_lag_bytes", intern({"file": str(path)}), float(n))
        fams.add("mlops_shipper_failing", NO_LABELS, 1.0 if stats.get("sink_error") else 0.0)
        last = stats.get("last_success_timestamp_seconds")
        if isinstance(last, int | float):
            fams.add("mlops_shipper_last_success_timestamp_seconds", NO_LABELS, float(last))
        return fams.metrics()
