#!/usr/bin/env bash
# Run the test suite with every core kept busy by stress-ng, as on a shared CI machine under load: the tests
# synchronise on events, never on sleeps, so they must pass here too. Exits with pytest's status.
# Arguments go to pytest (`scripts/stress-tests.sh tests/test_workload_faults.py -x`).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v stress-ng >/dev/null 2>&1; then
  echo "stress-tests: stress-ng not installed (bash scripts/setup.sh installs it)" >&2
  exit 2
fi
workers="${STRESS_WORKERS:-$(nproc)}"
# One CPU hog per core, at the tests' own priority; stopped on every way out.
stress-ng --cpu "$workers" --cpu-method matrixprod --quiet &
stress_pid=$!
trap 'kill "$stress_pid" 2>/dev/null; wait "$stress_pid" 2>/dev/null' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
echo "stress-tests: $workers stress-ng CPU workers (pid $stress_pid); load now $(cut -d' ' -f1 /proc/loadavg)"
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
echo "stress-tests: pytest exited $rc; load $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$rc"
