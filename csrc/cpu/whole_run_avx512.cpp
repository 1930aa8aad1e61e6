// Instantiates csrc/cpu/whole_run.h for the avx512 level (W = 16); CMake compiles files named
// *_avx2.cpp / *_avx512.cpp with that ISA's flags. Nothing else belongs here.
#define AME_ISA_NS avx512
#define AME_W 16
#define AME_U 8  // 8 x 16 lanes: enough independent chains to hide sqrt/div latency (32 zmm registers)
#define AME_ESTIMATES 1  // FastMath by default (exact=True: ExactMath)
#define AME_REGISTER 1  // and the register forms where a rule has one
#include "cpu/whole_run.h"
