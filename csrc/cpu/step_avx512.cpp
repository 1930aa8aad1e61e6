// Instantiates csrc/cpu/step.h for the avx512 level (W = 16); CMake compiles files named
// *_avx2.cpp / *_avx512.cpp with that ISA's flags. Nothing else belongs here.
#define AME_ISA_NS avx512
#define AME_W 16
#define AME_ESTIMATES 0  // exact: the estimates measured no faster here (the step kernel streams w and state)
#include "cpu/step.h"
