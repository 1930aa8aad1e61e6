// Instantiates csrc/cpu/step.h for the avx2 level (W = 8); CMake compiles files named
// *_avx2.cpp / *_avx512.cpp with that ISA's flags. Nothing else belongs here.
#define AME_ISA_NS avx2
#define AME_W 8
#define AME_ESTIMATES 0  // always ExactMath (no estimates worth having here)
#include "cpu/step.h"
