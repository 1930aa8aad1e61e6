// Storage dtypes the CPU kernels read and write, and exact scalar conversions.
//
// bf16 / fp16 -> fp32 is exact; fp32 -> bf16 / fp16 rounds to nearest even (NaN stays a
// quiet NaN of the same sign, overflow goes to Inf), as torch's .to() does. Every helper
// is AME_HD (always inlined), so ISA-specific translation units never emit an
// out-of-line copy that the linker could hand to a less capable path.
#pragma once
#include <stdint.h>
#include <string.h>

#include <string>

#include "common/macros.h"

namespace ame {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
  }
  return "unknown";
}

inline int dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

inline bool dtype_valid(int code) { return code >= 0 && code <= 2; }

// "float32" / "bfloat16" / "float16" (also torch.* spellings); -1 when unknown.
inline int parse_dtype(const std::string& s) {
  std::string n = s.rfind("torch.", 0) == 0 ? s.substr(6) : s;
  if (n == "float32" || n == "float" || n == "fp32") return 0;
  if (n == "bfloat16" || n == "bf16") return 1;
  if (n == "float16" || n == "half" || n == "fp16") return 2;
  return -1;
}

AME_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
AME_HD float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

AME_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

AME_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half <-> float without F16C (after Maratyszcza's FP16 library, MIT): exact
// widening; narrowing rounds to nearest even through the fp32 adder. Needs IEEE fp32
// arithmetic without flush-to-zero, which these kernels never enable.
AME_HD float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
  return f32_from_bits(r);
}

AME_HD uint16_t f32_to_f16(float f) {
  // Two separate scalings (no -ffast-math here, so they are not folded into one).
  float base = (f32_from_bits(f32_bits(f) & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Load element i of a buffer of dtype d as fp32; store fp32 into element i with RNE.
AME_HD float load_f32(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
AME_HD void store_f32(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

}  // namespace ame
