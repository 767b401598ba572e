"""Reading NVML's result structures from their memory in one copy.

pynvml's ctypes structures run Python hooks on every attribute access, which made reading ~90
NVLink fields a device the GPU collector's top cost; ``struct`` decodes the same bytes in C.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

# nvmlFieldValue_t: fieldId u32, scopeId u32, timestamp i64, latencyUsec i64, valueType u32, nvmlReturn u32,
# value (8-byte union).
_FIELD_VALUE = struct.Struct("<IIqqII8s")
_VALUE_FORMATS = tuple(struct.Struct(f) for f in ("<d", "<I", "<Q", "<Q", "<q", "<i", "<H"))
_VALUE_NAMES = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
# Each value type's code within the 8-byte union, padded to its size: for decoding n values at once.
_VALUE_CODES = ("d", "I4x", "Q", "Q", "q", "i4x", "H6x")
# Formats a FieldDecoder keeps (by array length, and by length and value type) before it starts over.
_FORMATS_MAX = 64


def handle_address(h: Any) -> int:
    """A stable key for a device handle: a ctypes pointer's address, or the fake's object id."""
    if isinstance(h, ctypes._Pointer):
        return ctypes.cast(h, ctypes.c_void_p).value or 0
    return id(h)


def field_values(arr: Any) -> list[tuple[int, int, float | None]]:
    """(field id, scope id, value or ``None`` where NVML returned an error) for an nvmlFieldValue_t array."""
    out: list[tuple[int, int, float | None]] = []
    try:
        raw = memoryview(arr).cast("B")
    except TypeError:
        raw = None
    if raw is not None and len(raw) == _FIELD_VALUE.size * len(arr):
        for fid, scope, _ts, _lat, vtype, ret, value in _FIELD_VALUE.iter_unpack(raw):
            if ret != 0:
                out.append((fid, scope, None))
            else:
                fmt = _VALUE_FORMATS[vtype] if vtype < len(_VALUE_FORMATS) else _VALUE_FORMATS[3]
                out.append((fid, scope, float(fmt.unpack_from(value)[0])))
        return out
    for v in arr:  # not a ctypes buffer (a hand-made stand-in): attribute by attribute
        if int(v.nvmlReturn) != 0:
            out.append((int(v.fieldId), int(v.scopeId), None))
            continue
        t = int(v.valueType)
        name = _VALUE_NAMES[t] if t < len(_VALUE_NAMES) else "ullVal"
        out.append((int(v.fieldId), int(v.scopeId), float(getattr(v.value, name))))
    return out


class FieldDecoder:
    """Reads the values of nvmlFieldValue_t arrays in request order (``None`` where NVML returned an
    error): what :func:`field_values` gives, without the ids.

    Why: the GPU collector's counter refresh asks for ~90 fields a device (NVLink per link, PCIe, throttle)
    that all succeed and share one value type; the whole array is then decoded by two ``struct`` calls
    instead of a Python step per field. The formats for the lengths and types seen are kept (a device
    asks for the same fields every refresh); one decoder per collector, used by its thread alone.
    """

    __slots__ = ("_rows", "_same")

    def __init__(self) -> None:
        self._rows: dict[int, struct.Struct] = {}
        self._same: dict[tuple[int, int], struct.Struct] = {}

    def values(self, arr: Any) -> list[float | None]:
        n = len(arr)
        try:
            raw = memoryview(arr).cast("B")
        except TypeError:
            raw = None
        if raw is None or n == 0 or len(raw) != _FIELD_VALUE.size * n:
            return [x for _, _, x in field_values(arr)]
        row = _cached(self._rows, n, "<" + "IIqqII8s" * n).unpack(raw)
        vtypes = row[4::7]
        vtype = vtypes[0]
        if not any(row[5::7]) and vtype < len(_VALUE_CODES) and vtypes.count(vtype) == n:
            same = _cached(self._same, (n, vtype), "<" + _VALUE_CODES[vtype] * n)
            return list(map(float, same.unpack(b"".join(row[6::7]))))
        return [x for _, _, x in field_values(arr)]


def _cached(cache: dict[Any, struct.Struct], key: Any, fmt: str) -> struct.Struct:
    st = cache.get(key)
    if st is None:
        if len(cache) >= _FORMATS_MAX:
            cache.clear()
        st = cache[key] = struct.Struct(fmt)
    return st


class GpmResults:
    """Reads the (nvmlReturn, value) of the first ``count`` metrics of one nvmlGpmMetricsGet_t request
    in one copy; the layout is worked out once, from the structure's own field offsets."""

    __slots__ = ("_layout", "_length", "_offset")

    def __init__(self, mg: Any, count: int) -> None:
        metric = type(mg.metrics)._type_
        ret_off, val_off, size = metric.nvmlReturn.offset, metric.value.offset, ctypes.sizeof(metric)
        self._layout = struct.Struct(f"<{ret_off}xI{val_off - ret_off - 4}xd{size - val_off - 8}x")
        self._offset = type(mg).metrics.offset
        self._length = size * count

    def read(self, mg: Any) -> list[tuple[int, float]]:
        return list(self._layout.iter_unpack(ctypes.string_at(ctypes.addressof(mg) + self._offset, self._length)))
