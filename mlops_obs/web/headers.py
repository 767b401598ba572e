"""Pure parsers for the request headers the server acts on: ``Accept-Encoding`` and ``Authorization``.

Kept apart from the I/O so that they are tested directly, with property tests, the way
``collectors/host_parse.py`` is.
"""

from __future__ import annotations

import base64
import binascii
import re

_QVALUE = re.compile(r"^(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)$")


def _qvalue(params: list[str]) -> float:
    """The ``q`` of one ``Accept-Encoding`` element: 1 without one, 0 for a malformed one (RFC 9110 12.4.2)."""
    for p in params:
        name, sep, value = p.partition("=")
        if sep and name.strip().lower() == "q":
            v = value.strip()
            return float(v) if _QVALUE.match(v) else 0.0
    return 1.0


def accepts_gzip(header: str | None) -> bool:
    """Whether a response may be gzip-encoded for this ``Accept-Encoding`` (RFC 9110 12.5.3).

    ``gzip`` (or its alias ``x-gzip``) with a non-zero weight, or ``*`` with a non-zero weight when
    gzip is not named. ``gzip;q=0`` means "not gzip": the identity body is always acceptable to us
    and is what such a client gets. A malformed weight counts as zero: sending identity to a client
    that wanted gzip costs bytes, sending gzip to one that did not costs the scrape.
    """
    if not header:
        return False
    gzip_q: float | None = None
    star_q: float | None = None
    for element in header.split(","):
        coding, *params = element.split(";")
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            q = _qvalue(params)
            gzip_q = q if gzip_q is None else max(gzip_q, q)
        elif coding == "*":
            star_q = _qvalue(params)
    if gzip_q is not None:
        return gzip_q > 0
    return star_q is not None and star_q > 0


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` header, or ``None`` when there are none.

    Malformed base64, a value that is not UTF-8, or one without a colon all mean "no credentials":
    the client gets the same 401 as without the header.
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None
