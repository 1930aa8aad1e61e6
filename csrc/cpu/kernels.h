// Arguments and entry points of the CPU kernels. Raw pointers only (no libtorch); the
// binding (python/bind_cpu.cpp) checks every field before a kernel runs.
//
//   whole_run: the entire schedule over [numel] elements, N inputs [N][numel] given as N
//              separate pointers (any mix of fp32/bf16/fp16) -> out [numel] (any of them).
//   step:      one fused optimizer step, w fp32 [numel] and state fp32 [slots][numel]
//              read-modify-write, a batch of M inputs (any float dtype).
//
// Each entry exists once per SIMD level (namespaces scalar / avx2 / avx512, compiled from
// the *_scalar.cpp / *_avx2.cpp / *_avx512.cpp files with that ISA's flags); the
// dispatcher (dispatch.cpp) calls the level asked for.
#pragma once
#include <cstdint>

#include "common/cpu_features.h"
#include "common/dtypes.h"
#include "rules/common.h"

namespace ame {
namespace cpu {

enum class PivotMode : int { Soup = 0, Index = 1, Pointer = 2 };

struct WholeRunArgs {
  int n = 0;                               // ingredients
  int64_t numel = 0;                       // elements per ingredient
  const void* const* inputs = nullptr;     // [n] pointers
  const DType* input_dtypes = nullptr;     // [n]
  void* out = nullptr;                     // [numel] of out_dtype
  DType out_dtype = DType::F32;
  int steps = 0;                           // T
  const int32_t* batch_ptr = nullptr;      // [T+1]
  const int32_t* batch_idx = nullptr;      // [batch_ptr[T]], each in [0, n)
  const float* coeffs = nullptr;           // [T][4]: gscale, lr_eff, decay, inv_bc2_sqrt
  int optimizer = 0;                       // ame_kernels.schedule.OPTIMIZER_CODES
  HyperScalars hyper;
  PivotMode pivot_mode = PivotMode::Soup;
  int pivot_index = 0;                     // PivotMode::Index
  const void* pivot = nullptr;             // PivotMode::Pointer: [numel] of pivot_dtype
  DType pivot_dtype = DType::F32;
  bool adaptive = true;                    // p_t = w_{t-1} (else w_0)
  int threads = 1;
  bool check_finite = false;
  uint8_t* nonfinite = nullptr;            // [n], set to 1 for inputs holding NaN/Inf (check_finite)
  int64_t block = 0;                       // elements per block; 0 = sized for the L2 cache
  // GD folded on the host (ame_kernels.schedule.linear_coefficients): when set, the
  // schedule is not stepped; out = sum_i linear[i] x_i (+ linear[n] * pivot for
  // PivotMode::Pointer; soup and index pivots are folded into linear[0..n) already).
  const float* linear = nullptr;           // [n + 1]
  // true: the correctly rounded square roots and divisions (rules/common.h ExactMath), the
  // SIMD levels bit-identical; false: the estimates with a Newton step (FastMath), faster.
  bool exact = false;
};

struct StepArgs {
  int64_t numel = 0;
  float* w = nullptr;                      // [numel] fp32
  float* state = nullptr;                  // [slots][numel] fp32 (may be null when slots == 0)
  int m = 0;                               // batch size
  const void* const* batch = nullptr;      // [m] pointers
  const DType* batch_dtypes = nullptr;     // [m]
  const float* pivot = nullptr;            // [numel] fp32, or null (adaptive: p = w)
  const float* coeffs = nullptr;           // [4]: row of global step t
  int t = 1;                               // 1-based global step
  int optimizer = 0;
  HyperScalars hyper;
  int threads = 1;
  bool exact = false;                      // as WholeRunArgs::exact
};

void whole_run(const WholeRunArgs& a, SimdLevel level);
void step(const StepArgs& a, SimdLevel level);

// Blocks are multiples of the widest register tile of any level (16 lanes x 8 vectors).
constexpr int64_t kMaxTile = 128;

// Elements per block whole_run uses when one element of all inputs together takes
// `in_bytes` bytes (requested > 0: that, rounded up to a multiple of kMaxTile).
int64_t whole_run_block(int64_t in_bytes, int64_t numel, int threads, int64_t requested);

#define AME_DECLARE_LEVEL(ns)              \
  namespace ns {                           \
  void whole_run(const WholeRunArgs& a);   \
  void step(const StepArgs& a);            \
  }
AME_DECLARE_LEVEL(scalar)
AME_DECLARE_LEVEL(avx2)
AME_DECLARE_LEVEL(avx512)
#undef AME_DECLARE_LEVEL

}  // namespace cpu
}  // namespace ame
