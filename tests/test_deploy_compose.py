"""docker-compose.yml would really start: valid against the Compose spec, every file it mounts exists and passes
its own tool (promtool, amtool), Grafana's provisioning points at what is mounted, the image owns the paths
the volumes land on, and our four services start natively with exactly the commands and settings compose
gives them (paths remapped to a temporary directory, OpenSearch played by tests/fake_opensearch.py).

Docker does not run here; everything compose would do with our own code is done the same way without it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from mlops_obs.children import free_port, http_get
from tests.conftest import require_binary
from tests.fake_opensearch import FakeOpenSearch

ROOT = Path(__file__).resolve().parent.parent
OURS = "mlops-obs:dev"
PASSWORD = "Compose-Test-Pw-1!"


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def _mounts(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, container path, read-only) for each volume in the short syntax."""
    out = []
    for vol in svc.get("volumes", []):
        parts = vol.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def _host_path(svc: dict[str, Any], container_path: str) -> Path:
    """Where a path inside a service's container comes from in the repository (its bind mounts)."""
    for src, target, _ in sorted(_mounts(svc), key=lambda m: -len(m[1])):
        if src.startswith("./") and (container_path == target or container_path.startswith(target + "/")):
            return ROOT / src / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not bind-mounted from the repository")


def _env(svc: dict[str, Any]) -> dict[str, str]:
    """The service's environment as compose would pass it, with .env's password set."""
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: re.sub(r"\$\{OPENSEARCH_INITIAL_ADMIN_PASSWORD[^}]*\}", PASSWORD, str(v)) for k, v in env.items()}


# --- static checks ------------------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec() -> None:
    tool = Path(sys.executable).parent / "check-jsonschema"
    assert tool.exists(), "check-jsonschema is a dev dependency: bash scripts/setup.sh"
    r = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_mounts_point_at_files_in_the_repository() -> None:
    compose = _compose()
    images = [s.get("image", "") for s in compose["services"].values()]
    assert all(":" in i and not i.endswith(":latest") for i in images if i), images  # pinned images
    for name, svc in compose["services"].items():
        for src, _, _ in _mounts(svc):
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in compose["volumes"], f"{name} mounts undeclared volume {src}"
        if "healthcheck" in svc:
            assert svc["healthcheck"]["test"], name
        for dep in svc.get("depends_on", {}):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"


def test_compose_prometheus_config_with_its_rule_files_passes_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    compose = _compose()
    svc = compose["services"]["prometheus"]
    flag = next(a for a in svc["command"] if a.startswith("--config.file="))
    cfg = yaml.safe_load(_host_path(svc, flag.split("=", 1)[1]).read_text())
    rules = [str(_host_path(svc, pattern)) for pattern in cfg["rule_files"]]
    assert any(Path(p).parent.glob(Path(p).name) for p in rules), "no generated rule file matches rule_files"
    cfg["rule_files"] = rules
    for sc in cfg["scrape_configs"]:
        for st in sc["static_configs"]:
            for target in st["targets"]:  # every target is a compose service (or Prometheus itself)
                assert target.split(":")[0] in {*compose["services"], "localhost"}, target
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "rules found" in r.stdout, r.stdout


