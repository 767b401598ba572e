"""A local HTTP endpoint speaking the OpenSearch subset the sink uses, with injectable faults.

Real sockets, real HTTP (the sink's opensearch-py client cannot tell it from a cluster for these
calls): ``/_bulk`` (``create`` with ``_id``, per-item statuses, 409 on a repeated ``_id`` within an
index), ``/_search`` (``match_all``), ``/_index_template/*``, ``/_plugins/_ism/policies/*``.

Faults, injected from the test:
* ``item_faults``: statuses consumed one per bulk item (``429``, ``500``, ``503``, ``400``, or ``409``:
  stored and answered 409, as when an earlier attempt was applied);
* ``request_faults``: consumed one per ``_bulk`` request: ``"reset"`` (connection closed, no answer),
  ``"timeout"`` (the write is applied, the answer comes after the client gave up), ``503``, ``429``;
* ``max_body_bytes``: larger bodies get 413;
* :meth:`stop` / :meth:`start` on the same port: an outage.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenSearch:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.indices: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
        self.templates: dict[str, Any] = {}
        self.policies: dict[str, Any] = {}
        self.item_faults: collections.deque[int] = collections.deque()
        self.request_faults: collections.deque[Any] = collections.deque()
        self.max_body_bytes: int | None = None
        self.timeout_sleep = 3.0
        self.bulk_requests = 0
        self.statuses: collections.Counter[int] = collections.Counter()
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

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                body = self._body()
                path = self.path.split("?")[0]
                if path.endswith("/_search"):
                    self._send(200, fake.search(path, body))
                elif path == "/":
                    self._send(200, {"version": {"number": "2.11.0", "distribution": "opensearch"}})
                else:
                    self._send(404, {"error": {"type": "not_found", "reason": path}, "status": 404})

            def do_PUT(self) -> None:
                body = self._body()
                path = self.path.split("?")[0]
                with fake.lock:
                    if path.startswith("/_index_template/"):
                        fake.templates[path.rsplit("/", 1)[1]] = json.loads(body)
                        self._send(200, {"acknowledged": True})
                    elif path.startswith("/_plugins/_ism/policies/"):
                        name = path.rsplit("/", 1)[1]
                        if name in fake.policies:
                            self._send(409, {"error": {"type": "version_conflict_engine_exception",
                                                       "reason": "policy exists"}, "status": 409})  # fmt: skip
                        else:
                            fake.policies[name] = json.loads(body)
                            self._send(201, {"_id": name})
                    else:
                        self._send(404, {"error": {"type": "not_found", "reason": path}, "status": 404})

            def do_POST(self) -> None:
                path = self.path.split("?")[0]
                body = self._body()
                if path.endswith("/_search"):
                    self._send(200, fake.search(path, body))
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
                    self.indices[index][_id] = doc
                    status, err = 201, None
                self.statuses[status] += 1
                res: dict[str, Any] = {"_index": index, "_id": _id, "status": status}
                if err:
                    res["error"] = err
                    errors = errors or status != 409
                items.append({op: res})
        return {"took": 1, "errors": errors, "items": items}

    def search(self, path: str, body: bytes) -> dict[str, Any]:
        index = path[: -len("/_search")].strip("/")
        with self.lock:
            docs = [
                {"_index": i, "_id": k, "_source": v}
                for i, d in self.indices.items()
                if not index or index == "*" or i == index or (index.endswith("*") and i.startswith(index[:-1]))
                for k, v in d.items()
            ]
        size = 10
        if body:
            size = int(json.loads(body).get("size", 10))
        return {"hits": {"total": {"value": len(docs), "relation": "eq"}, "hits": docs[:size]}}

    def all_docs(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            out: dict[str, dict[str, Any]] = {}
            for d in self.indices.values():
                out.update(d)
            return out

    def count(self) -> int:
        with self.lock:
            return sum(len(d) for d in self.indices.values())
