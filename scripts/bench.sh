#!/usr/bin/env bash
# Set up (if needed) and run the performance benchmark in bench/ (pytest-benchmark).
# Extra arguments go to pytest, e.g.
#   bash scripts/bench.sh -k "arith and occlusion"
#   bash scripts/bench.sh --bench-scale full --bench-dtype bf16
# Results: bench/results/<name>.json, .md (table of ratios and speed-ups) and .png.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
VENV=${TOKATTR_VENV:-.venv}
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest bench/ --benchmark-only -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "bench.sh: pytest collected no benchmark; that is a failure" >&2
  exit 1
fi
echo "bench.sh: results in $(pwd)/bench/results/ (<name>.json, <name>.md, <name>.png)"
exit "$rc"
