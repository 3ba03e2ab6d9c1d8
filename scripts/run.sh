#!/usr/bin/env bash
# Set up (if needed) and run the main job on the bundled model.
# Extra arguments are passed to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${TOKATTR_VENV:-.venv}
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# The default benchmark: every method x every metric on 100 fresh arithmetic problems with the
# bundled model; results in runs/bench (run again to resume; --overwrite to start over).
exec "$VENV/bin/tokattr" bench --config configs/bench/arith.yaml "$@"
