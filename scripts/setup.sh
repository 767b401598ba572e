#!/usr/bin/env bash
# Set up mlops-obs on a fresh Debian machine: the Prometheus family from apt, a venv with torch (CPU) and the
# project in editable mode with its dev tools. Safe to run again: each step is skipped when already done.
#
# Sourcing it (`source scripts/setup.sh`) defines its functions without running anything: the tests drive
# apt_install with a stand-in apt-get. POLICY_RC_D, APT_LOCK_TIMEOUT and SUDO may be set from outside.
set -euo pipefail

POLICY_RC_D="${POLICY_RC_D:-/usr/sbin/policy-rc.d}"
APT_LOCK_TIMEOUT="${APT_LOCK_TIMEOUT:-600}" # seconds to wait for another apt/dpkg (unattended-upgrades...)
if [ -z "${SUDO+set}" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
fi
PYTHON="${PYTHON:-python3}"

# binary -> Debian package
declare -A PKG=(
  [prometheus]=prometheus [promtool]=prometheus
  [prometheus-alertmanager]=prometheus-alertmanager [amtool]=prometheus-alertmanager
  [prometheus-node-exporter]=prometheus-node-exporter [openssl]=openssl
  [stress-ng]=stress-ng [chromium]=chromium [lnav]=lnav
  [victoria-metrics]=victoria-metrics [vmalert]=victoria-metrics [curl]=curl
)

# Every apt-get waits for the dpkg and lists locks instead of failing at once when another apt holds them.
apt_get() {
  # shellcheck disable=SC2086
  $SUDO apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" "$@"
}

created_policy=""
remove_policy() {
  if [ -n "$created_policy" ]; then
    $SUDO rm -f "$POLICY_RC_D"
    created_policy=""
  fi
}

# Install Debian packages for their binaries only. Their maintainer scripts would start system services
# (Prometheus on :9090...); a policy-rc.d answering 101 forbids that. It would forbid every later service
# start on the machine too, so it is removed on every way out (success, failure, signal), and only when
# this script created it: one an administrator put there stays.
apt_install() {
  apt_get update -qq
  if [ ! -e "$POLICY_RC_D" ]; then
    created_policy=1
    trap remove_policy EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
    echo "exit 101" | $SUDO tee "$POLICY_RC_D" >/dev/null
    $SUDO chmod +x "$POLICY_RC_D"
  fi
  DEBIAN_FRONTEND=noninteractive apt_get install -y -qq --no-install-recommends "$@" >/dev/null
  remove_policy
}

main() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local missing=() bin
  for bin in "${!PKG[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/bin/$bin" ] || missing+=("${PKG[$bin]}")
  done
  if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then missing+=(python3-venv); fi
  if [ "${#missing[@]}" -gt 0 ]; then
    local pkgs
    mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "setup: installing Debian packages: ${pkgs[*]}"
    apt_install "${pkgs[@]}"
  fi

  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: Python >= 3.11 is required ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
    exit 1
  }

  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  local stamp=".venv/.mlops-obs-installed" want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing Python packages into .venv"
    # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q --disable-pip-version-check 'torch==2.13.0' 2>&1 | grep -v 'is ignored' || true
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[torch,integrations,dev]' 2>&1 | grep -v 'is ignored' || true
    .venv/bin/python -c 'import mlops_obs, torch, prometheus_client, structlog, lightning, transformers' || {
      echo "setup: install failed" >&2
      exit 1
    }
    echo "$want" >"$stamp"
  fi
  echo "setup: ready (.venv/bin/mlops-obs)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
