// A work-sharing loop for the CPU kernels that never waits for a thread that is not running.
//
// at::parallel_for (OpenMP) splits a range evenly over the team and ends at a barrier, so
// a call takes as long as its slowest thread: on a shared 2-core machine, where the other
// thread is often descheduled for a whole time slice, a decode step of ~120 such calls was
// measured 2x slower with 2 threads than with 1.  Here the caller and helper threads claim
// small chunks from a shared counter; the caller waits only for chunks a helper has
// actually started, so a helper that is not scheduled costs nothing (the caller does its
// share).  Each chunk's result is independent of which thread runs it.
#pragma once

#include <cstdint>
#include <functional>

namespace quantrt_cpu {

// fn(chunk) for every chunk in [0, n), on the caller and up to at::get_num_threads() - 1
// helpers.  fn must not throw.
void parallel_chunks(int64_t n, const std::function<void(int64_t)>& fn);

// Chunks of about `grain` items over [0, total): fn(begin, end).
inline void parallel_range(int64_t total, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (total <= 0) return;
  const int64_t chunks = (total + grain - 1) / grain;
  if (chunks == 1) {
    fn(0, total);
    return;
  }
  const int64_t step = (total + chunks - 1) / chunks;
  parallel_chunks(chunks, [&](int64_t c) {
    const int64_t b = c * step;
    if (b < total) fn(b, b + step < total ? b + step : total);
  });
}

}  // namespace quantrt_cpu
