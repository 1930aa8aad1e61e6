// DELLA's keep probabilities on the CPU: each entry's magnitude rank within its row.
//
// Normative: ame_kernels.methods.task_vectors.della_probs (numpy). A chunk of whole rows of
// a tensor viewed as [rows, cols, rest] (rest = the product of the dims after dim 1, 1 for
// a 2-D tensor; a 1-D tensor is one row of cols = numel): for every line (r, :, t), the
// rank of m = |x - b| (fp32, b = 0 without a base) among that line's cols entries, in
// ascending order with ties broken by index (a stable sort), NaN after +Inf and equal to
// each other (numpy's order), -0 equal to +0; then, in fp32 with one IEEE rounding per
// operation, in numpy's order:
//   norm = float(rank) / float(max(cols - 1, 1));  p = (norm * 2) * eps + low
// where eps = float32(epsilon) and low = float32(density - epsilon).
//
// The ranks come from a row-local stable LSD radix sort (ties stay in index order) of a
// compressed key c = (k >> D) - (smallest nonzero k >> D) + 1 (0 for k = 0), k the fp32 bits
// of m: D = 16 or 8 where at most a 64th of the line's keys have bits below it (task vectors
// of bf16 / fp16 models have few significant bits), else 0; the runs of one c whose keys
// differ below D are then sorted by (k, index). c spans the line's exponent range only, so
// it takes two 10-bit digits where the full key took four bytes.
// Lines are split over the thread pool; the result depends on neither threads nor order.
#pragma once
#include <cstdint>

#include "common/dtypes.h"

namespace ame {
namespace cpu {

struct RankArgs {
  const void* x = nullptr;      // [numel] of x_dtype
  DType x_dtype = DType::F32;
  const void* base = nullptr;   // [numel] of base_dtype, or null (b = 0)
  DType base_dtype = DType::F32;
  int64_t numel = 0;            // rows * cols * rest
  int64_t cols = 1;             // the ranked dim (>= 1, < 2^32)
  int64_t rest = 1;             // elements after it (>= 1)
  float eps = 0.f;              // float32(epsilon)
  float low = 0.f;              // float32(density - epsilon)
  float* out = nullptr;         // [numel] fp32 keep probabilities, overwritten
  int threads = 1;
};

// Elements per task (whole lines; at least one line).
constexpr int64_t kRankTask = 1 << 16;

void della_probs(const RankArgs& a);

}  // namespace cpu
}  // namespace ame
