#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU tests, then the benchmark on 1 layer of Llama-3-8B shapes with
# --device cuda. Run from anywhere: `bash scripts/gpu_check.sh`. Results go to $OUT (default: .).
#   PY        the Python with orthopatch and a CUDA build of torch [.venv/bin/python, else python3]
#   WORKDIR   where the synthetic checkpoint is written (~2.6 GB) [/tmp/orthopatch-bench]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-.}
WORKDIR=${WORKDIR:-/tmp/orthopatch-bench}
mkdir -p "$OUT" "$WORKDIR"

nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
PY
"$PY" -c "import orthopatch" 2>/dev/null || "$PY" -m pip install --quiet --no-deps -e .

"$PY" -m pytest -q -m gpu tests/test_gpu.py tests/test_measure.py 2>&1 | tee "$OUT/gpu-tests.log"
"$PY" scripts/bench.py --preset 8b --layers 1 --repeats 2 --device cuda --skip-baseline \
    --workdir "$WORKDIR" --json "$OUT/gpu-bench.json" --clean 2>&1 | tee "$OUT/gpu-bench.log"
