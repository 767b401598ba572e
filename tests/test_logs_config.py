"""Job-side logging: JSON lines, sequence numbers, structured tracebacks, stdlib routing, redaction rules.

The redaction corpus (secret shapes through the real logger, detect-secrets) is tests/test_redaction_corpus.py."""

from __future__ import annotations

import io
import logging
import os
import pty
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog

from mlops_obs.logs import configure, get_logger
from mlops_obs.logs.config import unconfigure
from mlops_obs.logs.redact import MASK, MASK_VALUE, RedactSecrets, is_secret_key, key_action, redact_text

CTX = {"job": "train", "rank": 3, "node": "gpu-7", "run_id": "r-1"}


def _lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    unconfigure()


def test_json_lines_carry_context_level_ts_and_seq(tmp_path: Path) -> None:
    """Every line: bound context, level, canonical UTC ts, and seq 1, 2, 3 with no gaps."""
    out = tmp_path / "r.jsonl"
    with open(out, "ab") as f:
        configure("info", "json", stream=f, context=CTX)
        log = get_logger()
        log.debug("hidden")
        for i in range(5):
            log.info("step", step=i, loss=0.25)
        log.warning("slow", ms=12)
    recs = _lines(out)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert {r["job"] for r in recs} == {"train"} and {r["rank"] for r in recs} == {3}
    assert recs[0]["event"] == "step" and recs[0]["level"] == "info" and recs[-1]["level"] == "warning"
    for r in recs:
        ts = str(r["ts"])
        assert len(ts) == 27 and ts.endswith("Z") and ts[19] == "."


def test_exceptions_are_structured_without_locals_then_redacted(tmp_path: Path) -> None:
    """log.exception renders a traceback as data (type, value, frames), never the frames' locals, and
    redaction runs on it afterwards: the exception's message is scanned like any value."""
    out = tmp_path / "r.jsonl"
    with open(out, "ab") as f:
        configure("info", "json", stream=f, context=CTX)
        secret_local = "do-not-log-me"  # noqa: F841 - must not appear
        try:
            raise ValueError("login failed: password=Hq7nB2vXk9LmPw")
        except ValueError:
            get_logger().exception("step failed")
    rec = _lines(out)[0]
    exc = rec["exception"]
    assert isinstance(exc, list) and exc[0]["exc_type"] == "ValueError" and exc[0]["frames"]
    assert exc[0]["exc_value"] == f"login failed: password={MASK}"
    assert "locals" not in exc[0]["frames"][0]
    assert b"do-not-log-me" not in out.read_bytes() and b"Hq7nB2vXk9LmPw" not in out.read_bytes()


def test_stdlib_logging_and_warnings_routed_into_same_stream(tmp_path: Path) -> None:
    """Library records (torch, NCCL's Python side) and warnings arrive as JSON lines with seq."""
    out = tmp_path / "r.jsonl"
    with open(out, "ab") as f:
        configure("info", "json", stream=f, context=CTX)
        logging.getLogger("torch.distributed").warning("NCCL %s timeout", "allreduce")
        logging.getLogger("noisy").debug("below the level")
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
        get_logger().info("own")
    recs = _lines(out)
    assert recs[0]["logger"] == "torch.distributed" and recs[0]["event"] == "NCCL allreduce timeout"
    assert recs[0]["level"] == "warning" and recs[0]["job"] == "train"
    assert any("deprecated thing" in str(r["event"]) for r in recs)
    assert not any("below the level" in str(r["event"]) for r in recs)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))


def test_console_renderer_only_on_a_tty(tmp_path: Path) -> None:
    """'auto'/'console' render for humans on a terminal and fall back to JSON lines on a file."""
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            configure("info", "console", stream=tty, context=CTX)
            get_logger().info("hello tty")
            tty.flush()
        text = os.read(master, 4096).decode(errors="replace")
        assert "hello tty" in text and not text.lstrip().startswith("{")
    finally:
        os.close(master)
        os.close(slave)
    out = tmp_path / "f.jsonl"
    with open(out, "ab") as f:
        configure("info", "auto", stream=f, context=CTX)
        get_logger().info("hello file")
    assert _lines(out)[0]["event"] == "hello file"


