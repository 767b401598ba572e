"""Job-side logging: JSON lines, sequence numbers, structured tracebacks, stdlib routing, redaction."""

from __future__ import annotations

import io
import logging
import os
import pty
import warnings
from pathlib import Path

import orjson
import pytest
import structlog

from mlops_obs.logs import configure, get_logger
from mlops_obs.logs.redact import MASK, RedactSecrets, redact_text

CTX = {"job": "train", "rank": 3, "node": "gpu-7", "run_id": "r-1"}


def _lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


@pytest.fixture(autouse=True)
def _reset_logging() -> object:
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h).__name__ == "_StdlibToStructlog":
            root.removeHandler(h)
    logging.captureWarnings(False)


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


def test_exceptions_are_structured_without_locals(tmp_path: Path) -> None:
    """log.exception renders a traceback as data (type, value, frames) and never the frames' locals."""
    out = tmp_path / "r.jsonl"
    with open(out, "ab") as f:
        configure("info", "json", stream=f, context=CTX)
        secret_local = "do-not-log-me"  # noqa: F841 - must not appear
        try:
            raise ValueError("bad shape")
        except ValueError:
            get_logger().exception("step failed")
    rec = _lines(out)[0]
    exc = rec["exception"]
    assert isinstance(exc, list) and exc[0]["exc_type"] == "ValueError" and exc[0]["frames"]
    assert "locals" not in exc[0]["frames"][0]
    assert b"do-not-log-me" not in out.read_bytes()


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


# Real-looking shapes (made up, never valid): (text, the secret part that must disappear).
SECRET_CORPUS = [
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
     "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("curl -H 'Authorization: Basic YWRtaW46cGFzc3dvcmQxMjM='", "YWRtaW46cGFzc3dvcmQxMjM="),
    ("aws key AKIAIOSFODNN7EXAMPLE in env", "IOSFODNN7EXAMPLE"),
    ("temporary ASIAY34FZKBOKMUTVV7A used", "ZKBOKMUTVV7A"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("AWS_SESSION_TOKEN=FwoGZXIvYXdzEJr//////////wEaDOCqB8MZAtoKEN", "FwoGZXIvYXdzEJr"),
    ("gcp key AIzaSyA1B2c3D4e5F6g7H8i9J0kLmNoPqRsTuVw in config", "SyA1B2c3D4e5F6g7H8i9J0kLmNoPqRsTuVw"),
    ("oauth ya29.a0AfH6SMBx3kQ9vZr7Yt2Lp0Wq8Ne5Mc1Xb4 expired", "a0AfH6SMBx3kQ9vZr7Yt2Lp0Wq8Ne5Mc1Xb4"),
    ("git clone https://ghp_1234567890abcdefghijklmnopqrstuvwxyzAB@github.com/o/r",
     "1234567890abcdefghijklmnopqrstuvwxyzAB"),
    ("token github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "0123456789_abcdefghijklmnopqrstuvwxyz"),
    ("gitlab glpat-xY7zQ9wV2uT5sR8pN1mK here", "xY7zQ9wV2uT5sR8pN1mK"),
    ("slack xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("webhook https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX", "XXXXXXXXXXXXXXXXXXXXXXXX"),
    ("HF_TOKEN hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789", "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"),
    ("openai sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz012345 set", "AbCdEfGhIjKlMnOpQrStUvWxYz012345"),
    ("anthropic sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv", "api03-AbCdEfGhIjKlMnOpQrStUv"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "4eC39HqLyjWDarjtT1zdp7dc"),
    ("npm npm_abcdefghijklmnopqrstuvwxyz0123456789 x", "abcdefghijklmnopqrstuvwxyz0123456789"),
    ("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4==;",
     "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4=="),
    ("blob https://acct.blob.core.windows.net/c?sv=2021&sig=AbCdEfGhIjKlMnOp%2BQrStUv%3D", "AbCdEfGhIjKlMnOp"),
    ("mysql://root:Tr0ub4dor&3@10.0.0.5:3306/db", "Tr0ub4dor&3"),
    ("redis://:verysecretpw@cache:6379/0", "verysecretpw"),
    ("https://user:p%40ss@registry.example.com/simple", "p%40ss"),
    ('config {"password": "CorrectHorseBattery"}', "CorrectHorseBattery"),
    ("DB_PASSWORD=Passw0rd!2024 started", "Passw0rd!2024"),
    ("api_key: 9f8e7d6c5b4a39281706f5e4d3c2b1a0", "9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
    ("client_secret=Q~abc123DEF456ghi789JKL", "Q~abc123DEF456ghi789JKL"),
    ("WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567", "0123456789abcdef0123456789abcdef01234567"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq0Zx\n-----END RSA PRIVATE KEY-----",
     "MIIEowIBAAKCAQEA7bq0Zx"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
     "b3BlbnNzaC1rZXktdjEAAAAA"),
]  # fmt: skip

CLEAN = [
    "step 100 loss=0.2531 lr=0.0003 grad_norm=1.25",
    "NCCL INFO Channel 00/02 : 0 1 2 3",
    "rank 3 of 8 on node gpu-7: allreduce of 268435456 bytes took 12.5 ms",
    "tokens_per_second=51234.5 mfu=0.41",
    "checkpoint saved to /ckpt/run-17/step-000100.pt",
]


def test_redaction_corpus() -> None:
    """Every shape of the corpus (30 kinds of credentials) loses its secret part."""
    assert len(SECRET_CORPUS) >= 20
    for text, secret in SECRET_CORPUS:
        out = redact_text(text)
        assert secret not in out, f"leaked: {text!r} -> {out!r}"
        assert MASK in out


def test_redaction_leaves_ordinary_lines_alone() -> None:
    """Metrics-like key=value lines, NCCL info and paths are not mangled."""
    for text in CLEAN:
        assert redact_text(text) == text


def test_secret_keys_and_nesting() -> None:
    """Keys naming secrets are masked whatever the value; nested dicts and lists are scanned."""
    r = RedactSecrets()
    ed = {"event": "x", "api_key": "short", "cfg": {"db": {"password": 123456}}, "urls": ["http://a:b@h/"], "n": 5}
    out = r(None, "info", ed)
    assert out["api_key"] == MASK and out["cfg"]["db"]["password"] == MASK
    assert out["urls"] == [f"http://{MASK}@h/"] and out["n"] == 5


def test_logfmt_for_daemons_still_works() -> None:
    """The exporter's logfmt output keeps working (and is redacted too)."""
    buf = io.StringIO()
    configure("info", "logfmt", stream=buf)
    get_logger(component="exporter").info("listening", url="http://admin:pw12345@0.0.0.0:9400")
    text = buf.getvalue()
    assert "event=listening" in text and "component=exporter" in text and "pw12345" not in text
