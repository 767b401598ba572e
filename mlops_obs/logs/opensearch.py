"""OpenSearch as a backend: the sink (``_bulk`` with our own NDJSON, per-item outcomes, retries that
never drop), the index template and ISM policy it installs, and the source that reads it back
(:class:`OpenSearchSource`: a point in time paged with ``search_after``, aggregations for the
per-rank facts; see its docstring and docs/logs.md, "Reading back").

Why not opensearch-py's helpers: ``streaming_bulk`` retries only per-item 429s (and not at all with
``raise_on_error``), ``parallel_bulk`` not at all; both build bodies ~10x slower than orjson. Here:

* each event becomes ``{"create": {"_index", "_id"}}`` + the document, built with orjson; bodies are
  capped by bytes (``max_body_bytes``), not by count;
* ``create`` with our ``_id`` (file fingerprint + offset) in the index named by the event's *own*
  timestamp, so a retry after a lost response lands in the same index and answers 409;
* per item: 200/201 and 409 are done; 429, 5xx, timeouts and connection errors are retried with
  full-jitter exponential backoff, forever (the shipper stops reading meanwhile); a 413 splits the
  request in two (a single document too big is dead-lettered); any other 4xx goes to the
  dead-letter file with its reason, fsynced before the batch counts as acknowledged, except the
  one 4xx that says the cluster is broken, not the document: our ingest pipeline missing (see
  :meth:`OpenSearchSink._repair_pipeline`: re-installed and the documents re-sent, or sent without it);
* at start it installs an ingest pipeline stamping each document with the cluster's time of ingest
  (:func:`ingest_pipeline_body`, the field :data:`INGESTED`, what a follower follows by), an index
  template (:func:`template_body`: OpenSearch types, what readers filter or aggregate on typed at the
  top level, the pipeline as the indices' default) and an ISM retention policy (:func:`ism_policy_body`);
  a pipeline that cannot be installed (refused, or its API failing past :data:`PIPELINE_PATIENCE_S`)
  is left out, never holding the logs back.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from mlops_obs.config import (
    Setting,
    int_parser,
    parse_bool,
    parse_duration,
    parse_http_url,
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
    format_timestamp,
    say,
)
from mlops_obs.logs.source import EventQuery, RankFacts

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

TEMPLATE_NAME = "mlops-logs"
POLICY_NAME = "mlops-logs-retention"
PIPELINE_NAME = "mlops-logs-ingested"
"""The names for the default prefix; another prefix gets its own (:func:`setup_names`), so two
deployments (or a test) sharing a cluster do not overwrite each other's template, policy and pipeline."""

INGESTED = "ingested"
"""The field the ingest pipeline sets to the cluster's time of ingest (``{{_ingest.timestamp}}``):
when a document was stored, on one clock for every shipper, which is what a follower follows by
(:meth:`OpenSearchSource.follow`). Mapped as ``date`` (milliseconds: a follower needs no finer)."""


PIPELINE_TRIES = 5
PIPELINE_PATIENCE_S = 30.0
"""A ``PUT _ingest/pipeline`` answered with a 5xx is retried (with the set-up, or before re-sending
the documents it failed) until it has failed this many times in a row *and* for this long: a cluster
still electing its manager or starting answers 5xx for seconds, and gets the pipeline; one whose
ingest API keeps failing (no node reporting ingest info, a cluster-manager task that keeps timing
out) gets none, like a role that may not install it, and the logs flow without :data:`INGESTED`."""
PIPELINE_RECHECK_S = 60.0
"""How long the sink sends documents past a missing pipeline it could not re-install (``"pipeline":
"_none"``) before it sends them normally again, to see whether an administrator put it back."""
NO_PIPELINE = "_none"
"""A bulk action's ``pipeline`` naming no pipeline: it overrides the index's ``default_pipeline``
(OpenSearch's ``IngestService.resolvePipelines``; ``index.final_pipeline`` would still run)."""


def setup_names(prefix: str) -> tuple[str, str, str]:
    """The index template's, the ISM policy's and the ingest pipeline's names for indices ``<prefix>-*``."""
    return prefix, f"{prefix}-retention", f"{prefix}-ingested"


OPENSEARCH_URL_SETTING = Setting(
    "opensearch", parse_http_url, None, "OpenSearch URL to ship to instead of the embedded store.", metavar="URL"
)
OPENSEARCH_READ_SETTINGS: tuple[Setting, ...] = (
    Setting("opensearch.index-prefix", parse_str, "mlops-logs",
            "Daily indices <prefix>-YYYY.MM.DD, chosen from each event's own timestamp."),
    Setting("opensearch.timeout", parse_duration, 30.0, "Timeout of one request.", metavar="DURATION"),
    Setting("opensearch.username", parse_optional_str, None, "Basic-auth user."),
    Setting("opensearch.password-file", parse_optional_path, None, "File holding the basic-auth password.",
            metavar="PATH"),
    Setting("opensearch.ca-file", parse_optional_path, None, "CA bundle to verify the server.", metavar="PATH"),
    Setting("opensearch.client-cert", parse_optional_path, None, "Client certificate (mTLS).", metavar="PATH"),
    Setting("opensearch.client-key", parse_optional_path, None, "Client key (mTLS).", metavar="PATH"),
    Setting("opensearch.insecure-skip-verify", parse_bool, False, "Do not verify the server certificate.",
            kind="bool"),
)  # fmt: skip
"""The ``opensearch.*`` settings a command that only reads from OpenSearch takes (``replay``, ``rca``,
``bundle``): where the indices are and how to connect."""
OPENSEARCH_WRITE_SETTINGS: tuple[Setting, ...] = (
    Setting("opensearch.max-body-bytes", int_parser(1024), 5 << 20, "Cap on one _bulk request body.",
            metavar="BYTES"),
    Setting("opensearch.retention", parse_duration, 30 * 86400.0, "ISM policy: delete indices older than this.",
            metavar="DURATION"),
    Setting("opensearch.backoff-max", parse_duration, 10.0, "Longest pause between retries.", metavar="DURATION"),
    Setting("opensearch.setup", parse_bool, True,
            "Install the ingest pipeline, index template and ISM policy at start.", kind="bool"),
)  # fmt: skip
"""The ``opensearch.*`` settings only a writer takes: request size, retries, the ingest pipeline,
index template and ISM policy."""
OPENSEARCH_SETTINGS: tuple[Setting, ...] = OPENSEARCH_READ_SETTINGS + OPENSEARCH_WRITE_SETTINGS
"""Every ``opensearch.*`` setting :func:`settings_from_config` reads, shared by every command that
writes to OpenSearch (one config file serves ``ship`` and ``alert-sink``)."""
_WRITE_DEFAULTS = {s.key: s.default for s in OPENSEARCH_WRITE_SETTINGS}


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
        max_body_bytes=cfg.get("opensearch.max-body-bytes", _WRITE_DEFAULTS["opensearch.max-body-bytes"]),
        retention_s=cfg.get("opensearch.retention", _WRITE_DEFAULTS["opensearch.retention"]),
        timeout_s=cfg["opensearch.timeout"],
        backoff_max_s=cfg.get("opensearch.backoff-max", _WRITE_DEFAULTS["opensearch.backoff-max"]),
        username=username,
        password=password,
        ca_file=cfg.get("opensearch.ca-file"),
        client_cert=cfg.get("opensearch.client-cert"),
        client_key=cfg.get("opensearch.client-key"),
        verify=not cfg.get("opensearch.insecure-skip-verify", False),
        setup=cfg.get("opensearch.setup", _WRITE_DEFAULTS["opensearch.setup"]),
    )


