"""``mlops-obs rca``: name a job's root cause (kind, rank, node, step, evidence), set its symptoms
apart, and optionally write the HTML report.

Exit codes: 0 healthy, 1 a fault found, 3 unknown (the evidence supports no kind), 2 a usage error,
4 the analysis could not run (the store or bundle unreadable, Prometheus down when asked for). No
traceback reaches the user: every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from mlops_obs.config import (
    COMMON_SETTINGS,
    ConfigError,
    Setting,
    parse_bool,
    parse_http_url,
    parse_optional_path,
    parse_optional_str,
    positive_duration,
)
from mlops_obs.logs.opensearch import OPENSEARCH_READ_SETTINGS, OPENSEARCH_URL_SETTING

EXIT_HEALTHY, EXIT_FAULT, EXIT_USAGE, EXIT_UNKNOWN, EXIT_FAILED = 0, 1, 2, 3, 4
DEFAULT_STORE = Path("mlops-obs-store")


def parse_time(v: Any) -> str | None:
    from mlops_obs.rca.times import parse_when

    s = parse_optional_str(v)
    return None if s is None else parse_when(s)


# Settings shared with ``mlops-obs bundle``: where the events are, which job, which window, Prometheus.
SOURCE_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "store", parse_optional_path, None, f"Embedded store directory (default ./{DEFAULT_STORE}).", metavar="DIR"
    ),
    Setting("job", parse_optional_str, None, "The job to analyse (required).", metavar="JOB"),
    Setting(
        "since", parse_time, None, "Only events at or after: RFC 3339, or a duration ago (15m, 2h).", metavar="TIME"
    ),
    Setting("until", parse_time, None, "Only events before: RFC 3339, or a duration ago.", metavar="TIME"),
    Setting(
        "prometheus", parse_http_url, None, "Prometheus URL for metric evidence around the incident.", metavar="URL"
    ),
    Setting("prometheus.timeout", positive_duration, 10.0, "Timeout of one Prometheus query.", metavar="DURATION"),
)

RCA_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "bundle",
        parse_optional_path,
        None,
        "Analyse an incident bundle (from `mlops-obs bundle`) instead of a store.",
        metavar="FILE",
    ),
    dataclasses.replace(OPENSEARCH_URL_SETTING, help="Analyse the events in OpenSearch instead of a store."),
    *OPENSEARCH_READ_SETTINGS,
    Setting("json", parse_bool, False, "Print the verdict as one JSON object.", kind="bool"),
    Setting("html", parse_optional_path, None, "Also write the self-contained HTML report here.", metavar="FILE"),
)


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + SOURCE_SETTINGS + RCA_SETTINGS)


class Failed(Exception):
    """The analysis could not run (exit 4); ``str()`` is the line printed."""


def required_job(cfg: Mapping[str, Any]) -> str:
    job = cfg.get("job")
    if not job:
        raise ConfigError("job", "required: the job to analyse (--job J)")
    return str(job)


def store_dir(cfg: Mapping[str, Any]) -> Path:
    return Path(cfg.get("store") or DEFAULT_STORE)


def fetch_metrics(cfg: Mapping[str, Any], job: str, first: str | None, last: str | None) -> Any:
    """Metric evidence from ``--prometheus`` over the job's time range (None when not asked for)."""
    from mlops_obs.rca.metrics import fetch
    from mlops_obs.rca.prometheus import Prometheus, PrometheusError
    from mlops_obs.rca.times import epoch

    url = cfg.get("prometheus")
    if not url:
        return None
    now = time.time()
    t0 = epoch(first) if first else epoch(cfg["since"]) if cfg.get("since") else now - 3600
    t1 = epoch(last) if last else epoch(cfg["until"]) if cfg.get("until") else now
    try:
        return fetch(Prometheus(url, float(cfg.get("prometheus.timeout") or 10.0)), job, t0, min(t1, now))
    except PrometheusError as e:
        raise Failed(str(e)) from None


def guarded(command: str, body: Callable[[], int]) -> int:
    """Run ``body``; a :class:`Failed` (or anything unforeseen) is one line on stderr and exit 4, never
    a traceback. :class:`ConfigError` passes through to the CLI's usage handling (exit 2)."""
    try:
        return body()
    except Failed as e:
        print(f"mlops-obs {command}: error: {e}", file=sys.stderr)
    except ConfigError:
        raise
    except Exception as e:  # the promise: one line, never a traceback
        print(f"mlops-obs {command}: error: {type(e).__name__}: {e}", file=sys.stderr)
    return EXIT_FAILED


