#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (issue 17): every `gpu`-marked test, then the GPU rows of the
# engine benchmark (native, vLLM and transformers on the same checkpoint, fp32: bf16 rows are not wired yet).
# Budget: under 8 minutes on one GPU. Never run yet: no GPU has been lent to this project's sessions.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, after `make install`
#
# The device machines reach no network: the venv travels with the checkout (run's `carry: [".venv"]`), so a
# CUDA build of torch and the GPU vLLM (the `vllm` extra) must already be in it; this script checks that
# first and says what is missing instead of failing half-way. Output: one table per step, and
# benchmarks/results/engine_backends_gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
date -u +"gpu_check: %Y-%m-%d %H:%M UTC"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'PYEOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA device; install a CUDA build of torch")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF
timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
timeout 180 "$PY" benchmarks/engine_backends.py --device cuda --presets small,base --batches 1,32 --rounds 2 \
    --output benchmarks/results/engine_backends_gpu.json
