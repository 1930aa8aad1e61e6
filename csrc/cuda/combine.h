// Host-side interface of the CUDA combine kernel (csrc/cuda/combine.cu): the plain
// args struct python/bind_cuda.cpp fills (after checking every field) and the launcher.
// No CUDA headers, as launch.h.
//
// The pass itself is defined in ame_kernels/methods/combine.py (module docstring,
// normative): per element, all fp32, ingredients in order,
//   b = base or 0;  tau_i = x_i - b;  keep_i = window_i(|tau_i|, g) [and u_i < p_i]
//   t_i = keep_i ? (inv_prob ? tau_i / p_i : tau_i) * scale_i : 0;  y_i = weight_i * t_i
//   elect none: acc = sum y_i, div = sum weight_i (|div| < 1e-8 -> 1, from the host)
//   elect sum/count: s = sign of sum y_i / sum sign(y_i) (>= 0 -> +1); acc, div over sign(y_i) == s
//   out = round_to_nearest_even(b + lam * (normalize ? acc / div : acc))
#pragma once
#include <cstdint>

namespace ame {
namespace cuda {

// Per-ingredient scalars, as two device arrays (ingredient i of field f at f * n + i):
//   fparams fp32 [5, n]: weight, scale, top_mag, end_mag, density
//   iparams i64  [2, n]: top_idx, end_idx
enum CombineField : int32_t { kWeight = 0, kScale = 1, kTopMag = 2, kEndMag = 3, kDensity = 4 };
enum CombineIndex : int32_t { kTopIdx = 0, kEndIdx = 1 };
constexpr int32_t kCombineFloatFields = 5;
constexpr int32_t kCombineIndexFields = 2;
// Ingredients 0..kKeepBits-1 carry their keep bit from the vote pass to the sum pass of
// elect sum/count; the rest recompute it (window and draw) in the second pass.
constexpr int32_t kKeepBits = 64;

struct CombineArgs {
  const uint64_t* inputs = nullptr;    // device [n]: address of each input's [c] data
  const int32_t* in_dtypes = nullptr;  // device [n] DType codes (read only when in_dtype == kMixed)
  int32_t in_dtype = 0;                // a DType, or kMixed
  int32_t n = 0;
  int64_t c = 0;                       // elements in this chunk
  int64_t offset = 0;                  // global index of element 0 (masks, windows)
  const void* base = nullptr;          // device [c] of base_dtype, or null (b = 0)
  int32_t base_dtype = 0;
  void* out = nullptr;                 // device [c] of out_dtype
  int32_t out_dtype = 0;
  const float* fparams = nullptr;      // device [5 n], see above
  const int64_t* iparams = nullptr;    // device [2 n]
  // device [n]: address of ingredient i's fp32 [c] keep probabilities, 0 where none (draw
  // against density[i] when it is < 1); null when no ingredient has per-element probs.
  const uint64_t* probs = nullptr;
  // The transform pass (methods.transforms.transform_torch): device [n], the address of ingredient
  // i's fp32 [c] output; set, each ingredient's b + y_i (elect: the agreeing y_i, else 0) is written
  // there instead of the mix, and out is not written. Null: the combine pass.
  const uint64_t* outs = nullptr;
  uint32_t k0 = 0, k1 = 0;             // Philox key: seed mod 2^32, (seed >> 32) xor name_key
  int32_t elect = 0;                   // 0 none, 1 sum, 2 count
  bool normalize = false;
  bool inv_prob = false;
  bool random = false;                 // some ingredient draws (density < 1 or probs)
  float div_none = 1.f;                // elect none: the fp32 sum of the weights (1 where |sum| < 1e-8)
  float lam = 1.f;
  int device = 0;
  uintptr_t stream = 0;                // cudaStream_t of the caller
};

// Launch on a.stream (asynchronous). vec_ok: every input and probs address is 16-byte
// aligned (the caller has them; base and out are checked here).
void combine(const CombineArgs& a, bool vec_ok);

// The kernel's per-group code run on the host over host memory (every address in `a`,
// the tables included, is host memory; in_dtypes is always read). For tests without a GPU.
void combine_emulated(const CombineArgs& a, bool vec);

}  // namespace cuda
}  // namespace ame
