// What a GEMM does to C after the multiply-adds: start from C or zero, add the bias, apply the
// activation. Epilogue is the micro-kernel's version (per C tile); epilogue_rows applies the same
// to whole rows for the paths that write C without the micro-kernel. Include only from *_isa.cc.
#pragma once

#include "core/isa_unit.h"
#include "core/vec.h"
#include "gemm/gemm.h"

namespace pt {
namespace PT_ISA_NS {
namespace {  // internal linkage in every *_isa.cc that includes this (see blocking.h)

// What the write-back of a C tile does after the FMAs.
struct Epilogue {
  bool load_c = false;               // start from the current C (accumulate, or a later K block)
  const float* bias = nullptr;       // added on the last K block, indexed by tile column
  Activation act = Activation::none; // applied on the last K block
};

inline Vec activate(Vec x, Activation act) {
  // max(0, x): when x is NaN the second operand wins, so NaN propagates.
  if (act == Activation::relu) return max(Vec::zero(), x);
  if (act == Activation::gelu) return gelu(x);
  return x;
}

// C rows without a product (K = 0, or after the dot path): C = act((load_c ? C : 0) + bias).
[[maybe_unused]] void epilogue_rows(float* c, index_t ldc, index_t M, index_t N, bool load_c,
                                    const float* bias, Activation act) {
  for (index_t m = 0; m < M; ++m) {
    float* row = c + m * ldc;
    for (index_t n = 0; n < N; n += Vec::width) {
      const int w = N - n < Vec::width ? static_cast<int>(N - n) : Vec::width;
      Vec x = load_c ? Vec::load(row + n, w) : Vec::zero();
      if (bias) x = x + Vec::load(bias + n, w);
      activate(x, act).store(row + n, w);
    }
  }
}

}  // namespace
}  // namespace PT_ISA_NS
}  // namespace pt
