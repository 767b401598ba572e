"""``scripts/setup.sh``'s apt step: it waits for the dpkg lock, and the policy-rc.d it puts in place to keep
package services from starting is gone on every way out, and only when it created it.

A stand-in ``apt-get`` earlier on PATH records its arguments and fails or succeeds on demand, so the real
package database is never touched; ``POLICY_RC_D`` points into the test's directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"

FAKE_APT = """#!/bin/sh
echo "$*" >> "$APT_LOG"
case "$*" in
  *" install "*)
    [ -n "$APT_HANG" ] && { : > "$APT_HANG"; exec sleep 600; }
    exit "${APT_INSTALL_RC:-0}" ;;
esac
exit 0
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    apt = bin_dir / "apt-get"
    apt.write_text(FAKE_APT)
    apt.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "APT_LOG": str(tmp_path / "apt.log"),
        "POLICY_RC_D": str(tmp_path / "policy-rc.d"),
        "APT_LOCK_TIMEOUT": "77",
        "SUDO": "",
        "APT_HANG": "",
        **extra,
    }


def _install(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f"source {SETUP} && apt_install stress-ng"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_every_apt_get_waits_for_the_lock_and_the_policy_goes_after_success(tmp_path: Path) -> None:
    r = _install(_env(tmp_path))
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["update", "install"]
    assert all(c.startswith("-o DPkg::Lock::Timeout=77 ") for c in calls), calls
    assert not (tmp_path / "policy-rc.d").exists()


def test_policy_is_removed_when_apt_fails(tmp_path: Path) -> None:
    r = _install(_env(tmp_path, APT_INSTALL_RC="100"))
    assert r.returncode == 100
    assert not (tmp_path / "policy-rc.d").exists()


def test_policy_is_removed_when_setup_is_interrupted(tmp_path: Path) -> None:
    started = tmp_path / "install-started"
    env = _env(tmp_path, APT_HANG=str(started))
    proc = subprocess.Popen(["bash", "-c", f"source {SETUP} && apt_install stress-ng"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: started.exists() or proc.poll() is not None, "the stand-in apt-get to start")
        assert started.exists(), proc.communicate()
        assert (tmp_path / "policy-rc.d").read_text() == "exit 101\n"
        os.killpg(proc.pid, signal.SIGTERM)  # what `timeout` or a CI cancel does to the whole group
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143
    assert not (tmp_path / "policy-rc.d").exists()


def test_a_policy_the_script_did_not_create_stays(tmp_path: Path) -> None:
    mine = tmp_path / "policy-rc.d"
    mine.write_text("#!/bin/sh\n# the administrator's\nexit 0\n")
    for rc in ("0", "100"):
        r = _install(_env(tmp_path, APT_INSTALL_RC=rc))
        assert r.returncode == int(rc), r.stderr
        assert mine.read_text() == "#!/bin/sh\n# the administrator's\nexit 0\n"
