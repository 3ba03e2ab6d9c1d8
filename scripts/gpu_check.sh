#!/usr/bin/env bash
# The check to run when a session has one GPU: at most 10 minutes, every step under its own
# time limit, results in bench/results/<gpu>-*:
#
#   1. the cuda-marked tests (tests/test_cuda.py: every method on the GPU equals the CPU; a
#      model split between GPU and CPU by device_map equals the whole one);
#   2. the performance bench at the quick scale in fp32 (-> <gpu>-fp32.{json,md,png}) and,
#      on the 100M Llama at 64 and 256 tokens, in bf16 (-> <gpu>-bf16.*), Captum as the peer;
#   3. FSDP2 at world size 1 with NCCL (configs/bench/fsdp.yaml on the GPU);
#   4. a device_map run whose max_memory puts part of the model on the CPU (gradients cross
#      devices), compared with the whole model on the GPU;
#   5. occlusion and Shapley sampling on a 2,048-token prompt, every token a feature, with the
#      100M Llama (-> <gpu>-long-prompts.*): thousands of passes, a GPU job.
#
# The steps' limits add up to 580 s, under the 10 minutes the check may take.
#
#   bash scripts/gpu_check.sh             # on a machine with a CUDA device
#   bash scripts/gpu_check.sh --dry-run   # anywhere: the same steps on the CPU, tiny (the
#                                         # bench collected, not run; disk instead of CPU
#                                         # offload), results in a temporary folder
#
# A bench step stopped at its limit still writes what it measured (pytest gets SIGINT).
# Steps 3 and 4 and every step's status and time go to <gpu>-check.md. Exit status: the
# number of failed steps (0: all passed). PYTHON: the interpreter (default .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
  bash scripts/setup.sh || exit 1
fi
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  GPU=dry-run ACC=cpu RESULTS=$(mktemp -d) COLLECT=(--collect-only -q)
  N=2 OFFLOAD='{"cpu": "4MiB"}'  # the rest of the model on disk
  LONG=(--lengths 16 --methods forward occlusion)
else
  GPU=$("$PY" - <<'PY'
import re, sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device here; bash scripts/gpu_check.sh --dry-run checks the script on a CPU")
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))
PY
  ) || exit 1
  ACC=gpu RESULTS=bench/results COLLECT=()
  N=16 OFFLOAD='{"0": "3MiB", "cpu": "2GiB"}'  # arith-tiny is 7 MiB: about half on the CPU
  LONG=(--lengths 2048 --methods forward occlusion shapley_sampling)
fi
RUNS=$(mktemp -d)
REPORT=$RESULTS/$GPU-check.md
{
  echo "# GPU check: $GPU"
  echo
  echo "\`bash scripts/gpu_check.sh$([ "$DRY" = 1 ] && echo " --dry-run")\`, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
} > "$REPORT"
FAILED=0

# step NAME LIMIT_S COMMAND...: run it under its time limit, record status and time.
step() {
  local name=$1 limit=$2 t0 rc status
  shift 2
  echo "==> $name (at most ${limit}s)"
  t0=$(date +%s)
  timeout -s INT -k 15 "$limit" "$@"
  rc=$?
  case "$rc" in
    0) status=passed ;;
    124 | 130) status="stopped at ${limit}s (partial results kept)"; FAILED=$((FAILED + 1)) ;;
    *) status="failed (exit $rc)"; FAILED=$((FAILED + 1)) ;;
  esac
  echo "| $name | $status | $(($(date +%s) - t0)) |" >> "$REPORT"
}

# A small tokattr bench (the whole model, then split by device_map), rows in the given folder.
BENCH=("$PY" -m tokattr.cli bench --config configs/bench/quick.yaml --overwrite true
  --wandb false --trainer.accelerator "$ACC" --data.n "$N"
  --model.methods '{"integrated_gradients": {"n_steps": 16}, "saliency": {}, "occlusion": {}}'
  --model.metrics '["comprehensiveness", "sufficiency"]')

step "cuda-marked tests" 75 "$PY" -m pytest -m cuda tests/ -q -p no:cacheprovider
step "bench quick fp32" 190 "$PY" -m pytest bench/ --benchmark-only -p no:cacheprovider \
  --bench-scale quick --bench-dtype fp32 --bench-peers captum --bench-name "$GPU-fp32" \
  "${COLLECT[@]}"
step "bench bf16 (100M Llama, 64 and 256 tokens)" 75 "$PY" -m pytest bench/ --benchmark-only \
  -p no:cacheprovider --bench-scale quick --bench-dtype bf16 --bench-peers captum \
  --bench-name "$GPU-bf16" -k "llama-100m and (len64 or len256) and not test_memory" \
  "${COLLECT[@]}"
step "FSDP2 at world size 1" 50 "$PY" -m tokattr.cli bench --config configs/bench/fsdp.yaml \
  --out_dir "$RUNS/fsdp" --overwrite true --wandb false --trainer.accelerator "$ACC" \
  --trainer.devices 1 --trainer.strategy.init_args.data_parallel_size 1 --data.n "$N" \
  --model.methods '{"integrated_gradients": {"n_steps": 16}, "occlusion": {}, "kernel_shap": {"n_samples": 32}}'
step "whole model" 40 "${BENCH[@]}" --out_dir "$RUNS/whole"
step "device_map with max_memory $OFFLOAD" 40 "${BENCH[@]}" --out_dir "$RUNS/split" \
  --model.device_map auto --model.max_memory "$OFFLOAD" --model.offload_folder "$RUNS/offload"
step "device_map equals the whole model" 10 "$PY" - "$RUNS/whole" "$RUNS/split" "$RUNS/compare" <<'PY'
import json, sys
from pathlib import Path

def rows(d):
    return {(r["example_id"], r["method"]): r for r in map(json.loads, open(Path(d, "attributions.jsonl")))}

a, b = rows(sys.argv[1]), rows(sys.argv[2])
assert a.keys() == b.keys() and a, "the two runs scored different (example, method) pairs"
worst = 0.0
for k, r in a.items():
    scale = max(abs(x) for x in r["scores"]) or 1.0
    worst = max(worst, max(abs(x - y) for x, y in zip(r["scores"], b[k]["scores"])) / scale)
Path(sys.argv[3]).write_text(
    f"device_map run against the whole model: largest score difference {worst:.2e} of the "
    f"row's largest |score| over {len(a)} rows\n"
)
sys.exit(0 if worst <= 1e-3 else f"device_map differs from the whole model by {worst:.2e}")
PY
step "long prompts, every token (100M Llama)" 100 "$PY" -m bench.long_prompts "${LONG[@]}" \
  --tokens --timeout 90 --out-dir "$RESULTS" --name "$GPU-long-prompts"
if [ -f "$RUNS/compare" ]; then
  { echo; cat "$RUNS/compare"; } >> "$REPORT"
fi
if [ -f "$RUNS/fsdp/summary.md" ]; then
  { echo; echo "FSDP2 at world size 1 (summary.md):"; echo; cat "$RUNS/fsdp/summary.md"; } >> "$REPORT"
fi
echo "gpu_check.sh: $FAILED step(s) failed; report: $REPORT"
exit "$FAILED"
