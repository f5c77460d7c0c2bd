// The helper threads behind parallel_chunks (see pool.h).
#include "pool.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace quantrt_cpu {
namespace {

// Helpers spin this long after a job before sleeping: decode steps issue a call every
// few tens of microseconds, and waking a sleeping thread costs about as much.
constexpr auto kSpin = std::chrono::microseconds(200);

// gen is odd while a job is open for helpers and even between jobs.  A helper raises busy,
// then checks that the job it saw is still open: the caller closes a job (gen even) before
// waiting for busy to drop, so a helper either backs off or is waited for, and the job's
// fields are never read while the next job writes them.
struct Pool {
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<uint64_t> gen{0};
  std::atomic<int> busy{0};        // helpers inside an open job
  std::atomic<int> sleeping{0};
  std::atomic<int64_t> next{0};    // next unclaimed chunk
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t n = 0;
  std::vector<std::thread> helpers;

  bool open_job(uint64_t g, uint64_t seen) const { return g != seen && (g & 1); }

  void helper() {
    uint64_t seen = gen.load(std::memory_order_acquire);
    for (;;) {
      auto until = std::chrono::steady_clock::now() + kSpin;
      uint64_t g;
      while (!open_job(g = gen.load(std::memory_order_acquire), seen)) {
        if (std::chrono::steady_clock::now() < until) {
          _mm_pause();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu);
        sleeping.fetch_add(1);
        cv.wait(lock, [&] { return open_job(gen.load(std::memory_order_acquire), seen); });
        sleeping.fetch_sub(1);
      }
      seen = g;
      busy.fetch_add(1, std::memory_order_seq_cst);
      if (gen.load(std::memory_order_seq_cst) == g) {
        const auto* f = fn;
        const int64_t count = n;
        for (int64_t c; (c = next.fetch_add(1)) < count;) (*f)(c);
      }
      busy.fetch_sub(1, std::memory_order_release);
    }
  }

  void run(int64_t count, const std::function<void(int64_t)>& f, int threads) {
    while (static_cast<int>(helpers.size()) < threads - 1) {
      helpers.emplace_back([this] { helper(); });
      helpers.back().detach();  // they live as long as the process
    }
    fn = &f;
    n = count;
    next.store(0, std::memory_order_relaxed);
    gen.fetch_add(1, std::memory_order_seq_cst);  // open
    if (sleeping.load() > 0) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
    for (int64_t c; (c = next.fetch_add(1)) < count;) f(c);
    gen.fetch_add(1, std::memory_order_seq_cst);  // closed: late helpers back off
    // wait for chunks a helper claimed; yield so a preempted helper can finish on this core
    for (int spins = 0; busy.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 2000) _mm_pause();
      else std::this_thread::yield();
    }
  }
};

Pool* pool_for_this_process() {
  // A forked child has none of the parent's threads (and maybe a locked mutex): it gets a
  // fresh pool; the parent's is leaked in the child on purpose.
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  if (pool == nullptr || owner != getpid()) {
    pool = new Pool();
    owner = getpid();
  }
  return pool;
}

std::mutex g_call_mu;  // one job at a time (calls from several Python threads queue here)

}  // namespace

void parallel_chunks(int64_t n, const std::function<void(int64_t)>& fn) {
  const int threads = at::get_num_threads();
  if (n <= 1 || threads <= 1) {
    for (int64_t c = 0; c < n; ++c) fn(c);
    return;
  }
  std::lock_guard<std::mutex> lock(g_call_mu);
  pool_for_this_process()->run(n, fn, threads);
}

}  // namespace quantrt_cpu
