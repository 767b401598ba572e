"""Detectors over the ranks' log facts: their own failures, exit records, the ranks that went silent
while their peers timed out, a job that hangs, and the peers' symptoms."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from mlops_obs.rca.detectors.registry import Context, detector
from mlops_obs.rca.facts import Noted, RankFacts
from mlops_obs.rca.model import Finding, event_evidence
from mlops_obs.rca.patterns import event_text
from mlops_obs.rca.times import epoch, human_duration, stamp

SILENCE_FLOOR_SECONDS = 60.0
"""A job whose every rank has been silent this long (and at least :data:`SILENCE_STEPS` step intervals)
without finishing is hung."""
SILENCE_STEPS = 20
SIGKILL_CODES = frozenset((137, -9))
STOP_CODES = frozenset((143, -15, 130, -2))
KNOWN_OWN = ("rank failed", "non-finite loss, stopping")  # our workload's own failure records


def _at(step: int | None) -> str:
    return f" at step {step}" if step is not None else ""


def _ranks(xs: Iterable[int]) -> str:
    xs = sorted(xs)
    return ("rank " if len(xs) == 1 else "ranks ") + ", ".join(map(str, xs))


def first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return ""


_WRAPPED = re.compile(r"(?:\w+Error: )?Got the following error when running the callback: ")


def failure_text(ev: Mapping[str, Any]) -> str:
    """The line that says what went wrong: an ``error`` field or exception over a generic message,
    without the wrappers torch adds around a collective's error (one per callback layer)."""
    fields = ev.get("fields")
    text = None
    if isinstance(fields, Mapping):
        err = fields.get("error")
        if isinstance(err, str) and err.strip():
            text = first_line(err)
        exc = fields.get("exception")
        if text is None and isinstance(exc, list) and exc and isinstance(exc[0], Mapping):
            text = first_line(f"{exc[0].get('exc_type', '')}: {exc[0].get('exc_value', '')}")
    if text is None:
        text = first_line(event_text(ev))
        if isinstance(fields, Mapping) and not fields.get("raw"):
            extra = [f"{k}={fields[k]}" for k in ("step", "loss") if k in fields]
            text += f" ({', '.join(extra)})" if extra else ""
    m = list(_WRAPPED.finditer(text))
    return text[m[-1].end() :] if m else text


def fault_step(r: RankFacts, noted: Noted | None = None) -> int | None:
    """The step a rank was in when it failed: the failure record's own step, else the step after its
    last logged one when it logs every step; None when that cannot be known."""
    if noted is not None and noted.step is not None:
        return noted.step
    if r.last_step is not None and r.step_gap == 1:
        return r.last_step + 1
    return None


def fault_time(r: RankFacts, noted: Noted) -> str:
    """The event's time when it can be trusted, else when the rank went silent."""
    return noted.time if noted.trusted or not r.last else r.last


def _summary(kind: str, r: int, step: int | None, noted: Noted) -> str:
    d = noted.signal.detail
    text = failure_text(noted.event)
    if kind == "nan_loss":
        return f"rank {r} got a non-finite loss{_at(step)} and stopped"
    if kind == "oom":
        tried = f" (tried to allocate {d['tried']})" if "tried" in d else ""
        return f"rank {r} ran out of CUDA memory{_at(step)}{tried}"
    if kind == "disk_full":
        return f"rank {r} failed{_at(step)}: no space left on device"
    if kind == "gpu_xid":
        return f"rank {r} failed{_at(step)} on a GPU error (XID {d.get('xid', '?')})"
    if kind == "gpu_ecc":
        return f"rank {r} failed{_at(step)} on an uncorrectable GPU memory (ECC) error"
    if kind == "oom_killed":
        return f"rank {r} was killed by the kernel's OOM killer{_at(step)}"
    return f"rank {r} crashed{_at(step)}: {text}"


