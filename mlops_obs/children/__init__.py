"""Running Prometheus-family binaries (prometheus, alertmanager) as child processes on free loopback ports.

The demo and the tests need the real binaries, never system services: a generated config in a private
work directory, a port picked free on 127.0.0.1, readiness awaited on ``/-/ready``, and a clean stop.
A child also stops when its parent dies however it dies (SIGKILL, the OOM killer): on Linux it asks the
kernel for a parent-death SIGTERM before it runs the binary, so a killed demo or test run leaves no
Prometheus holding a port and a TSDB behind. The kernel ties that signal to the thread that started the
child: start children from a thread that outlives them (the main thread, as the demo and tests do).
:class:`ChildServer` is that life cycle; :mod:`.prometheus` and :mod:`.alertmanager` say which binary,
which config and which flags, and add a small client for each one's HTTP API.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

__all__ = ["ChildServer", "die_with_parent", "find_binary", "free_port", "http_get"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def find_binary(*names: str) -> str | None:
    """The first of ``names`` on PATH (or in /usr/bin, which a minimal PATH may lack)."""
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon; another process may race it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """``(status, body)`` of a GET; an HTTP error status is a result, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when this process dies, or ``None`` off Linux.

    It runs in the child between fork and exec, so it only calls what was resolved before the fork (the
    ``prctl`` symbol) and plain syscalls. A parent that died before the request took effect shows as a
    changed parent pid, and the child exits at once rather than run orphaned.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0 and os.getppid() != parent:
            os._exit(1)

    return preexec


class ChildServer:
    """One binary as a child: config written, started on a free port, ready on ``/-/ready``, stopped."""

    name: ClassVar[str]  # used for file names and messages
    binaries: ClassVar[tuple[str, ...]]  # names to look for on PATH, first found wins
    apt_package: ClassVar[str]

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.binary = binary or find_binary(*self.binaries)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def flags(self, config_path: Path) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            return self  # already running: a second start would orphan the first child
        if not self.binary:
            raise FileNotFoundError(f"{self.name} binary not found (apt-get install {self.apt_package})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / f"{self.name}.yml"
        cfg_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = free_port()
        log_path = self.workdir / f"{self.name}.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, *self.flags(cfg_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {tail}")
            try:
                if http_get(self.url + "/-/ready", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.name} did not become ready within {timeout:g}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
