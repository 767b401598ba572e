"""The failure texts rca reads, as torch 2.x, gloo, NCCL, torchrun, CUDA, the kernel and our workload
print them (FIELD-NOTES section 8; the gloo lines are copied from this repository's workload runs)."""

from __future__ import annotations

from typing import Any

import pytest

from mlops_obs.rca.patterns import classify, rank_of, step_of


def ev(message: str, level: str = "error", **fields: Any) -> dict[str, Any]:
    return {"_id": "x-1", "@timestamp": "2026-01-01T00:00:00.000000Z", "kind": "log", "job": "j", "rank": None,
            "node": "n1", "level": level, "message": message, "seq": None, "source": "s", "offset": 0,
            "fields": fields}  # fmt: skip


GLOO_CLOSED = (
    "RuntimeError: Got the following error when running the callback: RuntimeError: [/__w/pytorch/pytorch/third_party"
    "/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:20651. This is typically caused by a "
    "remote worker crashing. Check the logs of the remote worker before reporting an error. GLHF!"
)
GLOO_TIMEOUT = (
    "RuntimeError: Got the following error when running the callback: RuntimeError: [/__w/pytorch/pytorch/third_party"
    "/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"
)
NCCL_WATCHDOG = (
    "[rank3]:[E1206 18:44:12.715298746 ProcessGroupNCCL.cpp:607] [Rank 3] Watchdog caught collective operation timeout:"
    " WorkNCCL(SeqNum=7753, OpType=ALLREDUCE, NumelIn=1048576, NumelOut=1048576, Timeout(ms)=600000) ran for 600061 "
    "milliseconds before timing out.\n[rank3]:[E1206 18:44:12.716 ProcessGroupNCCL.cpp:1664] [PG 0 Rank 3] Exception "
    "(either an error or timeout) detected by watchdog at work: 7753, last enqueued NCCL work: 7755, last completed "
    "NCCL work: 7752."
)
TORCHRUN_ROOT = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
train.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2024-12-06_18:44:13
  host      : node-07
  rank      : 2 (local_rank: 2)
  exitcode  : -9 (pid: 5939)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 5939
============================================================"""


@pytest.mark.parametrize(
    ("message", "fields", "kind", "role", "detail"),
    [
        ("rank failed", {"error": GLOO_CLOSED}, "peer_lost", "symptom", {}),
        ("rank failed", {"error": GLOO_TIMEOUT}, "collective_timeout", "symptom", {"timeout_ms": 5000, "op": "recv"}),
        (NCCL_WATCHDOG, {}, "collective_timeout", "symptom",
         {"seq": 7753, "op": "ALLREDUCE", "timeout_ms": 600000, "last_completed": 7752}),
        ("[rank1]: RuntimeError: NCCL communicator was aborted on rank 1.", {}, "peer_lost", "symptom", {}),
        ("Sending process 5940 closing signal SIGTERM", {}, "terminated", "stop", {"pid": 5940}),
        ("rank failed", {"exception": [{"exc_type": "KeyboardInterrupt", "exc_value": ""}]}, "terminated", "stop", {}),
        (TORCHRUN_ROOT, {}, "exit", "exit",
         {"first_observed": True, "rank": 2, "exit_code": -9, "pid": 5939, "host": "node-07",
          "at": "2024-12-06_18:44:13"}),
        ("torch.distributed.elastic.multiprocessing.api:failed (exitcode: 1) local_rank: 2 (pid: 5939) of binary: "
         "/usr/bin/python3", {}, "exit", "exit", {"exit_code": 1, "local_rank": 2, "pid": 5939}),
        ("workload: rank 1 exited with code 1; stopping the other ranks", {}, "exit", "exit",
         {"rank": 1, "exit_code": 1}),
        ("non-finite loss, stopping", {"step": 6, "loss": "nan"}, "nan_loss", "cause", {}),
        ("workload rank 0: non-finite loss nan at step 4", {}, "nan_loss", "cause", {}),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
         "79.11 GiB of which 1.06 GiB is free.", {}, "oom", "cause",
         {"tried": "2.00 GiB", "gpu": 0, "capacity": "79.11 GiB"}),
        ("Out of memory: Killed process 5939 (python3) total-vm:123kB", {}, "oom_killed", "cause", {"pid": 5939}),
        ("OSError: [Errno 28] No space left on device: '/ckpt/step_1200.pt'", {}, "disk_full", "cause", {}),
        ("NVRM: Xid (PCI:0000:3b:00): 79, pid=5939, GPU has fallen off the bus.", {}, "gpu_xid", "cause",
         {"pci": "PCI:0000:3b:00", "xid": 79}),
        ("RuntimeError: CUDA error: uncorrectable ECC error encountered", {}, "gpu_ecc", "cause", {}),
        ("Fatal Python error: Segmentation fault", {}, "crash", "cause", {}),
        ("rank failed", {"error": "RuntimeError: injected crash at step 5"}, "crash", "cause",
         {"exception": "RuntimeError", "generic": True}),
        ("[rank1]: ValueError: bad batch", {}, "crash", "cause", {"exception": "ValueError", "generic": True}),
        ("Traceback (most recent call last):", {}, "error", "error", {}),
    ],
)  # fmt: skip
def test_real_failure_text_is_classified(
    message: str, fields: dict[str, Any], kind: str, role: str, detail: dict[str, Any]
) -> None:
    sig = classify(ev(message, **fields))
    assert sig is not None, message
    assert (sig.kind, sig.role) == (kind, role), message
    assert dict(sig.detail) == detail


def test_lines_that_say_nothing_are_left_alone() -> None:
    assert classify(ev("step", level="info", step=3, loss=2.3)) is None
    assert classify(ev("checkpoint saved", level="info")) is None
    # A raw line at info (today's shipper stores "[rankN]: ..." lines as info) is read when it has a failure word.
    raw = ev("[rank1]: RuntimeError: injected crash at step 5", level="info", raw=True)
    assert classify(raw) is not None and classify(raw).kind == "crash"  # type: ignore[union-attr]
    assert classify(ev('[rank1]:   File "train.py", line 3, in main', level="info", raw=True)) is None
    # A ten-megabyte line is scanned only up to SCAN_CHARS: a failure word past that is not read.
    big = classify(ev("x" * 10_000_000 + " Segmentation fault"))
    assert big is not None and (big.kind, big.role) == ("error", "error")


def test_rank_and_step_from_text() -> None:
    assert rank_of(ev("[rank3]: RuntimeError: boom")) == 3
    assert rank_of({**ev("[rank3]: x"), "rank": 1}) == 1
    assert rank_of(ev("no prefix")) is None
    assert step_of(ev("rank failed", step=5)) == 5
    assert step_of(ev("workload rank 0: non-finite loss nan at step 4")) == 4
    assert step_of(ev("rank failed", step="5")) is None
