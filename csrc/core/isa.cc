#include "core/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace pt {

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

static Isa detect() {
  const char* forced = std::getenv("PYTRANSFORMER_ISA");
  if (forced && std::strcmp(forced, "generic") == 0) return Isa::generic;
#if defined(PT_HAVE_AVX2)
  if (cpu_has_avx2_fma()) return Isa::avx2;
#endif
  return Isa::generic;
}

static std::atomic<Isa>& isa_setting() {
  static std::atomic<Isa> isa{detect()};
  return isa;
}

Isa selected_isa() { return isa_setting().load(std::memory_order_relaxed); }

void force_isa(Isa isa) {
#if defined(PT_HAVE_AVX2)
  if (isa == Isa::avx2 && !cpu_has_avx2_fma()) isa = Isa::generic;
#else
  isa = Isa::generic;
#endif
  isa_setting().store(isa, std::memory_order_relaxed);
}

const char* isa_name(Isa isa) { return isa == Isa::avx2 ? "avx2" : "generic"; }

}  // namespace pt
