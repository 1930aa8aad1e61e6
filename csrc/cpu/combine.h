// The combine pass and its statistics primitives on the CPU: arguments and entry points.
//
// The arithmetic is normative in ame_kernels/methods/combine.py (module docstring,
// CombinePlan, combine_torch) and ame_kernels/methods/stats.py; these kernels give the
// combine pass BITWISE what combine_torch gives (same fp32 operations in the same order,
// no FMA contraction: the combine_* files compile with -ffp-contract=off), the histogram
// exact counts, and gram / kept_l1 float64 sums (tau in fp32, products exact in float64)
// in a fixed order: per task of kStatsTask elements, then tasks in index order, so the
// result depends neither on the thread count nor on the SIMD level.
//
//   combine:             one chunk of C elements (global indices offset .. offset + C - 1),
//                        N inputs (any mix of fp32/bf16/fp16), optional base -> out.
//   magnitude_histogram: int64 [nbins] counts of the fp32 bits of |x - b|.
//   gram:                float64 [N][N] of sum_j tau_i[j] tau_k[j].
//   kept_l1:             float64 [N][2] of (sum |tau_i|, sum over kept |tau_i|).
//   transform:           the combine pass stopped before the mix: outs[i] = b + y_i (elect:
//                        y_i zeroed where it disagrees with the elected sign), fp32, bitwise
//                        methods.transforms.transform_torch.
//
// Each entry exists once per SIMD level (namespaces scalar / avx2 / avx512, compiled from
// combine_{scalar,avx2,avx512}.cpp with that ISA's flags, all from cpu/combine_kernel.h);
// combine.cpp dispatches. The binding (python/bind_cpu.cpp) checks every argument.
#pragma once
#include <cstdint>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtypes.h"

