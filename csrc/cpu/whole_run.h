// The whole-run kernel: for a block of elements, the entire schedule (all epochs,
// batches and optimizer steps), reading the N inputs from their own memory.
//
// Included by whole_run_{scalar,avx2,avx512}.cpp, each of which defines AME_ISA_NS (the
// namespace, so the per-ISA instantiations never merge at link time), AME_W (the vector
// width), AME_U (vectors per register tile), AME_ESTIMATES (FastMath: 0 where the exact
// instructions are as fast) and AME_REGISTER (RegisterMath: the rules' register forms), and
// compiles with that ISA's flags.
//
// Per block of B elements (B sized so that the block's N input slices, the next block's
// and w fit in L2 together, see whole_run_block):
//   1. pivot:  w_0 = soup (one pass summing the N slices, converted to fp32 in registers;
//              the same pass runs the check_finite probe, x*0 per input), an input's
//              slice or the pivot tensor's.
//   2. steps:  for each register tile of U*W elements, w (and w_0 for a fixed pivot) and
//              the optimizer state live in registers across ALL T steps; step t reads its
//              batch members straight from their memory (bf16/fp16 widened in registers,
//              no upcast copy). After the soup pass the block's slices sit in L2, so
//              steps, and every later epoch, read cache: they cost compute, not DRAM
//              traffic. Meanwhile the next block's slices are prefetched, so DRAM reads
//              overlap the step phase.
//   3. store:  w_T -> out, rounded to nearest even for bf16/fp16.
// The last, partial tile of the whole range runs on a zero-padded fp32 copy of its few
// elements (padding lanes compute on zeros and are never stored).
#pragma once
#include <algorithm>
#include <type_traits>
#include <cstdlib>
#include <new>
#include <cstring>
#include <vector>

#include "common/dispatch.h"
#include "common/simd.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

#ifndef AME_ISA_NS
#error "define AME_ISA_NS, AME_W, AME_U, AME_ESTIMATES and AME_REGISTER before including cpu/whole_run.h"
#endif

namespace ame {
namespace cpu {
namespace AME_ISA_NS {
namespace {

constexpr int kW = AME_W;
constexpr int kU = AME_U;
constexpr int kTile = kW * kU;
static_assert(kMaxTile % kTile == 0, "blocks (multiples of kMaxTile) must hold whole tiles");
using V = typename VecOf<kW>::type;

struct AlignedBuffer {
  float* p = nullptr;
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(p); }
  void reserve(size_t floats) {  // on the calling thread: a failure throws before any work
    if (!p) p = static_cast<float*>(std::aligned_alloc(64, ((floats * 4 + 63) / 64) * 64));
    if (!p) throw std::bad_alloc();
  }
};

// Per-worker scratch: P [bs] (w_0, then w_T), the staged last tile [n][kTile], non-finite flags.
struct Scratch {
  AlignedBuffer P, tail;
  std::vector<const void*> tail_ptrs;
  std::vector<DType> tail_dtypes;
  std::vector<uint8_t> bad;
};

// kU vectors of a source of dtype d from element i, widened to fp32.
AME_HD void load_tile(const void* p, DType d, int64_t i, V* x) {
  if (d == DType::F32) {
    for (int u = 0; u < kU; ++u) x[u] = vload<kW>(static_cast<const float*>(p) + i + u * kW);
  } else if (d == DType::BF16) {
    for (int u = 0; u < kU; ++u) x[u] = vload_any<kW>(p, DType::BF16, i + u * kW);
  } else {
    for (int u = 0; u < kU; ++u) x[u] = vload_any<kW>(p, DType::F16, i + u * kW);
  }
}

// All-bf16 inputs on AVX-512 (run_tile's kPairs): the tile's vectors 2k and 2k+1 hold the
// even and the odd elements of its elements [32k, 32k + 32), so one 512-bit load of 32 bf16
// widens with one shift (even: the low halves) and one mask (odd: the high halves) instead
// of a widening move and a shift per vector. w converts to and from that order once per
// tile (to_pairs / from_pairs); the arithmetic is elementwise, so the lane order is free.
#if AME_W == 16
constexpr bool kHavePairs = kU % 2 == 0;
AME_HD void load_pairs(const void* p, int64_t i, V* x) {
  const uint16_t* q = static_cast<const uint16_t*>(p) + i;
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int u = 0; u + 1 < kU; u += 2) {
    const __m512i raw = _mm512_loadu_si512(q + u * kW);
    x[u] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    x[u + 1] = _mm512_castsi512_ps(_mm512_and_si512(raw, hi));
  }
}
AME_HD void to_pairs(const float* P, V* w) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int u = 0; u + 1 < kU; u += 2) {
    const __m512 a = _mm512_loadu_ps(P + u * kW), b = _mm512_loadu_ps(P + (u + 1) * kW);
    w[u] = _mm512_permutex2var_ps(a, even, b);
    w[u + 1] = _mm512_permutex2var_ps(a, odd, b);
  }
}
AME_HD void from_pairs(const V* w, float* P) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int u = 0; u + 1 < kU; u += 2) {
    _mm512_storeu_ps(P + u * kW, _mm512_permutex2var_ps(w[u].v, lo, w[u + 1].v));
    _mm512_storeu_ps(P + (u + 1) * kW, _mm512_permutex2var_ps(w[u].v, hi, w[u + 1].v));
  }
}
#else
constexpr bool kHavePairs = false;  // never called: run_tile<..., true> is AVX-512 only
AME_HD void load_pairs(const void*, int64_t, V*) {}
AME_HD void to_pairs(const float*, V*) {}
AME_HD void from_pairs(const V*, float*) {}
#endif

