// Microbenchmark of the keep masks' Philox uniforms at a vector level (cpu::avx2::uniforms, or
// cpu::avx512::uniforms with -DAME_ISA_NS=avx512 -DAME_W=16: what della_masks draws per line): 4096 lines of 2048 uniforms, each line starting 5 past a multiple
// of 2048 (so every line has a ragged head and tail), min of 9 rounds, one thread; prints ns per
// uniform and a crc32 of the first round's values (equal before and after a change that keeps
// the values). From the repository root (any x86-64 with AVX2; the output binary anywhere
// executable):
//   g++ -O3 -mavx2 -mfma -mf16c -ffp-contract=off -std=c++17 -w -Icsrc benchmarks/micro/uniforms.cpp \
//       csrc/common/*.cpp csrc/cpu/thread_pool.cpp -lz -lpthread -o /path/to/uniforms && /path/to/uniforms
// and at the avx512 level (the flags CMakeLists.txt gives *_avx512.cpp):
//   g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -ffp-contract=off -std=c++17 -w \
//       -Icsrc -DAME_ISA_NS=avx512 -DAME_W=16 benchmarks/micro/uniforms.cpp csrc/common/*.cpp \
//       csrc/cpu/thread_pool.cpp -lz -lpthread -o /path/to/uniforms512 && /path/to/uniforms512
#ifndef AME_ISA_NS
#define AME_ISA_NS avx2
#define AME_W 8
#endif
#include "cpu/combine_kernel.h"

#include <zlib.h>

#include <chrono>
#include <cstdio>
#include <vector>

int main() {
  const int64_t cols = 2048, lines = 4096;
  std::vector<float> u(cols);
  uint32_t crc = 0;
  double best = 1e9;
  for (int r = 0; r < 9; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t l = 0; l < lines; ++l) {
      ame::cpu::AME_ISA_NS::uniforms(static_cast<uint64_t>(l * cols + 5), cols, 1u, 0x1234u, 0x9876u, u.data());
      if (r == 0) crc = crc32(crc, reinterpret_cast<const unsigned char*>(u.data()), static_cast<unsigned>(cols * 4));
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < best) best = s;
  }
  std::printf("%.3f ns/uniform  crc %08x\n", best / static_cast<double>(cols * lines) * 1e9, crc);
}