namespace ame {
namespace cpu {

struct CombineArgs {
  int n = 0;                                // ingredients
  int64_t numel = 0;                        // C: elements of this chunk
  int64_t offset = 0;                       // global index of the chunk's first element
  const void* const* inputs = nullptr;      // [n] pointers, each [numel] of input_dtypes[i]
  const DType* input_dtypes = nullptr;      // [n]
  const void* base = nullptr;               // [numel] of base_dtype, or null (b = 0)
  DType base_dtype = DType::F32;
  void* out = nullptr;                      // [numel] of out_dtype (combine only)
  DType out_dtype = DType::F32;
  float* const* outs = nullptr;             // transform only: [n] pointers, each [numel] fp32
  // Keep masks, bit j % 8 of byte j / 8 for element j (chunk-local), [n] pointers (entries may
  // be null) of ceil(numel / 8) bytes: kept_l1 writes masks_out (what combine's keep would be),
  // combine / transform read masks_in in place of the window and draw (bitwise the same).
  uint8_t* const* masks_out = nullptr;
  const uint8_t* const* masks_in = nullptr;
  // The plan (CombinePlan.kernel_kwargs()), per ingredient:
  const float* weight = nullptr;            // [n]
  const float* scale = nullptr;             // [n]
  const float* top_mag = nullptr;           // [n] window start key (magnitude, index)
  const int64_t* top_idx = nullptr;         // [n]
  const float* end_mag = nullptr;           // [n] window end key
  const int64_t* end_idx = nullptr;         // [n]
  const float* density = nullptr;           // [n] keep probability (< 1: random drop)
  const float* const* probs = nullptr;      // null, or [n] pointers (each null or [numel] fp32)
  uint64_t seed = 0;
  uint32_t name_key = 0;
  int elect = 0;                            // 0 none, 1 sum (TIES), 2 count
  bool normalize = false;
  float lam = 1.f;
  bool inv_prob = false;
  int threads = 1;
  int64_t nonfinite = 0;                    // combine, transform: set to the count of Inf/NaN written
};

struct HistArgs {
  const void* x = nullptr;                  // [numel] of x_dtype
  DType x_dtype = DType::F32;
  const void* base = nullptr;               // [numel] of base_dtype, or null
  DType base_dtype = DType::F32;
  int64_t numel = 0;
  uint32_t prefix_mask = 0;                 // 0: every entry counts
  uint32_t prefix = 0;
  int shift = 0;                            // bin = (bits >> shift) & (nbins - 1)
  int64_t nbins = 1;                        // a power of two
  int64_t* counts = nullptr;                // [nbins], overwritten
  int threads = 1;
};

struct GramArgs {
  int n = 0;
  int64_t numel = 0;
  const void* const* inputs = nullptr;
  const DType* input_dtypes = nullptr;
  const void* base = nullptr;
  DType base_dtype = DType::F32;
  double* out = nullptr;                    // [n][n], overwritten (symmetric)
  int threads = 1;
};

// The rank selection's one pass over several targets (the base loaded once per element), for
// ``methods.stats.select_ranks``:
//   magnitude_bracket: per target t (ingredient which[t], a bracket of fp32 bit patterns
//     [lo[t], hi[t]]), counts of the magnitudes above it, inside it and non-finite, and the
//     bits and chunk-local indices, ascending, of the entries inside it (while at most cap).
//     A target with shift[t] = s > 0 (lo[t]'s low s bits clear, hi[t]'s set) counts its
//     inside entries whose low s bits are zero (bf16 / fp16 task vectors: heavy ties) per
//     task of kStatsTask entries and per bin (bits - lo) >> s instead of collecting them:
//     a rank inside then needs no list, only the task that holds it. Only the others
//     ("odd" entries, between the bins' values) are collected.
struct RankPassArgs {
  int64_t numel = 0;
  const void* const* inputs = nullptr;      // indexed by which[t]
  const DType* input_dtypes = nullptr;
  const void* base = nullptr;               // or null: b = 0
  DType base_dtype = DType::F32;
  const int* which = nullptr;               // [k] ingredient per target
  const uint32_t* lo = nullptr;             // [k] the bracket's bounds, inclusive
  const uint32_t* hi = nullptr;
  int k = 0;
  int64_t cap = 0;                          // most entries collected per target
  const int* shift = nullptr;               // [k] or null: 0 = collect every inside entry
  int32_t* bins = nullptr;                  // per binned target t, in target order: [ntasks][nbins(t)]; zeroed by the pass
  int threads = 1;
};

// A binned target's bins: ((hi - lo) >> shift) + 1, or 0 without a shift.
inline int64_t bracket_nbins(uint32_t lo, uint32_t hi, int shift) {
  return shift > 0 ? static_cast<int64_t>((hi - lo) >> shift) + 1 : 0;
}
constexpr int64_t kBracketMaxBins = 64;  // most bins of one binned target

// Elements per statistics task (gram, kept_l1): the unit of the fixed summation order.
constexpr int64_t kStatsTask = 1 << 16;
// Elements per combine task.
constexpr int64_t kCombineTask = 1 << 15;

void combine(CombineArgs& a, SimdLevel level);  // sets a.nonfinite
void transform(CombineArgs& a, SimdLevel level);  // a.outs, not a.out; sets a.nonfinite
void magnitude_histogram(const HistArgs& a, SimdLevel level);
void gram(const GramArgs& a, SimdLevel level);
// counts [k][3]: above, inside, non-finite; bits, idx: [k] vectors, overwritten (empty if inside > cap)
void magnitude_bracket(const RankPassArgs& a, int64_t* counts, std::vector<uint32_t>* bits,
                       std::vector<int64_t>* idx, SimdLevel level);
// The rank selection's sample: out[q] = the fp32 bits of |x[pos[q]] - b[pos[q]]| for q < n
// (b = 0 without a base), the positions split over threads (the mapped pages they touch are
// faulted in by both). Scalar: a gather; no SIMD level.
void magnitude_sample(const void* x, DType x_dtype, const void* base, DType base_dtype, const int64_t* pos,
                      int64_t n, uint32_t* out, int threads);
// kept_l1 reads a's plan, inputs and base (out is not used); writes out [n][2]. An ingredient
// with masks_in[i] takes its keep bits from there (as combine does) instead of its window and draw.
void kept_l1(const CombineArgs& a, double* out, SimdLevel level);
// out[j] = the keep masks' uniform of ingredient i at global index g0 + j, j < n
// (methods.combine.philox_uniform; the key words k0, k1 as Prep makes them), bitwise at every level.
void uniforms(uint64_t g0, int64_t n, uint32_t i, uint32_t k0, uint32_t k1, float* out, SimdLevel level);

#define AME_DECLARE_COMBINE_LEVEL(ns)                        \
  namespace ns {                                             \
  void combine(CombineArgs& a);                              \
  void transform(CombineArgs& a);                            \
  void magnitude_histogram(const HistArgs& a);               \
  void gram(const GramArgs& a);                              \
  void magnitude_bracket(const RankPassArgs& a, int64_t* counts, std::vector<uint32_t>* bits, \
                         std::vector<int64_t>* idx);                                         \
  void kept_l1(const CombineArgs& a, double* out);           \
  void uniforms(uint64_t g0, int64_t n, uint32_t i, uint32_t k0, uint32_t k1, float* out); \
  }
AME_DECLARE_COMBINE_LEVEL(scalar)
AME_DECLARE_COMBINE_LEVEL(avx2)
AME_DECLARE_COMBINE_LEVEL(avx512)
#undef AME_DECLARE_COMBINE_LEVEL

}  // namespace cpu
}  // namespace ame
