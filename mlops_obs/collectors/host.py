"""Host CPU, memory, load, disk I/O and network through psutil, named like node_exporter's series.

Names carry the ``mlops_node_`` prefix so they never collide with a node_exporter scraped by the
same Prometheus, while keeping node_exporter's label vocabulary (``mode``, ``device``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, register


@register
class HostCollector(Collector):
    name = "host"
    help = "CPU, memory, load, disk I/O and network of this node (psutil)."

    def sample(self) -> Iterable[Metric]:
        cpu = CounterMetricFamily("mlops_node_cpu_seconds", "Seconds all CPUs spent in each mode.", labels=["mode"])
        for mode, secs in psutil.cpu_times()._asdict().items():
            cpu.add_metric([mode], float(secs))
        yield cpu
        yield GaugeMetricFamily("mlops_node_cpus", "Logical CPUs.", value=psutil.cpu_count() or 0)

        load = GaugeMetricFamily("mlops_node_load", "Load average.", labels=["window"])
        for window, value in zip(("1m", "5m", "15m"), os.getloadavg()):
            load.add_metric([window], value)
        yield load

        vm = psutil.virtual_memory()
        yield GaugeMetricFamily("mlops_node_memory_total_bytes", "Physical memory.", value=vm.total)
        yield GaugeMetricFamily(
            "mlops_node_memory_available_bytes", "Memory available without swapping.", value=vm.available
        )
        sw = psutil.swap_memory()
        yield GaugeMetricFamily("mlops_node_swap_total_bytes", "Swap space.", value=sw.total)
        yield GaugeMetricFamily("mlops_node_swap_used_bytes", "Swap in use.", value=sw.used)

        disks = psutil.disk_io_counters(perdisk=True) or {}
        rd = CounterMetricFamily("mlops_node_disk_read_bytes", "Bytes read.", labels=["device"])
        wr = CounterMetricFamily("mlops_node_disk_written_bytes", "Bytes written.", labels=["device"])
        busy = CounterMetricFamily("mlops_node_disk_io_time_seconds", "Seconds spent doing I/O.", labels=["device"])
        for dev, c in sorted(disks.items()):
            rd.add_metric([dev], float(c.read_bytes))
            wr.add_metric([dev], float(c.write_bytes))
            busy_ms = getattr(c, "busy_time", None)
            if busy_ms is not None:
                busy.add_metric([dev], busy_ms / 1000.0)
        yield rd
        yield wr
        yield busy

        nics = psutil.net_io_counters(pernic=True) or {}
        families = {
            "bytes_recv": CounterMetricFamily("mlops_node_network_receive_bytes", "Bytes received.", labels=["device"]),
            "bytes_sent": CounterMetricFamily("mlops_node_network_transmit_bytes", "Bytes sent.", labels=["device"]),
            "errin": CounterMetricFamily("mlops_node_network_receive_errors", "Receive errors.", labels=["device"]),
            "errout": CounterMetricFamily("mlops_node_network_transmit_errors", "Transmit errors.", labels=["device"]),
            "dropin": CounterMetricFamily(
                "mlops_node_network_receive_drop", "Inbound packets dropped.", labels=["device"]
            ),
        }
        for dev, n in sorted(nics.items()):
            for attr, fam in families.items():
                fam.add_metric([dev], float(getattr(n, attr)))
        yield from families.values()
