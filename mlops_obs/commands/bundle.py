"""``mlops-obs bundle``: pack one job's incident (events, alerts, series around it, rank snapshots,
versions; redacted; size-capped) into a ``.tar.gz`` that ``rca --bundle`` reads on any machine.

Exit codes: 0 written, 2 a usage error, 4 it could not be written (store unreadable, Prometheus down
when asked for, the cap too small for the job's evidence); one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
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


def _run(cfg: Mapping[str, Any], job: str) -> int:
    from mlops_obs.rca.bundle import BundleError, write_bundle
    from mlops_obs.rca.sources import ChunkStore, SourceError

    directory = store_dir(cfg)
    since, until = cfg.get("since"), cfg.get("until")
    out = Path(cfg["out"])
    none = f"no events of job {job!r}" + (" in that time range" if since or until else "") + f" in {directory}"
    try:
        store = ChunkStore(directory)
    except SourceError as e:
        raise Failed(str(e)) from None
    try:
        span = store.span(job, since, until)
        if span is None:
            raise Failed(none)
        metrics = fetch_metrics(cfg, job, *span)
        # Streamed from the store, one chunk at a time, through the redaction into the archive.
        w = write_bundle(
            out,
            job,
            store.events(job, since, until),
            since=since,
            until=until,
            metrics=metrics,
            multiproc_dir=cfg.get("multiproc-dir"),
            max_bytes=int(cfg["max-bytes"]),
            source=f"store {directory}" + (f", prometheus {cfg['prometheus']}" if metrics else ""),
        )
    except (BundleError, SourceError) as e:
        raise Failed(str(e)) from None
    except OSError as e:
        raise Failed(f"--out {out}: {e.strerror or e}") from None
    finally:
        store.close()
    if w.events == 0:  # the chunks overlapped the range, none of their events fell in it
        out.unlink(missing_ok=True)
        raise Failed(none)
    dropped = f"; dropped the {w.dropped} oldest plain log lines for the size cap" if w.dropped else ""
    print(
        f"wrote {out}: {w.events} events, {w.series} series, {w.snapshots} rank snapshots, "
        f"{w.bytes / 1048576:.2f} MiB{dropped}"
    )
    return 0
