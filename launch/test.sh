#!/usr/bin/env bash
# The test command (CI runs it through .ci/run): lint and format check, then the suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# passive OpenMP waiting: two torch processes on a 2-core machine (a test and its torchrun ranks)
# otherwise spin against each other and run 10-20x slower
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
.venv/bin/python -m pytest -q tests "$@"
