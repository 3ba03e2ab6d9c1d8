#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install tokattr into it, at the versions of
# requirements.lock (made by scripts/lock.sh: every package, transitive ones included, pinned
# with hashes), so a fresh machine gets exactly the versions the suite was tested on.
#
# torch is installed first, pinned to 2.13.0, and only when the environment has no torch:
# an unpinned torch (or a package that asks for a range) would pull the newest CUDA build,
# several GB. The package itself accepts a range of torch, so an environment that already has
# a GPU build keeps it. Set TOKATTR_TORCH_INDEX to install torch from another index (e.g.
# https://download.pytorch.org/whl/cpu), TOKATTR_VENV for another environment folder,
# PYTHON for another interpreter.
#
# TOKATTR_DEPS=latest ignores the lock and installs the newest releases the index serves of
# everything but torch (scripts/test.sh --latest uses it, in .venv-latest); TOKATTR_DEPS=lowest
# the lowest versions pyproject.toml admits for tokattr's direct dependencies, the floors
# (scripts/test.sh --lowest, in .venv-lowest; resolved by uv, scripts/uv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${TOKATTR_VENV:-.venv}
DEPS=${TOKATTR_DEPS:-lock}
LOCK=requirements.lock
case "$DEPS" in
  lock | latest | lowest) ;;
  *) echo "setup.sh: TOKATTR_DEPS must be lock, latest or lowest, not '$DEPS'" >&2; exit 2 ;;
esac

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

if [ "$DEPS" = latest ]; then
  # Every run resolves again: the point is whatever the index serves today.
  echo "==> installing tokattr with the newest releases of its dependencies (lock ignored)"
  # torch stays the build installed above (an eager upgrade would fetch the newest CUDA build).
  # Its public version: a local label (+cu130) that the index's file name lacks matches nothing
  # there, and the installed build (local labels sort higher) still satisfies the public one.
  keep=$(mktemp)
  "$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' \
    > "$keep"
  "${PIP[@]}" install --upgrade --upgrade-strategy eager -c "$keep" -e ".[dev]"
  rm -f "$keep"
  "${PIP[@]}" check
  exit 0
fi

if [ "$DEPS" = lowest ]; then
  echo "==> installing tokattr with the lowest versions pyproject.toml admits (lock ignored)"
  UV=$(bash scripts/uv.sh)
  floors=$(mktemp)
  keep=$(mktemp)
  "$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' \
    > "$keep"
  "$UV" pip compile pyproject.toml --extra dev --constraint "$keep" \
    --config-file scripts/lock-uv.toml --python "$VENV/bin/python" \
    --resolution lowest-direct --no-emit-package torch --no-header --quiet --output-file "$floors"
  "${PIP[@]}" install --only-binary=:all: --no-deps -r "$floors"
  "${PIP[@]}" install --no-deps --no-build-isolation -e .
  "${PIP[@]}" check
  rm -f "$floors" "$keep"
  exit 0
fi

# Reinstall only when the lock, pyproject.toml or this script changed since the last install.
stamp="$VENV/.tokattr-installed"
want=$(cat "$LOCK" pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/tokattr" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing the locked dependencies ($LOCK)"
  # --no-deps: the lock is the whole set, so nothing is resolved here; hashes are checked.
  "${PIP[@]}" install --require-hashes --no-deps -r "$LOCK"
  echo "==> installing tokattr (editable, with the dev extra)"
  "${PIP[@]}" install --no-deps --no-build-isolation -e .
  # The lock must be complete and consistent with pyproject.toml and the torch installed.
  "${PIP[@]}" check
  echo "$want" > "$stamp"
fi
