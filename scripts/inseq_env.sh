#!/usr/bin/env bash
# Build the separate virtual environment bench/ runs Inseq in (.venv-inseq): Inseq 0.7.1 pins an
# old typeguard and, on Linux, CUDA 11 wheels that tokattr's environment must not get, so it
# lives apart. Its dependencies are installed by hand (no CUDA wheels); the bench finds it at
# .venv-inseq/bin/python (or $TOKATTR_BENCH_INSEQ_PYTHON). Tested with transformers 5.25.0:
# Inseq 0.7.1 predates transformers 5, so bench/_inseq_worker.py loads the model with eager
# attention for `attention` and adapts one value-zeroing hook (bench/results/inseq-attention.md);
# a transformers 4 env cannot load the model folders, which transformers 5 saved.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-inseq}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q --no-deps "inseq==0.7.1"
"$VENV/bin/pip" install -q "transformers>=4.56" "captum>=0.7" jaxtyping "typeguard<=2.13.3" \
  treescope rich matplotlib tqdm numpy
"$VENV/bin/python" -c "import inseq; print('inseq ready in $VENV')"
