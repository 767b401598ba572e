"""The one wrapper every NVML call goes through (the shape of nvitop's ``nvmlQuery``).

Why one wrapper: NVML's failure modes are per function and per device, and each needs the same
treatment everywhere. ``NotSupported`` (a fan on a passively cooled board, ECC off, no NVLink) means
"this series does not exist here", never 0, because a 0 would read as "healthy" on a dashboard and
make ``increase()`` rules silently pass. A function the installed driver lacks is logged once, not
every second. ``GPU_IS_LOST`` is the one error that must surface, so the collector can report
``mlops_gpu_lost`` for that device and carry on with the others. The library is initialised lazily
(importing the collector never touches the driver) and device handles are created once, because
handle look-ups are among the slow calls on some systems (NVIDIA/k8s-device-plugin#774).

Calls can be timed (count, sum, max per function; wall and CPU of each with ``keep_samples``):
``scripts/gpu_check.py`` reports those figures from a real GPU, which is how we know which calls to
keep off the scrape path and which to make less often.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlops_obs.collectors import CollectorUnavailable

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_perf_counter = time.perf_counter
_thread_time = time.thread_time

# NVML return codes (nvml.h); duplicated so this module never needs pynvml just to compare codes.
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_NOT_FOUND = 6
ERROR_TIMEOUT = 10
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15

# Codes that mean "no such value on this device": no series, logged at debug level only.
_ABSENT = frozenset({ERROR_NOT_SUPPORTED, ERROR_INVALID_ARGUMENT, ERROR_NOT_FOUND})

# How long to wait before trying nvmlInit again after it failed (a driver may be loaded later).
INIT_RETRY_SECONDS = 30.0

# How long a call that answered "not supported" is not made again with the same arguments. On a real
# H200 a NotSupported fan-speed query cost 1 ms a round, more than most calls that return a value;
# support does not change while the driver is loaded, but a retry now and then costs nothing.
ABSENT_RETRY_SECONDS = 300.0
# At most this many remembered calls (MIG handles are fetched anew each round: never an unbounded set).
ABSENT_MAX = 4096


class GpuLost(RuntimeError):
    """NVML says the device fell off the bus (``NVML_ERROR_GPU_IS_LOST``)."""


@dataclass
class CallStats:
    count: int = 0
    total: float = 0.0
    max: float = 0.0
    samples: list[float] = field(default_factory=list)  # wall seconds of each call (with keep_samples)
    cpu_samples: list[float] = field(default_factory=list)  # this thread's CPU seconds of each call


def _text(v: Any) -> str:
    """Older bindings return ``bytes`` for names and UUIDs, newer ones ``str``."""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _absent_key(name: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What identifies a call for the NotSupported memory: numbers as they are, a device handle by
    identity (ctypes pointers do not hash; the collector keeps one handle object per device), and
    ``None`` (not remembered) for a call with a list (field ids), whose errors are per field anyway."""
    key: list[Any] = [name]
    for a in args:
        if isinstance(a, (int, float, str)):
            key.append(a)
        elif isinstance(a, (list, tuple, dict)):
            return None
        else:
            key.append(id(a))
    return tuple(key)


