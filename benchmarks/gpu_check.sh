#!/usr/bin/env bash
# Everything a GPU machine should run, in one go: build with the machine's own torch
# (no venv: a GPU box has its CUDA torch and triton), the GPU tests of the Triton and
# CUDA backends, the GPU benchmark, and the static kernel report.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # logs land in OUT_DIR (default benchmarks/results/gpu)
#
# Exits non-zero if the build or a test fails; the benchmark and the report still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
status=0

{ nvidia-smi || true; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if ! $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "build failed: $OUT/build.log"; tail -30 "$OUT/build.log"; exit 1
fi
$PY -c "import ame_kernels as ak; print(ak.build_info()); print(ak.available_backends())" | tee -a "$OUT/build.log"

# GPU tests: the parity matrix at GPU sizes, the chunked driver vs unchunked, a merge larger
# than free GPU memory, triton == cuda, the fold, and the static report.
$PY -m pytest -q -ra -p no:cacheprovider tests/test_triton.py tests/test_cuda.py tests/test_gpu_fold.py \
  tests/test_kernel_report.py tests/test_identities.py 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

$PY benchmarks/bench_gpu.py --csv "$OUT/bench_gpu.csv" 2>&1 | tee "$OUT/bench_gpu.txt"
$PY -m ame_kernels.kernel_report --arch 90 > "$OUT/kernel_report.md" 2>&1 || true
echo "logs in $OUT (status $status)"
exit $status
