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

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  // libgcc's feature bits include the OS check (XCR0 enables the AVX-512 register state).
  return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni() {
#if defined(PT_HAVE_VNNI)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The best level at or below `wanted` that this build and CPU run.
static Isa supported(Isa wanted) {
  if (wanted == Isa::avx512vnni && !cpu_has_avx512_vnni()) wanted = Isa::avx512;
#if defined(PT_HAVE_AVX512)
  if (wanted == Isa::avx512 && !cpu_has_avx512()) wanted = Isa::avx2;
#else
  if (wanted == Isa::avx512) wanted = Isa::avx2;
#endif
#if defined(PT_HAVE_AVX2)
  if (wanted == Isa::avx2 && !cpu_has_avx2_fma()) wanted = Isa::generic;
#else
  wanted = Isa::generic;
#endif
  return wanted;
}

static Isa detect() {
  const char* forced = std::getenv("PYTRANSFORMER_ISA");
  if (forced && std::strcmp(forced, "generic") == 0) return Isa::generic;
  if (forced && std::strcmp(forced, "avx2") == 0) return supported(Isa::avx2);
  if (forced && std::strcmp(forced, "avx512") == 0) return supported(Isa::avx512);
  return supported(Isa::avx512vnni);
}

static std::atomic<Isa>& isa_setting() {
  static std::atomic<Isa> isa{detect()};
  return isa;
}

Isa selected_isa() { return isa_setting().load(std::memory_order_relaxed); }

void force_isa(Isa isa) { isa_setting().store(supported(isa), std::memory_order_relaxed); }

const char* isa_name(Isa isa) {
  if (isa == Isa::avx512vnni) return "avx512vnni";
  if (isa == Isa::avx512) return "avx512";
  return isa == Isa::avx2 ? "avx2" : "generic";
}

}  // namespace pt
