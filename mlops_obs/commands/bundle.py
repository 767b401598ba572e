"""``mlops-obs bundle``: pack one job's incident (events, alerts, series around it, rank snapshots,
versions; redacted; size-capped) into a ``.tar.gz`` that ``rca --bundle`` reads on any machine.

Exit codes: 0 written, 2 a usage error, 4 it could not be written (store unreadable, Prometheus down
when asked for, the cap too small for the job's evidence); one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlops_obs.commands.rca import SOURCE_SETTINGS, Failed, fetch_metrics, guarded, required_job, store_dir
from mlops_obs.config import COMMON_SETTINGS, ConfigError, Setting, int_parser, parse_optional_path

BUNDLE_SETTINGS: tuple[Setting, ...] = (
    Setting("out", parse_optional_path, None, "The bundle to write (FILE.tar.gz; required).", metavar="FILE"),
    Setting(
        "multiproc-dir",
        parse_optional_path,
        None,
        "The sidecar hand-off directory: the job's rank snapshots go into the bundle.",
        metavar="DIR",
    ),
    Setting(
        "max-bytes",
        int_parser(1 << 16),
        256 << 20,
        "Cap on the bundle's uncompressed content; the oldest plain log lines are dropped first.",
        metavar="BYTES",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + SOURCE_SETTINGS + BUNDLE_SETTINGS)


def run(cfg: Mapping[str, Any]) -> int:
    job = required_job(cfg)
    if not cfg.get("out"):
        raise ConfigError("out", "required: where to write the bundle (--out FILE.tar.gz)")
    return guarded("bundle", lambda: _run(cfg, job))


def job_events(directory: Path, job: str, since: str | None, until: str | None) -> list[dict[str, Any]]:
    """The job's events with its nodes' alerts and job-less lines, in time order, through
    :meth:`EventStore.query` (the store's read API today; it returns lists, so this holds them)."""
    from mlops_obs.logs.store import EventStore
    from mlops_obs.rca.sources import KIND_MARGIN_SECONDS, ChunkStore, relevant
    from mlops_obs.rca.times import epoch, stamp

    ChunkStore(directory).close()  # a clear error when there is no store (EventStore would create one)
    with EventStore(directory) as s:
        mine = s.query(job=job, since=since, until=until)
        if not mine:
            return []
        nodes = {e["node"] for e in mine if isinstance(e.get("node"), str)}
        lo = stamp(epoch(mine[0]["@timestamp"]) - KIND_MARGIN_SECONDS)
        hi = stamp(epoch(mine[-1]["@timestamp"]) + KIND_MARGIN_SECONDS)
        lo, hi = max(lo, since or lo), min(hi, until or hi)
        others = [
            e
            for e in s.query(since=lo, until=hi, level=("warning", "error", "critical"))
            if e.get("job") in (None, "") and relevant(e, job, nodes)
        ]
        others += [
            e
            for e in s.query(kind="alert", since=lo, until=hi)
            if e.get("job") in (None, "")
            and e.get("level") not in ("warning", "error", "critical")
            and relevant(e, job, nodes)
        ]
    out = mine + others
    out.sort(key=lambda e: (e["@timestamp"], e["source"], e["offset"]))
    return out


def _run(cfg: Mapping[str, Any], job: str) -> int:
    from mlops_obs.rca.bundle import BundleError, write_bundle
    from mlops_obs.rca.sources import SourceError

    directory = store_dir(cfg)
    since, until = cfg.get("since"), cfg.get("until")
    try:
        events = job_events(directory, job, since, until)
    except SourceError as e:
        raise Failed(str(e)) from None
    if not events:
        raise Failed(
            f"no events of job {job!r}" + (" in that time range" if since or until else "") + f" in {directory}"
        )
    metrics = fetch_metrics(cfg, job, events[0]["@timestamp"], events[-1]["@timestamp"])
    out = Path(cfg["out"])

    def again() -> Iterable[Mapping[str, Any]]:
        return events

    try:
        w = write_bundle(
            out,
            job,
            again,
            since=since,
            until=until,
            metrics=metrics,
            multiproc_dir=cfg.get("multiproc-dir"),
            max_bytes=int(cfg["max-bytes"]),
            source=f"store {directory}" + (f", prometheus {cfg['prometheus']}" if metrics else ""),
        )
    except BundleError as e:
        raise Failed(str(e)) from None
    except OSError as e:
        raise Failed(f"--out {out}: {e.strerror or e}") from None
    dropped = f"; dropped the {w.dropped} oldest plain log lines for the size cap" if w.dropped else ""
    print(
        f"wrote {out}: {w.events} events, {w.series} series, {w.snapshots} rank snapshots, "
        f"{w.bytes / 1048576:.2f} MiB{dropped}"
    )
    return 0
