#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install tokattr into it.
#
# torch is installed first, pinned to 2.13.0, and only when the environment has no torch:
# an unpinned torch (or a package that asks for a range) would pull the newest CUDA build,
# several GB. The package itself accepts torch>=2.4, so an environment that already has a
# GPU build keeps it. Set TOKATTR_TORCH_INDEX to install torch from another index (e.g.
# https://download.pytorch.org/whl/cpu), TOKATTR_VENV for another environment folder,
# PYTHON for another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${TOKATTR_VENV:-.venv}

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "tokattr needs Python >= 3.10 (found $("$PY" --version 2>&1))" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "==> installing torch==2.13.0"
  "${PIP[@]}" install ${TOKATTR_TORCH_INDEX:+--index-url "$TOKATTR_TORCH_INDEX"} torch==2.13.0
fi

# Reinstall the package only when pyproject.toml changed since the last install.
stamp="$VENV/.tokattr-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x "$VENV/bin/tokattr" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing tokattr (editable, with the dev extra)"
  "${PIP[@]}" install -e ".[dev]"
  echo "$want" > "$stamp"
fi
