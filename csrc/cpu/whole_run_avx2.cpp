// Instantiates csrc/cpu/whole_run.h for the avx2 level (W = 8); CMake compiles files named
// *_avx2.cpp / *_avx512.cpp with that ISA's flags. Nothing else belongs here.
#define AME_ISA_NS avx2
#define AME_W 8
#define AME_U 8  // 8 x 8 lanes: 2 (as before) left the exact sqrt/div latency-bound, 1.9x slower
#define AME_ESTIMATES 0  // FastMath is the exact instructions (no fixed-up estimates worth having here)
#define AME_REGISTER 1  // the register forms: on Zen 1 the double-pumped ymm sqrt/div bound the exact loops
#include "cpu/whole_run.h"
