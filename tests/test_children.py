"""Child servers (Prometheus, Alertmanager) end with the process that started them, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlops_obs.children import die_with_parent
from tests.conftest import wait_for


def _gone(pid: int) -> bool:
    """The process no longer runs: reaped, or a zombie waiting for its new parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_alertmanager_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from mlops_obs.children.alertmanager import AlertmanagerProcess
        config = {{"route": {{"receiver": "none"}}, "receivers": [{{"name": "none"}}]}}
        am = AlertmanagerProcess(Path({str(tmp_path / "am")!r}), config).start()
        print(am.proc.pid, flush=True)
        sys.stdin.read()  # until the test kills this process
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the parent did not report its child's pid: {line!r}"
        child = int(line)
        assert not _gone(child)
        os.kill(parent.pid, signal.SIGKILL)  # no handler, no atexit, no ChildServer.stop
        parent.wait()
        wait_for(lambda: _gone(child), f"alertmanager {child} to end with its SIGKILLed parent")
    finally:
        parent.kill()
        parent.wait()


def test_a_child_whose_parent_died_before_the_request_exits_at_once() -> None:
    """The race: the parent dies between fork and prctl. The child sees a changed parent and exits."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the parent: makes the hook, starts a child, and dies before the child runs it
        try:
            os.close(r)
            hook = die_with_parent()
            me = os.getpid()
            if os.fork() == 0:
                while os.getppid() == me:  # until the parent is gone
                    time.sleep(0.01)
                if hook is not None:
                    hook()
                os.write(w, b"survived")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"", "the hook let a child whose parent had died run on"