// One pass over `len` elements of src from element b0: with kSoup, P += x (P = x for the
// first input); with `check`, returns whether a NaN/Inf was read.
template <bool kSoup, bool kFirst>
inline bool scan_slice(const void* src, DType d, int64_t b0, int64_t len, float* P, bool check) {
  const int64_t lv = len - len % kW;
  V probe = V(0.f);
  const V zero = V(0.f);
  auto one = [&](int64_t j, V& p) {
    V x = vload_any<kW>(src, d, b0 + j);
    if (kSoup) vstore<kW>(P + j, kFirst ? x : vload<kW>(P + j) + x);
    p = v_fma(x, zero, p);
  };
  if (check) {
    // four independent probes: one chained FMA per vector would bound the pass by its latency
    // (measured: the check cost Adam's whole run 12% on the EPYC)
    V p0 = V(0.f), p1 = V(0.f), p2 = V(0.f), p3 = V(0.f);
    int64_t j = 0;
    for (; j + 4 * kW <= lv; j += 4 * kW) {
      one(j, p0);
      one(j + kW, p1);
      one(j + 2 * kW, p2);
      one(j + 3 * kW, p3);
    }
    for (; j < lv; j += kW) one(j, p0);
    probe = (p0 + p1) + (p2 + p3);  // a NaN anywhere stays a NaN
  } else {
    for (int64_t j = 0; j < lv; j += kW) {
      V x = vload_any<kW>(src, d, b0 + j);
      if (kSoup) vstore<kW>(P + j, kFirst ? x : vload<kW>(P + j) + x);
    }
  }
  bool bad = false;
  for (int64_t j = lv; j < len; ++j) {
    float x = load_f32(src, d, b0 + j);
    if (kSoup) P[j] = kFirst ? x : P[j] + x;
    if (check && x * 0.f != 0.f) bad = true;
  }
  return bad || (check && v_any_nan(probe));
}

// dst[0, len) = src[b0, b0 + len) as fp32, zeros up to `padded`.
inline void copy_slice(const void* src, DType d, int64_t b0, int64_t len, int64_t padded, float* dst) {
  const int64_t lv = len - len % kW;
  for (int64_t j = 0; j < lv; j += kW) vstore<kW>(dst + j, vload_any<kW>(src, d, b0 + j));
  for (int64_t j = lv; j < len; ++j) dst[j] = load_f32(src, d, b0 + j);
  for (int64_t j = len; j < padded; ++j) dst[j] = 0.f;
}

