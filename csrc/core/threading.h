// Thread pool settings and a deterministic parallel loop.
//
// Kernels parallelise over independent output blocks and never split a reduction across
// threads, so results are bit-identical for any thread count.
#pragma once

#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace pt {

// Threads kernels use; a process-wide setting (not per Python thread). Default: usable cores.
int num_threads();
void set_num_threads(int n);
bool have_openmp();
// Records that a thread team has been started (call before each parallel region). libgomp's
// team does not survive fork(): a child forked after one would hang in its next parallel
// region, so such a child is switched to one thread (threads_lost_to_fork() is then true).
void note_team();
bool threads_lost_to_fork();

// Calls fn(i) for i in [0, n), spread over up to num_threads() threads with a static schedule.
// fn must not throw and iterations must write disjoint memory.
template <class Fn>
void parallel_for(std::int64_t n, Fn&& fn) {
#if defined(_OPENMP)
  const int nt = num_threads();
  if (nt > 1 && n > 1 && !omp_in_parallel()) {
    note_team();
#pragma omp parallel for schedule(static) num_threads(nt)
    for (std::int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) fn(i);
}

// Like parallel_for but hands each thread one contiguous chunk [begin, end) and its index,
// for kernels that keep per-thread scratch buffers.
template <class Fn>
void parallel_chunks(std::int64_t n, Fn&& fn) {
#if defined(_OPENMP)
  const int nt = static_cast<int>(n < num_threads() ? n : num_threads());
  if (nt > 1 && !omp_in_parallel()) {
    note_team();
#pragma omp parallel num_threads(nt)
    {
      const std::int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
      fn(t, n * t / T, n * (t + 1) / T);
    }
    return;
  }
#endif
  if (n > 0) fn(0, 0, n);
}

}  // namespace pt
