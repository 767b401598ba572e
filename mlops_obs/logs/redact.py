"""Secret redaction for log events, on by default in every pipeline we configure.

Why here and not in the shipper: a secret that reaches the file is already leaked (to backups, to
whoever can read the node). So the job-side processor scrubs it before rendering, after exceptions
and tracebacks have been turned into text (an exception's message is as likely to hold a URL with a
password as any value). The shipper applies the same rules to JSON lines that other programs wrote
(:func:`redact_record`) and to raw lines (:func:`redact_text`).

Three mechanisms, one set of rules:

* a key whose *name* says secret (:func:`is_secret_key`: ``password``, ``passphrase``, ``db_pass``,
  ``client_secret``, ``credentials``, ``private_key``, ``access_token``, ``authorization``...) gets
  its whole value replaced, whatever it is (a string, a number, a dict);
* every string, every key and every value that is not plain data (bytes, exceptions, arbitrary
  objects: turned into the text the renderer would write) is scanned for secret *shapes*: cloud and
  SaaS credentials, tokens, JWTs, bearer/basic headers, PEM private keys, ``user:password@`` in
  URLs, ``password=...`` pairs in text (whose key goes through the same :func:`is_secret_key`);
* containers are walked without a depth limit (iteratively, so no recursion error) and cycles are
  cut; a container nested deeper than :data:`MAX_DEPTH` is kept as its (redacted) JSON text, so the
  renderer never fails on it.

The replacement keeps a short, harmless prefix (``AKIAIOSF[REDACTED]``, ``ghp_[REDACTED]``) so a
reader can still tell *which* credential leaked without learning it. Redaction is idempotent.

The cost of a clean event is what keeps this on by default: whether a key names a secret is decided
once per distinct key (:func:`key_action`, cached by the callers), numbers cost one type test, and a
string is only matched against a pattern when a cheap pre-check (length, a few characters or a long
token run) and a lower-case needle say it could hold that shape.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, cast

import orjson
from structlog.typing import EventDict, WrappedLogger

MASK = "[REDACTED]"
CYCLE = "[cycle]"
MAX_DEPTH = 64
"""Containers nested deeper than this are kept as JSON text (redacted): orjson refuses more than 254
levels, and the logfmt renderer's ``str()`` recurses."""

LEAVE, MASK_VALUE, SCAN_VALUE, REDACT_KEY = 0, 1, 2, 4
"""What :func:`key_action` says to do with a key's values: leave them (our own fields), mask them
whole (the key names a secret) or scan them for shapes; plus the flag :data:`REDACT_KEY` when the
key itself holds a secret shape and is rewritten."""

_KEY_CACHE_MAX = 4096  # distinct keys remembered per cache: a program inventing keys costs no memory

# --- which keys name a secret ---------------------------------------------------------------------

# Substrings of the key's lower-cased letters and digits (separators dropped): ``db_password``,
# ``aws_secret_access_key``, ``x-api-key``, ``privateKey``, ``credentials_json``...
_SECRET_KEY_PARTS = re.compile(
    r"passw(?:or)?d|passphrase|passcode|secret|credential|authorization|"
    r"(?:api|access|private|priv|auth|service|account|client|signing|encryption|master|session|hmac)key|"
    r"sessionid|cookie|bearer|jwt"
)
# Words that name a secret only at the end of the key (``db_pass``, ``basic_auth``, ``hf_token``,
# ``x_amz_signature``): ``tokens_per_second``, ``forward_pass_ms``, ``pass_at_1``, ``auth_type``
# are counts and settings.
_SECRET_LAST_WORDS = frozenset({"pass", "pw", "pwd", "auth", "token", "signature"})
# ...and not after these words: special tokens and counts of ML vocabularies, passes of a model.
_NOT_SECRET_BEFORE = frozenset(
    ("pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "stop", "sos", "eot", "im",
     "new", "max", "min", "num", "total", "first", "last", "next", "input", "output", "prompt", "image", "audio",
     "vision", "text", "decoder", "encoder", "forward", "backward", "fwd", "bwd", "second", "single", "multi",
     "one", "two", "each", "per", "eval", "train", "val", "test", "render")
)  # fmt: skip
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@functools.lru_cache(maxsize=_KEY_CACHE_MAX)
def is_secret_key(key: str) -> bool:
    """Whether a key's name says its value is a secret (``password``, ``passphrase``, ``db_pass``,
    ``client_secret``, ``credentials``, ``private_key``, ``apiKey``, ``access_token``, ``cookie``...).

    Names that only look like it are not: ``tokens``, ``num_tokens``, ``pad_token_id``,
    ``max_new_tokens``, ``forward_pass_ms``, ``pass_at_1``, ``key``, ``cache_key``.
    """
    words = [w for w in _NON_ALNUM.split(_CAMEL.sub("_", key).lower()) if w]
    if not words:
        return False
    if _SECRET_KEY_PARTS.search("".join(words)):
        return True
    last = words[-1]
    return last in _SECRET_LAST_WORDS and (len(words) == 1 or words[-2] not in _NOT_SECRET_BEFORE)


