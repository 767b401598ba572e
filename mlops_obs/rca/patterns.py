"""What one event says about a failure: pure matchers over real failure text, no I/O, no state.

The texts are those PyTorch 2.x, gloo, NCCL, torchrun, CUDA, the kernel and our own workload print
(FIELD-NOTES section 8), so the analysis reads a real job's evidence, not only ours. Each match gives a
:class:`Signal`: a *kind* and a *role*:

``cause``     the rank itself failed this way (a NaN loss, a CUDA OOM, an exception of its own).
``symptom``   the rank failed because a peer did: a collective timed out, a peer's connection closed.
``stop``      the rank was stopped from outside (SIGTERM from the launcher, Ctrl-C).
``exit``      an exit record: which rank exited, with what code or signal (launcher, torchrun).
``error``     an error line that names no failure of its own; a cause only if the rank never went on.

Matchers are tried in :data:`RULES` order and the first wins: symptoms before causes, since a
peer's crash reaches a healthy rank as an exception of its own (``RuntimeError: ... Connection closed
by peer``). Adding a failure text is adding one :class:`Rule` at the right place in that list, and a
case to ``tests/test_rca_patterns.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SCAN_CHARS = 16384
"""Text scanned per event: the start of a message holds its error; a 10 MB line costs no more."""


@dataclass(frozen=True)
class Signal:
    kind: str
    role: str  # cause | symptom | stop | exit | error
    detail: Mapping[str, Any] = field(default_factory=dict)


Extract = Callable[[re.Match[str], str], dict[str, Any]]


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    kind: str
    role: str
    extract: Extract | None = None


def _nccl_timeout(m: re.Match[str], text: str) -> dict[str, Any]:
    d: dict[str, Any] = {"seq": int(m.group(1)), "op": m.group(2), "timeout_ms": int(m.group(3))}
    last = re.search(r"last completed NCCL work: (\d+)", text)
    if last:
        d["last_completed"] = int(last.group(1))
    return d


def _gloo_timeout(m: re.Match[str], text: str) -> dict[str, Any]:
    return {"timeout_ms": int(m.group(1)), "op": m.group(2)}


def _oom(m: re.Match[str], text: str) -> dict[str, Any]:
    d: dict[str, Any] = {}
    alloc = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    if alloc:
        d["tried"] = alloc.group(1)
    gpu = re.search(r"GPU (\d+) has a total capacity of ([\d.]+ [KMGT]?i?B)", text)
    if gpu:
        d["gpu"], d["capacity"] = int(gpu.group(1)), gpu.group(2)
    return d


def _xid(m: re.Match[str], text: str) -> dict[str, Any]:
    return {"pci": m.group(1), "xid": int(m.group(2))}


def _killed(m: re.Match[str], text: str) -> dict[str, Any]:
    return {"pid": int(m.group(1))}


def _torchrun_root(m: re.Match[str], text: str) -> dict[str, Any]:
    """torchrun's ``Root Cause (first observed failure):`` block (joined into one event, or its lines)."""
    d: dict[str, Any] = {"first_observed": True}
    for key, rx in (
        ("rank", r"rank\s*:\s*(\d+)"),
        ("exit_code", r"exitcode\s*:\s*(-?\d+)"),
        ("pid", r"\(pid: (\d+)\)"),
        ("host", r"host\s*:\s*(\S+)"),
        ("at", r"time\s*:\s*(\S+)"),
    ):
        x = re.search(rx, text[m.start() :])
        if x:
            d[key] = int(x.group(1)) if key in ("rank", "exit_code", "pid") else x.group(1)
    return d


def _torchrun_agent(m: re.Match[str], text: str) -> dict[str, Any]:
    return {"exit_code": int(m.group(1)), "local_rank": int(m.group(2)), "pid": int(m.group(3))}


def _launcher_exit(m: re.Match[str], text: str) -> dict[str, Any]:
    return {"rank": int(m.group(1)), "exit_code": int(m.group(2))}


def _generic(m: re.Match[str], text: str) -> dict[str, Any]:
    return {"exception": m.group(0).rstrip(":"), "generic": True}


