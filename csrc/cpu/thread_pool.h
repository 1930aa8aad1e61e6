// A small persistent thread pool for the CPU kernels (no OpenMP dependency).
#pragma once
#include <cstdint>
#include <functional>

namespace ame {
namespace cpu {

// Runs fn(task, worker) for every task in [0, ntasks) on at most `threads` threads; the
// calling thread is worker 0, workers are numbered below min(threads, ntasks). Tasks are
// handed out dynamically (an atomic counter), so a core slowed by other load takes fewer.
// Blocks until every task is done. One parallel_for runs at a time (callers queue);
// fn must not throw.
void parallel_for(int64_t ntasks, int threads, const std::function<void(int64_t, int)>& fn);

}  // namespace cpu
}  // namespace ame
