"""Stack dumps (``kind="stack"`` events: Python's faulthandler output, or a ``traceback`` listing) as
evidence for a hang: the rank whose main thread sits in its own code while the others wait inside
torch is the one the others wait for."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mlops_obs.rca.detectors.registry import Context, detector
from mlops_obs.rca.model import Finding, event_evidence

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+),? in (?P<func>\S+)')
_THREAD = re.compile(r"^(?P<current>Current thread|Thread) (?P<id>0x[0-9a-fA-F]+|\d+)")
_STDLIB = re.compile(r"/lib/python3\.\d+/(?!site-packages/|dist-packages/)|^<frozen ")
_TORCH = re.compile(r"[/\\]torch[/\\]")


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    func: str

    def short(self) -> str:
        parts = self.file.replace("\\", "/").split("/")
        tail = "/".join(parts[-3:]) if "torch" in parts else parts[-1]
        return f"`{self.func}` at {tail}:{self.line}"


def parse_stack(text: str) -> list[tuple[bool, list[Frame]]]:
    """Threads of a dump as (is the current thread, frames innermost first). faulthandler lists the
    innermost call first; a ``traceback`` listing ("most recent call last") is reversed."""
    threads: list[tuple[bool, list[Frame]]] = []
    frames: list[Frame] | None = None
    current = False
    last_first = "most recent call last" in text
    for line in text.splitlines():
        t = _THREAD.match(line)
        if t:
            if frames is not None:
                threads.append((current, frames))
            frames, current = [], t.group("current") == "Current thread"
            continue
        m = _FRAME.match(line)
        if m:
            if frames is None:
                frames = []
            frames.append(Frame(m.group("file"), int(m.group("line")), m.group("func")))
    if frames is not None:
        threads.append((current, frames))
    if last_first:
        threads = [(c, list(reversed(fs))) for c, fs in threads]
    return [(c, fs) for c, fs in threads if fs]


def main_thread(threads: list[tuple[bool, list[Frame]]]) -> list[Frame] | None:
    """The thread running the program (its outermost frame is a module's, or runpy's for ``python -m``),
    else the current one."""
    for _, fs in threads:
        if fs[-1].func in ("<module>", "_run_module_as_main"):
            return fs
    for cur, fs in threads:
        if cur:
            return fs
    return threads[0][1] if threads else None


def where(frames: list[Frame]) -> tuple[Frame, bool]:
    """The innermost frame outside the standard library, and whether it is inside torch."""
    for f in frames:
        if not _STDLIB.search(f.file):
            return f, bool(_TORCH.search(f.file))
    return frames[0], False


def stack_text(ev: Mapping[str, Any]) -> str:
    fields = ev.get("fields")
    if isinstance(fields, Mapping):
        for k in ("stack", "text", "traceback"):
            v = fields.get(k)
            if isinstance(v, str) and v:
                return v
    return str(ev.get("message") or "")


@detector("stacks")
def stacks(ctx: Context) -> Iterable[Finding]:
    """The one rank not waiting inside torch, from each rank's latest dump."""
    latest: dict[int, Mapping[str, Any]] = {}
    for n in ctx.facts.stacks:
        r = n.event.get("rank")
        if type(r) is int and (r not in latest or n.time >= str(latest[r].get("@timestamp"))):
            latest[r] = n.event
    spots: dict[int, tuple[Frame, bool]] = {}
    for r, ev in latest.items():
        fs = main_thread(parse_stack(stack_text(ev)))
        if fs:
            spots[r] = where(fs)
    outside = sorted(r for r, (_, in_torch) in spots.items() if not in_torch)
    inside = sorted(r for r, (_, in_torch) in spots.items() if in_torch)
    if len(outside) != 1 or not inside:
        return
    x = outside[0]
    frame = spots[x][0]
    waits = sorted({spots[r][0].short() for r in inside})
    rf = ctx.facts.ranks.get(x)
    summary = (
        f"rank {x} is in {frame.short()}; {'rank' if len(inside) == 1 else 'ranks'} "
        f"{', '.join(map(str, inside))} {'waits' if len(inside) == 1 else 'wait'} in {' / '.join(waits[:2])}"
    )
    evidence = [event_evidence(latest[r], f"rank {r}: {spots[r][0].short()}") for r in [x, *inside][:8]]
    step = rf.last_step + 1 if rf and rf.last_step is not None and rf.step_gap == 1 else None
    yield Finding(
        "stall",
        "fault",
        x,
        summary,
        rf.last if rf and rf.last else str(latest[x].get("@timestamp")),
        "high",
        rf.node if rf else None,
        step,
        evidence,
    )