// Software prefetch of the next block's input slices, spread over the step phase of the
// current block, so that DRAM traffic overlaps compute instead of following it.
struct Prefetcher {
  const WholeRunArgs* a = nullptr;
  int i = 0;                 // input being prefetched (== n: done)
  int64_t b0 = 0, len = 0;   // next block
  int64_t off = 0, bytes = 0;
  void start(const WholeRunArgs& args, int64_t next_b0, int64_t next_len) {
    a = &args;
    b0 = next_b0;
    len = next_len;
    i = next_len > 0 ? 0 : args.n;
    off = 0;
    bytes = i < args.n ? next_len * dtype_size(args.input_dtypes[0]) : 0;
  }
  AME_HD void issue(int64_t lines) {
    while (lines-- > 0 && i < a->n) {
      const int sz = dtype_size(a->input_dtypes[i]);
      __builtin_prefetch(static_cast<const char*>(a->inputs[i]) + b0 * sz + off, 0, 2);
      off += 64;
      if (off >= bytes) {
        off = 0;
        if (++i < a->n) bytes = len * dtype_size(a->input_dtypes[i]);
      }
    }
  }
};

// The batch mean as the soup takes it: summed in the order given (ascending ingredient
// index, see SortedBatches), then divided by |B| (ExactMath, as torch.mean) or multiplied
// by 1/|B| (the estimates, on the levels that have FastMath: RegisterMath on AVX2 divides as
// its fallback ExactMath does); the soup pass uses the same operation with N.
template <class M>
AME_HD V mean_of(V sum, float count, float inv_count) {
  if constexpr (M::kFast && AME_ESTIMATES) return sum * V(inv_count); else return v_div(sum, V(count));
}

// Per-step constants the kernel derives once on the host from the plan: the batch members
// in ascending ingredient index (so a batch of every ingredient sums exactly as the soup
// does), |B_t|, 1/|B_t| and zeta_t / N = gscale_t |B_t| (double, rounded once).
struct SortedBatches {
  std::vector<int32_t> idx;
  std::vector<float> count, inv_count, zscale;
  explicit SortedBatches(const WholeRunArgs& a)
      : idx(a.batch_idx, a.batch_idx + (a.steps > 0 ? a.batch_ptr[a.steps] : 0)),
        count(a.steps), inv_count(a.steps), zscale(a.steps) {
    for (int t = 0; t < a.steps; ++t) {
      const int nb = a.batch_ptr[t + 1] - a.batch_ptr[t];
      std::sort(idx.begin() + a.batch_ptr[t], idx.begin() + a.batch_ptr[t + 1]);
      count[t] = static_cast<float>(nb);
      inv_count[t] = static_cast<float>(1.0 / nb);
      zscale[t] = static_cast<float>(static_cast<double>(a.coeffs[4 * t]) * nb);
    }
  }
};

// Step phase over one tile of kTile elements: w from P, inputs from src[i] at element i0;
// all T steps in registers, w_T back to P. Each step also issues `pf_lines` prefetches of
// the next block (spread thin: bursts of prefetches stall the step loop). Step t's
// pseudogradient is zeta_t / N * (p - mean_{i in B_t} x_i) (DESIGN 1, Numerics): with the
// soup pivot and a batch of every ingredient, exactly zero.
// The constants a block's steps read: the plan's coefficient rows (FastPrivateMath: with the
// rule's folds) and hyperparameters, or RegisterMath's rows and initial state.
struct StepConsts {
  const float* coeffs = nullptr;  // [steps][4], or [steps][kRegRow] for RegisterMath
  const HyperT<V>* h = nullptr;
  const float* init = nullptr;    // RegisterMath: the initial state per slot
};

