#!/usr/bin/env bash
# The recovery comparison of benchmarks/recovery.py on one GPU, in about ten minutes.
#
# Same students (SmolLM2-135M at about 85 % of its parameters: Krony-PT-style Kronecker MLPs with
# the modified Van Loan init, the budget allocation, and the truncated baseline), the same
# recipes (configs/recover-*.yaml) and the same evaluation (WikiText-2 test, first 16,384 tokens,
# sliding window 1024/512; GLUE SST-2 dev sentences as out-of-domain text), with bf16 autocast
# (mixed_precision: auto) and a larger training budget: TRAIN_TOKENS of WikiText-2 validation text
# and a 2-minute cap per end-to-end run. Writes docs/benchmarks/recovery_gpu.md and .png.
#
#   bash benchmarks/recovery_gpu.sh            # from the repository root, with .venv set up
#
# Needs a CUDA build of torch in .venv (scripts/setup.sh installs the CPU one: install yours first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
TRAIN_TOKENS=${TRAIN_TOKENS:-524288}
"$PY" benchmarks/recovery.py --size 0.85 --methods kron-vlr,budget,truncate --modes end_to_end,blockwise \
  --train-tokens "$TRAIN_TOKENS" --minutes 2 --device cuda --threads 8 --work runs/recovery-gpu \
  --out docs/benchmarks/recovery_gpu.md --plot docs/benchmarks/recovery_gpu.png
