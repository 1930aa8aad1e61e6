#!/usr/bin/env bash
# Everything a GPU machine should run, in stages: build with the machine's own torch (no
# venv: a GPU box has its CUDA torch and triton), the GPU tests of the Triton and CUDA
# backends, the GPU benchmark, and the static kernel report.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [STAGE ...]
#
# STAGE: build, tests, bench, report (default: all four, in that order). Logs land in DIR
# (default benchmarks/results/gpu). Each stage runs under its own time limit (seconds:
# AME_BUILD_LIMIT 300, AME_TESTS_LIMIT 420, AME_BENCH_LIMIT 480, AME_REPORT_LIMIT 180) so a
# hung stage cannot eat a whole session; where one command may run at most 10 minutes, split
# the stages over calls, each starting with build (a fresh machine has no build), e.g.
#   bash benchmarks/gpu_check.sh build tests
#   bash benchmarks/gpu_check.sh build bench report
# Exits non-zero if the build or a test fails (or a stage times out); later stages still run
# when a test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=benchmarks/results/gpu
if [ "${1:-}" = "--out" ]; then OUT=$2; shift 2; fi
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests bench report)
for s in "${STAGES[@]}"; do
  case $s in build|tests|bench|report) ;; *) echo "gpu_check.sh: unknown stage '$s' (build, tests, bench, report)"; exit 2;; esac
done
mkdir -p "$OUT"
status=0
export PYTHONUNBUFFERED=1 PY OUT

run_stage() {  # name limit: runs stage_<name> in a child bash under `timeout`, noting a timeout
  local name=$1 limit=$2
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" bash -o pipefail -c "$(declare -f "stage_$name"); stage_$name"
  local rc=$?
  [ $rc -eq 124 ] && echo "gpu_check.sh: stage $name timed out after ${limit}s"
  echo "gpu_check.sh: stage $name: exit $rc in $((SECONDS - t0)) s"
  return $rc
}

stage_build() {
  { nvidia-smi || true; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"; } \
    > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
  if ! $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    echo "build failed: $OUT/build.log"; tail -30 "$OUT/build.log"; return 1
  fi
  $PY -c "import ame_kernels as ak; print(ak.build_info()); print(ak.available_backends())" | tee -a "$OUT/build.log"
}

stage_tests() {
  # The parity matrix at GPU sizes, the chunked driver vs unchunked, a merge larger than the
  # memory this process may use, triton == cuda, the fold, and the static report's checks.
  $PY -m pytest -q -ra -p no:cacheprovider tests/test_triton.py tests/test_cuda.py tests/test_gpu_fold.py \
    tests/test_kernel_report.py tests/test_identities.py 2>&1 | tee "$OUT/tests.log" | tail -40
  return "${PIPESTATUS[0]}"
}

stage_bench() {
  $PY benchmarks/bench_gpu.py --csv "$OUT/bench_gpu.csv" 2>&1 | tee "$OUT/bench_gpu.txt"
  return "${PIPESTATUS[0]}"
}

stage_report() {
  $PY -m ame_kernels.kernel_report --arch 90 > "$OUT/kernel_report.md" 2>&1
}

for s in "${STAGES[@]}"; do
  case $s in
    build) run_stage build "${AME_BUILD_LIMIT:-300}" || { echo "logs in $OUT (build failed)"; exit 1; } ;;
    tests) run_stage tests "${AME_TESTS_LIMIT:-420}" || status=1 ;;
    bench) run_stage bench "${AME_BENCH_LIMIT:-480}" || status=1 ;;
    report) run_stage report "${AME_REPORT_LIMIT:-180}" || true ;;
  esac
done
echo "logs in $OUT (status $status)"
exit $status