template <class Rule, class M, bool kAdaptive, bool kWd, bool kPairs>
AME_HD void run_tile(float* P, const void* const* src, const DType* dts, int64_t i0, const int32_t* bp,
                     const SortedBatches& sb, const StepConsts& k, int steps, Prefetcher& pf, int64_t pf_lines) {
  const int32_t* bi = sb.idx.data();
  const HyperT<V>& h = *k.h;
  const float* coeffs = k.coeffs;
  constexpr int S = Rule::kSlots > 0 ? Rule::kSlots : 1;
  V w[kU], p0[kU], st[kU][S];
  if constexpr (kPairs) to_pairs(P, w);
  for (int u = 0; u < kU; ++u) {
    if constexpr (!kPairs) w[u] = vload<kW>(P + u * kW);
    p0[u] = w[u];
    if constexpr (M::kRegister)
      for (int j = 0; j < S; ++j) st[u][j] = V(k.init[j]);
    else
      Rule::init(st[u], h);
  }
  (void)p0;
  for (int t = 0; t < steps; ++t) {
    pf.issue(pf_lines);
    V mean[kU], x[kU];
    int32_t k = bp[t];
    if constexpr (kPairs) load_pairs(src[bi[k]], i0, mean); else load_tile(src[bi[k]], dts[bi[k]], i0, mean);
    if (bp[t + 1] - k > 1) {
      for (++k; k < bp[t + 1]; ++k) {
        if constexpr (kPairs) load_pairs(src[bi[k]], i0, x); else load_tile(src[bi[k]], dts[bi[k]], i0, x);
        for (int u = 0; u < kU; ++u) mean[u] = mean[u] + x[u];
      }
      for (int u = 0; u < kU; ++u) mean[u] = mean_of<M>(mean[u], sb.count[t], sb.inv_count[t]);
    }
    if constexpr (M::kRegister) {
      const RegCoeffsT<V> c = RegCoeffsT<V>::load(coeffs + kRegRow * t);
      for (int u = 0; u < kU; ++u) Rule::update_reg(w[u], (kAdaptive ? w[u] : p0[u]) - mean[u], st[u], c);
    } else {
      const StepCoeffsT<V> c = StepCoeffsT<V>::load(coeffs + 4 * t);
      const V zs = V(sb.zscale[t]);
      for (int u = 0; u < kU; ++u) {
        V g = ((kAdaptive ? w[u] : p0[u]) - mean[u]) * zs;
        if (kWd) g = add_weight_decay(g, w[u], h);
        Rule::template update<V, M>(w[u], g, st[u], c, h, t == 0);
      }
    }
  }
  if constexpr (kPairs) from_pairs(w, P); else
    for (int u = 0; u < kU; ++u) vstore<kW>(P + u * kW, w[u]);
}

// What every block of one run shares.
struct RunCtx {
  const WholeRunArgs* a;
  int64_t bs, in_bytes;
  const SortedBatches* sb;
  bool soup, all_bf16;
};

// Steps 1 and 2 for the block of `len` elements at b0 (the next block at `next_len`): the
// pivot into P, then every step, leaving w_T in P.
template <class Rule, class M, bool kAdaptive, bool kWd>
void block_steps(const RunCtx& x, const StepConsts& k, Scratch& s, int64_t b0, int64_t len, int64_t next_len) {
  const WholeRunArgs& a = *x.a;
  const int n = a.n;
  float* P = s.P.p;
  const int64_t padded = (len + kTile - 1) / kTile * kTile;

  // 1. the pivot w_0 (and the non-finite probe)
  if (x.soup || a.check_finite) {
    for (int i = 0; i < n; ++i) {
      const void* src = a.inputs[i];
      const DType d = a.input_dtypes[i];
      bool bad;
      if (x.soup && i == 0)
        bad = scan_slice<true, true>(src, d, b0, len, P, a.check_finite);
      else if (x.soup)
        bad = scan_slice<true, false>(src, d, b0, len, P, a.check_finite);
      else
        bad = scan_slice<false, false>(src, d, b0, len, P, a.check_finite);
      if (bad) s.bad[i] = 1;
    }
  }
  if (x.soup) {
    for (int64_t j = len; j < padded; ++j) P[j] = 0.f;
    // mean = sum / N (as torch.mean; FastMath: * 1/N), the batch means' operation
    const float nf = static_cast<float>(n), inv_n = static_cast<float>(1.0 / n);
    if (n > 1)
      for (int64_t j = 0; j < padded; j += kW) vstore<kW>(P + j, mean_of<M>(vload<kW>(P + j), nf, inv_n));
  } else if (a.pivot_mode == PivotMode::Index) {
    copy_slice(a.inputs[a.pivot_index], a.input_dtypes[a.pivot_index], b0, len, padded, P);
  } else {
    copy_slice(a.pivot, a.pivot_dtype, b0, len, padded, P);
  }

  // 2. all steps, one register tile at a time, prefetching the next block meanwhile
  Prefetcher pf;
  pf.start(a, b0 + x.bs, next_len);
  const int64_t tiles = padded / kTile;
  const int64_t lines_per_step = (x.bs * x.in_bytes / 64 + tiles - 1) / tiles / std::max(a.steps, 1) + 1;
  const int64_t full = len / kTile * kTile;
  for (int64_t j = 0; j < full; j += kTile) {
    if (x.all_bf16)
      run_tile<Rule, M, kAdaptive, kWd, kHavePairs>(P + j, a.inputs, a.input_dtypes, b0 + j, a.batch_ptr, *x.sb, k,
                                                    a.steps, pf, lines_per_step);
    else
      run_tile<Rule, M, kAdaptive, kWd, false>(P + j, a.inputs, a.input_dtypes, b0 + j, a.batch_ptr, *x.sb, k, a.steps,
                                               pf, lines_per_step);
  }
  if (full < len) {  // the ragged last tile: a zero-padded fp32 copy of its inputs
    for (int i = 0; i < n; ++i)
      copy_slice(a.inputs[i], a.input_dtypes[i], b0 + full, len - full, kTile, s.tail.p + i * kTile);
    run_tile<Rule, M, kAdaptive, kWd, false>(P + full, s.tail_ptrs.data(), s.tail_dtypes.data(), 0, a.batch_ptr,
                                             *x.sb, k, a.steps, pf, 0);
  }
}

