#!/usr/bin/env bash
# Regenerate requirements.lock: every package scripts/setup.sh installs (transitive ones
# included, torch excepted), pinned with hashes, for every Python >= 3.10 and platform
# (a universal resolution: markers pick the version per Python), from the package index.
#
#   bash scripts/lock.sh                            # keep the current pins; resolve only what
#                                                   # pyproject.toml's ranges now force
#   bash scripts/lock.sh --upgrade                  # newest versions of everything
#   bash scripts/lock.sh --upgrade-package wandb    # newest of one package (and what it needs)
#
# Extra arguments go to `uv pip compile`. Then run `bash scripts/test.sh` (it reinstalls from
# the new lock) and commit requirements.lock with the change that needed it.
#
# The resolver is uv, pinned in scripts/uv.sh and installed into its own environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
UV=$(bash scripts/uv.sh)
# torch itself is pinned (its dependencies get locked) but not written to the lock.
constraints=$(mktemp)
build=$(mktemp)
trap 'rm -f "$constraints" "$build"' EXIT
grep -o 'torch==[0-9.]*' scripts/setup.sh | head -1 > "$constraints"
# The build backend, for `pip install --no-build-isolation -e .` from the lock.
"$PY" - pyproject.toml > "$build" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"\[build-system\].*?requires\s*=\s*\[(.*?)\]", text, re.S).group(1)
print("\n".join(re.findall(r'"([^"]+)"', block)))
PY
"$UV" pip compile pyproject.toml "$build" \
  --extra dev \
  --constraint "$constraints" \
  --config-file scripts/lock-uv.toml \
  --universal --python-version 3.10 \
  --generate-hashes \
  --no-emit-package torch \
  --custom-compile-command "bash scripts/lock.sh" \
  --output-file requirements.lock \
  "$@"
# Name the build-system requirements by where they come from, not by the temporary file.
sed -i "s#-r $build#pyproject.toml (build-system)#; s#$build#pyproject.toml (build-system)#" \
  requirements.lock
echo "==> requirements.lock: $(grep -cE '^[A-Za-z0-9]' requirements.lock) pins"
