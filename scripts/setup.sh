#!/usr/bin/env bash
# Set up mlops-obs on a fresh Debian machine: the Prometheus family from apt, a venv with torch (CPU) and the
# project in editable mode with its dev tools. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
PYTHON="${PYTHON:-python3}"

# binary -> Debian package
declare -A PKG=(
  [prometheus]=prometheus [promtool]=prometheus
  [prometheus-alertmanager]=prometheus-alertmanager [amtool]=prometheus-alertmanager
  [prometheus-node-exporter]=prometheus-node-exporter [openssl]=openssl
  [chromium]=chromium
)
missing=()
for bin in "${!PKG[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/bin/$bin" ] || missing+=("${PKG[$bin]}")
done
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then missing+=(python3-venv); fi
if [ "${#missing[@]}" -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  echo "setup: installing Debian packages: $pkgs"
  $SUDO apt-get update -qq
  # The packages would start system services; we only want the binaries (tests run them as children).
  echo exit 101 | $SUDO tee /usr/sbin/policy-rc.d >/dev/null && $SUDO chmod +x /usr/sbin/policy-rc.d
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  $SUDO rm -f /usr/sbin/policy-rc.d
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: Python >= 3.11 is required ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.mlops-obs-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv"
  # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q --disable-pip-version-check 'torch==2.13.0' 2>&1 | grep -v 'is ignored' || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[torch,integrations,dev]' 2>&1 | grep -v 'is ignored' || true
  .venv/bin/python -c 'import mlops_obs, torch, prometheus_client, structlog, lightning, transformers' || { echo "setup: install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "setup: ready (.venv/bin/mlops-obs)"
