#include "core/threading.h"

#include <atomic>
#include <cstdlib>
#include <new>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace pt {

static int available_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

static std::atomic<int>& thread_setting() {
  static std::atomic<int> n{available_cores()};
  return n;
}

int num_threads() {
#if defined(_OPENMP)
  return thread_setting().load(std::memory_order_relaxed);
#else
  return 1;
#endif
}

void set_num_threads(int n) { thread_setting().store(n < 1 ? 1 : n, std::memory_order_relaxed); }

static std::atomic<bool> team_started{false};
static std::atomic<bool> lost_to_fork{false};

void note_team() { team_started.store(true, std::memory_order_relaxed); }

bool threads_lost_to_fork() { return lost_to_fork.load(std::memory_order_relaxed); }

#if defined(__unix__) || defined(__APPLE__)
static void after_fork_in_child() {
  if (team_started.load(std::memory_order_relaxed)) {
    thread_setting().store(1, std::memory_order_relaxed);
    lost_to_fork.store(true, std::memory_order_relaxed);
  }
}
static const int atfork_registered = pthread_atfork(nullptr, nullptr, after_fork_in_child);
#endif

void team_barrier(int team) {
#if defined(_OPENMP)
  if (team > 1) {
#pragma omp barrier
  }
#endif
}

namespace {
struct Scratch {
  float* p = nullptr;
  std::size_t n = 0;
  ~Scratch() { std::free(p); }
  float* get(std::size_t floats) {
    if (floats > n) {
      std::free(p);
      p = nullptr;
      n = 0;
      const std::size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      p = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!p) throw std::bad_alloc();
      n = floats;
    }
    return p;
  }
};
thread_local Scratch tl_scratch;
}  // namespace

float* thread_scratch(std::size_t floats) { return tl_scratch.get(floats); }

bool have_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace pt
