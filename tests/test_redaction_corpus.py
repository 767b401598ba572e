"""Redaction corpus: every secret shape, through the real logger, in JSON and logfmt, leaves no trace.

The text shapes live in ``tests/fixtures/secrets/corpus.yaml``; each is logged as the message, as a
value, nested in a value and through a stdlib logger. The structural cases below are the ways a
secret reaches a logger without being a plain string value: an exception's message and a stdlib
traceback, bytes, exception objects and other objects as values, integers under secret-named keys,
secrets used as keys, deep nesting, cycles, bound context, positional arguments, warnings.

Yelp's detect-secrets (entropy and public-IP plugins off) checks the result independently: it finds
the corpus's secrets in what the logger writes with redaction off, and nothing in what it writes
with redaction on (nor in :func:`redact_record`'s output for other programs' JSON lines).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from mlops_obs.logs import configure, get_logger
from mlops_obs.logs.config import unconfigure

FIXTURE = Path(__file__).parent / "fixtures" / "secrets" / "corpus.yaml"
CORPUS: list[dict[str, Any]] = yaml.safe_load(FIXTURE.read_text())
MASK = "[REDACTED]"
FORMATS = ("json", "logfmt")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    emit: Callable[[Any], None]  # called with a logger after configure()
    secrets: tuple[str, ...]


def _as_message(text: str) -> Callable[[Any], None]:
    return lambda log: log.info(text)


def _as_value(text: str) -> Callable[[Any], None]:
    return lambda log: log.info("config loaded", detail=text)


def _nested(text: str) -> Callable[[Any], None]:
    return lambda log: log.info("config loaded", cfg={"env": [{"name": "X", "value": text}], "n": 3})


def _stdlib(text: str) -> Callable[[Any], None]:
    return lambda log: logging.getLogger("torch.distributed").warning("%s", text)


# --- structural cases: (name, emit, secrets) -------------------------------------------------------


class _Conn:
    """An object whose str() holds a secret (an ORM engine, a client, a pydantic model...)."""

    def __str__(self) -> str:
        return "Engine(postgresql://ml:Zq8vLm2pXrTw4N@db/runs)"


@dataclasses.dataclass
class _DbSettings:
    host: str
    password: str


def _raise(exc: BaseException) -> None:
    raise exc


def _exception_message(log: Any) -> None:
    try:
        _raise(ConnectionError("auth failed for https://svc:Hq7nB2vXk9LmPw@registry.internal/v2/"))
    except ConnectionError:
        log.exception("pull failed")


def _exception_message_text_arg(log: Any) -> None:
    try:
        _raise(ValueError("bad config"))
    except ValueError:
        log.exception("rejected token=Tm4Kx8Qp2Vz7Rw1s")


def _exception_chained(log: Any) -> None:
    try:
        try:
            _raise(KeyError("api_key=Jd5Wq2Nz8Lx4Pm7r"))
        except KeyError as e:
            raise RuntimeError("lookup failed") from e
    except RuntimeError:
        log.exception("init failed")


def _exception_note(log: Any) -> None:
    try:
        e = OSError("mount failed")
        e.add_note("mount options: username=ci,password=Xb3Vn8Kq5Lm2Tz")
        _raise(e)
    except OSError:
        log.exception("volume error")


def _stdlib_traceback(log: Any) -> None:
    try:
        _raise(RuntimeError("rendezvous store refused Bearer Kr8mWq3Zt6Ny1Pv4Hx9Lb2Dc"))
    except RuntimeError:
        logging.getLogger("torch.distributed.elastic").exception("rendezvous failed")


def _stdlib_exc_info(log: Any) -> None:
    try:
        _raise(PermissionError("s3 denied for AKIAW8RTM3QXZ5NK2VYB"))
    except PermissionError:
        logging.getLogger("botocore").error("upload failed", exc_info=True)


def _stdlib_args(log: Any) -> None:
    logging.getLogger("urllib3").warning("Retrying %s after %d tries", "https://u:Pz5Kw8Nq3Rt7@pypi.internal/", 3)


def _warning(log: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("HF_TOKEN=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 is deprecated", UserWarning, stacklevel=1)


def _deep(log: Any) -> None:
    v: Any = {"password": "Vg6Jt3Wp9Bq2Ns"}
    for i in range(12):
        v = {f"level{i}": v, "note": "ok"}
    log.info("deep config", cfg=v)


def _deep_text(log: Any) -> None:
    v: Any = "mirror https://bot:Ls4Gx8Hm2Wq6Jc@git.internal/x.git"
    for _ in range(300):
        v = [v]
    log.info("very deep", cfg=v)


def _bytes(log: Any) -> None:
    log.info("response", body=b"Authorization: Bearer Wn5Rk8Tz2Qx7Lm4Vb9Hc3Jd6")


def _bytearray(log: Any) -> None:
    log.info("frame", data=bytearray(b"\xff\x00 password=Fc7Nw2Pk9Xr4Qm"))


def _bytes_nested(log: Any) -> None:
    log.info("env", env={"vars": [b"GITHUB_TOKEN=ghp_Tx8Kq3Wm6Zr9Lp2Nv5Bc4Hd7Jg1Fs0Ya2Ue"]})


def _exception_value(log: Any) -> None:
    log.warning("retrying", error=ValueError("invalid password=Qh3Zm8Vx5Tn2Wk"))


def _exception_value_nested(log: Any) -> None:
    log.warning("retrying", errors=[TimeoutError("slack xoxb-4821956307-7260394815-Hq3ZpWn8RtKv5LmX2cYb9JdF")])


def _object_value(log: Any) -> None:
    log.info("engine", engine=_Conn())


def _dataclass_value(log: Any) -> None:
    log.info("settings", db=_DbSettings(host="db", password="Rk2Wm7Pq4Zx9Tn"))


def _int_password(log: Any) -> None:
    log.info("login", user="svc", password=482913756)


def _int_password_nested(log: Any) -> None:
    log.info("login", cfg={"smtp": {"port": 25, "pin_pass": 90817263}})


def _passphrase(log: Any) -> None:
    log.info("unlocking key", passphrase="Wd8Kq3Zx6Nm2Pt")


def _db_pass(log: Any) -> None:
    log.info("db", db_pass="Lq7Vn2Xk9Rm4Bz")


SECRET_NAMED = {
    "client_secret": "Hb4Mz8Wq2Tn6Rx",
    "credentials": {"user": "svc", "key": "Pt5Nx9Kw3Zq7Lm"},
    "private_key": "Gc6Wr2Nm8Xq4Tz",
    "accessToken": "Vx3Lk7Qm9Zt2Wn",
    "refresh_token": "Nz8Tq4Wx6Km2Rb",
    "headers": {"X-Api-Key": "Km4Zq8Wt2Nx6Lv", "Cookie": "sid=Rt7Wm3Kx9Zq5Nb"},
    "smtp_pass": "Bw9Xq5Tm3Zk7Nr",
}
SECRET_NAMED_VALUES = ("Hb4Mz8Wq2Tn6Rx", "Pt5Nx9Kw3Zq7Lm", "Gc6Wr2Nm8Xq4Tz", "Vx3Lk7Qm9Zt2Wn", "Nz8Tq4Wx6Km2Rb")
SECRET_NAMED_VALUES += ("Km4Zq8Wt2Nx6Lv", "Rt7Wm3Kx9Zq5Nb", "Bw9Xq5Tm3Zk7Nr")


def _secret_names(log: Any) -> None:
    log.info("client", **SECRET_NAMED)


def _secret_as_key(log: Any) -> None:
    log.info("token usage", usage={"ghp_Zr4Kw9Tq2Xm7Nb5Lv8Hc3Jd6Pf1Gs0Ya4Ue": 3, "other": 1})


def _secret_as_top_key(log: Any) -> None:
    log.info("odd", **{"xoxp-2839471650-5928371046-Bq4Zt8Wm2Xk6Nr3Lv9Hc5Jd7": "seen"})


def _secret_in_set_and_tuple(log: Any) -> None:
    log.info("tags", tags={"sk_live_Wq8Zt3Nm6Kx2Rb9Lv4Hc7Jd"}, pair=("user", "password=Tz6Km2Wq8Nx4Rv"))


def _cycle(log: Any) -> None:
    d: dict[str, Any] = {"url": "amqp://guest:Mv5Qz9Wk3Tn7Xr@rabbit:5672/"}
    d["self"] = d
    log.info("cyclic", state=d)


def _bound(log: Any) -> None:
    log.bind(api_key="Xn7Kq2Wz5Tm9Rb", run="r1").info("bound")


def _positional(log: Any) -> None:
    log.info("connecting to %s", "postgresql://ml:Wt4Zq8Km2Nx6Rv@db:5432/runs")


def _exception_object_with_secret_repr(log: Any) -> None:
    log.error("failed", errors={"first": KeyError("secret=Zw2Qm7Xk4Nt9Rb")})


STRUCTURAL: list[Case] = [
    Case("log.exception message", _exception_message, ("Hq7nB2vXk9LmPw",)),
    Case("log.exception event text", _exception_message_text_arg, ("Tm4Kx8Qp2Vz7Rw1s",)),
    Case("chained exception cause", _exception_chained, ("Jd5Wq2Nz8Lx4Pm7r",)),
    Case("exception note", _exception_note, ("Xb3Vn8Kq5Lm2Tz",)),
    Case("stdlib traceback", _stdlib_traceback, ("Kr8mWq3Zt6Ny1Pv4Hx9Lb2Dc",)),
    Case("stdlib exc_info", _stdlib_exc_info, ("W8RTM3QXZ5NK2VYB",)),
    Case("stdlib message arguments", _stdlib_args, ("Pz5Kw8Nq3Rt7",)),
    Case("warnings.warn", _warning, ("QmZpLkRtWvXyNbVcMnAsDfGhJkLqWeRtYu",)),
    Case("nested 13 levels", _deep, ("Vg6Jt3Wp9Bq2Ns",)),
    Case("nested 300 levels", _deep_text, ("Ls4Gx8Hm2Wq6Jc",)),
    Case("bytes value", _bytes, ("Wn5Rk8Tz2Qx7Lm4Vb9Hc3Jd6",)),
    Case("bytearray value", _bytearray, ("Fc7Nw2Pk9Xr4Qm",)),
    Case("bytes nested", _bytes_nested, ("Tx8Kq3Wm6Zr9Lp2Nv5Bc4Hd7Jg1Fs0Ya2Ue",)),
    Case("exception object value", _exception_value, ("Qh3Zm8Vx5Tn2Wk",)),
    Case("exception object nested", _exception_value_nested, ("Hq3ZpWn8RtKv5LmX2cYb9JdF",)),
    Case("exception object in a dict", _exception_object_with_secret_repr, ("Zw2Qm7Xk4Nt9Rb",)),
    Case("object value", _object_value, ("Zq8vLm2pXrTw4N",)),
    Case("dataclass value", _dataclass_value, ("Rk2Wm7Pq4Zx9Tn",)),
    Case("integer password", _int_password, ("482913756",)),
    Case("integer under *_pass, nested", _int_password_nested, ("90817263",)),
    Case("passphrase key", _passphrase, ("Wd8Kq3Zx6Nm2Pt",)),
    Case("db_pass key", _db_pass, ("Lq7Vn2Xk9Rm4Bz",)),
    Case("secret-named keys", _secret_names, SECRET_NAMED_VALUES),
    Case("secret as a dict key", _secret_as_key, ("Zr4Kw9Tq2Xm7Nb5Lv8Hc3Jd6Pf1Gs0Ya4Ue",)),
    Case("secret as an event key", _secret_as_top_key, ("Bq4Zt8Wm2Xk6Nr3Lv9Hc5Jd7",)),
    Case("set and tuple values", _secret_in_set_and_tuple, ("Wq8Zt3Nm6Kx2Rb9Lv4Hc7Jd", "Tz6Km2Wq8Nx4Rv")),
    Case("cycle", _cycle, ("Mv5Qz9Wk3Tn7Xr",)),
    Case("bound context", _bound, ("Xn7Kq2Wz5Tm9Rb",)),
    Case("positional argument", _positional, ("Wt4Zq8Km2Nx6Rv",)),
]


def _text_cases() -> list[Case]:
    cases = []
    for entry in CORPUS:
        secrets = tuple(entry["secret"])
        for how, emit in (("message", _as_message), ("value", _as_value), ("nested", _nested), ("stdlib", _stdlib)):
            cases.append(Case(f"{entry['name']} ({how})", emit(entry["text"]), secrets))
    return cases


CASES = _text_cases() + STRUCTURAL


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    unconfigure()


def _log(path: Path, fmt: str, cases: list[Case], *, redact: bool = True) -> list[str]:
    """Log each case through the real configured logger into ``path``; the lines written per case."""
    per_case = []
    mode = "ab" if fmt == "json" else "a"
    for case in cases:
        start = path.stat().st_size if path.exists() else 0
        with open(path, mode) as f:
            configure("info", fmt, stream=f, context={"job": "corpus", "rank": 0}, redact=redact)
            case.emit(get_logger())
        with open(path, "rb") as f:
            f.seek(start)
            per_case.append(f.read().decode())
    return per_case


def test_corpus_size() -> None:
    """At least 60 text shapes, the 13 shapes of the issue among the cases, every secret unique."""
    assert len(CORPUS) >= 60
    names = {e["name"] for e in CORPUS}
    for shape in ("aws-secret-key-bare", "slack-app-level-token", "url-password-with-at", "url-password-with-slash"):
        assert shape in names
    all_secrets = [s for e in CORPUS for s in e["secret"]] + [s for c in STRUCTURAL for s in c.secrets]
    assert len(all_secrets) == len(set(all_secrets))
    for entry in CORPUS:
        assert all(s in entry["text"] for s in entry["secret"]), entry["name"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_no_secret_reaches_the_output(tmp_path: Path, fmt: str, case: Case) -> None:
    """The case's line is written (as valid JSON for the JSON format), redacted, without the secret."""
    out = _log(tmp_path / f"out.{fmt}", fmt, [case])[0]
    assert out.strip(), "nothing was logged"
    leaked = [s for s in case.secrets if s in out]
    assert not leaked, f"{case.name}: {leaked} leaked in {out!r}"
    assert MASK in out
    if fmt == "json":
        for line in out.splitlines():
            orjson.loads(line)