class Nvml:
    """Lazily initialised NVML with per-function error policy and, on request, call timing.

    Timing is off in the exporter (nothing exports it, and two clock reads and a stats update a
    call would cost a tenth of the GPU collector's round); ``scripts/gpu_check.py`` turns it on.

    ``loader`` returns a ``pynvml``-compatible object (the real module, or
    :class:`mlops_obs.collectors.fake_nvml.FakeNvml`); it is called on first use, not here.
    """

    def __init__(
        self,
        loader: Callable[[], Any],
        log: FilteringBoundLogger | None = None,
        keep_samples: bool = False,
        timing: bool = False,
    ) -> None:
        self._loader = loader
        self._log = log
        self._lib: Any = None
        self._lock = threading.Lock()
        self._init_error: str | None = None
        self._init_failed_at = 0.0
        self._fns: dict[str, Any] = {}
        self._logged: set[tuple[str, int]] = set()
        self._handles: list[Any] | None = None
        # Calls (name and arguments) that answered NotSupported / InvalidArgument, and when to retry.
        # The arguments are kept with the retry time so that a handle keyed by id() stays alive (its
        # id cannot be reused by another object) for as long as its entry exists.
        self._absent: dict[tuple[Any, ...], tuple[float, tuple[Any, ...]]] = {}
        self._absent_names: set[str] = set()
        self.timing = timing or keep_samples
        self._keep_samples = keep_samples
        self.stats: dict[str, CallStats] = {}

    @property
    def keep_samples(self) -> bool:
        """Keep every call's latency (for percentiles), not only count, total and max; implies timing."""
        return self._keep_samples

    @keep_samples.setter
    def keep_samples(self, on: bool) -> None:
        self._keep_samples = on
        self.timing = self.timing or on

    # --- initialisation ---------------------------------------------------------------------------

    @property
    def lib(self) -> Any:
        """The initialised binding; raises :class:`CollectorUnavailable` where NVML cannot start."""
        if self._lib is not None:
            return self._lib
        with self._lock:
            if self._lib is not None:
                return self._lib
            now = time.monotonic()
            if self._init_error is not None and now - self._init_failed_at < INIT_RETRY_SECONDS:
                raise CollectorUnavailable(self._init_error)
            try:
                lib = self._loader()
                lib.nvmlInit()
            except CollectorUnavailable:
                raise
            except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
                self._init_error = f"NVML is not available: {e}"
                self._init_failed_at = now
                raise CollectorUnavailable(self._init_error) from None
            self._init_error = None
            self._lib = lib
            return lib

    def shutdown(self) -> None:
        with self._lock:
            if self._lib is not None:
                try:
                    self._lib.nvmlShutdown()
                except Exception:
                    pass
            self._lib = None
            self._fns.clear()
            self._handles = None
            self._absent.clear()
            self._absent_names.clear()

    # --- calls -------------------------------------------------------------------------------------

    def _fn(self, name: str) -> Any:
        fn = self._fns.get(name)
        if fn is None:
            fn = getattr(self.lib, name, None)
            if fn is None:
                self._once(name, ERROR_FUNCTION_NOT_FOUND, "NVML function missing from the binding; no series from it")
                return None
            self._fns[name] = fn
        return fn

    def _once(self, fn: str, code: int, msg: str, level: str = "warning") -> None:
        key = (fn, code)
        if key in self._logged:
            return
        self._logged.add(key)
        if self._log is not None:
            getattr(self._log, level)(msg, function=fn, nvml_error=code)

    def call(self, name: str, *args: Any, not_found: Any = None) -> Any:
        """Call ``name``; ``None`` where the value does not exist here (``not_found`` for NOT_FOUND).

        Raises :class:`GpuLost` for a device that fell off the bus; never raises another NVML error.
        """
        # The success path of try_call, inlined: the GPU collector makes ~150 calls a round, and
        # the wrapper cost as much as a (fake) NVML call itself.
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fn(name)
            if fn is None:
                return None
        if name in self._absent_names and self._known_absent(name, args):
            return None
        if not self.timing:
            try:
                return fn(*args)
            except Exception as e:
                code = self._failed(name, e, args)
                return not_found if code == ERROR_NOT_FOUND else None
        c0, t0 = _thread_time(), _perf_counter()
        try:
            value = fn(*args)
        except Exception as e:
            self._timed(name, _perf_counter() - t0, _thread_time() - c0)
            code = self._failed(name, e, args)
            return not_found if code == ERROR_NOT_FOUND else None
        self._timed(name, _perf_counter() - t0, _thread_time() - c0)
        return value

    def _known_absent(self, name: str, args: tuple[Any, ...]) -> bool:
        """True while ``name(*args)`` is remembered as not supported (see ``ABSENT_RETRY_SECONDS``)."""
        key = _absent_key(name, args)
        entry = self._absent.get(key) if key is not None else None
        if key is None or entry is None:
            return False
        if time.monotonic() < entry[0]:
            return True
        del self._absent[key]
        return False

    def try_call(self, name: str, *args: Any) -> tuple[bool, Any]:
        """``(True, result)``, or ``(False, NVML error code)``: for calls whose success returns ``None``."""
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fn(name)
            if fn is None:
                return False, ERROR_FUNCTION_NOT_FOUND
        c0, t0 = _thread_time(), _perf_counter()
        try:
            value = fn(*args)
        except Exception as e:
            if self.timing:
                self._timed(name, _perf_counter() - t0, _thread_time() - c0)
            return False, self._failed(name, e, args)
        if self.timing:
            self._timed(name, _perf_counter() - t0, _thread_time() - c0)
        return True, value

    def _timed(self, name: str, dt: float, cpu: float) -> None:
        st = self.stats.get(name)
        if st is None:
            st = self.stats[name] = CallStats()
        st.count += 1
        st.total += dt
        if dt > st.max:
            st.max = dt
        if self.keep_samples:
            st.samples.append(dt)
            st.cpu_samples.append(cpu)

    def _failed(self, name: str, e: Exception, args: tuple[Any, ...] = ()) -> int:
        """The NVML error code of ``e``, logged per policy; raises GpuLost, and re-raises non-NVML errors."""
        code = getattr(e, "value", None)
        if not isinstance(code, int):
            raise e
        if code == ERROR_GPU_IS_LOST:
            raise GpuLost(name) from None
        if code == ERROR_NOT_FOUND:
            pass
        elif code in _ABSENT:
            self._once(name, code, "NVML value not supported on this device; no series", level="debug")
            key = _absent_key(name, args)
            if key is not None:
                if len(self._absent) >= ABSENT_MAX:
                    self._absent.clear()
                self._absent[key] = (time.monotonic() + ABSENT_RETRY_SECONDS, args)
                self._absent_names.add(name)
        elif code == ERROR_FUNCTION_NOT_FOUND:
            self._once(name, code, "NVML function not in the installed driver; its series are skipped")
        else:
            self._once(name, code, f"NVML call failed: {e}; its series are skipped")
        return code

    def text(self, name: str, *args: Any) -> str | None:
        v = self.call(name, *args)
        return None if v is None else _text(v)

    def handles(self) -> list[Any]:
        """Device handles, created once: handle look-ups can be slow and never change while we run."""
        if self._handles is None:
            count = self.call("nvmlDeviceGetCount")
            if count is None:
                raise CollectorUnavailable("NVML cannot count devices")
            hs = []
            for i in range(int(count)):
                try:
                    hs.append(self.call("nvmlDeviceGetHandleByIndex", i))
                except GpuLost:
                    hs.append(None)
            self._handles = hs
        return self._handles