// Whether P[0, len) holds a NaN or an Inf (four independent probes, as scan_slice).
inline bool any_nonfinite(const float* P, int64_t len) {
  const V zero = V(0.f);
  V p0 = zero, p1 = zero, p2 = zero, p3 = zero;
  const int64_t lv = len - len % kW;
  int64_t j = 0;
  for (; j + 4 * kW <= lv; j += 4 * kW) {
    p0 = v_fma(vload<kW>(P + j), zero, p0);
    p1 = v_fma(vload<kW>(P + j + kW), zero, p1);
    p2 = v_fma(vload<kW>(P + j + 2 * kW), zero, p2);
    p3 = v_fma(vload<kW>(P + j + 3 * kW), zero, p3);
  }
  for (; j < lv; j += kW) p0 = v_fma(vload<kW>(P + j), zero, p0);
  bool bad = v_any_nan((p0 + p1) + (p2 + p3));
  for (; j < len; ++j) bad = bad || P[j] * 0.f != 0.f;
  return bad;
}

// M: ExactMath, FastMath, FastPrivateMath (the rule's folds applied here), or RegisterMath,
// whose non-finite blocks rerun with F (the rule's FastPrivateMath or FastMath; ExactMath on
// levels without them).
template <class Rule, class M, bool kAdaptive, bool kWd>
void whole_run_impl(const WholeRunArgs& a) {
  const int n = a.n;
  int64_t in_bytes = 0;  // bytes of one element across all inputs
  for (int i = 0; i < n; ++i) in_bytes += dtype_size(a.input_dtypes[i]);
  const int64_t bs = whole_run_block(in_bytes, a.numel, a.threads, a.block);  // a multiple of kMaxTile
  const int64_t nblocks = (a.numel + bs - 1) / bs;
  if (nblocks == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(a.threads, nblocks));
  // Tasks are runs of consecutive blocks (8 per thread): inside a run the next block is
  // known and prefetched; across runs the pool balances load between threads.
  const int64_t run = std::max<int64_t>(1, nblocks / (8 * static_cast<int64_t>(threads)));
  const int64_t ntasks = (nblocks + run - 1) / run;
  // RegisterMath's fallback: the fixed-up estimates where the level has them, else exact
  using F = std::conditional_t<!AME_ESTIMATES, ExactMath,
                               std::conditional_t<Rule::kPrivateScaling, FastPrivateMath, FastMath>>;
  // the private folds: for M, or for F after RegisterMath
  constexpr bool kPrivate = M::kRegister ? F::kPrivateState : M::kPrivateState;
  // FastPrivateMath: the rule's (1 - beta) weights folded into a copy of the step constants
  HyperScalars hs = a.hyper;
  std::vector<float> folded;
  const float* coeffs = a.coeffs;
  if constexpr (kPrivate && Rule::kPrivateScaling) {
    folded.assign(a.coeffs, a.coeffs + 4 * static_cast<int64_t>(a.steps));
    Rule::fold_private(hs, folded.data(), a.steps);  // whole_run() checked that it applies
    coeffs = folded.data();
  }
  const HyperT<V> h(hs);
  const SortedBatches sb(a);
  StepConsts plain{coeffs, &h, nullptr}, reg = plain;
  std::vector<float> rows, init;
  if constexpr (M::kRegister) {
    rows.assign(static_cast<size_t>(kRegRow) * std::max(a.steps, 1), 0.f);
    init.assign(Rule::kSlots, 0.f);
    Rule::fold_register(a.hyper, a.coeffs, sb.zscale.data(), a.steps, rows.data(), init.data());  // checked
    reg = StepConsts{rows.data(), &h, init.data()};
  }
  const bool soup = a.pivot_mode == PivotMode::Soup;
  bool all_bf16 = kHavePairs;
  for (int i = 0; i < n; ++i) all_bf16 = all_bf16 && a.input_dtypes[i] == DType::BF16;
  const RunCtx ctx{&a, bs, in_bytes, &sb, soup, all_bf16};

  std::vector<Scratch> scratch(threads);
  for (Scratch& s : scratch) {
    s.P.reserve(bs);
    s.tail.reserve(static_cast<size_t>(n) * kTile);
    s.tail_ptrs.resize(n);
    for (int i = 0; i < n; ++i) s.tail_ptrs[i] = s.tail.p + static_cast<int64_t>(i) * kTile;
    s.tail_dtypes.assign(n, DType::F32);
    s.bad.assign(n, 0);
  }
  parallel_for(ntasks, threads, [&](int64_t task, int worker) {
    Scratch& s = scratch[worker];
    const int64_t b_end = std::min(nblocks, (task + 1) * run);
    for (int64_t b = task * run; b < b_end; ++b) {
      const int64_t b0 = b * bs;
      const int64_t len = std::min(bs, a.numel - b0);
      const int64_t next_len = b + 1 < b_end ? std::min(bs, a.numel - b0 - bs) : 0;
      if constexpr (M::kRegister) {
        block_steps<Rule, M, kAdaptive, kWd>(ctx, reg, s, b0, len, next_len);
        // an overflow (or a NaN input) somewhere in the block: the form with vfixupimmps,
        // whose special values are the exact instructions'
        if (any_nonfinite(s.P.p, len)) block_steps<Rule, F, kAdaptive, kWd>(ctx, plain, s, b0, len, next_len);
      } else {
        block_steps<Rule, M, kAdaptive, kWd>(ctx, plain, s, b0, len, next_len);
      }

      // 3. store w_T in the output dtype
      const float* P = s.P.p;
      const int64_t lv = len - len % kW;
      for (int64_t j = 0; j < lv; j += kW) vstore_any<kW>(a.out, a.out_dtype, b0 + j, vload<kW>(P + j));
      for (int64_t j = lv; j < len; ++j) store_f32(a.out, a.out_dtype, b0 + j, P[j]);
    }
  });

  if (a.check_finite && a.nonfinite)
    for (const Scratch& s : scratch)
      for (int i = 0; i < static_cast<int>(s.bad.size()); ++i)
        if (s.bad[i]) a.nonfinite[i] = 1;
}

