#!/usr/bin/env bash
# The GPU check of the exllamav2 backend, for a machine with ONE NVIDIA GPU and no network.
#
#   scripts/gpu-check.sh               # full check (~8 min on one H200, most of it building the extension)
#   scripts/gpu-check.sh --dry-run     # no GPU: the same steps on a small FP16 model through the CPU stand-in
#
# Needs python3 with a CUDA build of torch, nvcc and ninja (the extension is JIT-built for this GPU's
# compute capability only). Missing Python packages (exllamav2==0.3.2, optuna and its needs) can
# travel as wheels: WHEELS=/path/to/wheels installs them from there, offline, into $WORK/site.
# It prints: the GPU, the build time, `exl2opt calibrate`, then (scripts/gpu_check.py) two exl2
# variants made by exllamav2's own converter, `exl2opt search` on 2 variants x 3 cache modes with
# predicted and measured VRAM per trial (max_memory_allocated and mem_get_info), the causality
# check, and the Q-cache bytes of the real extension beside the CPU stand-in's.
# Figures land in docs/gpu-check.md by hand, with the date and the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/exl2opt-gpu-check}
RESULTS=${RESULTS:-${OUT:-}}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 EXL2OPT_CACHE="$WORK/cache"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
start=$(date +%s)
if [ "$DRY" = 1 ]; then
  echo "== dry run: no GPU used"
  "$PY" scripts/gpu_check.py --dry-run --work "$WORK/dry" ${RESULTS:+--out "$RESULTS"}
  echo "gpu-check (dry run): done in $(( $(date +%s) - start )) s"
  exit 0
fi
command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: this check needs an NVIDIA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "== build exllamav2_ext (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
t=$(date +%s)
timeout 420 "$PY" -c 'import exllamav2, exllamav2.ext as e; print("exllamav2", exllamav2.__version__, "ext", e.exllamav2_ext.__file__)'
echo "build/import took $(( $(date +%s) - t )) s"
echo "== exl2opt calibrate"
"$PY" -m optimizer calibrate
"$PY" scripts/gpu_check.py --work "$WORK" ${RESULTS:+--out "$RESULTS"}
echo "gpu-check: done in $(( $(date +%s) - start )) s"
