"""Property tests for the redactor (hypothesis): what holds for every input, not only the corpus.

* a corpus secret embedded anywhere in an arbitrary nested structure (as a string, bytes, an
  exception, an object's text or a dict key, at any depth, 100 levels included) never survives
  rendering;
* structure and values without secrets come back unchanged;
* redaction is idempotent, never raises, and always gives something orjson and ``str()`` can render;
* :func:`redact_record` does not modify its input.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import orjson
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlops_obs.logs.redact import MASK, is_secret_key, redact_record, redact_text, redact_value

CORPUS: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).parent / "fixtures" / "secrets" / "corpus.yaml").read_text()
)
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text around a secret: words and punctuation, never "=", ":", quotes or "@" (which could legitimately
# make a different shape of the secret, e.g. turn its first word into a key name).
FILLER = st.text(alphabet=string.ascii_letters + string.digits + " .,;!?()", max_size=20)
CLEAN_TEXT = st.text(alphabet=string.ascii_lowercase + string.digits + " .,", max_size=40)
CLEAN_KEY = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12).filter(
    lambda k: not is_secret_key(k) and redact_text(k) == k
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    CLEAN_TEXT,
)
CLEAN_TREE = st.recursive(
    SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(CLEAN_KEY, children, max_size=4)
)


class _Shows:
    """An arbitrary object whose text holds the secret (a client, an ORM engine, a model)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"_Shows({self.text!r})"


@st.composite
def embedded_secret(draw: st.DrawFn) -> tuple[Any, list[str]]:
    """(a nested value holding one corpus shape somewhere, the strings that must not survive)."""
    entry = draw(st.sampled_from(CORPUS))
    text = f"{draw(FILLER)} {entry['text']} {draw(FILLER)}"
    form = draw(st.sampled_from(["str", "bytes", "exception", "object", "key"]))
    value: Any = {
        "str": text,
        "bytes": text.encode(),
        "exception": RuntimeError(text),
        "object": _Shows(text),
        "key": {text: draw(SCALARS)},
    }[form]
    for _ in range(draw(st.integers(min_value=0, max_value=100))):
        siblings = draw(st.lists(SCALARS, max_size=2))
        kind = draw(st.sampled_from(["dict", "list", "tuple"]))
        if kind == "dict":
            value = {**{f"s{i}": s for i, s in enumerate(siblings)}, draw(CLEAN_KEY): value}
        else:
            siblings.insert(draw(st.integers(min_value=0, max_value=len(siblings))), value)
            value = siblings if kind == "list" else tuple(siblings)
    return value, entry["secret"]


@SETTINGS
@given(embedded_secret())
def test_an_embedded_secret_never_survives(case: tuple[Any, list[str]]) -> None:
    value, secrets = case
    out = redact_value(value)
    for rendered in (orjson.dumps(out).decode(), str(out)):
        leaked = [s for s in secrets if s in rendered]
        assert not leaked, f"{leaked} in {rendered[:500]!r}"


@SETTINGS
@given(embedded_secret())
def test_redact_record_finds_embedded_secrets_and_leaves_its_input(case: tuple[Any, list[str]]) -> None:
    value, secrets = case
    record = {"message": "x", "payload": value}
    before = repr(record)
    out = orjson.dumps(redact_record(record)).decode()
    assert not [s for s in secrets if s in out]
    assert repr(record) == before


@SETTINGS
@given(CLEAN_TREE)
def test_clean_structure_is_kept(value: Any) -> None:
    assert redact_value(value) == value
    if isinstance(value, dict):
        assert redact_record(value) == value


@SETTINGS
@given(st.text(max_size=300) | st.sampled_from([e["text"] for e in CORPUS]))
def test_redact_text_is_idempotent(text: str) -> None:
    once = redact_text(text)
    assert redact_text(once) == once


@SETTINGS
@given(
    st.recursive(
        st.one_of(
            SCALARS,
            st.text(max_size=50),
            st.binary(max_size=50),
            st.integers(),
            st.floats(),
            st.builds(_Shows, st.text(max_size=30)),
            st.builds(ValueError, st.text(max_size=30)),
            st.sets(st.integers(), max_size=3),
        ),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.one_of(st.text(max_size=10), st.integers(), st.binary(max_size=5)), children, max_size=3
            )
            | st.tuples(children, children)
        ),
    )
)
def test_any_value_redacts_to_something_renderable(value: Any) -> None:
    """Whatever is logged (bytes, objects, non-string keys, any int), the result renders as JSON."""
    before = repr(value)
    out = redact_value(value)
    orjson.dumps(out)
    str(out)
    assert repr(value) == before  # the caller's value is never modified


def test_deep_and_cyclic_values_render() -> None:
    """A cycle is cut; 10,000 levels do not recurse (the walk and the text of the deep part are iterative)."""
    cyc: dict[str, Any] = {"url": "https://u:Zq8vLm2pXrTw4N@h/"}
    cyc["again"] = [cyc]
    out = redact_value(cyc)
    assert out == {"url": f"https://u:{MASK}@h/", "again": ["[cycle]"]}
    deep: Any = "token=Tm4Kx8Qp2Vz7Rw1s"
    for _ in range(10_000):
        deep = {"d": deep}
    text = orjson.dumps(redact_value(deep)).decode()
    assert "Tm4Kx8Qp2Vz7Rw1s" not in text and MASK in text