@detector("rank_failures")
def rank_failures(ctx: Context) -> Iterable[Finding]:
    """Each rank's own first failure (a NaN loss, a CUDA OOM, an exception of its own...)."""
    for r in ctx.facts.ranks.values():
        cause = r.first_signal("cause")
        symptom = r.first_signal("symptom", "stop")
        if cause is not None and symptom is not None and cause.signal.detail.get("generic") and not cause.trusted:
            cause = None  # a bare "RuntimeError:" line of a traceback whose message names a peer's failure
        if cause is None:
            err = r.first_signal("error")
            if err is None or symptom is not None or r.finished or _progress_after(r, err):
                continue
            step = fault_step(r, err)
            yield Finding(
                "unknown",
                "fault",
                r.rank,
                f"rank {r.rank} logged an error{_at(step)} and never went on: {failure_text(err.event)}",
                fault_time(r, err),
                "low",
                r.node,
                step,
                [event_evidence(err.event, failure_text(err.event))],
            )
            continue
        kind = cause.signal.kind
        step = fault_step(r, cause)
        own = cause.trusted and cause.event.get("message") in KNOWN_OWN
        evidence = [event_evidence(cause.event, failure_text(cause.event))]
        for n in r.of_kind(kind):
            if n.id != cause.id and len(evidence) < 4:
                evidence.append(event_evidence(n.event, failure_text(n.event)))
        yield Finding(
            kind,
            "fault",
            r.rank,
            _summary(kind, r.rank, step, cause),
            fault_time(r, cause),
            "high" if own or (cause.trusted and kind != "crash") else "medium",
            r.node,
            step,
            evidence,
        )


def _progress_after(r: RankFacts, n: Noted) -> bool:
    return r.last_step_time is not None and n.trusted and r.last_step_time > n.time


def exit_of(ev: Mapping[str, Any], noted: Noted | None) -> tuple[int | None, int | None, str | None]:
    """(rank, exit code, signal name) of an exit record: a launcher event's fields, or what the text says."""
    fields = ev.get("fields")
    fields = fields if isinstance(fields, Mapping) else {}
    rank = ev.get("rank") if type(ev.get("rank")) is int else fields.get("rank")
    code = next(
        (fields[k] for k in ("exit_code", "exitcode", "returncode", "code") if type(fields.get(k)) is int), None
    )
    sig = fields.get("signal")
    if noted is not None and noted.signal.role == "exit":
        d = noted.signal.detail
        rank = d.get("rank", rank)
        code = d.get("exit_code", code)
    signame = None
    if isinstance(sig, str) and sig:
        signame = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
    elif type(sig) is int:
        signame = {9: "SIGKILL", 15: "SIGTERM", 2: "SIGINT", 6: "SIGABRT", 11: "SIGSEGV"}.get(sig, f"signal {sig}")
    if signame is None and type(code) is int:
        signame = {
            137: "SIGKILL",
            -9: "SIGKILL",
            143: "SIGTERM",
            -15: "SIGTERM",
            130: "SIGINT",
            -2: "SIGINT",
            139: "SIGSEGV",
            -11: "SIGSEGV",
            134: "SIGABRT",
            -6: "SIGABRT",
        }.get(code)
    return (rank if type(rank) is int else None), (code if type(code) is int else None), signame


@detector("exits")
def exits(ctx: Context) -> Iterable[Finding]:
    """Exit records (the launcher's, torchrun's) of ranks whose logs do not say how they ended."""
    f = ctx.facts
    records: list[Noted] = [n for n in f.launcher if n.signal.role == "exit" or _has_exit_fields(n.event)]
    records += [n for n in f.unranked if n.signal.role == "exit"]
    records += [n for r in f.ranks.values() for n in r.signals if n.signal.role == "exit"]
    seen: set[int] = set()
    for n in sorted(records, key=lambda x: x.time):
        rank, code, sig = exit_of(n.event, n)
        if rank is None or rank in seen or code == 0 or (code is None and sig is None):
            continue
        seen.add(rank)
        r = f.ranks.get(rank)
        if r is not None and (r.first_signal("cause", "symptom", "stop") is not None):
            continue  # its own lines say how it ended; the record adds nothing but the code
        how = f"exit code {code}" if code is not None else ""
        how = f"{how} ({sig})" if sig and how else (sig or how)
        time = n.time if n.trusted or r is None or not r.last else r.last
        ev = [event_evidence(n.event)]
        step = fault_step(r) if r is not None else None
        node = r.node if r is not None else None
        if code in STOP_CODES or sig in ("SIGTERM", "SIGINT"):
            yield Finding(
                "terminated", "symptom", rank, f"rank {rank} was stopped ({how})", time, "medium", node, step, ev
            )
        elif code in SIGKILL_CODES or sig == "SIGKILL":
            yield Finding(
                "crash",
                "fault",
                rank,
                f"rank {rank} was killed{_at(step)} ({how}) without a word in its logs",
                time,
                "low",
                node,
                step,
                ev,
                tags=frozenset(("sigkill",)),
            )
        else:
            conf = "medium" if n.signal.detail.get("first_observed") else "low"
            yield Finding(
                "crash", "fault", rank, f"rank {rank} exited{_at(step)} with {how}", time, conf, node, step, ev
            )