def index_for(prefix: str, timestamp: str) -> str:
    """Daily index from the event's own ``@timestamp`` (``2026-01-02T...`` -> ``prefix-2026.01.02``)."""
    return f"{prefix}-{timestamp[0:4]}.{timestamp[5:7]}.{timestamp[8:10]}"


STEP_RANGE = (-(1 << 63), 1 << 63)
"""What a ``long`` holds: a ``fields.step`` outside it is not copied to the top-level ``step``."""


def document(ev: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The ``_id`` and the indexed document of one event: the event without ``_id``, plus the two
    fields the reader needs typed at the top level (see :func:`template_body`): ``event_id`` (the
    ``_id`` again, the sort's tie-breaker) and ``step`` (``fields.step`` when it is an integer)."""
    doc = dict(ev)
    eid = doc.pop("_id")
    doc["event_id"] = eid
    fields = doc.get("fields")
    step = fields.get("step") if isinstance(fields, Mapping) else None
    if type(step) is int and STEP_RANGE[0] <= step < STEP_RANGE[1]:
        doc["step"] = step
    return eid, doc


def bulk_lines(events: Sequence[Mapping[str, Any]], prefix: str, *, pipeline: str | None = None) -> list[bytes]:
    """One ``create`` action + document per event, each pair as one bytes chunk ending in a newline;
    with ``pipeline``, each action names it (:data:`NO_PIPELINE`: past the index's default pipeline).

    The action's constant part is built once per day (index) and reused: with orjson doing the
    documents, string building is what is left to save.
    """
    out = []
    dumps = orjson.dumps
    heads: dict[str, bytes] = {}
    extra = b'","pipeline":' + dumps(pipeline) + b',"_id":' if pipeline is not None else b'","_id":'
    for ev in events:
        eid, doc = document(ev)
        day = doc["@timestamp"][:10]
        head = heads.get(day)
        if head is None:
            head = heads[day] = b'{"create":{"_index":"' + index_for(prefix, day).encode() + extra
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


MESSAGE_KEYWORD_CHARS = 8191
"""``message.raw`` indexes messages up to this many characters (4 bytes each stays under Lucene's
32766-byte term limit); a longer message is left out of it, and the reader filters those itself."""


def template_body(prefix: str, *, pipeline: bool = True) -> dict[str, Any]:
    """The composable index template for ``<prefix>-*`` (OpenSearch's ``PUT _index_template``).

    Every field replay and rca filter, sort or aggregate on is typed at the top level; ``fields``
    (everything else of a record, any keys, any types) is a ``flat_object`` (OpenSearch 2.7+): one
    mapping whatever its keys, so a record cannot explode the mapping or be rejected for a type
    clash, searchable by ``fields.key`` but not aggregatable, which is why ``step`` is copied out
    (:func:`document`). ``event_id`` is the ``_id`` as a keyword with doc values, the sort's last
    key: sorting on ``_id`` itself needs field data on the heap, which OpenSearch deprecates.
    ``dynamic: false`` keeps an unexpected top-level key in ``_source`` without mapping it. The ISM
    policy attaches itself through its ``ism_template`` (:func:`ism_policy_body`), not an index
    setting, which current ISM no longer honours in templates.

    With ``pipeline``, new indices run the ingest pipeline (:func:`ingest_pipeline_body`) on every
    document (``index.default_pipeline``); without it (the pipeline could not be installed), they do
    not: a default pipeline that does not exist fails every write into the index.
    """
    settings: dict[str, Any] = {"index.refresh_interval": "1s"}
    if pipeline:
        settings["index.default_pipeline"] = setup_names(prefix)[2]
    return {
        "index_patterns": [f"{prefix}-*"],
        "priority": 100,
        "template": {
            "settings": settings,
            "mappings": {
                "dynamic": False,
                "properties": {
                    "@timestamp": {"type": "date_nanos"},
                    "kind": {"type": "keyword"},
                    "job": {"type": "keyword"},
                    "rank": {"type": "integer"},
                    "node": {"type": "keyword"},
                    "level": {"type": "keyword"},
                    "message": {
                        "type": "text",
                        "fields": {"raw": {"type": "keyword", "ignore_above": MESSAGE_KEYWORD_CHARS}},
                    },
                    "seq": {"type": "long"},
                    "source": {"type": "keyword"},
                    "offset": {"type": "long"},
                    "step": {"type": "long"},
                    "event_id": {"type": "keyword"},
                    "fields": {"type": "flat_object"},
                    INGESTED: {"type": "date"},
                },
            },
        },
    }


def ingest_pipeline_body(prefix: str) -> dict[str, Any]:
    """The ingest pipeline (``PUT _ingest/pipeline/<name>``) setting :data:`INGESTED` to the time the
    cluster took the document in.

    ``_ingest.timestamp`` is taken per document on the node that runs the pipeline; the template
    renders it as Java's ``ZonedDateTime.toString()`` in UTC (``2026-03-04T10:00:01.123456Z``, but
    ``...T10:00Z`` on a whole minute), which the ``date`` mapping's default format parses and
    :func:`ingest_time_ns` reads back.
    """
    return {
        "description": f"mlops-obs: the time {prefix}-* documents were stored, which followers read by",
        "processors": [{"set": {"field": INGESTED, "value": "{{_ingest.timestamp}}"}}],
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


def min_index_age(policy: Any) -> str | None:
    """The ``min_index_age`` of the first transition that has one in an ISM ``policy`` (ours has one)."""
    for state in (policy or {}).get("states") or ():
        for transition in state.get("transitions") or ():
            age = (transition.get("conditions") or {}).get("min_index_age")
            if age is not None:
                return str(age)
    return None


def make_client(settings: OpenSearchSettings) -> Any:
    """The opensearch-py client for ``settings``: its own retries off (ours are per item, jittered,
    never dropping), TLS and basic auth as configured."""
    from opensearchpy import OpenSearch

    kw: dict[str, Any] = {
        "hosts": [settings.url],
        "timeout": settings.timeout_s,
        "max_retries": 0,
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
    # opensearch-py logs every failed request with a traceback; ours says it once, in one line
    logging.getLogger("opensearch").setLevel(logging.ERROR)
    return OpenSearch(**kw)


@dataclass(frozen=True)
class _Failed:
    """A ``_bulk`` request that failed as a whole, and why."""

    why: str


TOO_LARGE = _Failed("request entity too large (413)")


class OpenSearchSink:
    """OpenSearch as a :class:`~mlops_obs.logs.sink.Sink` (see the module docstring)."""

    def __init__(
        self, settings: OpenSearchSettings, log: FilteringBoundLogger | None = None, stats: Stats | None = None
    ) -> None:
        if settings.state_dir is None:
            raise ValueError("the OpenSearch sink needs a state directory for its dead-letter file")
        self.s = settings
        self.log = log
        self.stats = stats
        self.client = make_client(settings)
        self.dead_letters = DeadLetters(Path(settings.state_dir) / DEAD_LETTER_FILE, log)
        self._set_up = not settings.setup
        self.pipeline_tries = PIPELINE_TRIES
        self.pipeline_patience_s = PIPELINE_PATIENCE_S
        self.pipeline_recheck_s = PIPELINE_RECHECK_S
        self._pipeline = setup_names(settings.index_prefix)[2]
        self._pipeline_5xx = 0  # answers of 5xx to the pipeline's PUT in a row ...
        self._pipeline_5xx_since: float | None = None  # ... since then (monotonic)
        self._missing_since: float | None = None  # the pipeline found missing by a write, until one works again
        self._reinstalls = 0  # re-installs that "worked" in this occurrence (it keeps vanishing: give up)
        self._bypass_warned = False  # "shipping without it" said for this occurrence
        self._bypass_until = 0.0  # monotonic; until then documents name NO_PIPELINE

    def _count_retry(self, why: str) -> None:
        """One more retry, and why: ``stats.sink_error`` names the cause in the shipper's stats.json
        (and so in the failing-shipper alert's runbook) until a batch goes through."""
        if self.stats is not None:
            self.stats.retries += 1
            self.stats.sink_error = f"opensearch: {why}"

    def _setup(self, stop: threading.Event) -> None:
        """Ingest pipeline, template and ISM policy; retried like writes (the cluster may still be
        starting). Each is created or replaced by a ``PUT`` of the current body, so a deployment
        upgraded to another body gets it at the next start (the ISM policy, which a ``PUT`` does
        not replace, through :meth:`_update_retention`)."""
        from opensearchpy.exceptions import TransportError

        delay = backoff_delays(cap=self.s.backoff_max_s)
        last_error = None
        while True:
            try:
                template, policy, pipeline = setup_names(self.s.index_prefix)
                has_pipeline = self._install_pipeline(pipeline)
                self.client.indices.put_index_template(
                    name=template, body=template_body(self.s.index_prefix, pipeline=has_pipeline)
                )
                try:
                    self.client.transport.perform_request(
                        "PUT",
                        f"/_plugins/_ism/policies/{policy}",
                        body=ism_policy_body(self.s.index_prefix, self.s.retention_s),
                    )
                except TransportError as e:
                    if e.status_code == 409:  # already installed: with this retention?
                        self._try_update_retention(policy)
                    elif e.status_code in (400, 404) and "ism" not in str(e.error).lower():
                        self._say("warning", "ISM plugin not available; no retention policy installed")
                    elif _is_4xx(e):
                        self._say("warning", "ISM policy not installed", status=e.status_code, error=str(e.error))
                    else:
                        raise
                self._set_up = True
                return
            except Exception as e:
                self._count_retry(f"setup failed: {_why(e)}")
                if _why(e) != last_error:
                    last_error = _why(e)
                    self._say("warning", "OpenSearch setup failed; retrying", error=last_error)
                if stop.wait(delay()):
                    raise Stop() from None

    def _install_pipeline(self, name: str) -> bool:
        """Create or update the ingest pipeline; whether new indices may name it as their default.

        A refusal (a role without ``cluster_manage_pipelines``, a 4xx) is not worth holding the logs
        back for: if the pipeline is there all the same (an administrator installed it) it is used,
        otherwise the template names none, the documents carry no :data:`INGESTED` and followers
        fall back to event time (see :meth:`OpenSearchSource.follow`), and the sink says so. A lost
        connection is retried with the rest of the set-up, forever (the template could not be
        installed either). So is a 5xx, but only until :meth:`_pipeline_gives_up`: a cluster whose
        ingest API keeps failing while it answers the rest is treated like a refusal, so that logs
        flow without the pipeline rather than not at all (a later start tries again).
        """
        from opensearchpy.exceptions import ConnectionError as OSConnectionError
        from opensearchpy.exceptions import TransportError

        url = f"/_ingest/pipeline/{name}"
        gave_up = False
        try:
            self._put_pipeline(name)
            return True
        except OSConnectionError:
            raise
        except TransportError as e:
            if not _is_4xx(e):
                if not self._pipeline_gives_up():
                    raise
                gave_up = True
            refusal = e
        try:
            current = self.client.transport.perform_request("GET", url)
        except OSConnectionError:
            raise
        except TransportError as e:
            if not (_is_4xx(e) or gave_up):
                raise
            current = None
        if _sets_ingested((current or {}).get(name)):
            self._say("info", "ingest pipeline not updated (refused); the one installed is used",
                      pipeline=name, status=refusal.status_code)  # fmt: skip
            return True
        if gave_up:
            self._say("warning", "ingest pipeline not installed: its API keeps failing; followers of these "
                      "indices go by event time until a later start installs it", pipeline=name,
                      tries=self._pipeline_5xx, status=refusal.status_code, error=str(refusal.error))  # fmt: skip
        else:
            self._say("warning", "ingest pipeline not installed; followers of these indices go by event time",
                      pipeline=name, status=refusal.status_code, error=str(refusal.error))  # fmt: skip
        return False

    def _put_pipeline(self, name: str) -> None:
        """``PUT _ingest/pipeline/<name>`` with the current body (create or replace: idempotent)."""
        self.client.transport.perform_request("PUT", f"/_ingest/pipeline/{name}",
                                              body=ingest_pipeline_body(self.s.index_prefix))  # fmt: skip
        self._pipeline_5xx, self._pipeline_5xx_since = 0, None

    def _pipeline_gives_up(self) -> bool:
        """Count one more 5xx answer to the pipeline's PUT; whether to go on without the pipeline:
        after :data:`PIPELINE_TRIES` in a row over at least :data:`PIPELINE_PATIENCE_S`."""
        now = time.monotonic()
        if self._pipeline_5xx_since is None:
            self._pipeline_5xx_since = now
        self._pipeline_5xx += 1
        return (self._pipeline_5xx >= self.pipeline_tries
                and now - self._pipeline_5xx_since >= self.pipeline_patience_s)  # fmt: skip

    def _is_missing_pipeline(self, status: int, reason: str) -> bool:
        """Whether a bulk item failed because our ingest pipeline does not exist: the index (or the
        template it is created from) names it as ``index.default_pipeline`` and it was deleted, or the
        cluster restored without it. OpenSearch fails each such item before it reaches a shard, with
        ``IngestService``'s ``IllegalArgumentException``: status 400, ``illegal_argument_exception``,
        ``pipeline with id [<name>] does not exist``. Only ours: a pipeline of someone else's may do
        what must not be skipped (redaction), and is not ours to install."""
        return (status == 400 and reason.startswith("illegal_argument_exception: ")
                and f"pipeline with id [{self._pipeline}] does not exist" in reason)  # fmt: skip

    def _repair_pipeline(self, n: int) -> bool:
        """``n`` documents failed because our ingest pipeline is missing (:meth:`_is_missing_pipeline`):
        whether to re-send them as they are (True: re-installed, or the re-install may still work)
        or past the pipeline (False: ``"pipeline": "_none"`` for :data:`PIPELINE_RECHECK_S`).

        A missing pipeline is the cluster's configuration broken, not the documents bad: dead-lettering
        them (what a 400 otherwise gets) would keep every event out of the cluster until a restart,
        and the dead letters are never re-sent. So the pipeline is re-installed (the set-up's ``PUT``)
        and the documents re-sent after the usual backoff. When it cannot be re-installed (a 403: a
        role without ``cluster_manage_pipelines``; its API failing past :meth:`_pipeline_gives_up`;
        ``--no-opensearch.setup``; or it vanishes again after each re-install), two ways were open:

        * hold the shipper (retry forever): nothing lost, but nothing reaches the cluster either, the
          checkpoint stays put and the files' lag grows until a person acts;
        * dead-letter (what happened before): the cluster gets nothing, the dead-letter file everything.

        Neither is needed: a bulk action naming ``"pipeline": "_none"`` is indexed past the index's
        default pipeline, so the documents are written, only without :data:`INGESTED` (followers fall
        back to event time for them, as for a shipper whose role could not install the pipeline at
        start). That is what the sink does, saying so once per occurrence (a warning, and in
        ``stats.sink_error`` while the documents are re-sent); every :data:`PIPELINE_RECHECK_S` it
        sends normally again and tries the re-install again, so a pipeline an administrator puts
        back is used without a restart. A connection lost during the re-install is retried as a
        write is, forever.
        """
        from opensearchpy.exceptions import ConnectionError as OSConnectionError
        from opensearchpy.exceptions import TransportError

        name = self._pipeline
        first = self._missing_since is None
        if first:
            self._missing_since = time.monotonic()
            self._say("warning", "ingest pipeline missing: every write into the indices naming it fails",
                      pipeline=name, documents=n)  # fmt: skip
        why: str
        if not self.s.setup:
            why = "not re-installed: --no-opensearch.setup"
        elif self._reinstalls >= self.pipeline_tries:
            why = f"re-installed {self._reinstalls} times, missing again each time"
        else:
            try:
                self._put_pipeline(name)
            except OSConnectionError as e:
                self._count_retry(f"ingest pipeline {name} missing; re-installing it: unreachable: {_why(e)}")
                return True
            except TransportError as e:
                if _is_4xx(e):
                    why = f"re-install refused ({e.status_code} {e.error})"
                elif self._pipeline_gives_up():
                    why = f"re-install failed {self._pipeline_5xx} times ({e.status_code} {e.error})"
                else:
                    self._count_retry(f"ingest pipeline {name} missing; re-install failed ({e.status_code} "
                                      f"{e.error}), {n} documents held")  # fmt: skip
                    return True
            else:
                self._reinstalls += 1
                self._say("info", "ingest pipeline re-installed; re-sending the documents it failed",
                          pipeline=name, documents=n)  # fmt: skip
                self._count_retry(f"ingest pipeline {name} was missing: re-installed, {n} documents re-sent")
                return True
        self._bypass_until = time.monotonic() + self.pipeline_recheck_s
        self._count_retry(f"ingest pipeline {name} missing, {why}: {n} documents sent without it")
        if not self._bypass_warned:
            self._bypass_warned = True
            self._say("warning", "ingest pipeline missing and not re-installed: shipping without it (no "
                      "ingested time: followers go by event time); install it or restart with a role "
                      "that may (cluster_manage_pipelines)", pipeline=name, why=why)  # fmt: skip
        return False

    def _try_update_retention(self, policy: str) -> None:
        """:meth:`_update_retention`; a refusal (a role allowed to create a policy but not to read or
        change one, ISM's own 4xx) is a warning and shipping goes on: retention is not worth holding
        the logs back for. A 5xx or a lost connection is retried with the rest of the set-up."""
        from opensearchpy.exceptions import ConnectionError as OSConnectionError
        from opensearchpy.exceptions import TransportError

        try:
            self._update_retention(policy)
        except OSConnectionError:
            raise
        except TransportError as e:
            if _is_4xx(e):
                self._say("warning", "ISM retention not updated", status=e.status_code, error=str(e.error))
            else:
                raise

    def _update_retention(self, policy: str) -> None:
        """Bring an installed ISM policy to this sink's retention, the indices it already manages included.

        A changed ``--opensearch.retention`` would otherwise be ignored for good: the policy exists, so
        the create answers 409. The update is conditional on the version read (``if_seq_no``), and
        ISM runs an index on the policy version it enrolled it with, so the indices under the prefix
        are moved to the new version (``change_policy``); new indices pick it up by its template. With
        several shippers on different retentions, the last one started wins, and says so in its log.
        """
        from opensearchpy.exceptions import TransportError

        url = f"/_plugins/_ism/policies/{policy}"
        current = self.client.transport.perform_request("GET", url)
        body = ism_policy_body(self.s.index_prefix, self.s.retention_s)
        was, want = min_index_age(current.get("policy")), min_index_age(body["policy"])
        if was == want:
            return
        try:
            self.client.transport.perform_request(
                "PUT", url, params={"if_seq_no": current["_seq_no"], "if_primary_term": current["_primary_term"]},
                body=body,
            )  # fmt: skip
        except TransportError as e:
            if e.status_code == 409:  # changed since we read it: another shipper's update won
                return
            raise
        self.client.transport.perform_request(
            "POST", f"/_plugins/_ism/change_policy/{self.s.index_prefix}-*", body={"policy_id": policy}
        )
        self._say("info", "ISM retention updated", policy=policy, was=was, now=want)

    def _say(self, level: str, msg: str, **kw: Any) -> None:
        say(self.log, level, msg, **kw)

    def send(self, events: Events, stop: threading.Event) -> int:
        """Returns ``len(events)``: a first write (201) and a repeat (409) both count as held, untold apart."""
        if isinstance(events, ParsedEvents):
            events = events.dicts()
        if not self._set_up:
            self._setup(stop)
        bypass = time.monotonic() < self._bypass_until  # past a missing pipeline (see _repair_pipeline)
        lines = bulk_lines(events, self.s.index_prefix, pipeline=NO_PIPELINE if bypass else None)
        pending = [(a, b) for a, b in chunk_by_bytes(lines, self.s.max_body_bytes)]
        dead: list[tuple[Mapping[str, Any], str, int]] = []
        delay = backoff_delays(cap=self.s.backoff_max_s)
        written = missing_seen = False  # a document written normally; one failed for want of the pipeline
        while pending:
            a, b = pending.pop(0)
            idx = list(range(a, b))
            outcome = self._post([lines[i] for i in idx], stop)
            if outcome is TOO_LARGE:
                if len(idx) == 1:
                    dead.append((events[idx[0]], "request entity too large (413) for a single document", 413))
                else:
                    mid = (a + b) // 2
                    pending[:0] = [(a, mid), (mid, b)]
                continue
            if not isinstance(outcome, list):  # whole request failed (connection, timeout, 5xx, 429): retry it
                self._count_retry(outcome.why)
                pending.insert(0, (a, b))
                if stop.wait(delay()):
                    raise Stop() from None
                continue
            retry: list[int] = []
            missing: list[int] = []
            for i, item in zip(idx, outcome):
                status, reason = item
                if status in (200, 201, 409):
                    written = True
                    continue
                if status == 429 or status >= 500:
                    retry.append(i)
                elif self._is_missing_pipeline(status, reason):
                    missing.append(i)
                else:
                    dead.append((events[i], reason, status))
            if missing:
                missing_seen = True
                if not self._repair_pipeline(len(missing)) and not bypass:
                    bypass = True
                    lines = bulk_lines(events, self.s.index_prefix, pipeline=NO_PIPELINE)
                retry = sorted(retry + missing)
            elif retry:
                status, reason = outcome[retry[0] - a]
                self._count_retry(f"{len(retry)} of {len(idx)} documents refused for now ({status} {reason})")
            if retry:
                # retry only the failed items, as their own requests (they are contiguous enough)
                pending[:0] = [(i, i + 1) for i in retry] if len(retry) < 8 else _runs(retry)
                if stop.wait(delay()):
                    raise Stop() from None
            else:
                delay = backoff_delays(cap=self.s.backoff_max_s)
        if dead:
            self._dead_letter(dead)
        if self._missing_since is not None and written and not bypass and not missing_seen:
            self._say("info", "ingest pipeline working again", pipeline=self._pipeline,
                      missing_for_s=round(time.monotonic() - self._missing_since, 1))  # fmt: skip
            self._missing_since, self._reinstalls, self._bypass_warned = None, 0, False
        if self.stats is not None:
            self.stats.sink_error = None
        return len(events)

    def _post(self, chunk: list[bytes], stop: threading.Event) -> list[tuple[int, str]] | _Failed:
        """Per-item ``(status, reason)``, or why the whole request failed (:data:`TOO_LARGE` for 413)."""
        from opensearchpy.exceptions import ConnectionError as OSConnectionError
        from opensearchpy.exceptions import TransportError

        body = b"".join(chunk)
        try:
            resp = self.client.bulk(body=body)
        except OSConnectionError as e:  # includes timeouts: the write may or may not have been applied
            self._say("warning", "OpenSearch unreachable; retrying", error=_why(e))
            return _Failed(f"unreachable: {_why(e)}")
        except TransportError as e:
            if e.status_code == 413:
                return TOO_LARGE
            self._say("warning", "bulk request failed; retrying", status=e.status_code, error=_why(e))
            return _Failed(f"bulk request failed ({e.status_code}): {_why(e)}")
        FAULTS.hit("sent")
        items = resp.get("items") or []
        if len(items) != len(chunk):
            self._say("warning", "bulk response does not match the request; retrying", items=len(items))
            return _Failed(f"bulk response has {len(items)} items for {len(chunk)} documents")
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


def _sets_ingested(pipeline: Any) -> bool:
    """Whether an installed pipeline (``GET _ingest/pipeline/<name>``'s value) sets :data:`INGESTED`
    to the ingest timestamp."""
    for proc in (pipeline or {}).get("processors") or ():
        spec = proc.get("set") if isinstance(proc, Mapping) else None
        if not isinstance(spec, Mapping) or spec.get("field") != INGESTED:
            continue
        if "_ingest.timestamp" in str(spec.get("value")):
            return True
    return False


def _is_4xx(e: Any) -> bool:
    """Whether a ``TransportError`` is the cluster's answer that the request is refused (not a 5xx,
    not opensearch-py's ``N/A`` status for a request that got no answer)."""
    return isinstance(e.status_code, int) and 400 <= e.status_code < 500


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


# --- the read side ------------------------------------------------------------------------------------

SORT: list[dict[str, Any]] = [
    {"@timestamp": {"order": "asc"}},
    {"source": {"order": "asc"}},
    {"offset": {"order": "asc"}},
    {"event_id": {"order": "asc", "unmapped_type": "keyword"}},
]
"""The timeline's order, (``@timestamp``, ``source``, ``offset``), made total by ``event_id``: with a
sort key unique per document, ``search_after`` neither skips nor repeats an event between pages."""
SORT_DESC: list[dict[str, Any]] = [{k: {**v, "order": "desc"}} for d in SORT for k, v in d.items()]
ADDED_FIELDS = ("event_id", "step", INGESTED)
"""What :func:`document` and the ingest pipeline add to an event; a read takes them off again."""
ERROR_LEVELS = ("error", "critical")
PROGRESS_LEVELS = ("debug", "info")


def _escape_wildcard(text: str) -> str:
    return "".join("\\" + c if c in "\\*?" else c for c in text)


def query_body(q: EventQuery) -> dict[str, Any]:
    """The ``bool`` ``filter`` selecting what :meth:`EventQuery.matches` selects (``limit`` aside).

    The text filter is a case-insensitive ``wildcard`` on ``message.raw``, or-ed with "has no
    ``message.raw``" (a message longer than :data:`MESSAGE_KEYWORD_CHARS`), which the reader then
    checks itself: what comes back is a superset, :meth:`EventQuery.matches` the exact answer.
    """
    f: list[dict[str, Any]] = []
    if q.job is not None:
        f.append({"term": {"job": q.job}})
    if q.ranks:
        f.append({"terms": {"rank": list(q.ranks)}})
    if q.node is not None:
        f.append({"term": {"node": q.node}})
    if q.kind is not None:
        f.append({"term": {"kind": q.kind}})
    if q.since is not None or q.until is not None:
        rng: dict[str, Any] = {}
        if q.since is not None:
            rng["gte"] = q.since
        if q.until is not None:
            rng["lt"] = q.until
        f.append({"range": {"@timestamp": rng}})
    if q.levels is not None:
        f.append({"terms": {"level": sorted(q.levels)}})
    if q.text:
        pattern = f"*{_escape_wildcard(q.text)}*"
        f.append({"bool": {"should": [
            {"wildcard": {"message.raw": {"value": pattern, "case_insensitive": True}}},
            {"bool": {"must_not": [{"exists": {"field": "message.raw"}}]}},
        ], "minimum_should_match": 1}})  # fmt: skip
    return {"bool": {"filter": f}} if f else {"match_all": {}}


def event_of(hit: Mapping[str, Any]) -> dict[str, Any]:
    """A search hit as an event of the schema: ``_id`` from the hit, the fields the sink added gone."""
    src = hit.get("_source") or {}
    ev = {"_id": hit.get("_id")}
    ev.update((k, v) for k, v in src.items() if k not in ADDED_FIELDS)
    return ev


class OpenSearchSource:
    """OpenSearch as a :class:`~mlops_obs.logs.source.Source` over the ``<prefix>-*`` indices.

    * :meth:`events`: pages of ``page_size`` sorted by :data:`SORT`; beyond the first, through a point
      in time (``POST /<prefix>-*/_search/point_in_time``), each page ``search_after`` the last one's
      sort values, the point in time deleted at the end (or when the caller stops early). Only one
      page is held (:meth:`search`).
    * :meth:`follow`: :meth:`events`, then every ``poll_interval`` what was stored since, by the
      cluster's time of ingest (:data:`INGESTED`), whatever the events' own times; documents stored
      before the ingest pipeline existed by the old rule of event time (see there).
    * :meth:`rank_facts`: one aggregation request, whatever the job's size.

    Only searches: a reader needs read permissions on the indices, nothing on the cluster.
    """

    def __init__(
        self,
        settings: OpenSearchSettings,
        *,
        page_size: int = 1000,
        keep_alive: str = "2m",
        lookback_s: float = 120.0,
        ingest_margin_s: float = 10.0,
    ) -> None:
        self.client = make_client(settings)
        self.index = f"{settings.index_prefix}-*"
        self.page_size = page_size
        self.keep_alive = keep_alive
        self.lookback_s = lookback_s
        self.ingest_margin_s = ingest_margin_s
        self.requests = 0  # searches, aggregations and point-in-time calls made (for the benchmarks)
        self.bytes_out = 0  # request bodies, as JSON
        self.bytes_in = 0  # response bodies, as JSON

    def _call(self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None) -> Any:
        from opensearchpy.exceptions import NotFoundError

        self.requests += 1
        self.bytes_out += len(orjson.dumps(body)) if body is not None else 0
        try:
            resp = self.client.transport.perform_request(method, path, body=body, params=dict(params or {}))
        except NotFoundError:
            return None
        self.bytes_in += len(orjson.dumps(resp)) if resp is not None else 0
        return resp

    # --- paging -----------------------------------------------------------------------------------------

    def search(
        self, query: Mapping[str, Any], *, limit: int | None = None, sort: list[dict[str, Any]] | None = None
    ) -> Iterator[dict[str, Any]]:
        """The hits of ``query`` in ``sort`` order (default :data:`SORT`), up to ``limit``.

        The first page is a plain search; only when it comes back full is a point in time opened and
        the rest read through it, each page ``search_after`` the previous one's last sort values
        (unique, so nothing is skipped or repeated). Most of rca's questions fit one page: one
        request instead of three. What is stored between the first page and the point in time
        counts as stored after the read began, as anything stored during a read does.
        """
        sort = sort or SORT
        size = self.page_size if limit is None else min(self.page_size, limit)
        if size <= 0:
            return
        body: dict[str, Any] = {"size": size, "query": query, "sort": sort, "track_total_hits": False}
        hits = self._hits(self._call("POST", f"/{self.index}/_search", body=body))
        yield from hits
        n = len(hits)
        if len(hits) < size or (limit is not None and n >= limit):
            return
        created = self._call("POST", f"/{self.index}/_search/point_in_time", params={"keep_alive": self.keep_alive})
        if not created or not created.get("pit_id"):
            return  # the indices went away meanwhile (retention): nothing more to read
        pit = created["pit_id"]
        try:
            after = hits[-1]["sort"]
            while limit is None or n < limit:
                size = self.page_size if limit is None else min(self.page_size, limit - n)
                body = {
                    "size": size,
                    "query": query,
                    "sort": sort,
                    "pit": {"id": pit, "keep_alive": self.keep_alive},
                    "track_total_hits": False,
                    "search_after": after,
                }
                resp = self._call("POST", "/_search", body=body) or {}
                pit = resp.get("pit_id") or pit
                hits = self._hits(resp)
                yield from hits
                n += len(hits)
                if len(hits) < size:
                    return
                after = hits[-1]["sort"]
        finally:
            try:
                self._call("DELETE", "/_search/point_in_time", body={"pit_id": [pit]})
            except Exception:
                pass  # it expires after keep_alive anyway

    @staticmethod
    def _hits(resp: Any) -> list[dict[str, Any]]:
        return list(((resp or {}).get("hits") or {}).get("hits") or [])

    def events(self, query: EventQuery) -> Iterator[dict[str, Any]]:
        for ev, _ in self._read(query):
            yield ev

    def _read(
        self, query: EventQuery, also: Mapping[str, Any] | None = None, sort: list[dict[str, Any]] | None = None
    ) -> Iterator[tuple[dict[str, Any], int | None]]:
        """The events of ``query`` (and of the filter ``also``), each with its :data:`INGESTED` time
        in nanoseconds (None for a document stored without it)."""
        want = query.limit
        if want == 0:
            return
        n = 0
        body = query_body(query)
        if also is not None:
            body = {"bool": {"filter": [body, also]}}
        # The server's answer is exact but for over-long messages under a text filter (see query_body):
        # page on, checking each, until the limit is reached.
        for h in self.search(body, limit=None if query.text else want, sort=sort):
            ev = event_of(h)
            if query.text and not query.matches(ev):
                continue
            yield ev, ingest_time_ns((h.get("_source") or {}).get(INGESTED))
            n += 1
            if want is not None and n >= want:
                return

    def follow(self, query: EventQuery, stop: threading.Event, poll_interval: float = 0.25) -> Iterator[dict[str, Any]]:
        """:meth:`events`, then every ``poll_interval`` what was stored since, like the store's follow.

        "Stored since" is read from :data:`INGESTED`, the time the cluster took each document in
        (one clock for every shipper, so neither a shipper that lagged or was down for minutes nor a
        node whose clock is off hides an event): each poll asks for the documents ingested at most
        ``ingest_margin_s`` before the newest ingest time seen, skipping the ids already yielded in
        that margin. The margin is there because documents do not become searchable in the order
        they were stamped (a bulk is stamped before it is indexed, each shard refreshes on its own,
        ingest nodes' clocks differ by milliseconds): one that becomes searchable more than the
        margin after a later-stamped one was seen would be missed. Each poll's events come in the
        timeline's order (:data:`SORT`).

        The fallback, for documents without :data:`INGESTED` (indices created before the pipeline
        was installed, by a sink whose role may not install it, see :meth:`OpenSearchSink._install_pipeline`,
        or written past a pipeline that went missing, see :meth:`OpenSearchSink._repair_pipeline`):
        the old rule, documents whose own ``@timestamp`` is within ``lookback_s`` of the newest time
        seen. Such a document whose time is more than ``lookback_s`` older than the newest event is
        stored but not shown to a follower (a later ``replay`` shows it): a node's logs shipped late
        into an index made before the upgrade, until that index ages out.
        """
        margin_ns = int(self.ingest_margin_s * 1e9)
        ingested = _Seen(lambda newest: newest - margin_ns)  # ids by ingest time, within the margin of the newest
        legacy = _Seen(lambda newest: _shift(newest, -self.lookback_s))  # ids without one, by @timestamp
        newest_ts: str | None = None  # the newest @timestamp seen, of any document

        def note(ev: Mapping[str, Any], t: int | None) -> None:
            nonlocal newest_ts
            ts = str(ev.get("@timestamp"))
            if newest_ts is None or ts > newest_ts:
                newest_ts = ts
            if t is not None:
                ingested.add(str(ev.get("_id")), t)
            else:
                legacy.add(str(ev.get("_id")), ts)

        def window() -> dict[str, Any]:
            """What the next poll reads: stored within the margin of the newest seen, or without an
            ingest time and within the look-back of the newest event time."""
            since_stored: dict[str, Any] = {"exists": {"field": INGESTED}}
            if ingested.newest is not None:
                since_stored = {"range": {INGESTED: {"gte": _format_ms(ingested.newest - margin_ns)}}}
            old: list[dict[str, Any]] = []
            if newest_ts is not None:
                old.append({"range": {"@timestamp": {"gte": _shift(newest_ts, -self.lookback_s)}}})
            no_ingest = {"bool": {"must_not": [{"exists": {"field": INGESTED}}], "filter": old}}
            return {"bool": {"should": [since_stored, no_ingest], "minimum_should_match": 1}}

        if query.limit is not None:
            # A limited read shows only part of what is stored now, and the rest is not new: take the
            # newest ingest time and event time stored, then what a poll would read from there as
            # seen, so following starts after what is stored now.
            whole = dataclasses.replace(query, limit=None)
            by_ingest = [{INGESTED: {"order": "desc", "unmapped_type": "date"}}, *SORT_DESC]
            for _, t in self._read(dataclasses.replace(query, limit=1), {"exists": {"field": INGESTED}}, by_ingest):
                ingested.newest = t
            for ev, _ in self._read(dataclasses.replace(query, limit=1), sort=SORT_DESC):
                newest_ts = str(ev.get("@timestamp"))
            if ingested.newest is not None or newest_ts is not None:
                for ev, t in self._read(whole, window()):
                    note(ev, t)
        for ev, t in self._read(query):
            note(ev, t)
            yield ev
        while not stop.wait(poll_interval):
            ingested.evict()
            if newest_ts is not None:  # the look-back is from the newest event of either kind
                legacy.evict(_shift(newest_ts, -self.lookback_s))
            for ev, t in self._read(dataclasses.replace(query, limit=None), window()):
                eid = str(ev.get("_id"))
                if eid in ingested.ids or eid in legacy.ids:
                    continue
                note(ev, t)
                yield ev
                if stop.is_set():
                    return

    # --- aggregations -----------------------------------------------------------------------------------

    def rank_facts(self, job: str, *, since: str | None = None, until: str | None = None) -> list[RankFacts]:
        """One ``size: 0`` search: a ``terms`` aggregation on ``rank`` (and a ``filter`` for events
        without one), each bucket with its ``nodes`` (``terms``), its first and last event (``top_hits``
        sorted both ways: exact times, where ``min``/``max`` of a ``date_nanos`` round through a
        double), its first error and its last event with a ``step`` (``top_hits`` under a ``filter``)."""
        q = EventQuery(job=job, kind="log", since=since, until=until)
        ts_only = {"includes": ["@timestamp"]}
        per_rank = {
            "nodes": {"terms": {"field": "node", "size": 64}},
            "first": {"top_hits": {"size": 1, "sort": SORT, "_source": ts_only}},
            "last": {"top_hits": {"size": 1, "sort": SORT_DESC, "_source": ts_only}},
            "errors": {"filter": {"terms": {"level": list(ERROR_LEVELS)}},
                       "aggs": {"first": {"top_hits": {"size": 1, "sort": SORT}}}},
            "steps": {"filter": {"exists": {"field": "step"}},
                      "aggs": {"last": {"top_hits": {"size": 1, "sort": SORT_DESC,
                                                     "_source": {"includes": ["@timestamp", "step"]}}}}},
        }  # fmt: skip
        body = {
            "size": 0,
            "track_total_hits": False,
            "query": query_body(q),
            "aggs": {
                "ranks": {"terms": {"field": "rank", "size": MAX_RANKS, "order": {"_key": "asc"}}, "aggs": per_rank},
                "no_rank": {"filter": {"bool": {"must_not": [{"exists": {"field": "rank"}}]}}, "aggs": per_rank},
            },
        }
        resp = self._call("POST", f"/{self.index}/_search", body=body)
        if not resp:
            return []
        aggs = resp.get("aggregations") or {}
        out = [_rank_facts(job, b.get("key"), b) for b in (aggs.get("ranks") or {}).get("buckets") or []]
        none = aggs.get("no_rank") or {}
        if none.get("doc_count"):
            out.append(_rank_facts(job, None, none))
        return out

    def recent_steps(
        self, job: str, n: int, *, since: str | None = None, until: str | None = None
    ) -> dict[int, list[dict[str, Any]]]:
        """Per rank, its last ``n`` progress events (a log event at ``debug``/``info`` or no level
        with a ``step``), newest first: one aggregation (``terms`` on ``rank``, ``top_hits``)."""
        q = query_body(EventQuery(job=job, kind="log", since=since, until=until))
        progress = {"bool": {"filter": [{"exists": {"field": "step"}}], "should": [
            {"terms": {"level": list(PROGRESS_LEVELS)}},
            {"bool": {"must_not": [{"exists": {"field": "level"}}]}},
        ], "minimum_should_match": 1}}  # fmt: skip
        body = {
            "size": 0,
            "track_total_hits": False,
            "query": {"bool": {"filter": [q, progress]}},
            "aggs": {"ranks": {"terms": {"field": "rank", "size": MAX_RANKS},
                               "aggs": {"recent": {"top_hits": {"size": n, "sort": SORT_DESC}}}}},
        }  # fmt: skip
        resp = self._call("POST", f"/{self.index}/_search", body=body)
        out: dict[int, list[dict[str, Any]]] = {}
        for b in (((resp or {}).get("aggregations") or {}).get("ranks") or {}).get("buckets") or []:
            out[int(b["key"])] = [event_of(h) for h in b["recent"]["hits"]["hits"]]
        return out

    def after(
        self, job: str, starts: Mapping[int, str | None], *, until: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The log events of each rank of ``starts`` from its start time (all of them for None): a
        paged search with a ``bool`` ``should`` of one clause per rank, :data:`MAX_CLAUSES` ranks a
        search (under ``indices.query.bool.max_clause_count``, 1024 by default). Each rank's events
        come in order; the ranks of different searches are not merged."""
        q = query_body(EventQuery(job=job, kind="log", until=until))
        ranks = sorted(starts.items())
        for i in range(0, len(ranks), MAX_CLAUSES):
            clauses: list[dict[str, Any]] = []
            for rank, start in ranks[i : i + MAX_CLAUSES]:
                c: list[dict[str, Any]] = [{"term": {"rank": rank}}]
                if start is not None:
                    c.append({"range": {"@timestamp": {"gte": start}}})
                clauses.append({"bool": {"filter": c}})
            body = {"bool": {"filter": [q], "should": clauses, "minimum_should_match": 1}}
            for h in self.search(body):
                yield event_of(h)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


MAX_RANKS = 10000
MAX_CLAUSES = 512
"""Most ranks one aggregation returns buckets for (under OpenSearch's default ``search.max_buckets``)."""


def _top(agg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    hits = ((agg or {}).get("hits") or {}).get("hits") or []
    return event_of(hits[0]) if hits else None


def _rank_facts(job: str, rank: Any, b: Mapping[str, Any]) -> RankFacts:
    first, last = _top(b.get("first")), _top(b.get("last"))
    err = _top((b.get("errors") or {}).get("first"))
    steps = (((b.get("steps") or {}).get("last") or {}).get("hits") or {}).get("hits") or []
    step = steps[0].get("_source") or {} if steps else None
    step_value = (step or {}).get("step")
    return RankFacts(
        job=job,
        rank=int(rank) if rank is not None else None,
        nodes=tuple(sorted(str(n["key"]) for n in (b.get("nodes") or {}).get("buckets") or [])),
        events=int(b.get("doc_count") or 0),
        first_time=str((first or {}).get("@timestamp")),
        last_time=str((last or {}).get("@timestamp")),
        first_error=err,
        last_step=int(step_value) if type(step_value) is int else None,
        last_step_time=str(step.get("@timestamp")) if step else None,
    )


class _Seen:
    """The ids a follower yielded whose key (an ingest time, an event time) is within its window of
    the newest key seen: what the next poll will read again and must skip. Old ids are dropped as the
    window moves, so what is held stays the size of the window, also over a long backlog."""

    def __init__(self, floor: Callable[[Any], Any]) -> None:
        self.floor = floor  # the window's low end for a newest key
        self.ids: dict[str, Any] = {}
        self.newest: Any = None
        self._size_at_evict = 1024

    def add(self, eid: str, key: Any) -> None:
        self.ids[eid] = key
        if self.newest is None or key > self.newest:
            self.newest = key
        if len(self.ids) >= 2 * self._size_at_evict:  # amortised: each id is looked at O(1) times
            self.evict()
            self._size_at_evict = max(1024, len(self.ids))

    def evict(self, low: Any = None) -> None:
        """Drop the ids whose key is below ``low`` (default: the window's floor of the newest key)."""
        if self.newest is None:
            return
        low = self.floor(self.newest) if low is None else low
        for eid in [k for k, v in self.ids.items() if v < low]:
            del self.ids[eid]


_INSTANT = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d)(?::(\d\d)(?:[.,](\d{1,9}))?)?(Z|[+-]\d\d:?\d\d)?(?:\[[^\]]*\])?"
)


def ingest_time_ns(value: Any) -> int | None:
    """An :data:`INGESTED` value in nanoseconds since the epoch, or None (absent, or not a time).

    The pipeline writes Java's ``ZonedDateTime.toString()`` of the ingest timestamp: the seconds and
    the fraction only when not zero, the fraction in 3, 6 or 9 digits (``2026-03-04T10:00Z``,
    ``2026-03-04T10:00:01.123456Z``); any other count of digits is read too, and a number is epoch
    milliseconds (a pipeline of one's own).
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value * 1_000_000)
    if not isinstance(value, str):
        return None
    m = _INSTANT.fullmatch(value.strip())
    if m is None:
        return None
    y, mo, d, h, mi, sec, frac, zone = m.groups()
    try:
        t = _dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec or 0), tzinfo=_dt.UTC)
    except ValueError:
        return None
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        hh, mm = int(zone[1:3]), int(zone[-2:])
        t -= sign * _dt.timedelta(hours=hh, minutes=mm)
    whole = (t - _EPOCH) // _dt.timedelta(seconds=1)
    return whole * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


def _format_ms(ns: int) -> str:
    """Nanoseconds since the epoch as a time a ``date`` field parses, floored to the millisecond."""
    t = _EPOCH + _dt.timedelta(milliseconds=ns // 1_000_000)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _shift(ts: str, seconds: float) -> str:
    t = _dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.UTC)
    return format_timestamp(t + _dt.timedelta(seconds=seconds))
