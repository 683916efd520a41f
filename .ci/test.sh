#!/usr/bin/env bash
# The test suite: pytest in the project's venv. (SLURM-backed workflow tests start their own daemons.)
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q "$@"