def _has_exit_fields(ev: Mapping[str, Any]) -> bool:
    fields = ev.get("fields")
    return isinstance(fields, Mapping) and any(k in fields for k in ("exit_code", "exitcode", "returncode", "signal"))


@detector("silent_ranks")
def silent_ranks(ctx: Context) -> Iterable[Finding]:
    """The ranks missing from a collective: when peers time out (or lose their connection) and a rank
    says nothing, that rank hung (or died without a trace). What the NCCL watchdog's missing-rank set
    and the flight recorder's analyser do, from the logs."""
    f = ctx.facts
    if any(r.first_signal("cause") for r in f.ranks.values()):
        return
    reports = {r.rank: n for r in f.ranks.values() if (n := _peer_report(r)) is not None}
    if not reports:
        return
    reported = min(n.time for n in reports.values())
    quiet = [x for x in f.expected_ranks if x not in reports and not _stopped(f.ranks.get(x), reported)]
    if not quiet:
        return
    timeouts = [n for n in reports.values() if n.signal.kind == "collective_timeout"]
    evidence = [event_evidence(n.event, failure_text(n.event)) for _, n in sorted(reports.items())][:6]
    if timeouts:
        starts = [
            epoch(n.time) - n.signal.detail["timeout_ms"] / 1000.0
            for n in timeouts
            if n.trusted and type(n.signal.detail.get("timeout_ms")) is int
        ]
        waited = (
            " after " + human_duration(timeouts[0].signal.detail["timeout_ms"] / 1000.0)
            if (type(timeouts[0].signal.detail.get("timeout_ms")) is int)
            else ""
        )
        kind, why = "stall", f"while {_ranks(reports)} timed out{waited} waiting for it in a collective"
    else:
        starts = []
        kind, why = "crash", f"without a trace while {_ranks(reports)} lost the connection to it"
    for x in quiet:
        r = f.ranks.get(x)
        last = r.last_step if r else None
        step = fault_step(r) if r else None
        time = stamp(min(starts)) if starts else (r.last if r and r.last else min(n.time for n in reports.values()))
        if r and r.last and starts and r.last > time:
            time = r.last
        where = f"at step {step}" if step is not None else (f"after step {last}" if last is not None else "")
        verb = "hung" if kind == "stall" else "died"
        if len(quiet) == 1:
            summary = f"rank {x} {verb} {where} {why}".replace("  ", " ")
            node = r.node if r else None
            silent = frozenset(("silent",))
            yield Finding(
                kind, "fault", x, summary, time, "medium", node, step, [*evidence, *_last_words(r)], tags=silent
            )
        else:
            summary = (
                f"one of {_ranks(quiet)} {verb} {why}; the logs cannot tell which (they went silent at the same moment)"
            )
            evidence += _last_words(r)
            yield Finding(kind, "fault", None, summary, time, "low", None, step, evidence, tags=frozenset(("silent",)))
            return


def _peer_report(r: RankFacts) -> Noted | None:
    for n in r.signals:
        if n.signal.role == "symptom" and n.signal.kind in ("collective_timeout", "peer_lost"):
            return n
    return None


def _stopped(r: RankFacts | None, reported: str | None = None) -> bool:
    """Whether the rank ended in a way of its own: it finished, failed, or was stopped before its peers
    reported it missing. Stopped after (the launcher stopping what is left of a failed job) it is
    still the rank they waited for."""
    if r is None:
        return False
    if r.finished is not None:
        return True
    n = r.first_signal("stop", "error")
    if n is None:
        return False
    return not (reported is not None and n.signal.role == "stop" and n.trusted and n.time >= reported)