def key_action(key: str, skip: frozenset[str] = frozenset()) -> int:
    """What redaction does with a key and its values (:data:`LEAVE`, :data:`MASK_VALUE` or
    :data:`SCAN_VALUE`, with :data:`REDACT_KEY` or'ed in when the key holds a secret): the one place
    the key decision is made, for the processor, the JSON fast path, nested dicts and
    :func:`redact_record`. Callers cache it per distinct key."""
    if key in skip:
        return LEAVE
    action = MASK_VALUE if is_secret_key(key) else SCAN_VALUE
    return action | REDACT_KEY if redact_text(key) != key else action


# --- secret shapes in text ------------------------------------------------------------------------


class _Keyed:
    """The replacement for ``key=value``-like text: only when the key names a secret
    (:func:`is_secret_key`, the same rule as for keys) is the value after it matched and masked.

    With ``by_needle`` the pattern finds a needle (``pass``, ``token``...) and the key around it and
    its separator are read from there: one scan of the text for the needles instead of trying a key
    at every word, and a key that is not a secret costs only itself. Otherwise the pattern matches a
    key and its separator (``--flag value``). Every part is bounded, so a hostile run of
    ``key=key=...`` costs linear time; a key that is not a secret consumes only itself and its
    separator, so ``KeyError: 'api_key=...'`` still finds ``api_key``.
    """

    __slots__ = ("by_needle", "value")

    def __init__(self, value: str, *, by_needle: bool = False) -> None:
        self.value = re.compile(value)
        self.by_needle = by_needle

    def __call__(self, pattern: re.Pattern[str], text: str) -> str:
        parts: list[str] = []
        pos = 0
        where = text
        if self.by_needle:  # lower-case needles, found in the lower-cased text (same offsets)
            where = text.lower()
            if len(where) != len(text):  # a character whose lower case is longer: search the text itself
                where, pattern = text, re.compile(pattern.pattern, re.I)
        m = pattern.search(where)
        while m is not None:
            if self.by_needle:
                key, end = _key_around(text, m.start(), m.end())
            else:
                key, end = m.group("key"), m.end()
            if key is None:
                m = pattern.search(where, end)
                continue
            v = self.value.match(text, end) if is_secret_key(key.lstrip("-")) else None
            if v is not None:
                group = v.lastgroup or ""
                value = v.group(group)
                vstart, vend = v.span(group)
                # not already done by a shape rule ("Bearer [REDACTED]", "ghs_[REDACTED]")
                if (
                    value
                    and value != MASK
                    and not (group == "bare" and (value.lower() in _AUTH_SCHEMES or text.startswith(MASK, vend)))
                ):
                    parts.append(text[pos:vstart])
                    parts.append(MASK)
                    pos = end = vend
            m = pattern.search(where, end)
        if not parts:
            return text
        parts.append(text[pos:])
        return "".join(parts)


# the rest of the key after a needle, then its separator
_KEY_REST = re.compile(r"""[\w.\-]{0,64}(?P<sep>(?:\\?["'])?\s*(?:=>|[=:])\s*)""")


def _key_around(text: str, start: int, end: int) -> tuple[str | None, int]:
    """The key holding the needle at ``text[start:end]`` and where its value starts, or (None, where
    to search on) when the needle is not in a ``key=value``-like key (no separator, too long, or not
    starting with a letter or ``_``)."""
    first, limit = start, max(0, start - 65)
    while first > limit and (text[first - 1].isalnum() or text[first - 1] in "_.-"):
        first -= 1
    if start - first > 64:
        return None, end  # longer than a key
    rest = _KEY_REST.match(text, end)
    if rest is None:
        return None, end
    key = text[first : rest.start("sep")]
    bare = key.lstrip("-")
    if not bare or not (bare[0].isalpha() or bare[0] == "_") or len(key) - len(bare) not in (0, 2):
        return None, rest.end("sep")
    return key, rest.end()


