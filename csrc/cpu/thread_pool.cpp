#include "cpu/thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace ame {
namespace cpu {
namespace {

class Pool {
 public:
  ~Pool() {
    if (pid_ != getpid()) return;  // a forked child: the threads are the parent's
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread* t : threads_) {
      t->join();
      delete t;
    }
  }

  void parallel_for(int64_t ntasks, int threads, const std::function<void(int64_t, int)>& fn) {
    if (ntasks <= 0) return;
    const int helpers = static_cast<int>(std::min<int64_t>(std::max(threads, 1), ntasks)) - 1;
    if (helpers == 0) {
      for (int64_t t = 0; t < ntasks; ++t) fn(t, 0);
      return;
    }
    std::lock_guard<std::mutex> call(call_mu_);
    if (pid_ != getpid()) {  // after fork() the parent's workers do not exist here
      threads_.clear();      // (leaked on purpose: they cannot be joined)
      pid_ = getpid();
    }
    while (static_cast<int>(threads_.size()) < helpers) {
      int id = static_cast<int>(threads_.size()) + 1;
      threads_.push_back(new std::thread([this, id] { worker(id); }));
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      ntasks_ = ntasks;
      next_.store(0);
      helpers_ = helpers;
      pending_ = helpers;
      ++gen_;
    }
    cv_.notify_all();
    run(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void run(int id) {
    for (;;) {
      int64_t t = next_.fetch_add(1);
      if (t >= ntasks_) return;
      (*fn_)(t, id);
    }
  }

  void worker(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || gen_ != seen; });
      if (stop_) return;
      seen = gen_;
      if (id > helpers_) continue;  // not needed for this job
      lk.unlock();
      run(id);
      lk.lock();
      if (--pending_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex call_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread*> threads_;
  pid_t pid_ = getpid();
  uint64_t gen_ = 0;
  bool stop_ = false;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t ntasks_ = 0;
  std::atomic<int64_t> next_{0};
  int helpers_ = 0;
  int pending_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may outlive static teardown
  return *p;
}

}  // namespace

void parallel_for(int64_t ntasks, int threads, const std::function<void(int64_t, int)>& fn) {
  pool().parallel_for(ntasks, threads, fn);
}

}  // namespace cpu
}  // namespace ame