def test_non_secrets_stay_readable(tmp_path: Path) -> None:
    """Ordinary training lines keep every value: counts named like secrets, ids, hashes, paths."""
    fields = {
        "tokens": 1024,
        "num_tokens": 4096,
        "max_new_tokens": 256,
        "pad_token_id": 0,
        "tokens_per_second": 51234.5,
        "forward_pass_ms": 12.5,
        "pass_at_1": 0.42,
        "cache_key": "layer.0.weight",
        "commit": "3f2a9c0d8b7e6f5a4c3b2a1f0e9d8c7b6a5f4e3d",
        "ckpt": "/ckpt/run-17/step-000100.pt",
        "run_uuid": "550e8400-e29b-41d4-a716-446655440000",
        "url": "https://storage.example.com:443/bucket/key?x=1",
        "msg": "token embeddings computed for 4096 tokens; basic blocks fused",
    }
    for fmt in FORMATS:
        path = tmp_path / f"clean.{fmt}"
        _log(path, fmt, [Case("clean", lambda log: log.info("step", **fields), ())])
        text = path.read_text()
        assert MASK not in text
        if fmt == "json":
            rec = orjson.loads(text)
            assert {k: rec[k] for k in fields} == fields


# --- detect-secrets, as an independent check ------------------------------------------------------


