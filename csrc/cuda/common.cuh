// Device helpers shared by whole_run.cuh and step.cuh: dtype tags, 16-byte vector
// loads of a group of kEPT elements converted to fp32, round-to-nearest-even
// stores, and the launch geometry.
//
// Every helper here is __host__ __device__: csrc/cuda/emulate.cu compiles the same
// per-group code for the host, so CI (no GPU) tests the kernels' arithmetic.
//
// A thread owns groups of kEPT = 8 consecutive elements: one 16-byte load for
// bf16/fp16, two for fp32. A group uses vector loads only when every pointer it
// touches is 16-byte aligned (checked once on the host: `vec`) and the group
// is full; otherwise (the tail of C, or unaligned views) it falls back to scalar
// loads with a bounds check. Both paths produce the same values.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/macros.h"
#include "cuda/launch.h"

namespace ame {
namespace cuda {

constexpr int kEPT = 8;        // elements per thread-group
constexpr int kThreads = 256;  // threads per block

// Storage-type tags. Mixed: the dtype of each input is looked up at run time.
struct Mixed {};

// Read-only loads through the non-coherent cache on the device; plain loads on the host.
template <typename T>
AME_HD T ldg(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// One 16-byte store. Written through an intrinsic: a plain `*(uint4*)p = raw` of a
// vector assembled field by field is split by NVVM into four 32-bit st.global (seen in
// the PTX of every store_group), wasting store instructions on a memory-bound kernel.
AME_HD void stg128(uint4* p, const uint4& v) {
#if defined(__CUDA_ARCH__)
  __stcg(p, v);  // st.global.cg.v4.u32: cached in L2 only (the data is not read back by this thread)
#else
  *p = v;
#endif
}

AME_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}
AME_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

AME_HD float to_float(float x) { return x; }
AME_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
AME_HD float to_float(__half x) { return __half2float(x); }

// Round to nearest even (torch's .to(dtype) rounding).
template <typename T>
AME_HD T from_float(float x);
template <>
AME_HD float from_float<float>(float x) { return x; }
template <>
AME_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
AME_HD __half from_float<__half>(float x) { return __float2half_rn(x); }

// 16 bytes <-> 16/sizeof(T) floats, by shifts and masks on the four 32-bit words
// (no type punning through memory, so the vector stays in registers).
AME_HD void unpack_word(uint32_t u, float* out, float*) { out[0] = bits_to_float(u); }
AME_HD void unpack_word(uint32_t u, float* out, __nv_bfloat16*) {
  out[0] = bits_to_float(u << 16);  // bf16 is the top half of an fp32: exact
  out[1] = bits_to_float(u & 0xffff0000u);
}
AME_HD void unpack_word(uint32_t u, float* out, __half*) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
}
AME_HD uint32_t pack_word(const float* in, float*) { return float_to_bits(in[0]); }
AME_HD uint32_t pack_word(const float* in, __nv_bfloat16*) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(in[0]))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(in[1]))) << 16);
}
AME_HD uint32_t pack_word(const float* in, __half*) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(in[0]))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(in[1]))) << 16);
}

// Group load of kEPT elements of storage type T starting at element `base`.
// Read-only data (inputs, pivots): the non-coherent path (__ldg).
template <typename T>
AME_HD void load_group(const void* ptr, int64_t base, int64_t c, bool vec, float (&x)[kEPT]) {
  const T* p = static_cast<const T*>(ptr) + base;
  if (vec) {
    static_assert(sizeof(T) * kEPT % 16 == 0, "group must be a whole number of 16-byte vectors");
    constexpr int kVecs = sizeof(T) * kEPT / 16;
    constexpr int kPerWord = 4 / sizeof(T);
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const uint4 raw = ldg(reinterpret_cast<const uint4*>(p) + v);
      float* o = x + v * 4 * kPerWord;
      unpack_word(raw.x, o, static_cast<T*>(nullptr));
      unpack_word(raw.y, o + kPerWord, static_cast<T*>(nullptr));
      unpack_word(raw.z, o + 2 * kPerWord, static_cast<T*>(nullptr));
      unpack_word(raw.w, o + 3 * kPerWord, static_cast<T*>(nullptr));
    }
  } else {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) x[k] = (base + k < c) ? to_float(p[k]) : 0.f;
  }
}

