"""Incident bundles: one ``.tar.gz`` holding what an analysis of a job needs, so the incident can be
read on a laptop after the cluster has moved on (``rca --bundle``, ``replay --bundle``).

Members (format version 1):

``manifest.json``     what is inside and where it came from: format and versions, job, time range,
                      counts and sizes of each member, whether anything was dropped for the size cap.
``events.ndjson``     the job's events in the store schema, one JSON object a line, in time order: its
                      logs, launcher and stack events, and the alerts of the job and of its nodes.
``series.json``       the Prometheus range queries around the incident (``MetricEvidence.to_json``).
``snapshots/*.json``  the ranks' last metric snapshots from the sidecar hand-off directory.

Everything is redacted as the logs are (:mod:`mlops_obs.logs.redact`): messages and string values by
secret shape, values of keys named like secrets whole. A bundle is meant to travel.

The size cap bounds the uncompressed content. Series and snapshots are small and kept whole; when
the events do not fit, the oldest plain (``info``/``debug``) log lines go first, since an incident's
evidence is its warnings, errors, alerts, exit records and the last lines before them. The manifest
says how many were dropped and from when the kept ones start.

Writing streams: ``mlops-obs bundle`` reads the store one chunk at a time in time order
(:meth:`~mlops_obs.rca.sources.ChunkStore.events`), each event is redacted and written to a temporary
file as it comes, and the kept lines go from there into the archive, so memory holds the chunks that
overlap in time and a byte or five per event, never the job.

Reading never extracts to disk: members are streamed out of the archive, so a hostile archive's
paths mean nothing, and every member is size-checked before it is parsed.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import platform
import sqlite3
import tarfile
import tempfile
import zlib
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import orjson

from mlops_obs import __version__
from mlops_obs.logs.redact import RedactSecrets, redact_text
from mlops_obs.rca.metrics import MetricEvidence

FORMAT = "mlops-obs-incident-bundle"
FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 256 << 20
MAX_MANIFEST_BYTES = 1 << 20
MAX_SERIES_BYTES = 512 << 20
MAX_SNAPSHOT_BYTES = 4 << 20
SNAPSHOT_SUFFIX = ".rank.json"

_redact_fields = RedactSecrets(skip_keys=("ts", "level", "seq", "job", "rank", "node", "run_id", "step", "loss"))


class BundleError(Exception):
    """A bundle that cannot be written or read; ``str()`` is one line."""


def redact_event(ev: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a store event with its message and fields redacted as the job-side logger does."""
    out = dict(ev)
    msg = out.get("message")
    if isinstance(msg, str):
        out["message"] = redact_text(msg)
    fields = out.get("fields")
    if isinstance(fields, Mapping):
        out["fields"] = _redact_fields(None, "", dict(fields))
    return out


def _notable(ev: Mapping[str, Any]) -> bool:
    return ev.get("kind", "log") != "log" or ev.get("level") in ("warning", "error", "critical")


def _dump(ev: Mapping[str, Any]) -> bytes:
    return orjson.dumps(redact_event(ev), default=str) + b"\n"


@dataclass
class Written:
    path: Path
    events: int = 0
    dropped: int = 0
    series: int = 0
    snapshots: int = 0
    bytes: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)


