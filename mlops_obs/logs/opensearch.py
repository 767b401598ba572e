"""The OpenSearch sink: ``_bulk`` with our own NDJSON, per-item outcomes, retries that never drop.

Why not opensearch-py's helpers: ``streaming_bulk`` retries only per-item 429s (and not at all with
``raise_on_error``), ``parallel_bulk`` not at all; both build bodies ~10x slower than orjson. Here:

* each event becomes ``{"create": {"_index", "_id"}}`` + the document, built with orjson; bodies are
  capped by bytes (``max_body_bytes``), not by count;
* ``create`` with our ``_id`` (file fingerprint + offset) in the index named by the event's *own*
  timestamp, so a retry after a lost response lands in the same index and answers 409;
* per item: 200/201 and 409 are done; 429, 5xx, timeouts and connection errors are retried with
  full-jitter exponential backoff, forever (the shipper stops reading meanwhile); a 413 splits the
  request in two (a single document too big is dead-lettered); any other 4xx goes to the
  dead-letter file with its reason, fsynced before the batch counts as acknowledged;
* at start it installs an index template (mappings for our fields) and an ISM retention policy.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from mlops_obs.config import (
    Setting,
    int_parser,
    parse_bool,
    parse_duration,
    parse_optional_path,
    parse_optional_str,
    parse_str,
)
from mlops_obs.logs.sink import (
    DEAD_LETTER_FILE,
    FAULTS,
    DeadLetters,
    Events,
    ParsedEvents,
    Stats,
    Stop,
    backoff_delays,
    say,
)

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

TEMPLATE_NAME = "mlops-logs"
POLICY_NAME = "mlops-logs-retention"


def _parse_url(v: Any) -> str | None:
    s = parse_optional_str(v)
    if s is None:
        return None
    if not s.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {s!r}")
    return s.rstrip("/")


OPENSEARCH_URL_SETTING = Setting(
    "opensearch", _parse_url, None, "OpenSearch URL to ship to instead of the embedded store.", metavar="URL"
)
OPENSEARCH_SETTINGS: tuple[Setting, ...] = (
    Setting("opensearch.index-prefix", parse_str, "mlops-logs",
            "Daily indices <prefix>-YYYY.MM.DD, chosen from each event's own timestamp."),
    Setting("opensearch.max-body-bytes", int_parser(1024), 5 << 20, "Cap on one _bulk request body.",
            metavar="BYTES"),
    Setting("opensearch.retention", parse_duration, 30 * 86400.0, "ISM policy: delete indices older than this.",
            metavar="DURATION"),
    Setting("opensearch.timeout", parse_duration, 30.0, "Timeout of one _bulk request.", metavar="DURATION"),
    Setting("opensearch.backoff-max", parse_duration, 10.0, "Longest pause between retries.", metavar="DURATION"),
    Setting("opensearch.username", parse_optional_str, None, "Basic-auth user."),
    Setting("opensearch.password-file", parse_optional_path, None, "File holding the basic-auth password.",
            metavar="PATH"),
    Setting("opensearch.ca-file", parse_optional_path, None, "CA bundle to verify the server.", metavar="PATH"),
    Setting("opensearch.client-cert", parse_optional_path, None, "Client certificate (mTLS).", metavar="PATH"),
    Setting("opensearch.client-key", parse_optional_path, None, "Client key (mTLS).", metavar="PATH"),
    Setting("opensearch.insecure-skip-verify", parse_bool, False, "Do not verify the server certificate.",
            kind="bool"),
    Setting("opensearch.setup", parse_bool, True, "Install the index template and ISM policy at start.",
            kind="bool"),
)  # fmt: skip
"""The ``opensearch.*`` settings :func:`settings_from_config` reads, shared by every command that
writes to OpenSearch (one config file serves ``ship`` and ``alert-sink``)."""


@dataclass
class OpenSearchSettings:
    url: str
    state_dir: Path | None  # the dead-letter file's directory; needed to write, not to read
    index_prefix: str = "mlops-logs"
    max_body_bytes: int = 5 << 20
    retention_s: float = 30 * 86400.0
    timeout_s: float = 30.0
    backoff_max_s: float = 10.0
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    verify: bool = True
    setup: bool = True


def settings_from_config(cfg: Mapping[str, Any], state_dir: Path | None) -> OpenSearchSettings:
    """Credentials from a file or the environment, never from a flag value (it would show in ``ps``)."""
    password = os.environ.get("MLOPS_OBS_OPENSEARCH_PASSWORD")
    pw_file = cfg.get("opensearch.password-file")
    if pw_file is not None:
        try:
            password = Path(pw_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"opensearch.password-file: cannot read {str(pw_file)!r}: {e.strerror}") from None
    username = cfg.get("opensearch.username") or os.environ.get("MLOPS_OBS_OPENSEARCH_USERNAME")
    return OpenSearchSettings(
        url=cfg["opensearch"],
        state_dir=state_dir,
        index_prefix=cfg["opensearch.index-prefix"],
        max_body_bytes=cfg["opensearch.max-body-bytes"],
        retention_s=cfg["opensearch.retention"],
        timeout_s=cfg["opensearch.timeout"],
        backoff_max_s=cfg["opensearch.backoff-max"],
        username=username,
        password=password,
        ca_file=cfg.get("opensearch.ca-file"),
        client_cert=cfg.get("opensearch.client-cert"),
        client_key=cfg.get("opensearch.client-key"),
        verify=not cfg.get("opensearch.insecure-skip-verify", False),
        setup=cfg.get("opensearch.setup", True),
    )


def index_for(prefix: str, timestamp: str) -> str:
    """Daily index from the event's own ``@timestamp`` (``2026-01-02T...`` -> ``prefix-2026.01.02``)."""
    return f"{prefix}-{timestamp[0:4]}.{timestamp[5:7]}.{timestamp[8:10]}"


