#!/usr/bin/env bash
# The offload checks that need a CUDA GPU, in one short run (< 8 minutes on one H200):
#   1. tests/offload/test_gpu.py (placement independence bitwise, trajectory, hooks, pinned
#      NUMA-bound buffers, DDP comm hook)                                    ~2 min
#   2. bench/offload.py --gpu: iteration time of a GPT that does not fit in the capped device
#      memory without offloading, OffloadAdamW (planner / all-CPU) vs DeepSpeed ZeRO-2
#      offload_optimizer cpu vs FSDP2 CPUOffloadPolicy                      ~5 min
# Uses the python on PATH (or $PYTHON) with a CUDA build of torch; DeepSpeed optional
# (its row then says why it is missing). Results go to ${OUT:-bench-out}/.
#
#   bash bench/offload_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export STALWART_OFFLOAD_CACHE=${STALWART_OFFLOAD_CACHE:-$PWD/.cache/offload}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt" || exit 1
start=$SECONDS
timeout 200 $PY -m pytest -q -p no:cacheprovider -m gpu tests/offload/test_gpu.py 2>&1 | tail -25 | tee "$OUT/offload_gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "gpu tests: rc=$tests_rc, $((SECONDS - start)) s" | tee -a "$OUT/offload_gpu_tests.txt"
start=$SECONDS
timeout 300 $PY bench/offload.py --gpu --iters 5 --threads "$(nproc)" --json "$OUT/offload_gpu.json" 2>&1 \
    | grep -v -e "\[INFO\]" -e "\[WARNING\]" | tee "$OUT/offload_gpu_bench.txt"
echo "gpu bench: rc=${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$OUT/offload_gpu_bench.txt"
exit "$tests_rc"
