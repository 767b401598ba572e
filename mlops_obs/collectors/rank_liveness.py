"""Which ranks vanished: a snapshot still saying ``running`` whose process is gone, or whose pid now
belongs to a process that started later (SIGKILL, the OOM killer, a segfault, ``os._exit``: deaths no
hook inside the rank sees).

Taking a rank for dead when it is merely out of sight would page someone for a healthy job, so a
verdict needs proof that this sidecar can see the rank's pid:

* the snapshot names the kernel boot (``boot_id``) and pid namespace (``pid_ns``) of its pid (schema 3;
  an older rank's snapshot is never judged);
* the boot is this sidecar's: a snapshot from another machine on a shared directory is not its to judge;
* the pid namespace is the one ``--path.procfs`` shows (the pod sidecar with ``shareProcessNamespace``,
  a rank on the host): its pid is looked up directly;
* or another one (a rank in a container, the DaemonSet sidecar with ``hostPID``): the process whose
  innermost pid (``NSpid``) and namespace match is found by a scan of ``/proc`` (once per rank
  incarnation) and followed by its outer pid from then on. A rank never found this way is out of
  sight, not dead: only one seen alive and then gone is judged vanished.

A pid counts as gone when ``/proc/<pid>`` is absent, is a zombie (dead, not yet reaped), or is not
the process the snapshot recorded (:func:`~mlops_obs.collectors.process.same_process`: its start time
differs; the pid was reused).
"""

from __future__ import annotations

import os
import time

from mlops_obs.collectors.gpu_process import parse_nspid
from mlops_obs.collectors.host import CLK_TCK, ProcFiles, read_text
from mlops_obs.collectors.process import boot_time, same_process
from mlops_obs.rankdir import RUNNING, Snapshot

# How long a failed scan for a rank in another pid namespace is trusted before /proc is scanned again.
RESCAN_SECONDS = 30.0
# A (boot, namespace, pid, start) -> outer pid table this long is cleared: ranks restarting for days.
MAX_TRACKED = 4096


def pid_state_and_start(stat_text: str) -> tuple[str, int] | None:
    """(state letter, start ticks since boot) from ``/proc/<pid>/stat``; ``None`` if garbled."""
    end = stat_text.rfind(")")
    f = stat_text[end + 2 :].split() if end >= 0 else []
    if len(f) < 20:
        return None
    try:
        return f[0], int(f[19])
    except ValueError:
        return None


def identity(s: Snapshot) -> tuple[str, int, int, float] | None:
    """(boot id, pid namespace, pid, start time) of a running schema-3 snapshot; ``None`` for any other
    (a finished or failed rank, an older SDK, a field of the wrong type: the file is input)."""
    if s.get("state") != RUNNING:
        return None
    boot, ns, pid, start = s.get("boot_id"), s.get("pid_ns"), s.get("pid"), s.get("start_time")
    if not isinstance(boot, str) or not boot or isinstance(ns, bool) or not isinstance(ns, int):
        return None
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    if isinstance(start, bool) or not isinstance(start, int | float):
        return None
    return boot, ns, pid, float(start)


class Liveness:
    """Judges snapshots against one procfs root; keeps what it learnt about that root and the ranks in
    other pid namespaces between rounds (one instance per collector)."""

    def __init__(self) -> None:
        self._root: str | None = None
        self._btime: float | None = None
        self._boot_id: str | None = None
        self._pid_ns: int | None = None
        # (boot, ns, pid, start) -> the pid this procfs gives that rank (its outer pid), once found.
        self._outer: dict[tuple[str, int, int, float], int] = {}
        # (boot, ns, pid, start) -> monotonic time of the last scan that did not find it.
        self._missed: dict[tuple[str, int, int, float], float] = {}
        # Each judged rank's /proc/<pid>/stat, kept open and re-read with pread: a descriptor belongs to
        # the process it was opened for, so once that process is gone its reads fail, pid reused or not.
        self.files = ProcFiles()
        self._used: list[str] = []

    def _use(self, root: str) -> None:
        if root != self._root or self._btime is None:
            self._root = root
            self._btime = boot_time(root)
            text = read_text(f"{root}/sys/kernel/random/boot_id")
            self._boot_id = text.strip() if text else None
            self._pid_ns = _namespace(root)
            self._outer.clear()
            self._missed.clear()

    def vanished(self, s: Snapshot, root: str) -> bool:
        """Whether the rank of ``s`` is provably gone (see the module's docstring); ``False`` when it
        is alive, finished, failed, or out of this sidecar's sight."""
        ident = identity(s)
        if ident is None:
            return False
        self._use(root)
        boot, ns, pid, start = ident
        if self._btime is None or self._boot_id is None or boot != self._boot_id:
            return False
        if ns == self._pid_ns:
            return self._gone(root, pid, start)
        outer = self._outer.get(ident)
        if outer is not None:
            return self._gone(root, outer, start)
        now = time.monotonic()
        missed = self._missed.get(ident)
        if missed is not None and now - missed < RESCAN_SECONDS:
            return False
        found = self._scan(root, ns, pid, start)
        if len(self._outer) >= MAX_TRACKED:
            self._outer.clear()
            self._missed.clear()
        if found is None:
            self._missed[ident] = now
        else:
            self._outer[ident] = found
            self._missed.pop(ident, None)
        return False

    def end_round(self) -> None:
        """Close the kept files of the ranks not judged since the last call (they finished, or went)."""
        self.files.retain(self._used)
        self._used = []

    def close(self) -> None:
        self.files.close()

    def _gone(self, root: str, pid: int, start: float) -> bool:
        path = f"{root}/{pid}/stat"
        self._used.append(path)
        text = self.files.read(path)
        got = pid_state_and_start(text) if text is not None else None
        if got is None:
            return text is None  # absent: gone; garbled: not proof of anything
        state, ticks = got
        if state in ("Z", "X"):
            return True
        assert self._btime is not None
        return not same_process(start, self._btime + ticks / CLK_TCK)

    def _scan(self, root: str, ns: int, pid: int, start: float) -> int | None:
        """The outer pid of the live process whose innermost pid is ``pid`` in namespace ``ns``."""
        assert self._btime is not None
        try:
            names = [e.name for e in os.scandir(root) if e.name.isdigit()]
        except OSError:
            return None
        for name in names:
            status = read_text(f"{root}/{name}/status")
            if status is None:
                continue
            nspids = parse_nspid(status)
            if len(nspids) < 2 or nspids[-1] != pid:
                continue
            try:
                if os.stat(f"{root}/{name}/ns/pid").st_ino != ns:
                    continue
            except OSError:
                continue
            text = read_text(f"{root}/{name}/stat")
            got = pid_state_and_start(text) if text is not None else None
            if got is not None and same_process(start, self._btime + got[1] / CLK_TCK):
                return int(name)
        return None


def _namespace(root: str) -> int | None:
    """The pid namespace ``root`` numbers pids in: its pid 1's (needs privileges), else the reader's own
    (right where this procfs is the sidecar's own mount); ``None`` when neither can be read."""
    for who in ("1", "self"):
        try:
            return os.stat(f"{root}/{who}/ns/pid").st_ino
        except OSError:
            continue
    return None
