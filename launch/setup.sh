#!/usr/bin/env bash
# Create .venv and install dopsd-scale with its dependencies (CPU or GPU machines).
# torch is installed first, at an exact version, and pinned by constraints.txt for the rest:
# otherwise a dependency's bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=$(sed -n 's/^torch==//p' constraints.txt)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
fi
"$VENV/bin/pip" install -q -c constraints.txt -e ".[dev]"
echo "dopsd-scale installed in $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
