"""``--web.config.file`` in the Prometheus exporter-toolkit format: TLS, client certificates, basic auth.

The same YAML that node_exporter and Prometheus accept, so one file can guard every exporter on a
node::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional (mTLS)
      client_ca_file: ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...   # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')
    http_server_config:
      headers:
        X-Frame-Options: deny

Unknown keys are an error, as in exporter-toolkit (a typo such as ``basic_auth_user`` must not
silently turn authentication off). Relative file names are relative to the config file's folder.
Checking a bcrypt hash costs tens of milliseconds by design; as exporter-toolkit does, a successful
(user, password) pair is cached (by a SHA-256 of both, never in clear) so a 15 s scrape does not pay
that cost every time, and an unknown user is checked against a dummy hash so timing does not tell
which users exist.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_KEYS = {
    "cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version",
    "cipher_suites", "prefer_server_cipher_suites", "curve_preferences", "client_allowed_sans",
}  # fmt: skip
_TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
_HTTP_KEYS = {"headers", "http2"}
# A valid bcrypt hash of a random string, so an unknown user costs as much as a known one.
_DUMMY_HASH = bcrypt.hashpw(b"mlops-obs-no-such-user", bcrypt.gensalt(rounds=10))


class WebConfigError(ValueError):
    """The web config file cannot be used; ``str()`` is the one line the user sees."""


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    _cache: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    def check(self, user: str, password: str) -> bool:
        """Whether the basic-auth pair is valid; always true when no users are configured."""
        if not self.users:
            return True
        hashed = self.users.get(user)
        key = hashlib.sha256(f"{user}\0{password}\0".encode() + (hashed or b"")).digest()
        with self._lock:
            if key in self._cache:
                return True
        ok = bcrypt.checkpw(password.encode(), hashed if hashed is not None else _DUMMY_HASH) and hashed is not None
        if ok:
            with self._lock:
                if len(self._cache) > 1024:
                    self._cache.clear()
                self._cache.add(key)
        return ok


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise WebConfigError(msg)


def _tls_context(tls: Mapping[str, Any], base: Path) -> ssl.SSLContext:
    unknown = sorted(set(tls) - _TLS_KEYS)
    _need(not unknown, f"tls_server_config: unknown key {unknown[0] if unknown else ''!r}")
    cert, key = tls.get("cert_file"), tls.get("key_file")
    _need(bool(cert) and bool(key), "tls_server_config: cert_file and key_file are both required")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # exporter-toolkit's default
    for name, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if tls.get(name) is not None:
            v = str(tls[name])
            _need(v in TLS_VERSIONS, f"tls_server_config: {name} must be one of {', '.join(TLS_VERSIONS)}, got {v!r}")
            setattr(ctx, attr, TLS_VERSIONS[v])
    cert_path, key_path = base / str(cert), base / str(key)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as e:
        raise WebConfigError(f"tls_server_config: cannot load {cert_path} / {key_path}: {e}") from None
    auth = str(tls.get("client_auth_type") or "NoClientCert")
    _need(auth in CLIENT_AUTH, f"tls_server_config: client_auth_type must be one of {', '.join(CLIENT_AUTH)}")
    ctx.verify_mode = CLIENT_AUTH[auth]
    ca = tls.get("client_ca_file")
    if ca:
        try:
            ctx.load_verify_locations(base / str(ca))
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(f"tls_server_config: cannot load client_ca_file {base / str(ca)}: {e}") from None
    elif auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        raise WebConfigError(f"tls_server_config: client_auth_type {auth} needs client_ca_file")
    if tls.get("cipher_suites"):
        suites = tls["cipher_suites"]
        _need(isinstance(suites, list), "tls_server_config: cipher_suites must be a list")
        try:
            ctx.set_ciphers(":".join(str(s).replace("TLS_", "", 1).replace("_", "-") for s in suites))
        except ssl.SSLError:
            raise WebConfigError("tls_server_config: none of cipher_suites is supported") from None
    return ctx


def parse(data: Any, base: Path) -> WebConfig:
    if data is None:
        return WebConfig()
    _need(isinstance(data, Mapping), "must hold a mapping")
    unknown = sorted(set(data) - _TOP_KEYS)
    _need(not unknown, f"unknown key {unknown[0] if unknown else ''!r}")
    wc = WebConfig()
    if data.get("tls_server_config"):
        _need(isinstance(data["tls_server_config"], Mapping), "tls_server_config must be a mapping")
        wc.ssl_context = _tls_context(data["tls_server_config"], base)
    users = data.get("basic_auth_users") or {}
    _need(isinstance(users, Mapping), "basic_auth_users must map user names to bcrypt hashes")
    for user, hashed in users.items():
        h = str(hashed or "").encode()
        _need(h.startswith((b"$2a$", b"$2b$", b"$2y$")), f"basic_auth_users: {user!r} has no bcrypt hash")
        try:
            bcrypt.checkpw(b"", h)
        except ValueError:
            raise WebConfigError(f"basic_auth_users: {user!r} has an invalid bcrypt hash") from None
        wc.users[str(user)] = h
    http = data.get("http_server_config") or {}
    _need(isinstance(http, Mapping), "http_server_config must be a mapping")
    unknown = sorted(set(http) - _HTTP_KEYS)
    _need(not unknown, f"http_server_config: unknown key {unknown[0] if unknown else ''!r}")
    headers = http.get("headers") or {}
    _need(isinstance(headers, Mapping), "http_server_config: headers must be a mapping")
    for k, v in headers.items():
        _need("\n" not in str(k) + str(v) and "\r" not in str(k) + str(v), f"http_server_config: bad header {k!r}")
        wc.headers[str(k)] = str(v)
    return wc


def load(path: Path | str | None) -> WebConfig:
    """Read and validate the file; no file means plain HTTP without authentication."""
    if path is None or str(path) == "":
        return WebConfig()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise WebConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise WebConfigError(f"{p}: not valid YAML") from None
    try:
        return parse(data, p.parent)
    except WebConfigError as e:
        raise WebConfigError(f"{p}: {e}") from None