def test_console_output_is_redacted_traceback_included() -> None:
    """On a terminal too: values and the rendered traceback are redacted."""
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            configure("info", "console", stream=tty, context=CTX)
            try:
                raise ValueError("password=Hq7nB2vXk9LmPw")
            except ValueError:
                get_logger().exception("boom", token="Tm4Kx8Qp2Vz7Rw1s")
            tty.flush()
        text = os.read(master, 65536).decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
    assert "Traceback" in text and "ValueError: password=[REDACTED]" in text
    assert "Hq7nB2vXk9LmPw" not in text and "Tm4Kx8Qp2Vz7Rw1s" not in text


def test_redaction_is_on_by_default_in_the_pipeline(tmp_path: Path) -> None:
    """A secret passed as a value or inside the message never reaches the file."""
    out = tmp_path / "r.jsonl"
    with open(out, "ab") as f:
        configure("info", "json", stream=f, context=CTX)
        get_logger().info(
            "connecting to postgres://admin:s3cr3tPass@db:5432/x",
            password="hunter2hunter2",
            headers={"Authorization": "Bearer abcdefghijklmnopqrstuvwxyz012345"},
            tokens=1024,
        )
    raw = out.read_bytes()
    for leaked in (b"s3cr3tPass", b"hunter2hunter2", b"abcdefghijklmnopqrstuvwxyz012345"):
        assert leaked not in raw
    rec = _lines(out)[0]
    assert rec["tokens"] == 1024  # a count named like a secret is not a secret
    assert rec["password"] == MASK


# Ordinary lines that look a little like secrets: key=value metrics, counts named like secrets, hashes,
# ids, paths, URLs with ports, prose. The secret shapes are in tests/fixtures/secrets/corpus.yaml.
CLEAN = [
    "step 100 loss=0.2531 lr=0.0003 grad_norm=1.25",
    "NCCL INFO Channel 00/02 : 0 1 2 3",
    "rank 3 of 8 on node gpu-7: allreduce of 268435456 bytes took 12.5 ms",
    "tokens_per_second=51234.5 mfu=0.41 num_tokens=4096 max_new_tokens=256 pad_token_id=0",
    "forward_pass_ms=12.5 backward_pass_ms=20.1 pass@1=0.42",
    "checkpoint saved to /ckpt/run-17/step-000100.pt",
    "commit 3f2a9c0d8b7e6f5a4c3b2a1f0e9d8c7b6a5f4e3d deployed, digest sha256:" + "ab" * 32,
    "token embeddings computed for 4096 tokens; basic blocks fused: 12",
    "GET https://storage.internal:443/bucket/key?owner=a@b.com 200",
    "run 550e8400-e29b-41d4-a716-446655440000 resumed from /home/alice/Projects/Model2024/last.ckpt",
    "key=layer.0.weight shape=(4096, 4096); password reset required; Authorization header missing",
    "--max-steps 1000 --lr 3e-4 --token-file /etc/hf/token",
    "s3://datasets/imagenet/train/n01440764/n01440764_10026.JPEG",
]