def _ci(words: str) -> str:
    """``words`` (a ``|``-separated alternation of literals) matching in any case, written with
    character classes: re.IGNORECASE makes the regex engine give up its fast literal search, which
    costs up to ten times more on every clean string."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) if c not in "|" else c for c in words)


_AUTH_SCHEMES = frozenset({"bearer", "basic", "token", "digest", "negotiate", "ntlm", "aws4-hmac-sha256"})
_SCHEMES = _ci("|".join(sorted(_AUTH_SCHEMES)))


def _scheme_sub(m: re.Match[str]) -> str:
    """``Basic <b64>`` / ``Token <t>``: only a credential-like word (a digit, or upper and lower case),
    so that "token embeddings" and "basic blocks" stay."""
    cred = m.group(2)
    if m.group(1).lower() != "bearer" and not (
        any(c.isdigit() for c in cred) or (cred.lower() != cred and cred.upper() != cred)
    ):
        return m.group(0)
    return m.group(1) + " " + MASK


def _run_shape_sub(m: re.Match[str]) -> str:
    """The prefix of an id-like shape kept; a bare 40-character AWS secret access key only when it
    looks random (upper and lower case, digits, many distinct characters), as git SHA-1s (lower-case
    hex) and paths do not."""
    group = m.lastgroup or ""
    if group != "aws_secret":
        return m.group(group) + MASK
    s = m.group(0)
    if (
        s.count("/") <= 3
        and not s.startswith("/")
        and any(c.isdigit() for c in s)
        and any(c.isupper() for c in s)
        and any(c.islower() for c in s)
        and len(set(s)) >= 18
    ):
        return MASK
    return s


_Repl = str | Callable[[re.Match[str]], str] | _Keyed
_KEY_NEEDLES = ("pass", "pw", "secret", "token", "key", "auth", "credential", "cookie", "session", "bearer", "jwt",
                "signature")  # fmt: skip
_PEM = r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY([A-Z ]*)-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----|$)"
_HEADERS = _ci(
    "proxy-authorization|authorization|set-cookie|cookie|x-api-key|api-key|x-auth-token|x-jfrog-art-api|"
    "x-amz-security-token"
)
_QUOTED_VALUE = r"""(?:"(?P<dq>(?:[^"\\\n]|\\.)*)"|'(?P<sq>(?:[^'\\\n]|\\.)*)'|\\"(?P<eq>.*?)\\"|"""