def test_compose_alertmanager_config_passes_amtool() -> None:
    amtool = require_binary("amtool")
    svc = _compose()["services"]["alertmanager"]
    flag = next(a for a in svc["command"] if a.startswith("--config.file="))
    r = subprocess.run(
        [amtool, "check-config", str(_host_path(svc, flag.split("=", 1)[1]))], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_points_at_what_compose_mounts() -> None:
    compose = _compose()
    svc = compose["services"]["grafana"]
    prov = _host_path(svc, "/etc/grafana/provisioning")
    providers = [p for f in sorted((prov / "dashboards").glob("*.yml")) for p in _yaml_list(f, "providers")]
    assert providers
    for p in providers:
        dash_dir = _host_path(svc, p["options"]["path"])
        assert sorted(dash_dir.glob("*.json")), f"provider {p['name']} path holds no dashboards"
    specs = [s.split() for s in _env(svc).get("GF_INSTALL_PLUGINS", "").split(",") if s.strip()]
    plugins = {s[0]: s[1] if len(s) > 1 else "" for s in specs}
    sources = [d for f in sorted((prov / "datasources").glob("*.yml")) for d in _yaml_list(f, "datasources")]
    assert {d["type"] for d in sources} >= {"prometheus", "grafana-opensearch-datasource"}
    for d in sources:
        host = re.match(r"https?://([^:/]+)", d["url"])
        assert host and host.group(1) in compose["services"], d["url"]
        if d["type"] not in ("prometheus", "loki", "elasticsearch", "alertmanager"):  # not built in: installed
            assert re.fullmatch(r"\d+\.\d+\.\d+", plugins.get(d["type"], "")), f"{d['type']} plugin not pinned"
        for v in re.findall(r"\$\{?(\w+)", yaml.safe_dump(d)):
            assert v in _env(svc), f"datasource {d['name']} reads ${v}, which compose does not set"
    logs = next(d for d in sources if d["type"] == "grafana-opensearch-datasource")
    from mlops_obs.mixin.config import MixinConfig

    assert logs["jsonData"]["database"] == MixinConfig().logs_index_pattern


def _yaml_list(path: Path, key: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load(path.read_text())[key])


def test_image_creates_and_owns_every_path_a_named_volume_lands_on() -> None:
    dockerfile = (ROOT / "deploy/docker/Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)[-1]
    mkdir = " ".join(re.findall(r"mkdir -p ([^\n&\\]+)", dockerfile)).split()
    chown = re.findall(rf"chown {user}:{user} ([^\n&\\]+)", dockerfile)
    owned = " ".join(chown).split()
    for name, svc in _compose()["services"].items():
        if svc.get("image") != OURS:
            continue
        for src, target, _ in _mounts(svc):
            if not src.startswith("./"):
                assert target in mkdir and target in owned, f"{name}: {target} not created and owned by {user}"


# --- the OpenSearch Dashboards set-up step ------------------------------------------------------------------


class _RecordingDashboards:
    """Answers like OpenSearch Dashboards' HTTP API for the set-up script, recording every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.not_ready = 2  # the first status checks fail, as while Dashboards starts
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                outer.requests.append({"method": "GET", "path": self.path, "auth": self.headers["Authorization"]})
                if self.path == "/api/status" and outer.not_ready > 0:
                    outer.not_ready -= 1
                    self._answer(503, b'{"status":"starting"}')
                else:
                    self._answer(200, b'{"status":{"overall":{"state":"green"}}}')

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                outer.requests.append(
                    {
                        "method": "POST",
                        "path": self.path,
                        "xsrf": self.headers["osd-xsrf"],
                        "tenant": self.headers["securitytenant"],
                        "auth": self.headers["Authorization"],
                        "body": orjson.loads(self.rfile.read(n)),
                    }
                )
                self._answer(200, b"{}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


def test_dashboards_setup_creates_the_index_pattern_the_dashboard_links_open(tmp_path: Path) -> None:
    import base64

    require_binary("curl")
    from mlops_obs.mixin.config import MixinConfig

    svc = _compose()["services"]["opensearch-dashboards-setup"]
    script = _host_path(svc, svc["entrypoint"][-1])
    osd = _RecordingDashboards()
    env = {**_env(svc), "OSD_URL": osd.url, "PATH": os.environ["PATH"], "WAIT_SECONDS": "60"}
    try:
        # The script sleeps 5 s between status checks: two refusals, then the calls.
        r = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
    finally:
        osd.httpd.shutdown()
    assert r.returncode == 0, r.stdout + r.stderr
    pattern = MixinConfig().logs_index_pattern
    assert env["INDEX_PATTERN"] == pattern  # the id the dashboards' Discover links use
    posts = [q for q in osd.requests if q["method"] == "POST"]
    # in the shared global tenant and the setup user's private one (multi-tenancy keeps saved objects apart)
    assert [(q["path"], q["tenant"]) for q in posts] == [
        (f"/api/saved_objects/index-pattern/{pattern.replace('*', '%2A')}?overwrite=true", tenant)
        if i == 0
        else ("/api/opensearch-dashboards/settings", tenant)
        for tenant in ("global", "__user__")
        for i in range(2)
    ]
    assert all(q["xsrf"] == "true" for q in posts)
    assert all(q["auth"] == "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode() for q in osd.requests)
    assert all(q["body"] == {"attributes": {"title": pattern, "timeFieldName": "@timestamp"}} for q in posts[0::2])
    assert all(q["body"] == {"changes": {"defaultIndex": pattern}} for q in posts[1::2])


# --- our services, natively, as compose starts them ---------------------------------------------------------


@pytest.fixture
def compose_services(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Start workload, exporter, shipper and alert-sink with compose's commands and environment."""
    pytest.importorskip("torch", reason="the compose workload trains with torch")
    compose = _compose()
    fake = FakeOpenSearch().start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    logs: dict[str, Path] = {}
    try:
        for name, svc in compose["services"].items():
            if svc.get("image") != OURS:
                continue
            args = []
            for arg in svc["command"]:
                for src, target, _ in _mounts(svc):  # each named volume: a directory of that name
                    if not src.startswith("./"):
                        (tmp_path / src).mkdir(exist_ok=True)
                        arg = re.sub(rf"(^|=){re.escape(target)}(?=/|$)", rf"\g<1>{tmp_path / src}", arg)
                arg = arg.replace("https://opensearch:9200", fake.url)
                m = re.fullmatch(r"--web\.listen-address=:(\d+)", arg)
                if m:
                    ports[name] = free_port()
                    arg = f"--web.listen-address=127.0.0.1:{ports[name]}"
                args.append(arg)
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "wb") as out:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "mlops_obs", *args],
                    stdout=out,
                    stderr=out,
                    env={**os.environ, **_env(svc)},
                    stdin=subprocess.DEVNULL,
                )
        yield {"procs": procs, "ports": ports, "fake": fake, "tmp": tmp_path, "logs": logs, "compose": compose}
    finally:
        _stop_all(list(procs.values()))
        fake.stop()


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the services and everything they started: the workload's ranks are collected first, since once
    their launcher is gone they are re-parented away from this process and no longer found as children."""
    import psutil

    descendants = []
    for p in procs:
        try:
            descendants += psutil.Process(p.pid).children(recursive=True)
        except psutil.Error:
            pass
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for d in alive:
        d.kill()
    psutil.wait_procs(alive, timeout=10)


def _eventually(what: str, check: Any, env: dict[str, Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in env["procs"].items():
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode}: {env['logs'][name].read_text()[-2000:]}")
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(
        f"{what} within {timeout:g}s; logs: "
        + "; ".join(f"{n}: {p.read_text()[-500:]}" for n, p in env["logs"].items())
    )


@pytest.mark.timeout(300)
def test_our_services_start_and_work_with_composes_settings(compose_services: dict[str, Any]) -> None:
    env = compose_services
    assert set(env["procs"]) == {"workload", "exporter", "shipper", "alert-sink"}
    services = env["compose"]["services"]
    for name in ("exporter", "alert-sink"):  # each one's own compose healthcheck, on its remapped port
        url = re.search(r"http://localhost:(\d+)(/\S*?)'", " ".join(services[name]["healthcheck"]["test"]))
        assert url, services[name]["healthcheck"]
        health = f"http://127.0.0.1:{env['ports'][name]}{url.group(2)}"
        _eventually(f"{name} healthy", lambda u=health: http_get(u, timeout=2)[0] == 200, env)
    # The workload's ranks hand their snapshots to the exporter through the shared volume.
    metrics = f"http://127.0.0.1:{env['ports']['exporter']}/metrics"
    _eventually(
        "training series of the compose job on the exporter",
        lambda: 'job="compose-demo"' in http_get(metrics, timeout=5)[1].decode(),
        env,
        timeout=180,
    )
    # The shipper follows the workload's logs into OpenSearch.
    fake: FakeOpenSearch = env["fake"]
    _eventually(
        "the workload's log events in OpenSearch",
        lambda: any(d.get("job") == "compose-demo" for d in fake.all_docs().values()),
        env,
    )
    # The alert sink writes an Alertmanager notification into the same indices.
    payload = {
        "version": "4",
        "status": "firing",
        "receiver": "alert-sink",
        "groupKey": "{}:{}",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "ComposeSmoke", "severity": "warning", "job": "compose-demo"},
                "annotations": {"summary": "smoke"},
                "startsAt": "2026-01-01T00:00:00Z",
                "fingerprint": "abc",
            }
        ],
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{env['ports']['alert-sink']}/alerts",
        data=orjson.dumps(payload),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    alerts = [d for d in fake.all_docs().values() if d.get("kind") == "alert"]
    assert [a["fields"]["alertname"] for a in alerts] == ["ComposeSmoke"]
    log_indices = {i for i, docs in fake.indices.items() if any(d.get("kind") != "alert" for d in docs.values())}
    assert log_indices and all(i.startswith("mlops-logs-") for i in fake.indices), sorted(fake.indices)
