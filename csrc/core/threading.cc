#include "core/threading.h"

#include <atomic>
#include <thread>

#if defined(__linux__)
#include <sched.h>
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

bool have_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace pt
