// Runtime ISA detection and dispatch.
#pragma once

namespace pt {

// Ordered levels. avx512 runs every avx2 kernel except the float GEMM, whose micro-kernel holds a
// C row in one 16-lane register (same bits as avx2); avx512vnni adds the VNNI int8 dot products
// (vpdpbusd on 256-bit registers) to the int8 GEMM. The other float kernels are memory- or
// latency-bound and have no 512-bit build.
enum class Isa { generic, avx2, avx512, avx512vnni };

// The ISA kernels run with: detected once (cpuid), overridden by
// PYTRANSFORMER_ISA=generic|avx2|avx512|avx512vnni (a level the CPU lacks falls back to the best
// below).
Isa selected_isa();
const char* isa_name(Isa isa);
// Test-only: switches the ISA for later kernel calls (an unsupported request falls back as above).
void force_isa(Isa isa);
// What the CPU supports, regardless of the override.
bool cpu_has_avx2_fma();
// AVX-512 F, VL, BW and DQ (and AVX2 + FMA), enabled by the OS.
bool cpu_has_avx512();
// cpu_has_avx512() and VNNI.
bool cpu_has_avx512_vnni();

}  // namespace pt

// PT_DISPATCH(sym) names the per-ISA definition of `sym` (declared in both pt::generic and
// pt::avx2) that the selected ISA should run; avx512 and avx512vnni run the avx2 one.
#if defined(PT_HAVE_AVX2)
#define PT_DISPATCH(sym) \
  (::pt::selected_isa() != ::pt::Isa::generic ? ::pt::avx2::sym : ::pt::generic::sym)
#else
#define PT_DISPATCH(sym) (::pt::generic::sym)
#endif
