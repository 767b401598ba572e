"""The pure header parsers: ``Accept-Encoding`` weights and ``Authorization: Basic``, with property tests."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlops_obs.web.headers import accepts_gzip, basic_credentials

_CODINGS = ["gzip", "x-gzip", "GZIP", "deflate", "br", "identity", "*", "compress", "zstd"]
# Weights and what RFC 9110's qvalue grammar makes of them; a malformed one counts as 0.
_QS: dict[str | None, float] = {None: 1.0, "0": 0.0, "0.0": 0.0, "0.000": 0.0, "0.001": 0.001, "0.5": 0.5, "1": 1.0,
                                "1.0": 1.0, "1.000": 1.0, "bogus": 0.0, "2": 0.0, "-1": 0.0, "0.0001": 0.0}  # fmt: skip


@given(
    st.lists(st.tuples(st.sampled_from(_CODINGS), st.sampled_from(list(_QS)), st.sampled_from(["", " "])), max_size=6)
)
def test_accepts_gzip_matches_the_rfc_model(elements: list[tuple[str, str | None, str]]) -> None:
    header = ",".join(f"{sp}{c}{'' if q is None else f'{sp};{sp}q={q}'}" for c, q, sp in elements)
    gz = [_QS[q] for c, q, _ in elements if c.lower() in ("gzip", "x-gzip")]
    star = [_QS[q] for c, q, _ in elements if c == "*"]
    expected = max(gz) > 0 if gz else bool(star) and star[-1] > 0
    assert accepts_gzip(header) is expected, header


@given(st.text(max_size=200))
def test_accepts_gzip_never_raises(header: str) -> None:
    assert accepts_gzip(header) in (True, False)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("gzip", True), ("gzip;q=0", False), ("GZIP; Q=0", False), ("gzip;q=1.5", False), ("x-gzip", True),
     ("*;q=0.1", True), ("gzip;q=0, *", False), (None, False)],
)  # fmt: skip
def test_accepts_gzip_examples(header: str | None, expected: bool) -> None:
    assert accepts_gzip(header) is expected


@given(st.text(max_size=80).filter(lambda u: ":" not in u), st.text(max_size=120))
def test_basic_credentials_round_trip(user: str, password: str) -> None:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert basic_credentials(f"Basic {token}") == (user, password)
    assert basic_credentials(f"basic  {token} ") == (user, password)


@given(st.text(max_size=200))
def test_basic_credentials_never_raise(header: str) -> None:
    got = basic_credentials(header)
    assert got is None or (isinstance(got[0], str) and isinstance(got[1], str))


@pytest.mark.parametrize(
    "header",
    ["", "Bearer abc", "Basic", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(),
     "Basic " + base64.b64encode(b"\xff\xfe:x").decode()],
)  # fmt: skip
def test_basic_credentials_refused(header: str) -> None:
    assert basic_credentials(header) is None
