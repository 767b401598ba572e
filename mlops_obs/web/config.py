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
silently turn authentication off). So is an empty or comment-only file: a file truncated while it
is rewritten must not serve plain HTTP without authentication; ``{}`` says "nothing" on purpose.
Relative file names are relative to the config file's folder. The file is read through
:func:`mlops_obs.config.read_yaml` (size cap, no YAML aliases).

Checking a bcrypt hash costs tens of milliseconds by design. As exporter-toolkit does, a verified
(user, password) pair is cached, by a SHA-256 of both and the hash, never in clear, so a 15 s
scrape does not pay that cost every time; a refused pair is cached too, so a client with a stale
password costs one check, not one a scrape. An unknown user is checked against a configured user's
hash: the same cost, so timing does not tell which users exist. Passwords over bcrypt's 72-byte
input are refused without a check (bcrypt would raise, or silently truncate in older versions).
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from mlops_obs.config import ConfigFileError, read_yaml

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
# Headers the server writes itself (framing, negotiation): a second copy would corrupt the answer.
_SERVER_HEADERS = {"content-length", "content-type", "content-encoding", "transfer-encoding", "connection", "date",
                   "server", "vary", "www-authenticate", "retry-after", "allow"}  # fmt: skip
# A bcrypt hash in modular crypt form: variant, two-digit cost, 22 characters of salt, 31 of hash.
_BCRYPT_HASH = re.compile(rb"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
# bcrypt reads at most 72 bytes of password; more is refused rather than truncated.
BCRYPT_MAX_PASSWORD = 72
# One check at cost 16 takes seconds here (each step doubles it); a higher cost would make every
# uncached scrape time out and a reload hang, so it is refused when the file is loaded.
BCRYPT_MAX_COST = 16
_CACHE_SIZE = 1024


class WebConfigError(ValueError):
    """The web config file cannot be used; ``str()`` is the one line the user sees."""


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    _verdicts: OrderedDict[bytes, bool] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    @property
    def _stand_in(self) -> bytes:
        """The hash an unknown user is checked against: the costliest configured one."""
        return max(self.users.values(), key=lambda h: int(h[4:6]))

    def _key(self, user: str, password: str) -> bytes:
        hashed = self.users.get(user, b"")
        return hashlib.sha256(user.encode() + b"\0" + password.encode() + b"\0" + hashed).digest()

    def cached(self, user: str, password: str) -> bool | None:
        """The verdict when it needs no bcrypt check (no users, an over-long password, a recent
        verdict for the same pair), ``None`` when :meth:`verify` must run."""
        if not self.users:
            return True
        if len(password.encode()) > BCRYPT_MAX_PASSWORD or "\0" in password:
            return False
        key = self._key(user, password)
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
            return verdict

    def verify(self, user: str, password: str) -> bool:
        """The bcrypt check (slow by design, thread-safe, releases the GIL); remembers the verdict."""
        quick = self.cached(user, password)
        if quick is not None:
            return quick
        hashed = self.users.get(user)
        try:
            ok = bcrypt.checkpw(password.encode(), hashed if hashed is not None else self._stand_in)
        except ValueError:
            ok = False
        ok = ok and hashed is not None
        key = self._key(user, password)
        with self._lock:
            self._verdicts[key] = ok
            while len(self._verdicts) > _CACHE_SIZE:
                self._verdicts.popitem(last=False)
        return ok

    def check(self, user: str, password: str) -> bool:
        """Whether the basic-auth pair is valid; always true when no users are configured."""
        quick = self.cached(user, password)
        return quick if quick is not None else self.verify(user, password)

    def downgrade_from(self, old: WebConfig) -> str | None:
        """Why replacing ``old`` with this configuration would weaken the port, or ``None``."""
        if old.tls and not self.tls:
            return "it would turn TLS off"
        if old.users and not self.users:
            return "it would turn basic authentication off"
        was = old.ssl_context.verify_mode if old.ssl_context is not None else None
        now = self.ssl_context.verify_mode if self.ssl_context is not None else None
        if was == ssl.CERT_REQUIRED and now != ssl.CERT_REQUIRED:
            return "it would stop requiring client certificates"
        return None


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


def _bcrypt_hash(user: Any, hashed: Any) -> bytes:
    h = str(hashed or "").encode()
    _need(h.startswith((b"$2a$", b"$2b$", b"$2y$")), f"basic_auth_users: {user!r} has no bcrypt hash")
    m = _BCRYPT_HASH.match(h)
    _need(m is not None, f"basic_auth_users: {user!r} has an invalid bcrypt hash")
    assert m is not None
    cost = int(m.group(1))
    _need(4 <= cost <= BCRYPT_MAX_COST, f"basic_auth_users: {user!r} has cost {cost}; use 4 to {BCRYPT_MAX_COST}")
    return h


def parse(data: Any, base: Path) -> WebConfig:
    """A :class:`WebConfig` from the loaded YAML document; ``None`` (an empty file) is refused."""
    _need(data is not None, "is empty; leave --web.config.file unset, or write {}, to serve without TLS and auth")
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
        wc.users[str(user)] = _bcrypt_hash(user, hashed)
    http = data.get("http_server_config") or {}
    _need(isinstance(http, Mapping), "http_server_config must be a mapping")
    unknown = sorted(set(http) - _HTTP_KEYS)
    _need(not unknown, f"http_server_config: unknown key {unknown[0] if unknown else ''!r}")
    headers = http.get("headers") or {}
    _need(isinstance(headers, Mapping), "http_server_config: headers must be a mapping")
    for k, v in headers.items():
        text = str(k) + str(v)
        _need(all(c >= " " and c != "\x7f" for c in text), f"http_server_config: bad header {k!r}")
        _need(re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", str(k)) is not None, f"http_server_config: bad header {k!r}")
        _need(str(k).lower() not in _SERVER_HEADERS, f"http_server_config: header {k!r} is set by the server")
        wc.headers[str(k)] = str(v)
    return wc


def load(path: Path | str | None) -> WebConfig:
    """Read and validate the file; no file means plain HTTP without authentication."""
    if path is None or str(path) == "":
        return WebConfig()
    p = Path(path)
    try:
        data = read_yaml(p)
    except ConfigFileError as e:
        raise WebConfigError(str(e)) from None
    try:
        return parse(data, p.parent)
    except WebConfigError as e:
        raise WebConfigError(f"{p}: {e}") from None


def load_for_reload(current: WebConfig, path: Path | str | None) -> WebConfig:
    """:func:`load`, refusing a file that would weaken the running port (TLS or auth turned off).

    Why: a reload is unattended (SIGHUP from a config reloader, a ConfigMap update); a file that
    lost its TLS or auth section by mistake must not quietly open the port. Weakening it on
    purpose takes a restart.
    """
    new = load(path)
    why = new.downgrade_from(current)
    if why is not None:
        where = path if path else "no --web.config.file"
        raise WebConfigError(f"{where}: refused: {why}; restart the process to weaken the port on purpose")
    return new


class ReloadStatus:
    """``mlops_web_config_last_reload_successful`` and its success timestamp, as Prometheus has for its config.

    :attr:`text` is the same bytes object until the next reload, so a server that caches the
    gzip of a scrape by identity keeps doing so.
    """

    def __init__(self) -> None:
        self.successful = True
        self.success_time = time.time()  # the start counts as a successful load
        self.text = self._render()

    def record(self, ok: bool) -> None:
        self.successful = ok
        if ok:
            self.success_time = time.time()
        self.text = self._render()

    def _render(self) -> bytes:
        return (
            "# HELP mlops_web_config_last_reload_successful Whether the last configuration reload succeeded.\n"
            "# TYPE mlops_web_config_last_reload_successful gauge\n"
            f"mlops_web_config_last_reload_successful {int(self.successful)}\n"
            "# HELP mlops_web_config_last_reload_success_timestamp_seconds Time of the last successful "
            "configuration load.\n"
            "# TYPE mlops_web_config_last_reload_success_timestamp_seconds gauge\n"
            f"mlops_web_config_last_reload_success_timestamp_seconds {self.success_time:.3f}\n"
        ).encode()