def run(cfg: Mapping[str, Any]) -> int:
    job = required_job(cfg)
    if sum(bool(cfg.get(k)) for k in ("bundle", "store", "opensearch")) > 1:
        raise ConfigError("store", "give one of --store, --opensearch or --bundle")
    return guarded("rca", lambda: _run(cfg, job))


def _run(cfg: Mapping[str, Any], job: str) -> int:
    from mlops_obs.rca.bundle import Bundle, BundleError
    from mlops_obs.rca.sources import EventStream, Source, SourceError, SourceFacts, open_store
    from mlops_obs.rca.verdict import analyse

    since, until = cfg.get("since"), cfg.get("until")
    now: str | None = None
    source: Source
    bundle: Bundle | None = None
    try:
        if cfg.get("bundle"):
            bundle = Bundle(cfg["bundle"])
            if bundle.job and bundle.job != job:
                raise Failed(f"{cfg['bundle']}: the bundle holds job {bundle.job!r}, not {job!r}")
            source = EventStream(bundle.events, str(cfg["bundle"]))
            now = bundle.manifest.get("until") or bundle.manifest.get("created")
        elif cfg.get("opensearch"):
            from mlops_obs.logs.backend import Backend, open_source

            source = SourceFacts(open_source(Backend.from_config(cfg)), str(cfg["opensearch"]))
        else:
            source = open_store(store_dir(cfg))
        facts = source.facts(job, since, until)
        if not facts.ranks and not len(facts.alerts) and not len(facts.launcher):
            raise Failed(
                f"no events of job {job!r}"
                + (" in that time range" if since or until else "")
                + f" in {cfg.get('bundle') or cfg.get('opensearch') or store_dir(cfg)}"
            )
        metrics = fetch_metrics(cfg, job, facts.first, facts.last)
        if metrics is None and bundle is not None:
            metrics = bundle.metrics()
        report, facts = analyse(source, job, since=since, until=until, metrics=metrics, now=now, facts=facts)
    except (SourceError, BundleError) as e:
        raise Failed(str(e)) from None
    finally:
        if bundle is not None:
            bundle.close()
    if cfg.get("html"):
        from mlops_obs.rca.report import render_html

        path = Path(cfg["html"])
        try:
            path.write_text(render_html(report, facts, metrics), encoding="utf-8")
        except OSError as e:
            raise Failed(f"--html {path}: {e.strerror or e}") from None
    out = sys.stdout
    if cfg.get("json"):
        out.write(orjson.dumps(report.to_json(), default=str).decode() + "\n")
    else:
        out.write(text_report(report) + "\n")
        if cfg.get("html"):
            out.write(f"report: {cfg['html']}\n")
    return {"healthy": EXIT_HEALTHY, "fault": EXIT_FAULT}.get(report.verdict, EXIT_UNKNOWN)


def text_report(report: Any) -> str:
    """The short readable verdict: what, where, when, why; then evidence, symptoms, other findings."""
    from mlops_obs.rca.model import clip

    root = report.root
    if root is None:
        return f"job {report.job}: {report.verdict.upper()}: {report.summary}"
    where = ", ".join(
        x
        for x in (
            f"rank {root.rank}" if root.rank is not None else "",
            f"node {root.node}" if root.node else "",
            f"step {root.step}" if root.step is not None else "",
            root.time or "",
        )
        if x
    )
    lines = [
        f"job {report.job}: {report.verdict.upper()}: {root.kind} ({where}; confidence {root.confidence})",
        f"  {root.summary}",
        "evidence:",
    ]
    for e in root.evidence[:8]:
        who = f"rank {e.rank}" if e.rank is not None else "-"
        lines.append(f"  {e.time or '-':27s} {e.source:8s} {who:8s} {clip(e.text, 160)}")
    if report.symptoms:
        lines.append("symptoms:")
        for s in report.symptoms[:16]:
            who = f"rank {s.rank}" if s.rank is not None else (s.node or "-")
            text = s.evidence[0].text if s.evidence else s.summary
            lines.append(f"  {s.time or '-':27s} {s.kind:18s} {who:8s} {clip(text, 120)}")
        if len(report.symptoms) > 16:
            lines.append(f"  ... and {len(report.symptoms) - 16} more")
    if report.others:
        lines.append("other findings:")
        for o in report.others:
            who = f"rank {o.rank}" if o.rank is not None else (o.node or "-")
            lines.append(f"  {o.time or '-':27s} {o.kind:18s} {who:8s} {clip(o.summary, 120)}")
    return "\n".join(lines)
