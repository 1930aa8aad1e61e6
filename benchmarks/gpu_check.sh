#!/usr/bin/env bash
# Everything a GPU machine should run, in stages: build with the machine's own torch (no
# venv: a GPU box has its CUDA torch and triton), the CUDA C++ tests, the Triton tests, the
# GPU benchmark (whole-run and combine kernels against a same-run D2D copy), the static
# kernel report, and (on request) a compute-sanitizer pass.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [STAGE ...]
#
# STAGE: build, cuda, triton, bench, report (default: these five, in this order), sanitize
# (memcheck over a few CUDA cases; not in the default). DIR: where the logs go (default: $OUT
# when set, as on the lent device machines, whose $OUT comes back; else benchmarks/results/gpu).
# Each stage runs under its own time limit in seconds (AME_<STAGE>_LIMIT: build 420, cuda 360,
# triton 480, bench 480, report 180, sanitize 420) so a hung stage cannot eat a session. Where a
# command may run for at most 10 minutes, split the stages over calls, each starting with build
# (a fresh machine has none; on a warm one it is incremental):
#   bash benchmarks/gpu_check.sh build cuda
#   bash benchmarks/gpu_check.sh build triton
#   bash benchmarks/gpu_check.sh build bench report
# Stages that only test (cuda, triton) may run at once in two invocations, their logs apart:
#   bash benchmarks/gpu_check.sh build && { bash benchmarks/gpu_check.sh cuda & bash benchmarks/gpu_check.sh triton; wait; }
# Exits non-zero if the build fails, the CUDA backend is not usable (every CUDA test would
# skip and the run would look green), a test fails, or a stage times out; later stages still
# run after a failed test stage.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-benchmarks/results/gpu}
if [ "${1:-}" = "--out" ]; then LOGS=$2; shift 2; fi
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build cuda triton bench report)
for s in "${STAGES[@]}"; do
  case $s in build|cuda|triton|bench|report|sanitize) ;;
    *) echo "gpu_check.sh: unknown stage '$s' (build, cuda, triton, bench, report, sanitize)"; exit 2;; esac
done
mkdir -p "$LOGS"
# AME_BUILD_CUDA=1: no nvcc found must fail the build, not quietly skip every CUDA test.
export PYTHONUNBUFFERED=1 AME_BUILD_CUDA=1 PY LOGS
status=0

run_stage() {  # name default-limit: stage_<name> in a child bash under `timeout`
  local name=$1 var="AME_${1^^}_LIMIT"
  local limit=${!var:-$2} t0=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" bash -o pipefail -c "$(declare -f "stage_$name" pytest_stage); stage_$name"
  local rc=$?
  [ $rc -eq 124 ] && echo "gpu_check.sh: stage $name timed out after ${limit}s"
  echo "gpu_check.sh: stage $name: exit $rc in $((SECONDS - t0)) s"
  return $rc
}

pytest_stage() {  # log-name pytest-args...
  local name=$1; shift
  # AME_PYTEST_ARGS: extra pytest arguments, e.g. "-n 6" (pytest-xdist) to spread a stage's
  # compiles and CPU-side references over the machine's cores.
  $PY -m pytest -q -ra -p no:cacheprovider ${AME_PYTEST_ARGS:-} "$@" 2>&1 | tee "$LOGS/tests_$name.log" | tail -40
  return "${PIPESTATUS[0]}"
}

stage_build() {
  { nvidia-smi || true; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"; } \
    > "$LOGS/machine.txt" 2>&1
  cat "$LOGS/machine.txt"
  if ! $PY -m pip install -q --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1; then
    echo "build failed: $LOGS/build.log"; tail -30 "$LOGS/build.log"; return 1
  fi
  $PY - <<'EOF' 2>&1 | tee -a "$LOGS/build.log"
import torch, ame_kernels as ak
print(ak.build_info()); print(ak.available_backends())
ok, why = ak.available_backends()["cuda"]
assert torch.cuda.is_available() and ok, f"the cuda backend is not usable on this GPU machine: {why}"
EOF
}

stage_cuda() {
  # CUDA_LAUNCH_BLOCKING: a faulting kernel fails at its own launch (check_launch names it),
  # not at some later torch call.
  CUDA_LAUNCH_BLOCKING=1 pytest_stage cuda tests/test_cuda.py tests/test_cuda_combine.py tests/test_gpu_fold.py \
    -k "not triton"
}

stage_triton() {
  # Parity over every optimizer x dtype x size x option at GPU sizes, the chunked driver, a
  # merge larger than the memory the process may use, triton == cuda. One autotune config
  # (AME_TRITON_AUTOTUNE=0): hundreds of variants need compiling, not four benchmarks each;
  # the bench stage tunes.
  AME_TRITON_AUTOTUNE=0 pytest_stage triton tests/test_triton.py tests/test_triton_combine.py tests/test_gpu_fold.py \
    tests/test_cuda.py -k triton
}

stage_bench() {
  $PY benchmarks/bench_gpu.py --csv "$LOGS/bench_gpu.csv" 2>&1 | tee "$LOGS/bench_gpu.txt"
  return "${PIPESTATUS[0]}"
}

stage_report() {
  $PY -m ame_kernels.kernel_report --arch 90 > "$LOGS/kernel_report.md" 2>&1
}

stage_sanitize() {
  compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    -k "whole_run_matches_reference and 4099 or step_matches_reference" 2>&1 | tee "$LOGS/sanitize.log" | tail -30
  local rc=${PIPESTATUS[0]}
  compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_combine.py \
    -k "gpu_combine_bitwise" 2>&1 | tee -a "$LOGS/sanitize.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] && return "$rc" || return 1
}

for s in "${STAGES[@]}"; do
  case $s in
    build) run_stage build 420 || { echo "logs in $LOGS (build failed)"; exit 1; } ;;
    cuda) run_stage cuda 360 || status=1 ;;
    triton) run_stage triton 480 || status=1 ;;
    bench) run_stage bench 480 || status=1 ;;
    report) run_stage report 180 || true ;;
    sanitize) run_stage sanitize 420 || status=1 ;;
  esac
done
echo "logs in $LOGS (status $status)"
exit $status
