// Runtime ISA detection and dispatch.
#pragma once

namespace pt {

enum class Isa { generic, avx2 };

// The ISA kernels run with: detected once (cpuid), overridden by PYTRANSFORMER_ISA=generic|avx2
// (asking for avx2 on a CPU without it falls back to generic).
Isa selected_isa();
const char* isa_name(Isa isa);
// Test-only: switches the ISA for later kernel calls (an unsupported request selects generic).
void force_isa(Isa isa);
// What the CPU supports, regardless of the override.
bool cpu_has_avx2_fma();

}  // namespace pt

// PT_DISPATCH(sym) names the per-ISA definition of `sym` (declared in both pt::generic and
// pt::avx2) that the selected ISA should run.
#if defined(PT_HAVE_AVX2)
#define PT_DISPATCH(sym) \
  (::pt::selected_isa() == ::pt::Isa::avx2 ? ::pt::avx2::sym : ::pt::generic::sym)
#else
#define PT_DISPATCH(sym) (::pt::generic::sym)
#endif
