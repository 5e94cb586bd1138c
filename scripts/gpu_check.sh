#!/usr/bin/env bash
# The GPU paths in one command (benchmarks/gpu_check.py): bfloat16 training with nccl, FSDP,
# covariance actors and the null-space init on GPU, vLLM on CUDA serving 4 adapters.
# Writes runs/gpu_check.json. `--dry-run` checks the plan on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