def _last_words(r: RankFacts | None) -> list[Any]:
    if r is None or r.last_event is None:
        return []
    return [
        event_evidence(
            r.last_event,
            f"last line of rank {r.rank}: {r.last_event.get('message')}"
            + (f" (step {r.last_step})" if r.last_step is not None else ""),
        )
    ]


@detector("hang")
def hang(ctx: Context) -> Iterable[Finding]:
    """Every unfinished rank silent far longer than its step interval, with no error anywhere."""
    f = ctx.facts
    ranks = [r for r in f.ranks.values() if r.last]
    if not ranks or any(r.first_signal("cause", "symptom", "stop", "error") for r in ranks):
        return
    live = [r for r in ranks if r.finished is None]
    if not live:
        return
    interval = f.median_step_interval()
    need = max(SILENCE_FLOOR_SECONDS, SILENCE_STEPS * interval if interval else 0.0)
    silences = {r.rank: ctx.silent_for(r) or 0.0 for r in live}
    if min(silences.values()) < need:
        return
    last_steps = {r.rank: r.last_step for r in live}
    known = [s for s in last_steps.values() if s is not None]
    behind = [x for x, s in last_steps.items() if known and s is not None and s < max(known)]
    evidence = [e for r in sorted(live, key=lambda r: r.rank)[:8] for e in _last_words(r)]
    silent = human_duration(min(silences.values()))
    if len(behind) == 1 and len(live) > 1:
        x = behind[0]
        r = f.ranks[x]
        step = fault_step(r)
        yield Finding(
            "stall",
            "fault",
            x,
            f"rank {x} stopped{_at(step)}, behind its peers; no rank has logged for {silent}",
            r.last,
            "medium",
            r.node,
            step,
            evidence,
        )
        return
    steps = sorted(set(known))
    where = f" after step {steps[-1]}" if steps else ""
    first_quiet = min(str(r.last) for r in live)
    yield Finding(
        "stall",
        "fault",
        None,
        f"every rank stopped{where} at the same moment and none has logged for "
        f"{silent}, with no error; the hung rank cannot be told from the logs (stack dumps or the phase "
        "series would say)",
        first_quiet,
        "low",
        None,
        None,
        evidence,
    )


@detector("symptoms")
def symptoms(ctx: Context) -> Iterable[Finding]:
    """Each rank's first sign of a peer's failure: a collective timeout, a lost connection, a stop."""
    for r in ctx.facts.ranks.values():
        n = r.first_signal("symptom", "stop")
        if n is None:
            continue
        kind = n.signal.kind
        what = {
            "collective_timeout": "timed out in a collective",
            "peer_lost": "lost the connection to a peer",
            "terminated": "was stopped",
        }.get(kind, kind)
        yield Finding(
            kind,
            "symptom",
            r.rank,
            f"rank {r.rank} {what}",
            fault_time(r, n),
            "medium",
            r.node,
            fault_step(r, n),
            [event_evidence(n.event, failure_text(n.event))],
        )


@detector("node_lines")
def node_lines(ctx: Context) -> Iterable[Finding]:
    """Failures told by lines of no rank (a node's kernel log: an XID, an ECC error, the OOM killer)."""
    seen: set[tuple[str, str | None]] = set()
    what = {
        "gpu_xid": "a GPU error (XID {xid})",
        "gpu_ecc": "an uncorrectable GPU memory (ECC) error",
        "oom_killed": "the kernel's OOM killer killing process {pid}",
        "disk_full": "a full disk",
    }
    for n in ctx.facts.unranked:
        kind = n.signal.kind
        if n.signal.role != "cause" or kind not in what:
            continue
        node = n.event.get("node") if isinstance(n.event.get("node"), str) else None
        if (kind, node) in seen:
            continue
        seen.add((kind, node))
        text = what[kind].format(xid=n.signal.detail.get("xid", "?"), pid=n.signal.detail.get("pid", "?"))
        yield Finding(
            kind,
            "fault",
            None,
            f"{node or 'a node'} logged {text}",
            n.time,
            "high" if n.trusted else "medium",
            node,
            None,
            [event_evidence(n.event, failure_text(n.event))],
        )
