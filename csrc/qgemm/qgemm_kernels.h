// Per-ISA entry of the int8 GEMM (qgemm_isa.cc) and the run description qgemm.cc hands it.
#pragma once

#include "qgemm/qgemm.h"

namespace pt {

// One product over int16-widened activations: A (M, Kp) int16 with Kp = K rounded up to even
// (zero-padded), times the packed weight. Exactly one of c32 (raw sums) or c (dequantised floats)
// is set. row_inv: (M,) 1 / x_scale; col_inv: (N,) 1 / w_scale.
struct QRun {
  const std::int16_t* a = nullptr;
  index_t lda = 0;
  const std::int8_t* b = nullptr;
  index_t M = 0, N = 0, Kp = 0;
  std::int32_t* c32 = nullptr;
  index_t ldc32 = 0;
  float* c = nullptr;
  index_t ldc = 0;
  const float* row_inv = nullptr;
  const float* col_inv = nullptr;
  const float* bias = nullptr;
  Activation act = Activation::none;
};

namespace generic {
void qgemm_run(const QRun& run);
}
#if defined(PT_HAVE_AVX2) || defined(PT_ISA_AVX2)
namespace avx2 {
void qgemm_run(const QRun& run);
}
#endif

}  // namespace pt