def write_bundle(
    out: Path,
    job: str,
    events: Iterable[Mapping[str, Any]],
    *,
    since: str | None = None,
    until: str | None = None,
    metrics: MetricEvidence | None = None,
    multiproc_dir: Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source: str = "",
    extra_versions: Mapping[str, str] | None = None,
) -> Written:
    """Write a bundle to ``out`` (atomically: a temp file beside it, then a rename).

    ``events`` (in time order) is read once, each event redacted and written to a temporary file as it
    comes, with one byte (notable or not) and, for a plain line, its size kept: 1-5 bytes an event,
    whatever the job's size. The cap then says how many of the oldest plain lines go; the kept lines
    are streamed from the file into the archive (through a second file only when some were dropped).
    """
    series_doc = orjson.dumps(_redact_series(metrics.to_json())) if metrics else None
    snaps = _snapshots(multiproc_dir, job) if multiproc_dir else []
    fixed = len(series_doc or b"") + sum(len(b) for _, b in snaps)
    budget = max_bytes - fixed
    if budget <= 0:
        raise BundleError(f"the series and snapshots alone ({fixed} bytes) exceed the size cap ({max_bytes} bytes)")
    written = Written(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as all_file, tempfile.TemporaryFile() as kept_file:
        notable = bytearray()  # per event, in order: 1 for a warning or worse, an alert, launcher or stack event
        plain_sizes = array("I")  # per plain line, in order: its size
        notable_bytes = 0
        kinds: dict[str, int] = {}
        times: dict[bool, list[str]] = {True: [], False: []}  # first and last time, of notable and plain events
        for ev in events:
            line = _dump(ev)
            all_file.write(line)
            mark = _notable(ev)
            notable.append(mark)
            if mark:
                notable_bytes += len(line)
            else:
                plain_sizes.append(len(line))
            k = str(ev.get("kind", "log"))
            kinds[k] = kinds.get(k, 0) + 1
            ts = ev.get("@timestamp")
            if isinstance(ts, str):
                t = times[mark]
                if not t:
                    t += [ts, ts]
                t[0], t[1] = min(t[0], ts), max(t[1], ts)
        if notable_bytes > budget:
            raise BundleError(
                f"the job's warnings, errors and alerts alone ({notable_bytes} bytes) exceed the size cap "
                f"({max_bytes} bytes); give a narrower --since/--until or a larger cap"
            )
        # The oldest plain lines that must go for the rest to fit.
        excess = sum(plain_sizes) - (budget - notable_bytes)
        dropped_bytes = 0
        while written.dropped < len(plain_sizes) and dropped_bytes < excess:
            dropped_bytes += plain_sizes[written.dropped]
            written.dropped += 1
        n_plain = len(plain_sizes)
        del plain_sizes
        ev_bytes = all_file.tell() - dropped_bytes
        written.events = len(notable) - written.dropped
        kept_from = None
        ev_file = all_file
        all_file.seek(0)
        if written.dropped:
            kinds["log"] -= written.dropped
            kept_from = _copy_kept(all_file, kept_file, notable, written.dropped)
            ev_file = kept_file
            ev_file.seek(0)
        del notable
        spans = [times[True]] if times[True] else []
        if times[False] and written.dropped < n_plain:
            spans.append([kept_from or times[False][0], times[False][1]])
        first = min((t[0] for t in spans), default=None)
        last = max((t[1] for t in spans), default=None)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "versions": _versions(extra_versions),
            "job": job,
            "since": since,
            "until": until,
            "first_event": first,
            "last_event": last,
            "source": source,
            "redacted": True,
            "max_bytes": max_bytes,
            "truncated": written.dropped > 0,
            "events": {
                "member": "events.ndjson",
                "count": written.events,
                "bytes": ev_bytes,
                "by_kind": {k: n for k, n in kinds.items() if n},
                "dropped": written.dropped,
                "kept_plain_from": kept_from,
            },
            "series": {
                "member": "series.json",
                "count": sum(len(x) for x in metrics.series.values()) if metrics else 0,
                "queries": len(metrics.series) if metrics else 0,
                "bytes": len(series_doc or b""),
            },
            "snapshots": {
                "count": len(snaps),
                "bytes": sum(len(b) for _, b in snaps),
                "members": [f"snapshots/{n}" for n, _ in snaps],
            },
        }
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                _add(tar, "manifest.json", orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
                info = tarfile.TarInfo("events.ndjson")
                info.size = ev_bytes
                info.mtime = int(_dt.datetime.now().timestamp())
                tar.addfile(info, ev_file)
                if series_doc is not None:
                    _add(tar, "series.json", series_doc)
                for name, body in snaps:
                    _add(tar, f"snapshots/{name}", body)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    written.series = manifest["series"]["count"]  # type: ignore[index]
    written.snapshots = len(snaps)
    written.bytes = out.stat().st_size
    written.manifest = manifest
    return written


def _copy_kept(src: IO[bytes], dst: IO[bytes], notable: bytearray, drop: int) -> str | None:
    """Copy ``src``'s lines to ``dst`` but the first ``drop`` plain ones; the time of the first plain
    line kept (None when none is)."""
    plain_seen = 0
    kept_from = None
    for mark, line in zip(notable, src):
        if not mark:
            plain_seen += 1
            if plain_seen <= drop:
                continue
            if kept_from is None:
                kept_from = orjson.loads(line).get("@timestamp")
        dst.write(line)
    return kept_from


def _add(tar: tarfile.TarFile, name: str, body: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    info.mtime = int(_dt.datetime.now().timestamp())
    tar.addfile(info, io.BytesIO(body))


def _versions(extra: Mapping[str, str] | None) -> dict[str, str]:
    v = {
        "mlops_obs": __version__,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }
    for pkg in ("torch", "prometheus-client"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    v.update(extra or {})
    return v


def _redact_series(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for it in items:
        for s in it["result"]:
            s["metric"] = {k: redact_text(v) for k, v in s["metric"].items()}
    return items


def _snapshots(directory: Path, job: str) -> list[tuple[str, bytes]]:
    """The job's rank snapshots (``<job>.<rank>.rank.json``, its ``job`` field checked), redacted."""
    out: list[tuple[str, bytes]] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise BundleError(f"--multiproc-dir {directory}: {e.strerror}") from None
    for entry in entries:
        name = entry.name
        if not name.endswith(SNAPSHOT_SUFFIX) or name.startswith("."):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat().st_size > MAX_SNAPSHOT_BYTES:
                continue
            doc = orjson.loads(Path(entry.path).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if not isinstance(doc, dict) or str(doc.get("job")) != job:
            continue
        out.append((name.replace(SNAPSHOT_SUFFIX, ".json"), orjson.dumps(_redact_fields(None, "", doc))))
    return out


class Bundle:
    """A bundle opened for reading: its manifest, its events (streamed), its series and snapshots."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, mode="r:gz")  # noqa: SIM115 - open while the Bundle is
            members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
        except FileNotFoundError:
            raise BundleError(f"{self.path}: no such file") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BundleError(f"{self.path}: not a readable .tar.gz bundle: {e}") from None
        self._members = members
        doc = self._json("manifest.json", MAX_MANIFEST_BYTES)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BundleError(f"{self.path}: not an mlops-obs incident bundle (no {FORMAT} manifest)")
        if doc.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{self.path}: bundle format version {doc.get('format_version')!r}; this reads {FORMAT_VERSION}"
            )
        self.manifest: dict[str, Any] = doc
        self.skipped = 0  # event lines that were not events

    @property
    def job(self) -> str:
        return str(self.manifest.get("job") or "")

    def _open(self, name: str) -> IO[bytes]:
        m = self._members.get(name)
        if m is None:
            raise BundleError(f"{self.path}: member {name} is missing")
        try:
            f = self._tar.extractfile(m)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BundleError(f"{self.path}: cannot read {name}: {e}") from None
        if f is None:
            raise BundleError(f"{self.path}: member {name} is not a file")
        return f

    def _json(self, name: str, cap: int) -> Any:
        m = self._members.get(name)
        if m is None:
            raise BundleError(f"{self.path}: member {name} is missing")
        if m.size > cap:
            raise BundleError(f"{self.path}: {name} is {m.size} bytes, over the {cap}-byte limit")
        try:
            return orjson.loads(self._open(name).read(cap + 1))
        except (orjson.JSONDecodeError, tarfile.TarError, OSError, EOFError) as e:
            raise BundleError(f"{self.path}: {name}: {e}") from None

    def events(self) -> Iterator[dict[str, Any]]:
        """Every event, in the order written; a line that is not an event object is skipped and counted.

        Each call reads through an archive handle of its own, front to back: two readings at once (a
        replay merging a job's events with its nodes' alerts) would otherwise seek one gzip stream
        back and forth, decompressing it again from the start at every turn."""
        self.skipped = 0
        m = self._members.get("events.ndjson")
        if m is None:
            raise BundleError(f"{self.path}: member events.ndjson is missing")
        try:
            tar = tarfile.open(self.path, mode="r:gz")  # noqa: SIM115 - closed below
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BundleError(f"{self.path}: not a readable .tar.gz bundle: {e}") from None
        try:
            f = tar.extractfile(m)
            if f is None:
                raise BundleError(f"{self.path}: member events.ndjson is not a file")
            for line in f:
                try:
                    ev = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.skipped += 1
                    continue
                if not isinstance(ev, dict) or not isinstance(ev.get("@timestamp"), str):
                    self.skipped += 1
                    continue
                yield ev
            # To the end of the gzip stream, whose checksum comes last: damage that still inflates
            # (a bundle altered in transit) is an error here, not a replay that looked whole.
            while tar.fileobj is not None and tar.fileobj.read(1 << 20):
                pass
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise BundleError(f"{self.path}: events.ndjson: {e}") from None
        finally:
            tar.close()

    def metrics(self) -> MetricEvidence | None:
        if "series.json" not in self._members:
            return None
        doc = self._json("series.json", MAX_SERIES_BYTES)
        try:
            return MetricEvidence.from_json(doc) if isinstance(doc, list) else None
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{self.path}: series.json: {e}") from None

    def snapshots(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in sorted(self._members):
            if name.startswith("snapshots/") and name.endswith(".json"):
                out[name.removeprefix("snapshots/")] = self._json(name, MAX_SNAPSHOT_BYTES)
        return out

    def close(self) -> None:
        self._tar.close()