# (needles, pattern, replacement): a pattern runs only when one of its lower-case needles occurs in
# the lower-cased text (None: when the text has a run of 16+ token characters); a string replacement
# may keep group 1, a harmless prefix. Specific shapes first, then headers, then key=value pairs.
_PATTERNS: list[tuple[tuple[str, ...] | None, re.Pattern[str], _Repl]] = [
    # PEM armour: the replacement has no "BEGIN", which secret scanners flag by itself
    (("private key",), re.compile(_PEM, re.S), r"\1PRIVATE KEY\2 " + MASK),
    (("putty-user-key-file",), re.compile(r"PuTTY-User-Key-File-\d+:.*", re.S), "PuTTY private key " + MASK),
    # scheme://user:password@host, the password up to the last "@" (it may hold "@" or "/"); not host:port/...
    (("://",),
     re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]{0,30}://[^\s:/?#\"'<>]{0,256}:)(?!\d{1,5}(?:[/?#\"'<>\s]|$))"
                r"[^\s\"'<>]{1,1024}@"),
     r"\1" + MASK + "@"),
    (("akia", "asia", "agpa", "aida", "aroa", "anpa", "abia", "acca", "a3t"),
     re.compile(r"\b((?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{4})[A-Z0-9]{12}\b"), r"\1" + MASK),
    ((":aa",), re.compile(r"\b([0-9]{8,10}:)AA[A-Za-z0-9_\-]{33}"), r"\1" + MASK),  # Telegram bot
    (("aiza",), re.compile(r"\b(AIza)[0-9A-Za-z\-_]{35}"), r"\1" + MASK),
    (("ya29.",), re.compile(r"\b(ya29\.)[0-9A-Za-z\-_]{20,}"), r"\1" + MASK),
    (("gh",), re.compile(r"\b(gh[pousr]_)[A-Za-z0-9_]{30,}"), r"\1" + MASK),
    (("github_pat_",), re.compile(r"\b(github_pat_)[A-Za-z0-9_]{22,}"), r"\1" + MASK),
    (("gl", "gr1348941"),
     re.compile(r"\b(gl(?:pat|dt|ft|rt|ptt|cbt|imt|agent|oas|soat|sa|ffct)-|GR1348941)[A-Za-z0-9\-_]{20,}"),
     r"\1" + MASK),
    (("xox", "xapp-"), re.compile(r"\b(xox[abposrce]-|xoxe\.xox[bp]-|xapp-)[A-Za-z0-9\-]{10,}"), r"\1" + MASK),
    (("hooks.slack",),
     re.compile(r"(https://hooks\.slack\.com/(?:services|workflows|triggers)/)[A-Za-z0-9/_\-]+"), r"\1" + MASK),
    (("webhooks",),
     re.compile(r"(https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/)[0-9]+/[A-Za-z0-9_\-]+"),
     r"\1" + MASK),
    (("hf_", "api_org_"), re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{30,}"), r"\1" + MASK),
    (("sk-",), re.compile(r"\b(sk-(?:proj-|ant-|svcacct-|admin-)?)[A-Za-z0-9\-_]{20,}"), r"\1" + MASK),
    (("r8_",), re.compile(r"\b(r8_)[A-Za-z0-9]{30,}"), r"\1" + MASK),
    (("_live_", "_test_", "whsec_"),
     re.compile(r"\b((?:sk|rk|pk)_(?:live|test)_|whsec_)[A-Za-z0-9]{16,}"), r"\1" + MASK),
    (("sg.",), re.compile(r"\b(SG\.)[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}"), r"\1" + MASK),
    (("-us",), re.compile(r"\b[0-9a-f]{32}(-us[0-9]{1,2})\b"), MASK + r"\1"),  # Mailchimp
    (("key-",), re.compile(r"\b(key-)[0-9a-f]{32}\b"), r"\1" + MASK),  # Mailgun
    (("sq0",), re.compile(r"\b(sq0(?:atp|csp)-)[0-9A-Za-z\-_]{22,}"), r"\1" + MASK),
    (("shp",), re.compile(r"\b(shp(?:at|ss|ca|pa)_)[a-fA-F0-9]{32}"), r"\1" + MASK),
    (("dapi",), re.compile(r"\b(dapi)[a-f0-9]{32}(?:-[0-9])?"), r"\1" + MASK),
    (("dop_v1_", "doo_v1_", "dor_v1_"), re.compile(r"\b(do[opr]_v1_)[a-f0-9]{64}"), r"\1" + MASK),
    (("npm_",), re.compile(r"\b(npm_)[A-Za-z0-9]{36}"), r"\1" + MASK),
    (("pypi-",), re.compile(r"\b(pypi-)AgE[A-Za-z0-9\-_]{50,}"), r"\1" + MASK),
    (("akc",), re.compile(r"(?<![A-Za-z0-9])(AKC)[a-zA-Z0-9]{10,}"), r"\1" + MASK),  # Artifactory
    (("q~",), re.compile(r"(?<![\w~.\-])([\w~.\-]{3}[0-9]Q~)[\w~.\-]{31,34}"), r"\1" + MASK),  # Entra ID
    (("eyj",), re.compile(r"\b(eyJ)[A-Za-z0-9\-_=]{8,}\.eyJ[A-Za-z0-9\-_=]{4,}\.[A-Za-z0-9\-_=.+/]*"), r"\1" + MASK),
    (("accountkey=", "sharedaccesssignature=", "sig="),
     re.compile(r"(" + _ci("AccountKey=|SharedAccessSignature=") + r"|[?&]" + _ci("sig") + r"=)[A-Za-z0-9%+/=]{16,}"),
     r"\1" + MASK),
    # Header lines: everything after the header name is the credential (a scheme word is kept).
    (("authorization", "cookie", "api-key", "auth-token", "art-api", "security-token"),
     re.compile(rf"\b({_HEADERS})(\\?[\"']?\s*:\s*\\?[\"']?)"
                rf"(?!(?:{_SCHEMES})\s+\[REDACTED\]|\[REDACTED\])((?:{_SCHEMES})\s+)?[^\s\"'\\][^\r\n\"'\\]*"),
     r"\1\2\3" + MASK),
    (("bearer", "basic", "token"),
     re.compile(r"\b(" + _ci("bearer|basic|token") + r")\s+(?!\[REDACTED\])([A-Za-z0-9\-._~+/]{6,}=*)"), _scheme_sub),
    # key=value, key: value, "key": "value", key => value, --key value: the key decides (is_secret_key).
    (_KEY_NEEDLES,
     re.compile("|".join(_KEY_NEEDLES)),
     _Keyed(_QUOTED_VALUE + r"""(?P<bare>[^\s"',;&\[\](){}<>\\]{3,}))""", by_needle=True)),
    (("--",),
     re.compile(r"(?<!\S)--(?P<key>(?=[A-Za-z])[\w.\-]{1,64}) +"),
     _Keyed(_QUOTED_VALUE + r"""(?P<bare>[^\s"'\-][^\s"']*))""")),
    # Shapes without a literal to look for, only in text with a run of 20+ token characters, in one pass:
    # Discord bot tokens, Twilio keys, bare 40-character AWS secret keys.
    (None,
     re.compile(r"\b(?P<discord>[MNO][A-Za-z0-9_\-]{23,25}\.)[A-Za-z0-9_\-]{6}\.[A-Za-z0-9_\-]{27,}"
                r"|\b(?P<twilio>(?:AC|SK)[a-f0-9]{4})[a-f0-9]{28}\b"
                r"|(?<![A-Za-z0-9/+=])(?P<aws_secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"),
     _run_shape_sub),
]  # fmt: skip

