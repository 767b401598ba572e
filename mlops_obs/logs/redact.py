"""Secret redaction for log events, on by default in every pipeline we configure.

Why here and not in the shipper: a secret that reaches the file is already leaked (to backups, to
whoever can read the node). So the job-side processor scrubs it before rendering. Two mechanisms:

* keys whose *name* says secret (``password``, ``api_key``, ``authorization``...) get their whole
  value replaced, whatever it looks like;
* string values are scanned for secret *shapes* (bearer headers, AWS/GCP/Azure keys, GitHub/Slack/
  HF/OpenAI tokens, JWTs, PEM private keys, ``user:pass@`` in URLs, ``password=...`` pairs).

The replacement keeps a short, harmless prefix (``AKIAIOSF[REDACTED]``) so a reader can still tell *which*
credential leaked without learning it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "[REDACTED]"

SECRET_KEY = re.compile(
    r"(?i)(passw(or)?d|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|"
    r"authorization|auth[_-]?header|credential|session[_-]?id|cookie|client[_-]?secret|x-api-key)"
)

# (needles, pattern, replacement): a pattern runs only when one of its lower-case needles occurs in
# the lower-cased text (None: when the text has a run of 16+ token characters); a replacement may
# keep group 1, a harmless prefix.
_PATTERNS: list[tuple[tuple[str, ...] | None, re.Pattern[str], str]] = [
    (("private key",), re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
     "-----BEGIN PRIVATE KEY-----" + MASK),
    (("bearer", "basic", "token"), re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9\-._~+/]{8,}=*"), r"\1 " + MASK),
    (("://",), re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s:@]*:[^/\s@]+@"), r"\1" + MASK + "@"),
    (None, re.compile(r"\b((?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{4})[A-Z0-9]{12}\b"), r"\1" + MASK),
    (("aws_",), re.compile(r"(?i)(aws_secret_access_key|aws_session_token)(\s*[=:]\s*)\S+"), r"\1\2" + MASK),
    (("aiza",), re.compile(r"\b(AIza)[0-9A-Za-z\-_]{35}\b"), r"\1" + MASK),
    (("ya29.",), re.compile(r"\b(ya29\.)[0-9A-Za-z\-_]{20,}"), r"\1" + MASK),
    (("gh",), re.compile(r"\b(gh[pousr]_)[A-Za-z0-9]{36,}\b"), r"\1" + MASK),
    (("github_pat_",), re.compile(r"\b(github_pat_)[A-Za-z0-9_]{22,}\b"), r"\1" + MASK),
    (("glpat-",), re.compile(r"\b(glpat-)[A-Za-z0-9\-_]{20,}\b"), r"\1" + MASK),
    (("xox",), re.compile(r"\b(xox[abposr]-)[A-Za-z0-9\-]{10,}\b"), r"\1" + MASK),
    (("hooks.slack",), re.compile(r"(https://hooks\.slack\.com/services/)[A-Za-z0-9/]+"), r"\1" + MASK),
    (("hf_",), re.compile(r"\b(hf_)[A-Za-z0-9]{30,}\b"), r"\1" + MASK),
    (("sk-",), re.compile(r"\b(sk-(?:proj-|ant-)?)[A-Za-z0-9\-_]{20,}\b"), r"\1" + MASK),
    (("_live_",), re.compile(r"\b(sk_live_|rk_live_|pk_live_)[A-Za-z0-9]{16,}\b"), r"\1" + MASK),
    (("npm_",), re.compile(r"\b(npm_)[A-Za-z0-9]{36}\b"), r"\1" + MASK),
    (("eyj",), re.compile(r"\b(eyJ)[A-Za-z0-9\-_]{8,}\.eyJ[A-Za-z0-9\-_]{8,}\.[A-Za-z0-9\-_]{8,}"), r"\1" + MASK),
    (("accountkey=", "sharedaccesssignature=", "sig="),
     re.compile(r"(?i)(AccountKey=|SharedAccessSignature=|sig=)[A-Za-z0-9%+/=]{16,}"), r"\1" + MASK),
    (("wandb_api_key", "mlflow_tracking_password"),
     re.compile(r"(?i)\b(wandb_api_key|MLFLOW_TRACKING_PASSWORD)(\s*[=:]\s*)\S+"), r"\1\2" + MASK),
    (("pass", "pwd", "secret", "token", "key"),
     re.compile(r"(?i)((?:passw(?:or)?d|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key)"
                r"[\"']?\s*[=:]\s*[\"']?)([^\s\"',;&]{3,})"),
     r"\1" + MASK),
]  # fmt: skip

# Every shape above contains "=", ":" or "@", or a run of 16+ token characters; checking that
# first (three C-level substring tests and one character-class scan) keeps clean strings cheap.
_LONG_RUN = re.compile(r"[A-Za-z0-9+/_\-]{16}")


def _maybe_secret(text: str) -> bool:
    return len(text) >= 8 and ("=" in text or ":" in text or "@" in text or _LONG_RUN.search(text) is not None)


def redact_text(text: str) -> str:
    """Replace every secret shape in ``text``; cheap pre-checks keep clean strings fast."""
    if not _maybe_secret(text):
        return text
    low = text.lower()
    long_run = _LONG_RUN.search(text) is not None
    for needles, pattern, repl in _PATTERNS:
        if long_run if needles is None else any(n in low for n in needles):
            text = pattern.sub(repl, text)
    return text


def _redact_value(key: str | None, value: Any, depth: int = 0) -> Any:
    if key is not None and SECRET_KEY.search(key) and value not in (None, "", True, False):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if depth < 4:
        if isinstance(value, Mapping):
            return {k: _redact_value(str(k), v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [_redact_value(None, v, depth + 1) for v in value]
    return value


LEAVE, MASK_VALUE, SCAN_VALUE = 0, 1, 2


def key_action(key: str, skip: frozenset[str]) -> int:
    """What redaction does with a key's values, decided once per key and cached by the callers:
    leave them (our own fields), mask them whole (the key names a secret), or scan them for secret shapes."""
    if key in skip:
        return LEAVE
    return MASK_VALUE if SECRET_KEY.search(key) else SCAN_VALUE


class RedactSecrets:
    """structlog processor: scrub secrets from every value (nested up to 4 levels) before rendering.

    Whether a key names a secret is decided once per distinct key and cached: the common event has
    only numbers and short clean strings, and pays one dict lookup and one pre-check per value.
    """

    def __init__(self, skip_keys: Iterable[str] = ("ts", "level", "seq", "job", "rank", "node", "run_id")) -> None:
        self._skip = frozenset(skip_keys)
        self._secret_key: dict[str, int] = {}  # 0: leave alone, 1: secret key, 2: scan the value

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        cache = self._secret_key
        for k, v in event_dict.items():
            t = type(v)
            if t is int or t is float or v is None or t is bool:
                continue
            action = cache.get(k)
            if action is None:
                action = cache[k] = key_action(k, self._skip)
            if action == 0:
                continue
            if action == 1:
                if v != "":
                    event_dict[k] = MASK
            elif t is str:
                if _maybe_secret(v):
                    event_dict[k] = redact_text(v)
            else:
                event_dict[k] = _redact_value(None, v)
        return event_dict