def test_redaction_leaves_ordinary_lines_alone() -> None:
    """Metrics-like key=value lines, NCCL info, hashes, ids and paths are not mangled."""
    for text in CLEAN:
        assert redact_text(text) == text


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True), ("db_password", True), ("passwd", True), ("passphrase", True), ("db_pass", True),
        ("SMTP_PASS", True), ("client_secret", True), ("aws_secret_access_key", True), ("secretKey", True),
        ("credentials", True), ("credential_json", True), ("private_key", True), ("privateKey", True),
        ("api_key", True), ("x-api-key", True), ("apiKey", True), ("access_token", True), ("accessToken", True),
        ("hf_token", True), ("HUGGING_FACE_HUB_TOKEN", True), ("token", True), ("authorization", True),
        ("Proxy-Authorization", True), ("auth", True), ("basic_auth", True), ("cookie", True),
        ("session_id", True), ("X-Amz-Signature", True), ("pwd", True), ("jwt", True),
        ("tokens", False), ("num_tokens", False), ("max_new_tokens", False), ("tokens_per_second", False),
        ("pad_token", False), ("pad_token_id", False), ("eos_token", False), ("token_count", False),
        ("forward_pass", False), ("forward_pass_ms", False), ("pass_at_1", False), ("passes", False),
        ("key", False), ("cache_key", False), ("auth_type", False), ("author", False), ("keyboard", False),
        ("", False), ("event", False),
    ],
)  # fmt: skip
def test_secret_key_names(key: str, secret: bool) -> None:
    """Which key names hold secrets: the credential words, not the ML counts that contain them."""
    assert is_secret_key(key) is secret
    assert (key_action(key) == MASK_VALUE) is secret


def test_secret_keys_and_nesting() -> None:
    """Keys naming secrets are masked whatever the value; nested dicts and lists are scanned; the
    event dict's own keys are rewritten when they hold a secret."""
    r = RedactSecrets()
    ed = {"event": "x", "api_key": "short", "cfg": {"db": {"password": 123456}}, "urls": ["http://a:b@h/"], "n": 5}
    out = r(None, "info", ed)
    assert out["api_key"] == MASK and out["cfg"]["db"]["password"] == MASK
    assert out["urls"] == [f"http://a:{MASK}@h/"] and out["n"] == 5
    out = r(None, "info", {"a": 1, "ghp_" + "Zr4Kw9Tq2Xm7Nb5Lv8Hc3Jd6Pf1Gs0Ya4Ue": 2, "b": 3})
    assert list(out) == ["a", f"ghp_{MASK}", "b"]


def test_values_the_renderer_refuses_never_raise(tmp_path: Path) -> None:
    """Cycles, 300 levels of nesting, non-string keys and integers over 64 bits are written (as text
    where JSON cannot hold them) instead of raising into the training loop, redaction on or off."""
    deep: object = "bottom"
    for _ in range(300):
        deep = [deep]
    cyc: dict[str, object] = {"a": 1}
    cyc["self"] = cyc
    for redact in (True, False):
        out = tmp_path / f"r{redact}.jsonl"
        with open(out, "ab") as f:
            configure("info", "json", stream=f, context=CTX, redact=redact)
            log = get_logger()
            log.info("big", n=2**70)
            log.info("keys", m={1: "a", (2, 3): "b", b"k": "c"})
            log.info("deep", v=deep)
            log.info("cycle", v=cyc)
        recs = _lines(out)
        assert [r["event"] for r in recs] == ["big", "keys", "deep", "cycle"]
        assert recs[0]["n"] == str(2**70)
        assert recs[1]["m"] == {"1": "a", "(2, 3)": "b", "k": "c"}
        assert "bottom" in orjson.dumps(recs[2]["v"]).decode()
        assert recs[3]["v"] == {"a": 1, "self": "[cycle]"}


def test_logfmt_traceback_redacted() -> None:
    """The logfmt chain renders the traceback text first, then redacts it."""
    buf = io.StringIO()
    configure("info", "logfmt", stream=buf)
    try:
        raise ValueError("login failed: password=Hq7nB2vXk9LmPw")
    except ValueError:
        get_logger().exception("step failed")
    assert "Traceback" in buf.getvalue() and "Hq7nB2vXk9LmPw" not in buf.getvalue()