# Every shape above contains "=", ":", "@" or "--", a run of 16+ token characters, an Entra "Q~" or a
# scheme word and a space; testing that first (C-level substring tests, one regex scan) keeps the
# common clean string cheap.
_LONG_RUN = re.compile(r"[A-Za-z0-9+/_\-]{20}")  # the shapes without a needle all have one
# A timestamp passes the pre-check (":") and is the most common such value (every line's ``ts``).
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]{1,9})?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?"
)
_RUN_OR_SCHEME = re.compile(r"[A-Za-z0-9+/_\-]{16}|[0-9]Q~|(?:" + _ci("bearer|basic|token") + r")\s")
# Which patterns each needle enables: a string that passes the pre-check is searched for any needle in
# one regex pass (most clean strings stop there), then for each needle, and only the patterns it can
# hold run, in their order.
_NEEDLES = tuple(sorted({n for needles, _, _ in _PATTERNS if needles for n in needles}))
_ANY_NEEDLE = re.compile("|".join(re.escape(n) for n in sorted(_NEEDLES, key=len, reverse=True)))
_BY_NEEDLE = {n: frozenset(i for i, (ns, _, _) in enumerate(_PATTERNS) if ns and n in ns) for n in _NEEDLES}
_ON_LONG_RUN = tuple(i for i, (ns, _, _) in enumerate(_PATTERNS) if ns is None)


def _maybe_secret(text: str) -> bool:
    return len(text) >= 8 and (
        "=" in text or ":" in text or "@" in text or "--" in text or _RUN_OR_SCHEME.search(text) is not None
    )


def redact_text(text: str) -> str:
    """Replace every secret shape in ``text``; cheap pre-checks keep clean strings fast."""
    return _redact_checked(text) if _maybe_secret(text) else text


def _redact_checked(text: str) -> str:
    """:func:`redact_text` for a text that passed :func:`_maybe_secret`."""
    if _TIMESTAMP.fullmatch(text) is not None:
        return text
    low = text.lower()
    long_run = _LONG_RUN.search(text) is not None
    todo: Iterable[int]
    if _ANY_NEEDLE.search(low) is None:
        if not long_run:
            return text
        todo = _ON_LONG_RUN
    else:
        found: set[int] = set(_ON_LONG_RUN) if long_run else set()
        for needle in filter(low.__contains__, _NEEDLES):
            found |= _BY_NEEDLE[needle]
        todo = sorted(found)
    for i in todo:
        pattern, repl = _PATTERNS[i][1], _PATTERNS[i][2]
        text = repl(pattern, text) if isinstance(repl, _Keyed) else pattern.sub(repl, text)
    return text


# --- values: plain data, containers, everything else ----------------------------------------------

