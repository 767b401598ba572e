"""GPU collector through NVML (nvidia-ml-py's ``pynvml``).

Where NVML is absent (no driver, no GPU) the collector raises :class:`CollectorUnavailable`: the
exporter reports ``mlops_scrape_collector_success{collector="gpu"} 0`` and logs one line, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, CollectorUnavailable, register


@register
class GpuCollector(Collector):
    name = "gpu"
    help = "NVIDIA GPU health and utilisation through NVML."

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._nvml: Any = None

    def _init(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
                raise CollectorUnavailable(f"NVML is not available: {e}") from None
            self._nvml = pynvml
        return self._nvml

    def sample(self) -> Iterable[Metric]:
        nvml = self._init()
        util = GaugeMetricFamily(
            "mlops_gpu_utilization_ratio", "Fraction of time a kernel ran.", labels=["gpu", "uuid", "model"]
        )
        mem = GaugeMetricFamily("mlops_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu", "uuid", "model"])
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            labels = [str(i), nvml.nvmlDeviceGetUUID(h), nvml.nvmlDeviceGetName(h)]
            util.add_metric(labels, nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
            mem.add_metric(labels, float(nvml.nvmlDeviceGetMemoryInfo(h).used))
        return [util, mem]

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
