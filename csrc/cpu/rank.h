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
#include <algorithm>
#include <cstdint>

#include "common/cpu_features.h"
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

constexpr uint32_t kNaNKey = 0x7fc00000u;  // every NaN: after +Inf (0x7f800000), equal to each other

// The sort key of a magnitude: its fp32 bits without the sign (-0 = +0), NaN canonical.
AME_HD uint32_t mag_key(float tau) {
  const uint32_t k = f32_bits(tau) & 0x7fffffffu;
  return k > 0x7f800000u ? kNaNKey : k;
}

// DecideArgs' bucket of key k (below): 0 for the zeros, else 1 + ((max(k, lo) - lo) >> shift).
// Masked, not branched: a zero test on every entry mispredicts on rows with many zeros.
AME_HD uint32_t bucket_of(uint32_t k, uint32_t lo, int shift) {
  return (1u + ((std::max(k, lo) - lo) >> shift)) & (0u - static_cast<uint32_t>(k != 0));
}

// What one line's keys need for the sort: the range of its nonzero keys and how many keys
// have bits set below bit 8 and below bit 16.
struct LineStats {
  uint32_t min_nz = 0;    // the smallest nonzero key (0 when every key is 0)
  uint32_t max = 0;
  uint32_t low8 = 0;      // keys with (k & 0xff) != 0
  uint32_t low16 = 0;     // keys with (k & 0xffff) != 0
};

// Elements per task (whole lines; at least one line).
constexpr int64_t kRankTask = 1 << 16;

void della_probs(const RankArgs& a);

// The keep draw of one ingredient on a chunk, for della_masks.
struct MaskArgs {
  uint64_t seed = 0;
  uint32_t name_key = 0;
  uint32_t ingredient = 0;
  int64_t offset = 0;           // global index of the chunk's first element
  uint8_t* bits = nullptr;      // [ceil(numel / 8)] keep bits (bit j % 8 of byte j / 8), overwritten
  SimdLevel level = SimdLevel::Scalar;  // the uniforms' level (any: the same bits)
  // Optional [2]: (sum |tau|, sum over kept |tau|) in float64, bitwise what kept_l1 (cpu/combine.h)
  // sums with these bits as masks_in: its tasks of kStatsTask elements, lane j % 16, lanes then
  // tasks in order. Computed where whole lines tile those tasks in reasonable tasks of their own,
  // or the chunk is small enough for one task (l1_done); else left to kept_l1.
  double* l1 = nullptr;
  bool* l1_done = nullptr;
};

// DELLA's keep mask without the probabilities: bit j = u_j < p_j, u_j the keep masks' Philox
// uniform (methods.combine.philox_uniform, ingredient m.ingredient at global index offset + j)
// and p_j della_probs' probability, bit for bit. Lines must be contiguous (rest = 1). For the
// L1 rescale, which needs the mask only: most entries are decided by bucket counts of their
// line (see rank.cpp), without a sort.
void della_masks(const RankArgs& a, const MaskArgs& m);

// One line's keep decisions from bucket counts (della_masks' inner loop, cpu/rank.cpp): for c <
// cols, bucket q = 0 for keys[c] = 0, else 1 + ((max(keys[c], lo) - lo) >> shift), whose entries
// rank from first[q] to first[q + 1] - 1; (tl, th) = (table[first[q]], table[first[q + 1] - 1]),
// or table[zeros before c] twice for a zero; bit c of bits (zeroed first) = u[c] < tl; an entry
// with th > u[c] >= tl is open. With at most max_open open entries, each gets bit u[c] <
// table[its exact rank]; returns the count of open entries (more than max_open: the bits are
// incomplete, the caller ranks the line). table is non-decreasing. Bitwise the same at every level.
struct DecideArgs {
  const uint32_t* keys;
  const float* u;
  int64_t cols;
  uint32_t lo;
  int shift;
  uint32_t* first;  // [2^nb + 1]: the entries in the buckets below q (first[2^nb] = cols; della_line writes it)
  const float* table;
  uint64_t* bits;     // [ceil(cols / 64)]
  uint32_t* open;     // [max_open + 16]: a vector level may store up to 15 past max_open
  int64_t max_open;
  uint32_t* next = nullptr;  // the scalar tie pass: [2^nb] per bucket q, the entries in the buckets below it
  bool floor_mixed = false;  // bucket 1 also holds every nonzero key below lo (not only [lo, lo + 2^shift))
  uint32_t* work = nullptr;  // the vector levels' della_line: [decide_work(cols)] scratch
  // table[r] = ((float(r) / denom) * 2) * eps + low, each operation rounded (prob_table): the
  // avx512 decisions compute the bounds they need instead of looking them up
  float denom = 1.f, eps = 0.f, low = 0.f;
};
// Bit c of a line's keep words set to v.
inline void set_bit(uint64_t* w, int64_t c, bool v) {
  const uint64_t m = uint64_t{1} << (c & 63);
  w[c >> 6] = v ? (w[c >> 6] | m) : (w[c >> 6] & ~m);
}
// The open entries' bits from their exact ranks rank(keys, cols, c) (with at most d.max_open of
// them); returns nopen. Each level passes its own exact_rank (the same counts).
template <class Rank>
int64_t resolve_open_by(const DecideArgs& d, int64_t nopen, Rank rank) {
  if (nopen <= d.max_open) {
    for (int64_t t = 0; t < nopen; ++t) {
      const int64_t c = d.open[t];
      set_bit(d.bits, c, d.u[c] < d.table[rank(d.keys, d.cols, c)]);
    }
  }
  return nopen;
}
// resolve_open_by with the scalar exact_rank (rank.cpp).
int64_t resolve_open(const DecideArgs& d, int64_t nopen);
// The scratch (32-bit words) the vector levels' della_line need for a line of cols.
constexpr int64_t decide_work(int64_t cols) { return 5 * (cols + 64); }
// One contiguous line's keys (keys[c] = mag_key(x - b), b = 0 without a base) and LineStats.
LineStats line_keys(const void* x, DType xd, const void* b, DType bd, int64_t start, int64_t cols, uint32_t* keys,
                    SimdLevel level);