def _detect_secrets(path: Path) -> dict[int, set[str]]:
    """detect-secrets' findings in ``path`` (line number -> finding types), entropy and IP plugins off."""
    proc = subprocess.run(
        [sys.executable, "-m", "detect_secrets", "scan",
         "--disable-plugin", "Base64HighEntropyString", "--disable-plugin", "HexHighEntropyString",
         "--disable-plugin", "IPPublicDetector", path.name],
        cwd=path.parent, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    disabled = {"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"}
    assert not disabled & {p["name"] for p in report["plugins_used"]}
    found: dict[int, set[str]] = {}
    for results in report["results"].values():
        for r in results:
            found.setdefault(r["line_number"], set()).add(r["type"])
    return found


def test_detect_secrets_finds_the_raw_corpus(tmp_path: Path) -> None:
    """The scanner flags, in the raw corpus (one shape a line), exactly the shapes the fixture's
    ``scanner`` field names, with those finding types: the corpus holds real-looking secrets."""
    path = tmp_path / "corpus.txt"
    path.write_text("".join(e["text"].replace("\n", "\\n") + "\n" for e in CORPUS))
    found = _detect_secrets(path)
    expected = {i + 1: set(e["scanner"]) for i, e in enumerate(CORPUS) if e["scanner"]}
    wrong = {CORPUS[n - 1]["name"]: (sorted(expected.get(n, ())), sorted(found.get(n, ())))
             for n in expected.keys() | found.keys() if expected.get(n) != found.get(n)}  # fmt: skip
    assert not wrong, f"shape: (fixture, detect-secrets) differ: {wrong}"
    assert len(expected) >= 40


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_secrets_finds_the_corpus_in_unredacted_output(tmp_path: Path, fmt: str) -> None:
    """With redaction off, the scanner still flags the corpus in what our logger writes (JSON and
    logfmt escaping do not hide it), so the empty scan of the redacted output below means something."""
    path = tmp_path / f"raw.{'jsonl' if fmt == 'json' else 'log'}"
    _log(path, fmt, [Case(e["name"], _as_message(e["text"]), ()) for e in CORPUS], redact=False)
    assert len(_detect_secrets(path)) >= 35


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_secrets_finds_nothing_in_redacted_output(tmp_path: Path, fmt: str) -> None:
    """Every case, redacted, in one file per format: the scanner flags nothing."""
    path = tmp_path / f"redacted.{'jsonl' if fmt == 'json' else 'log'}"
    _log(path, fmt, CASES)
    assert len(path.read_text().splitlines()) >= len(CASES)
    assert _detect_secrets(path) == {}


# --- redact_record: other programs' JSON lines, for the shipper ------------------------------------


FOREIGN_SECRETS = ("Jm5Wq8Zt3Nx7Kr", "Xc2Rv6Tn9Wq4Lb", "Hz7Nq3Km8Wx2Vt", "Bq6Tz2Wm9Kx5Rn", "Lw3Xk7Nq2Zm8Tv")


def _foreign_records() -> list[dict[str, Any]]:
    """Records as other loggers write them (python-json-logger, zap, pino...), holding the corpus."""
    records: list[dict[str, Any]] = []
    for i, e in enumerate(CORPUS):
        text = e["text"]
        shape = i % 4
        if shape == 0:
            records.append({"levelname": "INFO", "message": text})
        elif shape == 1:
            records.append({"level": 30, "msg": "request", "req": {"headers": {"x-trace": "1"}, "body": text}})
        elif shape == 2:
            records.append({"severity": "WARNING", "msg": "env", "env": [{"name": "VALUE", "value": text}]})
        else:
            records.append({"L": "ERROR", "M": "failed", "error": text, "stacktrace": f"Traceback: {text}"})
    pw = iter(FOREIGN_SECRETS)
    records += [
        {"msg": "login", "password": next(pw), "user": "svc"},
        {"msg": "db", "config": {"database": {"db_pass": next(pw), "port": 5432}}},
        {"msg": "ssh", "passphrase": next(pw)},
        {"msg": "client", "clientSecret": next(pw)},
        {"msg": "pin", "db_password": 77341902},
        {"msg": "creds", "credentials": {"aws_secret_access_key": next(pw)}},
    ]
    return records


def test_redact_record_output_passes_detect_secrets(tmp_path: Path) -> None:
    """The shipper's redaction of other loggers' JSON lines: the scanner flags the raw records and
    nothing once :func:`redact_record` has run; no secret string survives either."""
    from mlops_obs.logs.redact import redact_record

    records = _foreign_records()
    raw, clean = tmp_path / "raw.jsonl", tmp_path / "clean.jsonl"
    raw.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    redacted = [redact_record(r) for r in records]
    clean.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in redacted))
    assert len(_detect_secrets(raw)) >= 40
    assert _detect_secrets(clean) == {}
    text = clean.read_text()
    for e in CORPUS:
        assert not [s for s in e["secret"] if s in text], e["name"]
    for secret in (*FOREIGN_SECRETS, "77341902"):
        assert secret not in text
    assert redacted[0] == {"levelname": "INFO", "message": redacted[0]["message"]}  # shape kept


def test_logfmt_lines_stay_one_line_each(tmp_path: Path) -> None:
    """A traceback in logfmt is one escaped value, so every event stays one line for the shipper."""
    path = tmp_path / "d.log"
    _log(path, "logfmt", [Case("exc", _exception_message, ())])
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and "exception=" in lines[0] and "Traceback" in lines[0]
    assert MASK in lines[0] and "Hq7nB2vXk9LmPw" not in lines[0]
