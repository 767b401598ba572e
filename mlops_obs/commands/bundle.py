"""``mlops-obs bundle``: pack one job's incident (events, alerts, series around it, rank snapshots,
versions; redacted; size-capped) into a ``.tar.gz`` that ``rca --bundle`` and ``replay --bundle`` read on
any machine. The events come from the embedded store (``--store``, its chunks read directly) or from
OpenSearch (``--opensearch``, through the logs ``Source``: aggregations for the job's extent, sorted
pages for its events); either way they stream into the archive.

Exit codes: 0 written, 2 a usage error, 4 it could not be written (store or OpenSearch unreadable, Prometheus down
when asked for, the cap too small for the job's evidence); one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlops_obs.commands.rca import SOURCE_SETTINGS, Failed, fetch_metrics, guarded, required_job, store_dir
from mlops_obs.config import COMMON_SETTINGS, ConfigError, Setting, int_parser, parse_optional_path
from mlops_obs.logs.opensearch import OPENSEARCH_READ_SETTINGS, OPENSEARCH_URL_SETTING

BUNDLE_SETTINGS: tuple[Setting, ...] = (
    dataclasses.replace(OPENSEARCH_URL_SETTING, help="Read the job's events from OpenSearch instead of a store."),
    *OPENSEARCH_READ_SETTINGS,
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


def _run(cfg: Mapping[str, Any], job: str) -> int:
    from mlops_obs.rca.bundle import BundleError, write_bundle
    from mlops_obs.rca.sources import ChunkStore, SourceError, SourceFacts

    if cfg.get("store") and cfg.get("opensearch"):
        raise ConfigError("store", "give --store or --opensearch, not both")
    since, until = cfg.get("since"), cfg.get("until")
    out = Path(cfg["out"])
    where = str(cfg.get("opensearch") or store_dir(cfg))
    none = f"no events of job {job!r}" + (" in that time range" if since or until else "") + f" in {where}"
    reader: ChunkStore | SourceFacts
    try:
        if cfg.get("opensearch"):
            from mlops_obs.logs.backend import Backend, open_source

            reader = SourceFacts(open_source(Backend.from_config(cfg)), where)
            origin = f"opensearch {where}"
        else:
            reader = ChunkStore(store_dir(cfg))
            origin = f"store {where}"
    except (SourceError, OSError, ValueError) as e:  # no store there; an unreadable OpenSearch password file
        raise Failed(str(e)) from None
    try:
        span = reader.span(job, since, until)
        if span is None:
            raise Failed(none)
        metrics = fetch_metrics(cfg, job, *span)
        # Streamed from the source (store chunks or OpenSearch pages) through the redaction into the archive.
        events: Iterator[dict[str, Any]] = reader.events(job, since, until)
        w = write_bundle(
            out,
            job,
            events,
            since=since,
            until=until,
            metrics=metrics,
            multiproc_dir=cfg.get("multiproc-dir"),
            max_bytes=int(cfg["max-bytes"]),
            source=origin + (f", prometheus {cfg['prometheus']}" if metrics else ""),
        )
    except (BundleError, SourceError) as e:
        raise Failed(str(e)) from None
    except OSError as e:
        raise Failed(f"--out {out}: {e.strerror or e}") from None
    finally:
        reader.close()
    if w.events == 0:  # the chunks overlapped the range, none of their events fell in it
        out.unlink(missing_ok=True)
        raise Failed(none)
    dropped = f"; dropped the {w.dropped} oldest plain log lines for the size cap" if w.dropped else ""
    print(
        f"wrote {out}: {w.events} events, {w.series} series, {w.snapshots} rank snapshots, "
        f"{w.bytes / 1048576:.2f} MiB{dropped}"
    )
    return 0