def _c(rx: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(rx, flags)


RULES: tuple[Rule, ...] = (
    # --- symptoms: a peer failed or hung ---------------------------------------------------------
    Rule(
        _c(
            r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(\d+), OpType=(\w+).*?"
            r"Timeout\(ms\)=(\d+)\)",
            re.S,
        ),
        "collective_timeout",
        "symptom",
        _nccl_timeout,
    ),
    Rule(_c(r"Timed out waiting (\d+)ms for (recv|send) operation"), "collective_timeout", "symptom", _gloo_timeout),
    Rule(
        _c(
            r"(?i)\b(?:DistBackendError|DistStoreError)\b.*\btime(?:d)?[ _-]?out|"
            r"\b(?:allreduce|all_reduce|allgather|all_gather|reduce_scatter|barrier|broadcast)\b[^\n]{0,80}"
            r"\btimed? ?out\b|\bSocket Timeout\b"
        ),
        "collective_timeout",
        "symptom",
    ),
    Rule(
        _c(
            r"Connection closed by peer|Connection reset by peer|typically caused by a remote worker crashing|"
            r"ncclRemoteError|remote process exited|NCCL communicator was aborted|Broken pipe.*gloo|gloo.*Broken pipe"
        ),
        "peer_lost",
        "symptom",
    ),
    # --- stopped from outside --------------------------------------------------------------------------
    Rule(_c(r"Sending process (\d+) closing signal SIG(?:TERM|INT)"), "terminated", "stop", _killed),
    Rule(
        _c(r"\bKeyboardInterrupt\b|got signal: (?:15|2)\b|Signals\.SIG(?:TERM|INT)\b|^rank stopped by signal\b"),
        "terminated",
        "stop",
    ),
    # --- exit records ------------------------------------------------------------------------------------
    Rule(_c(r"Root Cause \(first observed failure\):"), "exit", "exit", _torchrun_root),
    Rule(
        _c(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\) of binary"), "exit", "exit", _torchrun_agent
    ),
    Rule(_c(r"\brank (\d+) exited with code (-?\d+)"), "exit", "exit", _launcher_exit),
    # --- causes ------------------------------------------------------------------------------------------
    Rule(
        _c(r"(?i)non-finite loss|NonFiniteLossError|\bloss (?:is|became|=) ?(?:nan|inf)\b|\bnan loss\b"),
        "nan_loss",
        "cause",
    ),
    Rule(
        _c(
            r"CUDA out of memory|torch\.(?:cuda\.)?OutOfMemoryError|CUDA error: out of memory|"
            r"CUBLAS_STATUS_ALLOC_FAILED"
        ),
        "oom",
        "cause",
        _oom,
    ),
    Rule(
        _c(r"Out of memory: Killed process (\d+)|Memory cgroup out of memory: Killed process (\d+)"),
        "oom_killed",
        "cause",
        _killed,
    ),
    Rule(_c(r"No space left on device|\bENOSPC\b|\[Errno 28\]|Disk quota exceeded"), "disk_full", "cause"),
    Rule(_c(r"NVRM: Xid \(([^)]*)\): (\d+)"), "gpu_xid", "cause", _xid),
    Rule(_c(r"(?i)GPU has fallen off the bus|\bXid\b.{0,40}\b79\b"), "gpu_xid", "cause"),
    Rule(_c(r"(?i)uncorrectable ECC error|ECC error|cudaErrorECCUncorrectable|double bit ECC"), "gpu_ecc", "cause"),
    Rule(_c(r"Segmentation fault|\bSIGSEGV\b|Fatal Python error|core dumped|\bSIGABRT\b|\bSIGBUS\b"), "crash", "cause"),
    Rule(_c(r"\b(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)\b(?::|$)", re.M), "crash", "cause", _generic),
)

# Lines worth running the rules on when their level says nothing (raw text shipped as ``info``).
_INTERESTING = _c(
    r"Error|Exception|error:|Timed out|Watchdog|Connection (?:closed|reset)|Killed process|No space|Xid|ECC|"
    r"Segmentation|Fatal|SIG[A-Z]{3,4}|exited with code|exitcode|non-finite|out of memory|KeyboardInterrupt"
)
_RANK_PREFIX = _c(r"^\[(?:rank|Rank )(\d+)\]:")
_STEP_IN_TEXT = _c(r"\bat step (\d+)\b|\bstep[ =:](\d+)\b")


def event_text(event: Mapping[str, Any]) -> str:
    """The text an event's failure is told in: message, ``error`` field and exception records."""
    parts = [str(event.get("message") or "")]
    fields = event.get("fields")
    if isinstance(fields, Mapping):
        err = fields.get("error")
        if isinstance(err, str) and err:
            parts.append(err)
        exc = fields.get("exception")
        if isinstance(exc, list):
            for x in exc[:4]:
                if isinstance(x, Mapping):
                    parts.append(f"{x.get('exc_type', '')}: {x.get('exc_value', '')}")
        elif isinstance(exc, str):
            parts.append(exc)
    return "\n".join(parts)[:SCAN_CHARS]


def worth_reading(event: Mapping[str, Any]) -> bool:
    """Whether :func:`classify` can say anything: warnings and worse, non-log kinds, and raw lines with
    a failure word (a raw line another shipper stored as ``info``)."""
    level = event.get("level")
    if level in ("warning", "error", "critical") or event.get("kind", "log") != "log":
        return True
    fields = event.get("fields")
    if isinstance(fields, Mapping) and fields.get("raw"):
        return _INTERESTING.search(str(event.get("message") or "")[:SCAN_CHARS]) is not None
    return False


def classify(event: Mapping[str, Any]) -> Signal | None:
    """The :class:`Signal` of one event, or None when it tells nothing about a failure."""
    if not worth_reading(event):
        return None
    text = event_text(event)
    for rule in RULES:
        m = rule.pattern.search(text)
        if m:
            return Signal(rule.kind, rule.role, rule.extract(m, text) if rule.extract else {})
    if event.get("level") in ("error", "critical"):
        return Signal("error", "error")
    return None


def rank_of(event: Mapping[str, Any]) -> int | None:
    """The event's rank, or the one torch's ``[rankN]:`` prefix names when the event has none."""
    r = event.get("rank")
    if type(r) is int:
        return r
    m = _RANK_PREFIX.match(str(event.get("message") or ""))
    return int(m.group(1)) if m else None


def step_of(event: Mapping[str, Any]) -> int | None:
    """``fields.step`` when it is an integer, else a step the text names (``at step 5``)."""
    fields = event.get("fields")
    if isinstance(fields, Mapping):
        s = fields.get("step")
        if type(s) is int:
            return s
    m = _STEP_IN_TEXT.search(str(event.get("message") or "")[:SCAN_CHARS])
    if m:
        return int(m.group(1) or m.group(2))
    return None
