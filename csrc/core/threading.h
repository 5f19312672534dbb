// Thread settings, deterministic parallel loops, thread teams and per-thread scratch memory.
//
// Kernels parallelise over independent output blocks and never split a reduction across
// threads, so results are bit-identical for any thread count.
#pragma once

#include <cstddef>
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

// Runs fn(thread, team_size) once on each thread of a team of up to nt threads: a team of one
// (fn(0, 1) on the calling thread) when nt <= 1 or when already inside a team. Threads of the
// team wait for each other at team_barrier(team_size).
template <class Fn>
void run_team(int nt, Fn&& fn) {
#if defined(_OPENMP)
  if (nt > 1 && !omp_in_parallel()) {
    note_team();
#pragma omp parallel num_threads(nt)
    fn(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  fn(0, 1);
}

// Every thread of a run_team team of `team` threads calls it at the same point; none returns
// before all have arrived. No-op for a team of one.
void team_barrier(int team);

// The calling thread's scratch memory: at least `floats` floats, 64-byte aligned, grown on
// demand, reused by the thread's next call (so a kernel must be done with it by then) and freed
// at thread exit. Call it outside parallel regions and hand the team slices, so nothing
// allocates inside one. Throws std::bad_alloc.
float* thread_scratch(std::size_t floats);

}  // namespace pt
