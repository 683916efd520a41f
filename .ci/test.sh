#!/usr/bin/env bash
# The test suite (`make test`, which .ci/run calls). Services some tests need (a single-node SLURM,
# headless Chromium) are set up by .ci/services/*.sh when this machine allows it (root + apt), and
# stopped afterwards; tests that need a missing service skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
started=()
stop_all() {
  for s in "${started[@]}"; do bash "$s" stop || true; done
}
trap stop_all EXIT
if [ "${MEDSASS_SKIP_SERVICES:-0}" != "1" ]; then
  for s in .ci/services/*.sh; do
    [ -e "$s" ] || continue
    if bash "$s" start; then started+=("$s"); else echo "note: $s could not start; its tests will skip" >&2; fi
  done
fi
.venv/bin/python -m pytest -q "$@"
