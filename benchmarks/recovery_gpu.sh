#!/usr/bin/env bash
# The recovery comparison of benchmarks/recovery.py on one GPU, in under eight minutes.
#
# Same students (SmolLM2-135M at about 85 % of its parameters: Krony-PT-style Kronecker MLPs with
# the modified Van Loan init, the SVD-only budget allocation, and the truncated baseline), the
# same recoveries (staged local -> block-wise -> end-to-end, and end-to-end alone) on the
# enwiki-sample articles, the same evaluation (WikiText-2 test, first 16,384 tokens, sliding window
# 1024/512; GLUE SST-2 dev sentences as out-of-domain text), with bf16 autocast
# (mixed_precision: auto), TRAIN_TOKENS training tokens and a MINUTES-minute budget per run.
# Writes docs/benchmarks/recovery_gpu.md and .png.
#
#   bash benchmarks/recovery_gpu.sh            # from the repository root, with .venv set up
#
# Needs a CUDA build of torch in .venv (scripts/setup.sh installs the CPU one: install yours
# first) and the data directory (DATA_DIR, default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
TRAIN_TOKENS=${TRAIN_TOKENS:-1048576}
MINUTES=${MINUTES:-1.5}
DATA_DIR=${DATA_DIR:-../shared/data}
"$PY" benchmarks/recovery.py --size 0.85 --students kron-vlr,budget-svd,truncate --recoveries staged,end_to_end \
  --data-dir "$DATA_DIR" --train-tokens "$TRAIN_TOKENS" --block-tokens 262144 --minutes "$MINUTES" --points 0.5,1,1.5 \
  --local-minutes 0.25 --blockwise-minutes 0.25 --device cuda --threads 8 --work runs/recovery-gpu \
  --out docs/benchmarks/recovery_gpu.md --plot docs/benchmarks/recovery_gpu.png
