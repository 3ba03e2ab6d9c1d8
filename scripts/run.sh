#!/usr/bin/env bash
# Set up (if needed) and run the main job on the bundled model.
# Extra arguments are passed to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${TOKATTR_VENV:-.venv}
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# Greedy exact-match accuracy of the bundled model per arithmetic bucket, on fresh problems.
exec "$VENV/bin/tokattr" eval-model --model arith-tiny "$@"
