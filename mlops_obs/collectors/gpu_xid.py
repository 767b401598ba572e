"""XID errors counted per (device, XID) from NVML's event set, on a daemon thread of their own."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mlops_obs.collectors._nvml import ERROR_TIMEOUT, GpuLost, Nvml
from mlops_obs.collectors._nvml_structs import handle_address

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

EVENT_XID = 0x0000000000000008  # nvmlEventTypeXidCriticalError
# One nvmlEventSetWait: how soon the thread notices it should stop (nobody waits for it: a daemon), and
# how often the XID thread wakes when no XID comes (each timeout is an NVMLError raised and caught, about
# a quarter of a millisecond of CPU as it runs cold: at 10 s that was ~0.0025% of a core, a twentieth of
# the whole sidecar's cost at a 15 s scrape). An event ends the wait at once, whatever its length.
WAIT_MS = 60_000


class XidWatcher:
    """Counts XID events per (device, XID) from NVML's event set, on its own daemon thread.

    A counter per code (not the last code) so ``increase(mlops_gpu_xid_errors_total[5m]) > 0`` fires
    once per new error. Counts start when this exporter starts, like any process-local counter.
    ``devices`` are (index, handle) pairs.
    """

    def __init__(self, nvml: Nvml, devices: Iterable[tuple[int, Any]], log: FilteringBoundLogger) -> None:
        self.nvml = nvml
        self.log = log
        devices = [(i, h) for i, h in devices if h is not None]
        self.by_handle = {handle_address(h): i for i, h in devices}
        self.counts: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(devices,), name="gpu-xid-events", daemon=True)
        self.registered: set[int] = set()

    def start(self) -> XidWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict[tuple[int, int], int]:
        with self._lock:
            return dict(self.counts)

    def _run(self, devices: list[tuple[int, Any]]) -> None:
        nvml = self.nvml
        try:
            es = nvml.call("nvmlEventSetCreate")
            if es is None:
                return
            for index, handle in devices:
                try:
                    if nvml.try_call("nvmlDeviceRegisterEvents", handle, EVENT_XID, es)[0]:
                        self.registered.add(index)
                except GpuLost:
                    continue
        except Exception as e:  # a lib that cannot even create an event set: no XID counting
            self.log.warning("gpu XID event thread not started", error=str(e))
            return
        if not self.registered:
            return
        wait = nvml.lib.nvmlEventSetWait
        while not self._stop.is_set():
            try:
                data = wait(es, WAIT_MS)
            except Exception as e:
                if getattr(e, "value", None) == ERROR_TIMEOUT:  # no event in this window
                    continue
                if self._stop.wait(1.0):
                    break
                continue
            if int(data.eventType) & EVENT_XID == 0:
                continue
            gpu = self.by_handle.get(handle_address(data.device))
            if gpu is None:
                continue
            key = (gpu, int(data.eventData))
            with self._lock:
                self.counts[key] = self.counts.get(key, 0) + 1
            self.log.warning("gpu XID error", gpu=gpu, xid=key[1])
        try:
            nvml.lib.nvmlEventSetFree(es)
        except Exception:
            pass