# Strings built to make a backtracking pattern quadratic: with an unbounded key, value or URL scheme
# pattern each of these takes minutes instead of milliseconds.
HOSTILE = {
    "key run": "key" * 66_000,
    "key= run": "key=" * 50_000,
    "password= run": "password=" * 22_000,
    "schemes": "x://a:" * 33_000,
    "dotted scheme": "a." * 100_000 + "://",
    "open quote": 'password="' + "a" * 200_000,
    "escaped quotes": 'key=\\"' * 33_000,
    "flags": "--token " * 25_000,
    "headers": "Authorization: " * 13_000,
    "pem": "-----BEGIN " + "A " * 100_000 + "private key",
    "long word": "x" * 200_000 + "password=abc",
    "base64": "Ab1/" * 50_000,
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_redaction_time_is_linear_on_hostile_strings(text: str) -> None:
    """A 200 kB line built against the patterns costs its own scan (well under a second here), never
    minutes: a training job is never stalled by what it logs."""
    t0 = time.process_time()
    redact_text(text)
    assert time.process_time() - t0 < 10


def test_structlog_internals_the_fast_logger_reads() -> None:
    """The one adapter over structlog's private attributes (``_fast_bound_logger``) reads a bound
    logger's ``_context``, ``_logger`` and ``_processors``: fail here, loudly, if structlog renames them."""
    configure("info", "json", stream=io.BytesIO(), context=CTX)
    log = get_logger(component="x")
    assert log._context is structlog.get_context(log)
    assert log._context == {"component": "x"}
    assert list(log._processors) == structlog.get_config()["processors"]
    assert isinstance(log._logger, structlog.BytesLogger)


def test_logfmt_for_daemons_still_works() -> None:
    """The exporter's logfmt output keeps working (and is redacted too)."""
    buf = io.StringIO()
    configure("info", "logfmt", stream=buf)
    get_logger(component="exporter").info("listening", url="http://admin:pw12345@0.0.0.0:9400")
    text = buf.getvalue()
    assert "event=listening" in text and "component=exporter" in text and "pw12345" not in text


def test_logfmt_never_raises_on_a_key_and_keeps_lines_unambiguous() -> None:
    buf = io.StringIO()
    configure("info", "logfmt", stream=buf)
    get_logger().info("odd keys", **{"a b": "password=hunter2", "k=v": 1, 'q"': 2, "é\u00a0x": 3, "plain": 4})
    line = buf.getvalue().strip()
    assert 'a_b="password=' in line and "hunter2" not in line  # renamed, and still redacted
    assert " k_v=1 " in line and " q_=2 " in line and " é_x=3 " in line and " plain=4 " in line


@pytest.mark.parametrize("fmt", ["json", "logfmt"])
def test_a_stdlib_record_that_cannot_be_formatted_is_one_event_without_its_arguments(
    fmt: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The stdlib's own handleError prints the template and the raw arguments to stderr, past redaction."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no str")

    token = "ghp_" + "a1b2c3d4e5" * 4
    path = tmp_path / "log"
    stream = open(path, "a" if fmt == "logfmt" else "ab")  # noqa: SIM115 (configure keeps it)
    configure("info", fmt, stream=stream)
    root = logging.getLogger()  # ours only: pytest's own capture handler would format (and raise) too
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if type(h).__module__ == "mlops_obs.logs.config"])
    logging.getLogger("torch.distributed").warning("token=%s peer=%s", token, Unprintable())
    logging.getLogger("lib").warning("one argument too many: %s", "x", "y")
    stream.close()
    out = path.read_text()
    captured = capfd.readouterr()
    assert token not in out + captured.err + captured.out
    assert "Logging error" not in captured.err
    assert out.count("log record could not be formatted") == 2, out
    if fmt == "json":
        events = [orjson.loads(x) for x in out.splitlines()]
        assert [(e["logger"], e["error"], e["arguments"]) for e in events] == [
            ("torch.distributed", "RuntimeError", 2),
            ("lib", "TypeError", 2),
        ]
