// Instantiates csrc/cpu/whole_run.h for the scalar level (W = 1); CMake compiles files named
// *_avx2.cpp / *_avx512.cpp with that ISA's flags. Nothing else belongs here.
#define AME_ISA_NS scalar
#define AME_W 1
#define AME_U 4
#define AME_ESTIMATES 0  // always ExactMath (no estimates worth having here)
#define AME_REGISTER 0
#include "cpu/whole_run.h"
