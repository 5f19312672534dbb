// Per-ISA entry of the int8 GEMM (qgemm_isa.cc) and the run description qgemm.cc hands it.
#pragma once

#include "qgemm/qgemm.h"

namespace pt {

// One product over int16-widened activations: A (M, Kp) int16 with Kp = K rounded up to even
// (zero-padded), times the packed weight. Exactly one of c32 (raw sums) or c (dequantised floats)
// is set. row_inv: (M,) 1 / x_scale; col_inv: (N,) 1 / w_scale.
// The avx512vnni kernel reads the activations as int8 instead: a8 (M, lda8), lda8 a multiple of 4
// >= Kp (zero-padded), and a_sum (M,) = 128 x each row's sum. vpdpbusd multiplies unsigned by
// signed bytes, so the kernel feeds it the weights as w + 128 (w ^ 0x80) and subtracts a_sum.
struct QRun {
  const std::int16_t* a = nullptr;
  index_t lda = 0;
  const std::int8_t* a8 = nullptr;
  index_t lda8 = 0;
  const std::int32_t* a_sum = nullptr;
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

// Per-row quantisation into int16 rows of stride ldq >= K (zero past K): q = round(x * s) with
// s = 127 / max|row| (1 for a zero row), clamped to [-127, 127]; scale[m] = s, or NaN (and q = 0)
// for a row with inf or NaN. Both ISAs round half to even and give identical q and s.
namespace generic {
void qgemm_run(const QRun& run);
void quantize_rows_i16(std::int16_t* q, index_t ldq, float* scale, const float* x, index_t ldx, index_t M,
                       index_t K);
}  // namespace generic
#if defined(PT_HAVE_AVX2) || defined(PT_ISA_AVX2)
namespace avx2 {
void qgemm_run(const QRun& run);
void quantize_rows_i16(std::int16_t* q, index_t ldq, float* scale, const float* x, index_t ldx, index_t M,
                       index_t K);
}  // namespace avx2
#endif
#if defined(PT_HAVE_VNNI) || defined(PT_ISA_VNNI)
namespace vnni {
void qgemm_run(const QRun& run);
}  // namespace vnni
#endif

}  // namespace pt
