"""A local HTTP endpoint speaking the OpenSearch subset the sink uses, with injectable faults.

Real sockets, real HTTP (opensearch-py cannot tell it from a cluster for these calls):
``/_bulk`` (``create`` with ``_id``, per-item statuses, 409 on a repeated ``_id`` within an index),
``/_index_template/*`` (rejecting a field type OpenSearch does not have, such as Elasticsearch's
``flattened``), ``/_plugins/_ism/policies/*``, ingest pipelines, and the read side as OpenSearch
documents it:

* ``GET /_index_template/<name>``; clean-up: ``DELETE /<index pattern>``, ``DELETE /_index_template/<name>``,
  ``DELETE /_plugins/_ism/policies/<id>`` (what the opt-in real-cluster tests clean up with, so they run
  against this endpoint too);
* ingest pipelines: ``PUT``/``GET``/``DELETE /_ingest/pipeline/<id>`` (``processors`` required; only
  the ``set`` processor, with ``field``, ``value``, ``override``, its value a mustache template of
  ``_ingest.timestamp`` or of a document field); an index takes its settings from the matching
  template with the highest priority *when it is created* (by its first document), and runs its
  ``index.default_pipeline`` on every document written into it then, unless the bulk action names a
  ``pipeline`` of its own (``_none``: none), a pipeline that does not exist failing the item as
  OpenSearch's ``IngestService`` does (400 ``illegal_argument_exception``, ``pipeline with id [<id>]
  does not exist``; the index is not created). ``_ingest.timestamp`` is the fake's :attr:`FakeOpenSearch.clock`, per
  document, rendered as OpenSearch renders it: Java's ``ZonedDateTime.toString()`` in UTC (seconds and
  fraction only when not zero);
* refresh: with :attr:`FakeOpenSearch.hold_refresh` set, documents written are stored (a repeated
  ``_id`` is still a 409) but not searchable until :meth:`FakeOpenSearch.refresh` (or
  ``POST /<index>/_refresh``), as between two refreshes of a real index;

* point in time: ``POST /<index>/_search/point_in_time?keep_alive=`` freezes the matching indices'
  documents (later writes are not seen through it), ``DELETE /_search/point_in_time`` with
  ``{"pit_id": [...]}``; a search naming an unknown or deleted one is a 404;
* ``_search`` with ``query`` (``match_all``, ``bool`` with ``filter``/``must``/``should``/
  ``must_not``/``minimum_should_match``, ``term``, ``terms``, ``range``, ``exists``, ``wildcard``
  with ``case_insensitive``), ``sort`` (``asc``/``desc``, missing values last, ``unmapped_type``),
  ``search_after``, ``size``, ``_source`` includes, and ``aggs`` (``terms`` with ``size`` and
  ``order``, ``filter``, ``top_hits``), each hit carrying its ``sort`` values (a ``date_nanos`` as
  nanoseconds since the epoch, a ``date`` as milliseconds, as OpenSearch returns them).

Fields are resolved through the installed template's mappings: an unmapped field (the template
says ``dynamic: false``) matches no query, a keyword sub-field skips values over ``ignore_above``.

Faults, injected from the test:
* ``item_faults``: statuses consumed one per bulk item (``429``, ``500``, ``503``, ``400``, or ``409``:
  stored and answered 409, as when an earlier attempt was applied);
* ``request_faults``: consumed one per ``_bulk`` request: ``"reset"`` (connection closed, no answer),
  ``"timeout"`` (the write is applied, the answer comes after the client gave up), ``503``, ``429``;
* ``max_body_bytes``: larger bodies get 413;
* ``refuse_pipelines``: a role without ``cluster_manage_pipelines`` (403 on ``PUT _ingest/pipeline``);
* ``pipeline_faults``: statuses consumed one per ``PUT _ingest/pipeline`` (``500``: the
  ``illegal_state_exception`` OpenSearch answers when no node reports ingest info; ``503``: a
  cluster-manager task that timed out), the pipeline not stored;
* :meth:`stop` / :meth:`start` on the same port: an outage.
"""

from __future__ import annotations

