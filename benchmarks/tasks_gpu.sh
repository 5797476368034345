#!/usr/bin/env bash
# The task benchmarks on one GPU, sized to finish in under eight minutes: GLUE with decoder students
# of SmolLM2-135M (benchmarks/glue_decoders.py), then SQuAD with the KroneckerBERT-style MiniLM
# students (benchmarks/squad_minilm.py), both with bf16 autocast.
#
# GLUE: the dense SmolLM2-135M teacher and its three students at 70 % of the parameters (Kronecker
# MLPs, SVD budget, truncation), built and trained as in the CPU benchmark, but on all 67,349 SST-2
# training rows (SST2_EPOCHS epochs, batch SST2_BATCH) and MRPC_EPOCHS epochs of MRPC (batch
# MRPC_BATCH). Results in runs/glue_decoders-gpu, the page in docs/benchmarks/glue_decoders_gpu.md
# (+ .png). SQuAD: the benchmark's GPU settings with SQUAD_FLAGS (default: one teacher setting
# instead of the grid, and short runs); results in runs/squad-minilm-gpu, the page in
# docs/benchmarks/squad_minilm_gpu.md (+ .png).
#
#   bash benchmarks/tasks_gpu.sh [DATA_DIR]      # from anywhere, with .venv set up
#
# DATA_DIR (argument, else $DATA_DIR, else ../shared/data) holds glue/, wikitext-2-raw/,
# enwiki-sample/ and squad-v1.1-dev-split/. Needs a CUDA build of torch in .venv (scripts/setup.sh
# installs the CPU one: install yours first). Both benchmarks skip the rows their work folders
# already hold, so a rerun after an interruption finishes the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
DATA_DIR=$(realpath "${1:-${DATA_DIR:-../shared/data}}")
[ -d "$DATA_DIR/glue" ] || { echo "data folder $DATA_DIR has no glue/ (give it as the first argument or DATA_DIR)" >&2; exit 2; }
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} KRONLM_DATA_DIR="$DATA_DIR"
THREADS=${THREADS:-8}
SST2_EPOCHS=${SST2_EPOCHS:-1}
SST2_BATCH=${SST2_BATCH:-128}
MRPC_EPOCHS=${MRPC_EPOCHS:-3}
MRPC_BATCH=${MRPC_BATCH:-32}
SQUAD_FLAGS=${SQUAD_FLAGS:---teacher-lrs 1e-4 --teacher-windows 256:96 --teacher-epochs 2 --teacher-more-epochs 0 --student-epochs 1 --stage1-steps 200}
GLUE=(benchmarks/glue_decoders.py --device cuda --threads "$THREADS" --data-dir "$DATA_DIR" --work runs/glue_decoders-gpu
      --out docs/benchmarks/glue_decoders_gpu.md)
start=$SECONDS
"$PY" "${GLUE[@]}" --tasks sst2 --max-train-examples all --epochs "$SST2_EPOCHS" --batch-size "$SST2_BATCH"
echo "# GLUE SST-2 done after $((SECONDS - start)) s"
"$PY" "${GLUE[@]}" --tasks mrpc --epochs "$MRPC_EPOCHS" --batch-size "$MRPC_BATCH"
echo "# GLUE MRPC done after $((SECONDS - start)) s"
# shellcheck disable=SC2086  # SQUAD_FLAGS is a list of flags
"$PY" benchmarks/squad_minilm.py --device cuda --threads "$THREADS" --data-dir "$DATA_DIR" --work runs/squad-minilm-gpu \
  --out docs/benchmarks/squad_minilm_gpu.md $SQUAD_FLAGS
echo "# SQuAD done after $((SECONDS - start)) s"