// Run-time dtype: a warp-uniform switch (every thread reads the same input).
AME_HD void load_group_any(const void* ptr, int32_t dtype, int64_t base, int64_t c, bool vec,
                                               float (&x)[kEPT]) {
  switch (dtype) {
    case static_cast<int32_t>(DType::kBFloat16): load_group<__nv_bfloat16>(ptr, base, c, vec, x); break;
    case static_cast<int32_t>(DType::kFloat16): load_group<__half>(ptr, base, c, vec, x); break;
    default: load_group<float>(ptr, base, c, vec, x); break;
  }
}

// Load of input i through the pointer table: TIn fixed, or looked up for Mixed.
template <typename TIn>
struct InputLoader {
  AME_HD static void load(const uint64_t* table, const int32_t* /*dtypes*/, int i, int64_t base,
                                              int64_t c, bool vec, float (&x)[kEPT]) {
    load_group<TIn>(reinterpret_cast<const void*>(ldg(reinterpret_cast<const unsigned long long*>(table) + i)), base,
                    c, vec, x);
  }
};
template <>
struct InputLoader<Mixed> {
  AME_HD static void load(const uint64_t* table, const int32_t* dtypes, int i, int64_t base,
                                              int64_t c, bool vec, float (&x)[kEPT]) {
    load_group_any(reinterpret_cast<const void*>(ldg(reinterpret_cast<const unsigned long long*>(table) + i)),
                   ldg(dtypes + i), base, c, vec, x);
  }
};

// fp32 read-write buffers (step kernel's w and state): plain loads, they are written back.
AME_HD void load_group_rw(const float* p, int64_t base, int64_t c, bool vec, float (&x)[kEPT]) {
  p += base;
  if (vec) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  } else {
#pragma unroll
    for (int k = 0; k < kEPT; ++k) x[k] = (base + k < c) ? p[k] : 0.f;
  }
}

// Group store with round-to-nearest-even conversion to T.
template <typename T>
AME_HD void store_group(void* ptr, int64_t base, int64_t c, bool vec, const float (&x)[kEPT]) {
  T* p = static_cast<T*>(ptr) + base;
  if (vec) {
    constexpr int kVecs = sizeof(T) * kEPT / 16;
    constexpr int kPerWord = 4 / sizeof(T);
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const float* in = x + v * 4 * kPerWord;
      uint4 raw;
      raw.x = pack_word(in, static_cast<T*>(nullptr));
      raw.y = pack_word(in + kPerWord, static_cast<T*>(nullptr));
      raw.z = pack_word(in + 2 * kPerWord, static_cast<T*>(nullptr));
      raw.w = pack_word(in + 3 * kPerWord, static_cast<T*>(nullptr));
      stg128(reinterpret_cast<uint4*>(p) + v, raw);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kEPT; ++k)
      if (base + k < c) p[k] = from_float<T>(x[k]);
  }
}

AME_HD bool any_nonfinite(const float (&x)[kEPT]) {
  bool bad = false;
#pragma unroll
  for (int k = 0; k < kEPT; ++k) bad |= !isfinite(x[k]);
  return bad;
}

// Grid for a grid-stride loop over `groups` thread-groups: enough blocks to fill
// every SM at the kernel's occupancy, never more than there are groups.
int grid_size(const void* kernel, int64_t groups, int device);

// Throws std::runtime_error("[<fn>] kernel <kernel> failed: <CUDA error>") if the
// launch that just happened failed.
void check_launch(const char* fn, const char* kernel);

}  // namespace cuda
}  // namespace ame
