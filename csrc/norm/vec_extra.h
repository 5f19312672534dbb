// Small additions to core/vec.h that the norm, loss and training kernels share.
// Include only from *_isa.cc files (after core/vec.h defines pt::PT_ISA_NS::Vec).
#pragma once

#include <cmath>

#include "core/vec.h"

namespace pt {
namespace PT_ISA_NS {

// Lanes below n selected (for Vec::select), the others not.
inline Vec first_lanes(int n) {
  alignas(32) static const float iota[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  return Vec::less(Vec::load(iota), Vec(static_cast<float>(n)));
}

// Loads the first n (< 8) lanes; the other lanes take `fill` (e.g. -FLT_MAX for a max).
inline Vec load_tail(const float* p, int n, float fill) {
  return Vec::select(first_lanes(n), Vec::load(p, n), Vec(fill));
}

// Lane-wise square root (vec.h has none).
inline Vec vsqrt(Vec x) {
#if defined(PT_ISA_AVX2)
  return Vec(_mm256_sqrt_ps(x.v));
#else
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::sqrt(x.v[i]);
  return r;
#endif
}

}  // namespace PT_ISA_NS
}  // namespace pt
