// Instantiates csrc/cpu/combine_kernel.h for the avx512 level (W = 16); CMake compiles files named
// *_avx2.cpp / *_avx512.cpp with that ISA's flags, and combine_*.cpp with -ffp-contract=off
// (the combine pass is bitwise combine_torch). Nothing else belongs here.
#define AME_ISA_NS avx512
#define AME_W 16
#include "cpu/combine_kernel.h"
