"""Who is using this GPU: pid -> training job/rank, container and pod, with bounded cardinality.

Why this exists: dcgm-exporter's most requested gaps are per-process GPU metrics and empty pod
labels. NVML tells us the pids on a device; we join them with

* the training snapshots in ``--multiproc-dir``, read through the exporter's
  :class:`~mlops_obs.rankdir.RankDirectory` (each carries the rank's ``pid``, ``job``, ``rank``),
  so a GPU series says which rank owns the device;
* ``/proc/<pid>/cgroup`` for the container id and the Kubernetes pod UID (cgroup v1 and v2, the
  cgroupfs and systemd drivers, docker/containerd/CRI-O);
* the Kubernetes downward-API variables ``POD_NAME`` / ``POD_NAMESPACE``: read from the process's own
  ``/proc/<pid>/environ`` where we may, else taken from this sidecar's environment when the process
  runs in the same pod as the sidecar (same pod UID).

NVML reports pids in the host's namespace while a rank records the pid it sees in its container; the
``NSpid`` line of ``/proc/<pid>/status`` gives both, so either matches. A pid that two snapshots claim
(two containers' pid 7) is left unattributed rather than guessed, and so is a pid whose process did
not start when its snapshot says the rank's process started
(:func:`~mlops_obs.collectors.process.same_process`): a snapshot is a claim anyone who can write the
directory can make, and a GPU's memory and time must not be published as a rank's on a claim alone.

Everything read from ``/proc`` is cached per (pid, start time), so a pid reused by a new process is
read afresh, and the cache only holds pids NVML still reports: an exited process drops its series and
its cache entry on the next round.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops_obs.collectors import host_parse as hp
from mlops_obs.collectors.host import CLK_TCK, PAGE_SIZE, ProcFiles
from mlops_obs.collectors.process import boot_time, same_process
from mlops_obs.rankdir import RankDirectory

_CONTAINER_ID = re.compile(
    r"(?:^|[/-])(?:docker-|cri-containerd-|crio-|containerd-|libpod-)?([0-9a-f]{64})(?:\.scope)?$"
)
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")

POD_ENV = ("POD_NAME", "POD_NAMESPACE")


@dataclass(frozen=True)
class CgroupIdentity:
    container_id: str | None = None
    pod_uid: str | None = None


def parse_cgroup(text: str) -> CgroupIdentity:
    """Container id and pod UID from a ``/proc/<pid>/cgroup`` file (v1 or v2, any driver)."""
    container: str | None = None
    pod: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2].strip()
        if not path or path == "/":
            continue
        for segment in reversed(path.split("/")):
            if container is None:
                m = _CONTAINER_ID.search(segment)
                if m:
                    container = m.group(1)
            if pod is None:
                p = _POD_UID.search(segment)
                if p:
                    pod = p.group(1).replace("_", "-")
        if container and pod:
            break
    return CgroupIdentity(container, pod)


def parse_environ(data: bytes, keys: Iterable[str] = POD_ENV) -> dict[str, str]:
    """The wanted variables from a NUL-separated ``/proc/<pid>/environ``; others are never kept."""
    wanted = set(keys)
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            key = k.decode("utf-8", "replace")
            if key in wanted:
                out[key] = v.decode("utf-8", "replace")
    return out


def parse_nspid(status_text: str) -> tuple[int, ...]:
    """The pid in each pid namespace, outermost first, from ``/proc/<pid>/status``."""
    for line in status_text.splitlines():
        if line.startswith("NSpid:"):
            try:
                return tuple(int(x) for x in line.split()[1:])
            except ValueError:
                return ()
    return ()


def start_ticks(stat_text: str) -> int | None:
    """When the process started (clock ticks since boot), from ``/proc/<pid>/stat``; ``None`` if garbled."""
    try:
        return hp.parse_pid_stat(stat_text, CLK_TCK, PAGE_SIZE).start_ticks
    except ValueError:
        return None


@dataclass(frozen=True)
class ProcessIdentity:
    pids: tuple[int, ...]
    container_id: str | None
    pod_uid: str | None
    pod: str | None
    namespace: str | None
    start_ticks: int | None = None  # when it started, in clock ticks since boot


# A cached identity is trusted this long before /proc/<pid>/stat is read again to catch a reused
# pid. NVML lists a pid only while it holds a CUDA context, so a pid that exits and comes back on
# another process that opens a context within these seconds is the only case it misses, for at
# most these seconds; re-reading every round would cost a tenth of the GPU collector's round.
REVALIDATE_SECONDS = 5.0


class ProcessResolver:
    """Reads and caches what ``/proc`` says about a pid; never raises for a pid that vanished."""

    def __init__(
        self,
        proc_root: str | Path = "/proc",
        environ: Mapping[str, str] | None = None,
        revalidate: float = REVALIDATE_SECONDS,
    ) -> None:
        self.proc = Path(proc_root)
        self._root = os.fspath(proc_root)
        env = os.environ if environ is None else environ
        self.own_pod = env.get("POD_NAME") or None
        self.own_namespace = env.get("POD_NAMESPACE") or None
        self.own_pod_uid = self._own_pod_uid()
        self.revalidate = revalidate
        # pid -> (start time in ticks, identity, monotonic time it was last checked against /proc)
        self._cache: dict[int, tuple[int | None, ProcessIdentity, float]] = {}
        # Each listed pid's /proc/<pid>/stat, kept open and re-read with pread (one syscall, not three):
        # the descriptor belongs to the process it was opened for, so a reused pid fails the read and is
        # resolved afresh.
        self.files = ProcFiles()

    def _read(self, pid: int | str, name: str) -> bytes | None:
        # A plain string path: /proc/<pid>/stat is read for every GPU process every round, and
        # pathlib's joins cost more than the read itself.
        try:
            with open(f"{self._root}/{pid}/{name}", "rb", buffering=0) as f:
                return f.read()
        except OSError:
            return None

    def _own_pod_uid(self) -> str | None:
        data = self._read("self", "cgroup")
        return parse_cgroup(data.decode("utf-8", "replace")).pod_uid if data else None

    def identity(self, pid: int) -> ProcessIdentity | None:
        cached = self._cache.get(pid)
        now = time.monotonic()
        if cached is not None and now - cached[2] < self.revalidate:
            return cached[1]
        stat = self.files.read(f"{self._root}/{pid}/stat")
        if stat is None:
            self._cache.pop(pid, None)
            return None
        start = start_ticks(stat)
        if cached is not None and cached[0] == start:
            self._cache[pid] = (start, cached[1], now)
            return cached[1]
        status = self._read(pid, "status")
        nspids = parse_nspid(status.decode("utf-8", "replace")) if status else ()
        cg_data = self._read(pid, "cgroup")
        cg = parse_cgroup(cg_data.decode("utf-8", "replace")) if cg_data else CgroupIdentity()
        env_data = self._read(pid, "environ")  # EACCES for another user's process: fine
        env = parse_environ(env_data) if env_data else {}
        pod, ns = env.get("POD_NAME") or None, env.get("POD_NAMESPACE") or None
        if pod is None and cg.pod_uid is not None and cg.pod_uid == self.own_pod_uid:
            pod, ns = self.own_pod, self.own_namespace
        ident = ProcessIdentity(nspids or (pid,), cg.container_id, cg.pod_uid, pod, ns, start)
        self._cache[pid] = (start, ident, now)
        return ident

    def forget_except(self, live: set[int]) -> None:
        for pid in list(self._cache):
            if pid not in live:
                del self._cache[pid]
        self.files.retain(f"{self._root}/{pid}/stat" for pid in live)

    def close(self) -> None:
        self.files.close()


# How old a listing of the rank directory the pid index takes (it is re-read every few seconds anyway).
LISTING_MAX_AGE = 1.0

# A rank's owner as its snapshot claims it: (job, rank), and the start time it recorded (Unix time).
Claim = tuple[tuple[str, str], Any]


class RankIndex:
    """pid -> the claim of the snapshot recording it, from the training snapshots; re-read at most
    every ``refresh`` seconds."""

    def __init__(self, ranks: RankDirectory | None, refresh: float = 5.0) -> None:
        self.ranks = ranks
        self.refresh = refresh
        self._by_pid: dict[int, Claim | None] = {}
        self._read_at = float("-inf")

    def _load(self) -> None:
        self._read_at = time.monotonic()
        by_pid: dict[int, Claim | None] = {}
        # Through the directory's parse cache, and its last listing when it is at most LISTING_MAX_AGE
        # old: the training collector's scan of this round is not made again.
        for s in self.ranks.snapshots(max_age=LISTING_MAX_AGE) if self.ranks is not None else ():
            if "pid" not in s:
                continue
            try:
                pid = int(s["pid"])
            except (TypeError, ValueError):
                continue
            claim = ((str(s.get("job", "")), str(s.get("rank", ""))), s.get("start_time"))
            # The same pid in two snapshots (two containers' pid namespaces): ambiguous, so nobody.
            by_pid[pid] = claim if pid not in by_pid or by_pid[pid] == claim else None
        self._by_pid = by_pid

    def lookup(self, pids: Iterable[int]) -> Claim | None:
        """The claim on the first of ``pids`` (host pid, then namespace pids) that a rank recorded."""
        pids = tuple(pids)
        age = time.monotonic() - self._read_at
        if age > self.refresh:
            self._load()
        elif age > 1.0:
            by_pid = self._by_pid
            for p in pids:
                if p in by_pid:
                    break
            else:
                self._load()
        by_pid = self._by_pid
        for p in pids:
            if p in by_pid:
                return by_pid[p]
        return None


class Attributor:
    """Labels for a GPU process: job, rank, container, pod, namespace (only those known)."""

    def __init__(
        self, ranks: RankDirectory | None, proc_root: str | Path = "/proc", environ: Mapping[str, str] | None = None
    ) -> None:
        self.ranks = RankIndex(ranks)
        self.procs = ProcessResolver(proc_root, environ)
        self._btime: float | None = None
        # pid -> (identity, owner, labels): the last answer, handed out again while neither changed.
        self._last: dict[int, tuple[ProcessIdentity | None, tuple[str, str] | None, dict[str, str]]] = {}

    def labels(self, pid: int) -> dict[str, str]:
        """The process's labels; the very same dict as last time while its identity and owner are the
        same, so a caller can keep what it built from it (callers must not modify it)."""
        ident = self.procs.identity(pid)
        pids = ident.pids if ident is not None else (pid,)
        if ident is not None and pid not in pids:
            pids = (pid, *pids)
        claim = self.ranks.lookup(pids)
        owner = claim[0] if claim is not None and self._started_as_claimed(ident, claim[1]) else None
        last = self._last.get(pid)
        if last is not None and last[0] is ident and last[1] == owner:
            return last[2]
        out: dict[str, str] = {}
        if owner is not None:
            out["job"], out["rank"] = owner
        if ident is not None:
            if ident.container_id:
                out["container"] = ident.container_id[:12]
            if ident.pod:
                out["pod"] = ident.pod
            if ident.namespace:
                out["namespace"] = ident.namespace
        self._last[pid] = (ident, owner, out)
        return out

    def _started_as_claimed(self, ident: ProcessIdentity | None, recorded: Any) -> bool:
        if ident is None or ident.start_ticks is None:
            return False
        if self._btime is None:  # read once; looked for again while /proc/stat has none
            self._btime = boot_time(os.fspath(self.procs.proc))
        if self._btime is None:
            return False
        return same_process(recorded, self._btime + ident.start_ticks / CLK_TCK)

    def close(self) -> None:
        self.procs.close()

    def end_round(self, live: set[int]) -> None:
        self.procs.forget_except(live)
        last = self._last
        if len(last) > len(live):
            for pid in [p for p in last if p not in live]:
                del last[pid]
