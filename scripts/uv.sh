#!/usr/bin/env bash
# Print the path of uv (the resolver scripts/lock.sh and `scripts/test.sh --lowest` use),
# first installing the pinned version into its own environment, .venv-tools, if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PY=${PYTHON:-python3}
TOOLS=${TOKATTR_TOOLS_VENV:-.venv-tools}
if [ "$("$TOOLS/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  echo "==> installing uv==$UV_VERSION into $TOOLS" >&2
  [ -x "$TOOLS/bin/python" ] || "$PY" -m venv "$TOOLS" >&2
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" >&2
fi
echo "$(pwd)/$TOOLS/bin/uv"