// The scalar end of a vector level's line keys: keys[c, cols) and the line's LineStats from the
// vector part's (lo: the smallest key - 1, 0 wrapping to the top; hi; the keys with low bits).
template <DType XD, DType BD, bool HasBase>
LineStats finish_line_keys(const void* x, const void* b, int64_t start, int64_t c, int64_t cols, uint32_t* keys,
                           uint32_t lo, uint32_t hi, uint32_t n8, uint32_t n16) {
  for (; c < cols; ++c) {
    float tau = load_f32(x, XD, start + c);
    if (HasBase) tau = tau - load_f32(b, BD, start + c);
    const uint32_t k = mag_key(tau);
    keys[c] = k;
    lo = lo < k - 1u ? lo : k - 1u;
    hi = hi > k ? hi : k;
    n8 += (k & 0xffu) != 0;
    n16 += (k & 0xffffu) != 0;
  }
  LineStats st;
  st.min_nz = lo + 1u;
  st.max = hi;
  st.low8 = n8;
  st.low16 = n16;
  return st;
}

// A vector level's line_keys: Keys::run<XD, BD, HasBase>(x, b, start, cols, keys) picked by the
// dtypes (BD = F32 and HasBase false without a base).
template <class Keys, DType XD>
LineStats line_keys_base(const void* x, const void* b, DType bd, int64_t start, int64_t cols, uint32_t* keys) {
  if (!b) return Keys::template run<XD, DType::F32, false>(x, b, start, cols, keys);
  switch (bd) {
    case DType::BF16: return Keys::template run<XD, DType::BF16, true>(x, b, start, cols, keys);
    case DType::F16: return Keys::template run<XD, DType::F16, true>(x, b, start, cols, keys);
    default: return Keys::template run<XD, DType::F32, true>(x, b, start, cols, keys);
  }
}
template <class Keys>
LineStats line_keys_of(const void* x, DType xd, const void* b, DType bd, int64_t start, int64_t cols, uint32_t* keys) {
  switch (xd) {
    case DType::BF16: return line_keys_base<Keys, DType::BF16>(x, b, bd, start, cols, keys);
    case DType::F16: return line_keys_base<Keys, DType::F16>(x, b, bd, start, cols, keys);
    default: return line_keys_base<Keys, DType::F32>(x, b, bd, start, cols, keys);
  }
}

namespace avx2 {
// avx512::della_line's contract (below) at the avx2 level, cnt zeroed [nbk + 8] (ties: [2 nbk +
// 8]): the counting pass that also lists the entries their uniforms leave undecided, the
// prefix sums, the listed entries' decisions (cpu/rank_avx2.cpp).
int64_t della_line(const DecideArgs& d, uint32_t* cnt, uint32_t nbk, bool ties);
// all[l] += |tau| and kept[l] += bit ? |tau| : 0 for the entries c0 + 16 w + l, w < n16, as
// avx512::add_l1_lanes (the same sums in the same order).
void add_l1_lanes(const uint32_t* keys, const uint64_t* bits, int64_t c0, int64_t n16, double* all, double* kept);
LineStats line_keys(const void* x, DType xd, const void* b, DType bd, int64_t start, int64_t cols, uint32_t* keys);
}
namespace avx512 {
// One line's decisions at the avx512 level (needs BMI2 and d.work; the caller checks), counting
// included: cnt zeroed [nbk + 16] (ties: [2 nbk + 16]), the buckets' prefix sums written to
// d.first [nbk + 1]. Most entries are decided by their uniform alone (u < table[0] keeps, u >=
// table[cols - 1] drops); the others (about 2 epsilon of them) are listed while counting and
// decided by their bucket's bounds afterwards. With ties (lo a multiple of 2^shift, the tie
// pass's buckets), an entry whose key has no bits below shift gets its exact rank: first[q] +
// the equal ones before it (each entry's count at its own increment). Same return and bits as
// the scalar decisions.
int64_t della_line(const DecideArgs& d, uint32_t* cnt, uint32_t nbk, bool ties);
// all[l] += |tau| and kept[l] += bit ? |tau| : 0 for the entries c0 + 16 w + l, w < n16 (keys as
// fp32 magnitudes, bit c of bits; c0 a multiple of 16), lane by lane as the scalar loop adds them.
void add_l1_lanes(const uint32_t* keys, const uint64_t* bits, int64_t c0, int64_t n16, double* all, double* kept);
LineStats line_keys(const void* x, DType xd, const void* b, DType bd, int64_t start, int64_t cols, uint32_t* keys);
}

}  // namespace cpu
}  // namespace ame
