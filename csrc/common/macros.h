// Shared macros for CPU and CUDA code: host/device inlining and argument checks.
#pragma once
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define AME_HD __host__ __device__ __forceinline__
#else
#define AME_HD inline __attribute__((always_inline))
#endif

// One fact per check; the message opens with the function name in brackets,
// e.g. AME_CHECK(n >= 1, "[whole_run] inputs: need at least 1 ingredient").
// Throws std::invalid_argument, which pybind11 turns into a ValueError.
#define AME_CHECK(cond, msg)                                   \
  do {                                                         \
    if (!(cond)) throw std::invalid_argument(std::string(msg)); \
  } while (0)