def bulk_lines(events: Sequence[Mapping[str, Any]], prefix: str) -> list[bytes]:
    """One ``create`` action + document per event, each pair as one bytes chunk ending in a newline.

    The action's constant part is built once per day (index) and reused: with orjson doing the
    documents, string building is what is left to save.
    """
    out = []
    dumps = orjson.dumps
    heads: dict[str, bytes] = {}
    for ev in events:
        doc = dict(ev)
        eid = doc.pop("_id")
        day = doc["@timestamp"][:10]
        head = heads.get(day)
        if head is None:
            head = heads[day] = b'{"create":{"_index":"' + index_for(prefix, day).encode() + b'","_id":'
        out.append(b"".join((head, dumps(eid), b"}}\n", dumps(doc, default=str), b"\n")))
    return out


def chunk_by_bytes(lines: list[bytes], cap: int) -> list[tuple[int, int]]:
    """[start, end) ranges of ``lines`` whose joined size stays under ``cap`` (at least one line each)."""
    ranges = []
    start, size = 0, 0
    for i, line in enumerate(lines):
        if i > start and size + len(line) > cap:
            ranges.append((start, i))
            start, size = i, 0
        size += len(line)
    if start < len(lines):
        ranges.append((start, len(lines)))
    return ranges


def template_body(prefix: str) -> dict[str, Any]:
    return {
        "index_patterns": [f"{prefix}-*"],
        "template": {
            "settings": {"index.refresh_interval": "1s", "plugins.index_state_management.policy_id": POLICY_NAME},
            "mappings": {
                "dynamic": True,
                "properties": {
                    "@timestamp": {"type": "date_nanos"},
                    "kind": {"type": "keyword"},
                    "job": {"type": "keyword"},
                    "rank": {"type": "integer"},
                    "node": {"type": "keyword"},
                    "level": {"type": "keyword"},
                    "message": {"type": "text", "fields": {"raw": {"type": "keyword", "ignore_above": 1024}}},
                    "seq": {"type": "long"},
                    "source": {"type": "keyword"},
                    "offset": {"type": "long"},
                    "fields": {"type": "flattened"},
                },
            },
        },
    }


def ism_policy_body(prefix: str, retention_s: float) -> dict[str, Any]:
    days = max(1, round(retention_s / 86400))
    return {
        "policy": {
            "description": f"Delete {prefix}-* indices {days} days after creation (mlops-obs).",
            "default_state": "hot",
            "states": [
                {"name": "hot", "actions": [],
                 "transitions": [{"state_name": "delete", "conditions": {"min_index_age": f"{days}d"}}]},
                {"name": "delete", "actions": [{"delete": {}}], "transitions": []},
            ],
            "ism_template": [{"index_patterns": [f"{prefix}-*"], "priority": 100}],
        }
    }  # fmt: skip