// GD folded by the host into one weighted sum (WholeRunArgs::linear): each input is read
// once, whatever the number of epochs, straight from its memory. Per tile the kU
// accumulators stay in registers across the N inputs; the NaN/Inf probe runs over all
// inputs at once, and only a block that trips it is rescanned to name the inputs.
void weighted_sum_impl(const WholeRunArgs& a) {
  const int n = a.n;
  int64_t in_bytes = 0;
  for (int i = 0; i < n; ++i) in_bytes += dtype_size(a.input_dtypes[i]);
  const int64_t bs = whole_run_block(in_bytes, a.numel, a.threads, a.block);
  const int64_t nblocks = (a.numel + bs - 1) / bs;
  if (nblocks == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(a.threads, nblocks));
  const int64_t run = std::max<int64_t>(1, nblocks / (8 * static_cast<int64_t>(threads)));
  const int64_t ntasks = (nblocks + run - 1) / run;
  const bool with_pivot = a.pivot_mode == PivotMode::Pointer;
  const int m = n + (with_pivot ? 1 : 0);  // sources: the inputs, then the pivot
  std::vector<const void*> srcs(a.inputs, a.inputs + n);
  std::vector<DType> dts(a.input_dtypes, a.input_dtypes + n);
  if (with_pivot) {
    srcs.push_back(a.pivot);
    dts.push_back(a.pivot_dtype);
  }
  std::vector<std::vector<uint8_t>> bad(threads, std::vector<uint8_t>(n, 0));
  parallel_for(ntasks, threads, [&](int64_t task, int worker) {
    const V zero = V(0.f);
    const int64_t b_end = std::min(nblocks, (task + 1) * run);
    for (int64_t b = task * run; b < b_end; ++b) {
      const int64_t b0 = b * bs;
      const int64_t len = std::min(bs, a.numel - b0);
      const int64_t full = len / kTile * kTile;
      V probe = zero;
      for (int64_t j = 0; j < full; j += kTile) {
        V acc[kU], x[kU];
        for (int u = 0; u < kU; ++u) acc[u] = zero;
        for (int i = 0; i < m; ++i) {
          load_tile(srcs[i], dts[i], b0 + j, x);
          const V c = V(a.linear[i]);
          for (int u = 0; u < kU; ++u) acc[u] = v_fma(c, x[u], acc[u]);
          if (a.check_finite && i < n)
            for (int u = 0; u < kU; ++u) probe = v_fma(x[u], zero, probe);
        }
        for (int u = 0; u < kU; ++u) vstore_any<kW>(a.out, a.out_dtype, b0 + j + u * kW, acc[u]);
      }
      bool tail_bad = false;
      for (int64_t j = b0 + full; j < b0 + len; ++j) {  // ragged tail, element by element
        float acc = 0.f;
        for (int i = 0; i < m; ++i) {
          const float x = load_f32(srcs[i], dts[i], j);
          acc = v_fma(a.linear[i], x, acc);
          if (a.check_finite && i < n && x * 0.f != 0.f) tail_bad = true;
        }
        store_f32(a.out, a.out_dtype, j, acc);
      }
      if (a.check_finite && (tail_bad || v_any_nan(probe)))
        for (int i = 0; i < n; ++i)
          if (scan_slice<false, false>(a.inputs[i], a.input_dtypes[i], b0, len, nullptr, true)) bad[worker][i] = 1;
    }
  });
  if (a.check_finite && a.nonfinite)
    for (const auto& flags : bad)
      for (int i = 0; i < n; ++i)
        if (flags[i]) a.nonfinite[i] = 1;
}

}  // namespace