import base64
import collections
import copy
import datetime as dt
import fnmatch
import itertools
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenSearch:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.indices: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
        self.templates: dict[str, Any] = {}
        self.policies: dict[str, Any] = {}
        self.policy_seq_no: dict[str, int] = {}
        self.change_policy_calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse_policy_changes = False  # a role that may create a policy but not update one (403)
        self.pipelines: dict[str, Any] = {}
        self.refuse_pipelines = False  # a role without cluster_manage_pipelines (403)
        self.pipeline_faults: collections.deque[int] = collections.deque()  # one per PUT _ingest/pipeline
        self.pipeline_puts = 0
        self.index_settings: dict[str, dict[str, Any]] = {}  # fixed when each index is created
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)  # _ingest.timestamp
        self.hold_refresh = False
        self.unrefreshed: set[tuple[str, str]] = set()  # stored, not yet searchable
        self.item_faults: collections.deque[int] = collections.deque()
        self.request_faults: collections.deque[Any] = collections.deque()
        self.max_body_bytes: int | None = None
        self.timeout_sleep = 3.0
        self.bulk_requests = 0
        self.statuses: collections.Counter[int] = collections.Counter()
        self.pits: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
        self.pit_requests = 0
        self.searches = 0
        self._pit_ids = itertools.count(1)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeOpenSearch:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _answer(self, status: int, obj: Any) -> None:
                self._send(status, obj)

            def do_DELETE(self) -> None:
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/_search/point_in_time":
                    self._answer(*fake.delete_pit(json.loads(body or b"{}")))
                elif path.startswith("/_ingest/pipeline/"):
                    self._send(*fake.delete_pipeline(path.rsplit("/", 1)[1]))
                elif path.startswith(("/_index_template/", "/_plugins/_ism/policies/")):
                    self._send(*fake.delete_setup(path))
                elif path.count("/") == 1 and not path.startswith("/_"):
                    self._send(*fake.delete_indices(path[1:]))
                else:
                    self._send(404, {"error": {"type": "not_found", "reason": path}, "status": 404})

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                body = self._body()
                path = self.path.split("?")[0]
                if path.endswith("/_search"):
                    self._answer(*fake.search(path, body))
                elif path == "/":
                    self._send(200, {"version": {"number": "2.11.0", "distribution": "opensearch"}})
                elif path.startswith("/_ingest/pipeline/"):
                    name = path.rsplit("/", 1)[1]
                    with fake.lock:
                        found = copy.deepcopy(fake.pipelines.get(name))
                    if found is None:
                        self._send(404, {})  # OpenSearch answers an unknown pipeline with an empty object
                    else:
                        self._send(200, {name: found})
                elif path.startswith("/_index_template/"):
                    name = path.rsplit("/", 1)[1]
                    with fake.lock:
                        tpl = copy.deepcopy(fake.templates.get(name))
                    if tpl is None:
                        self._send(404, _error(404, "resource_not_found_exception",
                                               f"index template matching [{name}] not found"))  # fmt: skip
                    else:
                        self._send(200, {"index_templates": [{"name": name, "index_template": tpl}]})
                elif path.startswith("/_plugins/_ism/policies/") and path.rsplit("/", 1)[1] in fake.policies:
                    name = path.rsplit("/", 1)[1]
                    with fake.lock:
                        seq, policy = fake.policy_seq_no[name], fake.policies[name]["policy"]
                    self._send(200, {"_id": name, "_version": seq + 1, "_seq_no": seq, "_primary_term": 1,
                                     "policy": {"policy_id": name, **policy}})  # fmt: skip
                else:
                    self._send(404, {"error": {"type": "not_found", "reason": path}, "status": 404})

            def do_PUT(self) -> None:
                body = self._body()
                path = self.path.split("?")[0]
                with fake.lock:
                    if path.startswith("/_index_template/"):
                        tpl = json.loads(body)
                        bad = _unknown_types(tpl.get("template", {}).get("mappings", {}))
                        if bad:
                            self._send(400, {"error": {"type": "mapper_parsing_exception",
                                                       "reason": f"No handler for type [{bad}] declared on field"},
                                             "status": 400})  # fmt: skip
                        else:
                            fake.templates[path.rsplit("/", 1)[1]] = tpl
                            self._send(200, {"acknowledged": True})
                    elif path.startswith("/_ingest/pipeline/"):
                        self._send(*fake.put_pipeline(path.rsplit("/", 1)[1], json.loads(body or b"{}")))
                    elif path.startswith("/_plugins/_ism/policies/"):
                        name = path.rsplit("/", 1)[1]
                        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                        if_seq = query.get("if_seq_no", [None])[0]
                        if if_seq is not None and fake.refuse_policy_changes:
                            self._send(403, {"error": {"type": "security_exception",
                                                       "reason": "no permissions"}, "status": 403})  # fmt: skip
                        elif name in fake.policies and (if_seq is None or int(if_seq) != fake.policy_seq_no[name]):
                            self._send(409, {"error": {"type": "version_conflict_engine_exception",
                                                       "reason": "policy exists"}, "status": 409})  # fmt: skip
                        else:
                            fake.policies[name] = json.loads(body)
                            fake.policy_seq_no[name] = fake.policy_seq_no.get(name, -1) + 1
                            self._send(201 if if_seq is None else 200, {"_id": name})
                    else:
                        self._send(404, {"error": {"type": "not_found", "reason": path}, "status": 404})

            def do_POST(self) -> None:
                path = self.path.split("?")[0]
                body = self._body()
                if path.endswith("/_search"):
                    self._answer(*fake.search(path, body))
                    return
                if path.startswith("/_plugins/_ism/change_policy/"):
                    with fake.lock:
                        fake.change_policy_calls.append((path.rsplit("/", 1)[1], json.loads(body)))
                    self._send(200, {"updated_indices": 1, "failures": False, "failed_indices": []})
                    return
                if path.endswith("/_refresh"):
                    fake.refresh()
                    self._send(200, {"_shards": {"total": 1, "successful": 1, "failed": 0}})
                    return
                if path.endswith("/_search/point_in_time"):
                    self._answer(*fake.create_pit(path[: -len("/_search/point_in_time")].strip("/")))
                    return
                if not path.endswith("/_bulk"):
                    self._send(404, {"error": {"type": "not_found", "reason": path}, "status": 404})
                    return
                with fake.lock:
                    fake.bulk_requests += 1
                    fault = fake.request_faults.popleft() if fake.request_faults else None
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(fault, int):
                    self._send(fault, {"error": {"type": "injected", "reason": f"injected {fault}"}, "status": fault})
                    return
                if fake.max_body_bytes is not None and len(body) > fake.max_body_bytes:
                    self._send(413, {"error": "Request Entity Too Large"})
                    return
                result = fake.bulk(body)
                if fault == "timeout":
                    time.sleep(fake.timeout_sleep)
                try:
                    self._send(200, result)
                except OSError:
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- behaviour ---

    def bulk(self, body: bytes) -> dict[str, Any]:
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        items = []
        errors = False
        with self.lock:
            for i in range(0, len(lines), 2):
                action = json.loads(lines[i])
                op, meta = next(iter(action.items()))
                doc = json.loads(lines[i + 1])
                index, _id = meta["_index"], meta["_id"]
                fault = self.item_faults.popleft() if self.item_faults else None
                if op != "create":
                    status, err = 400, {"type": "illegal_argument_exception", "reason": f"op {op} not supported"}
                elif fault == 409 or (fault is None and _id in self.indices[index]):
                    self.indices[index].setdefault(_id, doc)
                    status, err = 409, {"type": "version_conflict_engine_exception", "reason": "document exists"}
                elif fault is not None:
                    status = fault
                    kind = {429: "es_rejected_execution_exception", 400: "mapper_parsing_exception"}.get(
                        fault, "internal_server_error"
                    )
                    err = {"type": kind, "reason": f"injected {fault}"}
                else:
                    status, err = self._ingest(index, doc, meta.get("pipeline"))
                    if err is None:
                        self.indices[index][_id] = doc
                        if self.hold_refresh:
                            self.unrefreshed.add((index, _id))
                self.statuses[status] += 1
                res: dict[str, Any] = {"_index": index, "_id": _id, "status": status}
                if err:
                    res["error"] = err
                    errors = errors or status != 409
                items.append({op: res})
        return {"took": 1, "errors": errors, "items": items}

    def _ingest(self, index: str, doc: dict[str, Any], requested: str | None) -> tuple[int, dict[str, Any] | None]:
        """Run the pipeline on ``doc`` (the action's own ``pipeline``, else the index's default: the
        existing index's setting, or for a new one the template's that matches it), then create the
        index if it is new: (201, None), or the item's error.

        As OpenSearch (``IngestService.resolvePipelines``, ``executePipelines``): a pipeline named in
        the request overrides the default, ``_none`` is no pipeline, and one that does not exist fails
        the item before it reaches a shard (so a new index is not created by it).
        """
        settings = self.index_settings.get(index)
        if settings is None:
            settings = self._template_settings(index)
        name = requested if requested is not None else settings.get("index.default_pipeline")
        if name is not None and name != "_none":
            pipeline = self.pipelines.get(name)
            if pipeline is None:
                why = f"pipeline with id [{name}] does not exist"  # IngestService.executePipelines
                return 400, {"type": "illegal_argument_exception", "reason": why}
            self._run_pipeline(pipeline, doc)
        self.index_settings.setdefault(index, settings)
        return 201, None

    def _run_pipeline(self, pipeline: dict[str, Any], doc: dict[str, Any]) -> None:
        now = self.clock()
        for proc in pipeline["processors"]:
            spec = proc["set"]
            if spec.get("override", True) or doc.get(spec["field"]) is None:
                doc[spec["field"]] = _render(spec["value"], doc, now)

    def _template_settings(self, index: str) -> dict[str, Any]:
        """The flattened settings of the matching index template of highest priority (only one applies)."""
        best: tuple[int, dict[str, Any]] | None = None
        for tpl in self.templates.values():
            if any(fnmatch.fnmatchcase(index, p) for p in tpl.get("index_patterns") or []):
                prio = int(tpl.get("priority", 0))
                if best is None or prio > best[0]:
                    best = (prio, tpl.get("template", {}).get("settings") or {})
        return _flat_settings(best[1]) if best else {}

    def put_pipeline(self, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.pipeline_puts += 1
        if self.refuse_pipelines:
            return 403, _error(403, "security_exception", "no permissions for [cluster:admin/ingest/pipeline/put]")
        fault = self.pipeline_faults.popleft() if self.pipeline_faults else None
        if fault == 500:  # IngestService.validatePipeline when the nodes info call returned no ingest info
            return 500, _error(500, "illegal_state_exception", "Ingest info is empty")
        if fault == 503:
            return 503, _error(503, "process_cluster_event_timeout_exception",
                               f"failed to process cluster event (put-pipeline-{name}) within 30s")  # fmt: skip
        if fault is not None:
            return fault, _error(fault, "injected", f"injected {fault}")
        procs = body.get("processors")
        if not isinstance(procs, list):
            return 400, _error(400, "parse_exception", "[processors] required property is missing")
        for proc in procs:
            ((kind, spec),) = proc.items()
            if kind != "set":
                return 400, _error(400, "parse_exception", f"No processor type exists with name [{kind}]")
            for key in ("field", "value"):
                if key not in spec:
                    return 400, _error(400, "parse_exception", f"[{key}] required property is missing")
        self.pipelines[name] = body
        return 200, {"acknowledged": True}

    def delete_pipeline(self, name: str) -> tuple[int, dict[str, Any]]:
        """``DELETE _ingest/pipeline/<id>``; an unknown id is OpenSearch's ``ResourceNotFoundException``."""
        with self.lock:
            if self.pipelines.pop(name, None) is None:
                return 404, _error(404, "resource_not_found_exception", f"pipeline [{name}] is missing")
        return 200, {"acknowledged": True}

    def delete_setup(self, path: str) -> tuple[int, dict[str, Any]]:
        """``DELETE _index_template/<name>`` or ``DELETE _plugins/_ism/policies/<id>`` (what a test against
        a real cluster cleans up with); an unknown name is a 404."""
        name = path.rsplit("/", 1)[1]
        with self.lock:
            if path.startswith("/_index_template/"):
                if self.templates.pop(name, None) is None:
                    return 404, _error(404, "index_template_missing_exception", f"index_template [{name}] missing")
                return 200, {"acknowledged": True}
            if self.policies.pop(name, None) is None:
                return 404, _error(404, "not_found", f"Policy not found: {name}")
            self.policy_seq_no.pop(name, None)
        return 200, {"_id": name, "result": "deleted"}

    def delete_indices(self, target: str) -> tuple[int, dict[str, Any]]:
        """``DELETE /<index>[,<index>...]``, wildcards allowed (OpenSearch's default
        ``action.destructive_requires_name: false``); a name without a wildcard that matches nothing is a 404."""
        pats = [t for t in target.split(",") if t]
        with self.lock:
            gone = [i for i in list(self.indices) if any(fnmatch.fnmatchcase(i, p) for p in pats)]
            missing = [p for p in pats if "*" not in p and p not in gone]
            if missing:
                return 404, _error(404, "index_not_found_exception", f"no such index [{missing[0]}]")
            for i in gone:
                del self.indices[i]
                self.index_settings.pop(i, None)
            self.unrefreshed = {(i, k) for i, k in self.unrefreshed if i not in gone}
        return 200, {"acknowledged": True}

    def refresh(self) -> None:
        """Make every stored document searchable (what each index's refresh does)."""
        with self.lock:
            self.unrefreshed.clear()

    def _matching(self, target: str) -> list[tuple[str, str, dict[str, Any]]]:
        pats = [t for t in target.split(",") if t] or ["*"]
        return [
            (i, k, v)
            for i, d in self.indices.items()
            if any(p in ("_all", "*") or fnmatch.fnmatchcase(i, p) for p in pats)
            for k, v in d.items()
            if (i, k) not in self.unrefreshed
        ]

    def create_pit(self, target: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.pit_requests += 1
            if "*" not in target and target not in self.indices:
                return 404, _error(404, "index_not_found_exception", f"no such index [{target}]")
            pit = base64.b64encode(f"pit-{next(self._pit_ids)}".encode()).decode()
            self.pits[pit] = copy.deepcopy(self._matching(target))
            n = len({i for i, _, _ in self.pits[pit]})
        return 200, {"pit_id": pit, "_shards": {"total": n, "successful": n, "skipped": 0, "failed": 0},
                     "creation_time": int(time.time() * 1000)}  # fmt: skip

    def delete_pit(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ids = body.get("pit_id")
        ids = [ids] if isinstance(ids, str) else list(ids or [])
        with self.lock:
            self.pit_requests += 1
            return 200, {"pits": [{"successful": self.pits.pop(p, None) is not None, "pit_id": p} for p in ids]}

    def search(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            return self._search(path, body)
        except (ValueError, KeyError, TypeError) as e:
            return 400, _error(400, "parsing_exception", str(e))

    def _search(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        req = json.loads(body) if body else {}
        target = path[: -len("/_search")].strip("/")
        with self.lock:
            self.searches += 1
            pit = req.get("pit")
            if pit is not None:
                if target:
                    return 400, _error(400, "action_request_validation_exception",
                                       "[indices] cannot be used with point in time")  # fmt: skip
                docs = self.pits.get(pit.get("id"))
                if docs is None:
                    return 404, _error(404, "search_context_missing_exception", "No search context found")
            else:
                docs = copy.deepcopy(self._matching(target))
            mappings = self._mappings()
        if not docs:  # no shard in scope: nothing is parsed against a mapping, nothing found
            return 200, {"took": 0, "timed_out": False, "hits": {"hits": []}, **({"pit_id": pit["id"]} if pit else {})}
        view = _View(mappings)
        hits = [h for h in docs if view.matches(req.get("query") or {"match_all": {}}, h[2])]
        sort = _sort_spec(req.get("sort"), view)
        out: dict[str, Any] = {"took": 1, "timed_out": False, "hits": {"hits": []}}
        if req.get("track_total_hits", True) is not False:
            out["hits"]["total"] = {"value": len(hits), "relation": "eq"}
        if pit is not None:
            out["pit_id"] = pit["id"]
        if req.get("aggs") or req.get("aggregations"):
            out["aggregations"] = view.aggs(req.get("aggs") or req.get("aggregations"), hits)
        size = int(req.get("size", 10))
        if size:
            keyed = sorted(((view.sort_key(sort, h[2]), h) for h in hits), key=lambda kh: kh[0])
            after = req.get("search_after")
            if after is not None:
                if not sort:
                    return 400, _error(400, "illegal_argument_exception", "search_after needs a sort")
                bound = _sort_values_key(sort, after)
                keyed = [kh for kh in keyed if kh[0] > bound]
            out["hits"]["hits"] = [view.hit(h, sort, req.get("_source")) for _, h in keyed[:size]]
        return 200, out

    def _mappings(self) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for tpl in self.templates.values():
            props.update(tpl.get("template", {}).get("mappings", {}).get("properties", {}))
        return props

    def all_docs(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            out: dict[str, dict[str, Any]] = {}
            for d in self.indices.values():
                out.update(d)
            return out

    def count(self) -> int:
        with self.lock:
            return sum(len(d) for d in self.indices.values())


# --- query, sort and aggregation semantics --------------------------------------------------------------

KNOWN_TYPES = frozenset(
    ("binary", "boolean", "byte", "date", "date_nanos", "double", "flat_object", "float", "half_float", "integer",
     "ip", "keyword", "long", "object", "nested", "scaled_float", "short", "text", "unsigned_long", "wildcard",
     "match_only_text", "constant_keyword")
)  # fmt: skip
"""OpenSearch's field types (a subset of https://docs.opensearch.org/latest/field-types/): not ``flattened``."""


def _unknown_types(mapping: dict[str, Any]) -> str | None:
    for spec in (mapping.get("properties") or {}).values():
        t = spec.get("type", "object")
        if t not in KNOWN_TYPES:
            return str(t)
        for sub in (spec.get("fields") or {}).values():
            if sub.get("type") not in KNOWN_TYPES:
                return str(sub.get("type"))
        inner = _unknown_types(spec)
        if inner:
            return inner
    return None


def _error(status: int, kind: str, reason: str) -> dict[str, Any]:
    return {"error": {"type": kind, "reason": reason}, "status": status}


def _nanos(ts: str) -> int:
    t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


_DATE = re.compile(r"(\d{4})-(\d\d)-(\d\d)(?:T(\d\d)(?::(\d\d)(?::(\d\d)(?:\.(\d{1,9}))?)?)?)?(Z|[+-]\d\d:\d\d)?")


def _millis(v: Any) -> int:
    """A ``date`` field's value as OpenSearch indexes it: epoch milliseconds, from a number (epoch
    millis) or a string in the default ``strict_date_optional_time`` (optional time, minutes, seconds,
    1 to 9 fraction digits, which a ``date`` truncates to milliseconds)."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return int(v)
    m = _DATE.fullmatch(str(v))
    if m is None:
        raise ValueError(f"failed to parse date field [{v}] with format [strict_date_optional_time||epoch_millis]")
    y, mo, d, h, mi, sec, frac, zone = m.groups()
    t = dt.datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(sec or 0), tzinfo=dt.UTC)
    if zone and zone != "Z":
        t -= (1 if zone[0] == "+" else -1) * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    return int(t.timestamp()) * 1000 + int((frac or "0").ljust(9, "0")[:3])


def _java_instant(t: dt.datetime) -> str:
    """``ZonedDateTime.toString()`` in UTC, as a mustache template renders ``_ingest.timestamp``:
    ``HH:mm`` then ``:ss`` only if seconds or fraction are not zero, the fraction in 3, 6 or 9 digits."""
    t = t.astimezone(dt.UTC)
    out = t.strftime("%Y-%m-%dT%H:%M")
    if t.second or t.microsecond:
        out += f":{t.second:02d}"
    if t.microsecond:
        out += "." + (f"{t.microsecond // 1000:03d}" if t.microsecond % 1000 == 0 else f"{t.microsecond:06d}")
    return out + "Z"


def _render(value: Any, doc: dict[str, Any], now: dt.datetime) -> Any:
    """A ``set`` processor's value: a string is a mustache template (``{{x}}`` or ``{{{x}}}``)."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name = m.group(1).strip()
        if name == "_ingest.timestamp":
            return _java_instant(now)
        v: Any = doc
        for part in name.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        return "" if v is None else str(v)

    return re.sub(r"\{\{\{?([^{}]+?)\}?\}\}", sub, value)


def _flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"index": {"default_pipeline": x}}`` and ``{"default_pipeline": x}`` as ``index.default_pipeline``."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        key = prefix + k
        if isinstance(v, dict):
            out.update(_flat_settings(v, key + "."))
        else:
            out[key if key.startswith("index.") else "index." + key] = v
    return out


class _Missing:
    """Sorts after every value (OpenSearch's default ``missing: _last``, either order)."""


MISSING = _Missing()


def _sort_spec(raw: Any, view: _View) -> list[tuple[str, bool, str]]:
    """[(field, descending, type)]"""
    spec = []
    for item in [raw] if isinstance(raw, str | dict) else list(raw or []):
        if isinstance(item, str):
            field, opts = item, {}
        else:
            ((field, opts),) = item.items()
            opts = {"order": opts} if isinstance(opts, str) else opts
        t = view.type_of(field) or opts.get("unmapped_type")
        if t is None:
            raise ValueError(f"No mapping found for [{field}] in order to sort on")
        spec.append((field, opts.get("order", "asc") == "desc", t))
    return spec


class _Key:
    __slots__ = ("parts",)

    def __init__(self, parts: list[tuple[bool, Any]]) -> None:
        self.parts = parts

    def _cmp(self, other: _Key) -> int:
        for (desc, a), (_, b) in zip(self.parts, other.parts):
            if a is b or a == b:
                continue
            if a is MISSING:
                return 1
            if b is MISSING:
                return -1
            less = a < b
            return (1 if less else -1) if desc else (-1 if less else 1)
        return 0

    def __lt__(self, other: _Key) -> bool:
        return self._cmp(other) < 0

    def __gt__(self, other: _Key) -> bool:
        return self._cmp(other) > 0


def _sort_values_key(sort: list[tuple[str, bool, str]], values: list[Any]) -> _Key:
    return _Key([(desc, MISSING if v is None else v) for (_, desc, _), v in zip(sort, values)])


class _View:
    """Documents seen through the mappings: what each query, sort and aggregation reads of a field."""

    def __init__(self, props: dict[str, Any]) -> None:
        self.props = props

    def type_of(self, field: str) -> str | None:
        top, _, sub = field.partition(".")
        spec = self.props.get(top)
        if spec is None:
            return None
        if sub:
            if spec.get("type") == "flat_object":
                return "flat_object"
            sub_spec = (spec.get("fields") or {}).get(sub)
            return sub_spec.get("type") if sub_spec else None
        return str(spec.get("type", "object"))

    def values(self, field: str, doc: dict[str, Any]) -> list[Any]:
        """The indexed values of ``field`` (none when unmapped, absent, null or over ``ignore_above``)."""
        t = self.type_of(field)
        if t is None:
            return []
        top, _, sub = field.partition(".")
        v = doc.get(top)
        if sub and t == "flat_object":
            for part in sub.split("."):
                v = v.get(part) if isinstance(v, dict) else None
        elif sub:
            limit = (self.props[top].get("fields") or {})[sub].get("ignore_above")
            if isinstance(v, str) and limit is not None and len(v) > limit:
                return []
        vals = v if isinstance(v, list) else [v]
        out = []
        for x in vals:
            if x is None:
                continue
            if t == "date_nanos":
                x = _nanos(x)
            elif t == "date":
                x = _millis(x)
            elif t in ("integer", "long"):
                x = int(x)
            elif t in ("keyword", "text", "flat_object"):
                x = x if isinstance(x, str) else json.dumps(x)
            out.append(x)
        return out

    def _coerce(self, field: str, v: Any) -> Any:
        t = self.type_of(field)
        if t == "date_nanos":
            return _nanos(v) if isinstance(v, str) else int(v)
        if t == "date":
            return _millis(v)
        if t in ("integer", "long"):
            return int(v)
        return v

    def matches(self, q: dict[str, Any], doc: dict[str, Any]) -> bool:
        ((kind, arg),) = q.items()
        if kind == "match_all":
            return True
        if kind == "bool":

            def lst(x: Any) -> list[dict[str, Any]]:
                return [x] if isinstance(x, dict) else list(x or [])

            must = lst(arg.get("filter")) + lst(arg.get("must"))
            if not all(self.matches(c, doc) for c in must):
                return False
            if any(self.matches(c, doc) for c in lst(arg.get("must_not"))):
                return False
            should = lst(arg.get("should"))
            need = arg.get("minimum_should_match", 0 if must or arg.get("must_not") else 1)
            return not should or sum(self.matches(c, doc) for c in should) >= int(need)
        if kind == "term":
            ((field, v),) = arg.items()
            v = v["value"] if isinstance(v, dict) else v
            return self._coerce(field, v) in self.values(field, doc)
        if kind == "terms":
            ((field, vs),) = arg.items()
            want = {self._coerce(field, v) for v in vs}
            return any(x in want for x in self.values(field, doc))
        if kind == "exists":
            return bool(self.values(arg["field"], doc))
        if kind == "range":
            ((field, r),) = arg.items()
            ops = {"gte": lambda a, b: a >= b, "gt": lambda a, b: a > b, "lte": lambda a, b: a <= b,
                   "lt": lambda a, b: a < b}  # fmt: skip
            return any(all(ops[o](x, self._coerce(field, b)) for o, b in r.items() if o in ops)
                       for x in self.values(field, doc))  # fmt: skip
        if kind == "wildcard":
            ((field, spec),) = arg.items()
            spec = spec if isinstance(spec, dict) else {"value": spec}
            rx = _wildcard_regex(spec["value"], bool(spec.get("case_insensitive")))
            return any(rx.fullmatch(x) for x in self.values(field, doc) if isinstance(x, str))
        raise ValueError(f"query [{kind}] is not supported by the fake")

    def sort_key(self, sort: list[tuple[str, bool, str]], doc: dict[str, Any]) -> _Key:
        parts = []
        for field, desc, _ in sort:
            vals = self.values(field, doc)
            parts.append((desc, (max(vals) if desc else min(vals)) if vals else MISSING))
        return _Key(parts)

    def hit(self, h: tuple[str, str, dict[str, Any]], sort: list[tuple[str, bool, str]], source: Any) -> dict[str, Any]:
        index, _id, doc = h
        out: dict[str, Any] = {"_index": index, "_id": _id, "_score": None, "_source": _project(doc, source)}
        if sort:
            out["sort"] = [None if v is MISSING else v for _, v in self.sort_key(sort, doc).parts]
        return out

    def aggs(self, spec: dict[str, Any], hits: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, agg in spec.items():
            sub = agg.get("aggs") or agg.get("aggregations") or {}
            if "terms" in agg:
                t = agg["terms"]
                groups: dict[Any, list[tuple[str, str, dict[str, Any]]]] = collections.defaultdict(list)
                for h in hits:
                    for v in set(self.values(t["field"], h[2])):
                        groups[v].append(h)
                order = t.get("order", {"_count": "desc"})
                ((okey, odir),) = (order if isinstance(order, dict) else order[0]).items()
                if okey == "_key":
                    keys = sorted(groups, reverse=odir == "desc")
                else:
                    keys = sorted(groups, key=lambda k: (-len(groups[k]) if odir == "desc" else len(groups[k]), k))
                buckets = []
                for k in keys[: int(t.get("size", 10))]:
                    b = {"key": k, "doc_count": len(groups[k]), **self.aggs(sub, groups[k])}
                    buckets.append(b)
                out[name] = {"doc_count_error_upper_bound": 0, "sum_other_doc_count": sum(
                    len(groups[k]) for k in keys[int(t.get("size", 10)):]), "buckets": buckets}  # fmt: skip
            elif "filter" in agg:
                kept = [h for h in hits if self.matches(agg["filter"], h[2])]
                out[name] = {"doc_count": len(kept), **self.aggs(sub, kept)}
            elif "top_hits" in agg:
                th = agg["top_hits"]
                sort = _sort_spec(th.get("sort"), self)
                ranked = sorted(hits, key=lambda h: self.sort_key(sort, h[2])) if sort else hits
                out[name] = {"hits": {"total": {"value": len(hits), "relation": "eq"},
                                      "hits": [self.hit(h, sort, th.get("_source"))
                                               for h in ranked[: int(th.get("size", 3))]]}}  # fmt: skip
            else:
                raise ValueError(f"aggregation {sorted(agg)} is not supported by the fake")
        return out


def _project(doc: dict[str, Any], source: Any) -> dict[str, Any]:
    if source is None or source is True:
        return doc
    includes = source.get("includes") if isinstance(source, dict) else source
    if isinstance(includes, str):
        includes = [includes]
    return {k: v for k, v in doc.items() if k in (includes or [])}


def _wildcard_regex(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL | (re.IGNORECASE if case_insensitive else 0))


if __name__ == "__main__":  # a local endpoint to run the opt-in real-cluster tests' code against
    import signal

    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the server's threads start: they inherit it
    f = FakeOpenSearch().start()
    print(f"MLOPS_OBS_TEST_OPENSEARCH_URL={f.url}", flush=True)
    try:
        signal.sigwait(stop)
    finally:
        f.stop()