class OpenSearchSink:
    """OpenSearch as a :class:`~mlops_obs.logs.sink.Sink` (see the module docstring)."""

    def __init__(
        self, settings: OpenSearchSettings, log: FilteringBoundLogger | None = None, stats: Stats | None = None
    ) -> None:
        from opensearchpy import OpenSearch

        if settings.state_dir is None:
            raise ValueError("the OpenSearch sink needs a state directory for its dead-letter file")
        self.s = settings
        self.log = log
        self.stats = stats
        kw: dict[str, Any] = {
            "hosts": [settings.url],
            "timeout": settings.timeout_s,
            "max_retries": 0,  # retries are ours: per item, jittered, never dropping
            "retry_on_timeout": False,
            "http_compress": False,
        }
        if settings.username:
            kw["http_auth"] = (settings.username, settings.password or "")
        if settings.url.startswith("https://"):
            kw.update(use_ssl=True, verify_certs=settings.verify, ssl_show_warn=settings.verify)
            if settings.ca_file:
                kw["ca_certs"] = str(settings.ca_file)
            if settings.client_cert:
                kw["client_cert"] = str(settings.client_cert)
            if settings.client_key:
                kw["client_key"] = str(settings.client_key)
        self.client = OpenSearch(**kw)
        # opensearch-py logs every failed request with a traceback; ours says it once, in one line
        logging.getLogger("opensearch").setLevel(logging.ERROR)
        self.dead_letters = DeadLetters(Path(settings.state_dir) / DEAD_LETTER_FILE, log)
        self._set_up = not settings.setup

    def _count_retry(self) -> None:
        if self.stats is not None:
            self.stats.retries += 1

    def _setup(self, stop: threading.Event) -> None:
        """Template and ISM policy; retried like writes (the cluster may still be starting)."""
        from opensearchpy.exceptions import TransportError

        delay = backoff_delays(cap=self.s.backoff_max_s)
        last_error = None
        while True:
            try:
                self.client.indices.put_index_template(name=TEMPLATE_NAME, body=template_body(self.s.index_prefix))
                try:
                    self.client.transport.perform_request(
                        "PUT",
                        f"/_plugins/_ism/policies/{POLICY_NAME}",
                        body=ism_policy_body(self.s.index_prefix, self.s.retention_s),
                    )
                except TransportError as e:
                    if e.status_code == 409:  # already installed
                        pass
                    elif e.status_code in (400, 404) and "ism" not in str(e.error).lower():
                        self._say("warning", "ISM plugin not available; no retention policy installed")
                    elif isinstance(e.status_code, int) and 400 <= e.status_code < 500:
                        self._say("warning", "ISM policy not installed", status=e.status_code, error=str(e.error))
                    else:
                        raise
                self._set_up = True
                return
            except Exception as e:
                self._count_retry()
                if _why(e) != last_error:
                    last_error = _why(e)
                    self._say("warning", "OpenSearch setup failed; retrying", error=last_error)
                if stop.wait(delay()):
                    raise Stop() from None

    def _say(self, level: str, msg: str, **kw: Any) -> None:
        say(self.log, level, msg, **kw)

    def send(self, events: Events, stop: threading.Event) -> int:
        """Returns ``len(events)``: a first write (201) and a repeat (409) both count as held, untold apart."""
        if isinstance(events, ParsedEvents):
            events = events.dicts()
        if not self._set_up:
            self._setup(stop)
        lines = bulk_lines(events, self.s.index_prefix)
        pending = [(a, b) for a, b in chunk_by_bytes(lines, self.s.max_body_bytes)]
        dead: list[tuple[Mapping[str, Any], str, int]] = []
        delay = backoff_delays(cap=self.s.backoff_max_s)
        while pending:
            a, b = pending.pop(0)
            idx = list(range(a, b))
            outcome = self._post([lines[i] for i in idx], stop)
            if isinstance(outcome, str):  # "too_large"
                if len(idx) == 1:
                    dead.append((events[idx[0]], "request entity too large (413) for a single document", 413))
                else:
                    mid = (a + b) // 2
                    pending[:0] = [(a, mid), (mid, b)]
                continue
            if outcome is None:  # whole request failed (connection, timeout, 5xx, 429): retry it
                self._count_retry()
                pending.insert(0, (a, b))
                if stop.wait(delay()):
                    raise Stop() from None
                continue
            retry: list[int] = []
            for i, item in zip(idx, outcome):
                status, reason = item
                if status in (200, 201, 409):
                    continue
                if status == 429 or status >= 500:
                    retry.append(i)
                else:
                    dead.append((events[i], reason, status))
            if retry:
                self._count_retry()
                # retry only the failed items, as their own requests (they are contiguous enough)
                pending[:0] = [(i, i + 1) for i in retry] if len(retry) < 8 else _runs(retry)
                if stop.wait(delay()):
                    raise Stop() from None
            else:
                delay = backoff_delays(cap=self.s.backoff_max_s)
        if dead:
            self._dead_letter(dead)
        return len(events)

    def _post(self, chunk: list[bytes], stop: threading.Event) -> list[tuple[int, str]] | str | None:
        from opensearchpy.exceptions import ConnectionError as OSConnectionError
        from opensearchpy.exceptions import TransportError

        body = b"".join(chunk)
        try:
            resp = self.client.bulk(body=body)
        except OSConnectionError as e:  # includes timeouts: the write may or may not have been applied
            self._say("warning", "OpenSearch unreachable; retrying", error=_why(e))
            return None
        except TransportError as e:
            if e.status_code == 413:
                return "too_large"
            self._say("warning", "bulk request failed; retrying", status=e.status_code, error=_why(e))
            return None
        FAULTS.hit("sent")
        items = resp.get("items") or []
        if len(items) != len(chunk):
            self._say("warning", "bulk response does not match the request; retrying", items=len(items))
            return None
        out = []
        for it in items:
            res = next(iter(it.values()))
            status = int(res.get("status", 500))
            err = res.get("error")
            reason = (
                f"{err.get('type')}: {err.get('reason')}" if isinstance(err, dict) else str(err) if err else str(status)
            )
            out.append((status, reason))
        return out

    def _dead_letter(self, dead: list[tuple[Mapping[str, Any], str, int]]) -> None:
        written = self.dead_letters.add(dead)
        if not written:
            return
        if self.stats is not None:
            self.stats.dead_letters += len(written)
        self._say("warning", "events dead-lettered", count=len(written), path=str(self.dead_letters.path),
                  reason=written[0][1])  # fmt: skip

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"