void whole_run(const WholeRunArgs& a) {
  if (a.linear) return weighted_sum_impl(a);
  dispatch_rule(a.optimizer, a.hyper, [&](auto rule) {
    using Rule = decltype(rule);
    const bool wd = a.hyper.weight_decay != 0.f;
    auto run = [&](auto math) {
      using M = decltype(math);
      if (a.adaptive)
        wd ? whole_run_impl<Rule, M, true, true>(a) : whole_run_impl<Rule, M, true, false>(a);
      else
        wd ? whole_run_impl<Rule, M, false, true>(a) : whole_run_impl<Rule, M, false, false>(a);
    };
    // AME_REGISTER, AME_ESTIMATES (per level, csrc/cpu/whole_run_<level>.cpp): whether the
    // level has RegisterMath, and FastMath (0 where exact is as fast).
    if (!a.exact) {
      if constexpr (AME_REGISTER && Rule::kRegister) {
        // RegisterMath where the rule's form applies (and no coupled weight decay, which
        // its d = p - mean leaves out); the fold is a dry run here, redone in whole_run_impl
        if (!wd) {
          std::vector<float> rows(static_cast<size_t>(kRegRow) * std::max(a.steps, 1)), init(Rule::kSlots);
          const SortedBatches sb(a);
          if (Rule::fold_register(a.hyper, a.coeffs, sb.zscale.data(), a.steps, rows.data(), init.data()))
            return a.adaptive ? whole_run_impl<Rule, RegisterMath, true, false>(a)
                              : whole_run_impl<Rule, RegisterMath, false, false>(a);
        }
      }
      if constexpr (AME_ESTIMATES) {
        if constexpr (Rule::kPrivateScaling) {
          HyperScalars probe = a.hyper;
          if (Rule::fold_private(probe, nullptr, 0)) return run(FastPrivateMath{});
        }
        return run(FastMath{});
      }
    }
    run(ExactMath{});
  });
}

}  // namespace AME_ISA_NS
}  // namespace cpu
}  // namespace ame