_PASS_THROUGH = (float, _dt.date, _dt.time, _dt.timedelta, uuid.UUID)  # numbers, times, ids: never a secret
_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1  # orjson's integer range


def _text_of(value: Any) -> str:
    """The text a renderer would write for a value that is not plain data (``str()``, as orjson's
    ``default=str`` and the logfmt renderer do); bytes are decoded. Never raises."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


def _mask(value: Any) -> Any:
    """A value under a secret-named key: masked unless it cannot hold a secret (None, a bool, a
    non-integer number, which is a measurement, an empty string or container)."""
    if value is None or isinstance(value, bool | float):
        return value
    try:
        if len(value) == 0:
            return value
    except Exception:
        pass
    return MASK


def _redact_key(key: Any) -> str:
    text = key if type(key) is str else _text_of(key)
    return redact_text(text)


class _Walk:
    """One iterative, cycle-safe walk of a value: a redacted copy made of plain data only (dicts with
    string keys, lists, strings, numbers, bools, None, dates, UUIDs).

    ``scan=False`` makes the same plain copy without redacting (for renderers that cannot take the
    original: non-string keys, cycles, deep nesting, integers over 64 bits).
    """

    __slots__ = ("actions", "deep", "path", "scan", "stack")

    def __init__(self, actions: dict[str, int], scan: bool = True) -> None:
        self.actions = actions
        self.scan = scan
        self.path: set[int] = set()  # ids of the containers being copied (their ancestors): cycles
        self.stack: list[Any] = []
        self.deep: list[tuple[Any, Any]] = []  # (container, slot) holding a subtree past MAX_DEPTH

    def run(self, value: Any, action: int = SCAN_VALUE) -> Any:
        box: list[Any] = [None]
        stack = self.stack
        stack.append((box, 0, value, 0, action))
        while stack:
            item = stack.pop()
            if type(item) is int:  # a container's children are all done: it leaves the path
                self.path.discard(item)
                continue
            target, slot, v, depth, how = item
            out = target[slot] = self._one(v, depth, how)
            if depth == MAX_DEPTH and type(out) in (dict, list):
                self.deep.append((target, slot))
        for target, slot in self.deep:  # once every subtree is complete
            target[slot] = _json_text(target[slot])
        return box[0]

    def _one(self, v: Any, depth: int, how: int) -> Any:
        if how & MASK_VALUE and self.scan:
            return _mask(v)
        t = type(v)
        if t is str:
            return redact_text(v) if self.scan else v
        if v is None or t is bool or t is float:
            return v
        if isinstance(v, int):
            return v if _I64_MIN <= v <= _U64_MAX else str(v)
        if isinstance(v, _PASS_THROUGH):
            return v
        if isinstance(v, enum.Enum):
            return self._one(v.value, depth, how)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            try:
                v = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
            except Exception:
                v = _text_of(v)
        if isinstance(v, Mapping):
            return self._container(v, depth, True)
        if isinstance(v, list | tuple | set | frozenset):
            return self._container(v, depth, False)
        text = _text_of(v)
        return redact_text(text) if self.scan else text

    def _container(self, v: Any, depth: int, mapping: bool) -> Any:
        vid = id(v)
        if vid in self.path:
            return CYCLE
        try:
            items = list(v.items()) if mapping else list(v)
        except Exception:  # a broken custom container: keep its text
            text = _text_of(v)
            return redact_text(text) if self.scan else text
        self.path.add(vid)
        stack = self.stack
        stack.append(vid)
        depth += 1
        out: Any
        if mapping:
            out = {}
            actions = self.actions
            for k, child in items:
                if type(k) is str:
                    action = actions.get(k)
                    if action is None:
                        action = _remember(actions, k, key_action(k))
                    key = redact_text(k) if action & REDACT_KEY and self.scan else k
                else:
                    key = _redact_key(k) if self.scan else _text_of(k)
                    action = key_action(key)
                n = 2
                base = key
                while key in out:  # two keys that read the same once redacted or turned into text
                    key = f"{base}~{n}"
                    n += 1
                out[key] = None
                stack.append((out, key, child, depth, action))
        else:
            out = [None] * len(items)
            for i in range(len(items) - 1, -1, -1):
                stack.append((out, i, items[i], depth, SCAN_VALUE))
        return out


def _json_text(value: Any) -> str:
    """JSON text of a plain value of any depth, without recursion (for subtrees past MAX_DEPTH)."""
    parts: list[str] = []
    stack: list[Any] = [value]
    while stack:
        v = stack.pop()
        if type(v) is _Raw:
            parts.append(v.text)
        elif type(v) is dict:
            parts.append("{")
            todo: list[Any] = []
            for i, (k, child) in enumerate(v.items()):
                todo.append(_Raw(("," if i else "") + orjson.dumps(k).decode() + ":"))
                todo.append(child)
            todo.append(_Raw("}"))
            stack.extend(reversed(todo))
        elif type(v) is list:
            parts.append("[")
            todo = []
            for i, child in enumerate(v):
                if i:
                    todo.append(_Raw(","))
                todo.append(child)
            todo.append(_Raw("]"))
            stack.extend(reversed(todo))
        else:
            parts.append(orjson.dumps(v, default=str).decode())
    return "".join(parts)


class _Raw:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _remember(cache: dict[str, int], key: str, action: int) -> int:
    if len(cache) >= _KEY_CACHE_MAX:
        cache.clear()
    cache[key] = action
    return action


def redact_value(value: Any, actions: dict[str, int] | None = None) -> Any:
    """A redacted copy of any value: the rules of this module at every depth (see :class:`_Walk`).
    Strings and numbers come back as they are or redacted; containers as new dicts and lists."""
    return _Walk({} if actions is None else actions).run(value)


def plain_value(value: Any) -> Any:
    """The same plain copy as :func:`redact_value`, not redacted: what a renderer can always write."""
    return _Walk({}, scan=False).run(value)


def redact_event(
    event: MutableMapping[str, Any], actions: dict[str, int], skip: frozenset[str] = frozenset()
) -> MutableMapping[str, Any]:
    """Redact an event dict's values in place (keys through :func:`key_action`, cached in ``actions``);
    returns it, or a new dict in the same order when a key itself had to be rewritten.

    The hot loop of every redacting path: numbers and short strings cost a type test and one cached
    key lookup, nested and non-plain values go through :func:`redact_value`.
    """
    renamed = False
    for k, v in event.items():
        t = type(v)
        if t is float:
            continue  # a measurement: never masked, no shape
        try:
            action = actions[k]
        except KeyError:
            action = _remember(actions, k, key_action(k, skip))
        if action != SCAN_VALUE:
            if action == LEAVE:
                continue
            if action & REDACT_KEY:
                renamed = True
            if action & MASK_VALUE:
                event[k] = _mask(v)
                continue
        if t is str:
            if len(v) >= 8 and _maybe_secret(v):
                event[k] = _redact_checked(v)
        elif t is not int and v is not None and t is not bool:
            event[k] = _Walk(actions).run(v)
    if renamed:
        out: dict[str, Any] = {}
        for k, v in event.items():
            out[redact_text(k) if actions.get(k, 0) & REDACT_KEY else k] = v
        return out
    return event


_RECORD_ACTIONS: dict[str, int] = {}


def redact_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A redacted copy of one log record written by another program (a JSON object from its file):
    keys and values under the same rules as our own events, at any depth; ``record`` is not changed.

    For the shipper: call it on the parsed object before taking fields out of it (the message and
    any other key are scanned like the rest). Nested values come back as plain data (non-string
    keys as text, cycles cut, containers past :data:`MAX_DEPTH` as JSON text).
    """
    return cast(dict[str, Any], redact_event(dict(record), _RECORD_ACTIONS))


class RedactSecrets:
    """structlog processor: scrub secrets from every key and value (at any depth) before rendering.

    Place it after the exception renderer (``format_exc_info`` or ``dict_tracebacks``): a traceback's
    text and an exception's message are values like any other. Whether a key names a secret is
    decided once per distinct key and cached (:attr:`actions`, :meth:`action`).
    """

    DEFAULT_SKIP = ("ts", "level", "seq", "job", "rank", "node", "run_id")

    def __init__(self, skip_keys: Iterable[str] = DEFAULT_SKIP) -> None:
        self.skip = frozenset(skip_keys)
        self.actions: dict[str, int] = {}

    def action(self, key: str) -> int:
        """:func:`key_action` for ``key`` with this processor's skip list, remembered in :attr:`actions`."""
        return _remember(self.actions, key, key_action(key, self.skip))

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        return redact_event(event_dict, self.actions, self.skip)
