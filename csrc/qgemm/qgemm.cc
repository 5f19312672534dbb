// int8 GEMM op logic: weight packing, activation quantisation and widening, ISA dispatch. The
// multiply-adds run in qgemm_isa.cc.
#include "qgemm/qgemm.h"

#include <cstring>

#include "core/isa.h"
#include "core/threading.h"
#include "qgemm/qgemm_kernels.h"

namespace pt {

namespace {

index_t even(index_t k) { return (k + 1) / 2 * 2; }

// Where W[r, k] sits in the packed panels of a weight with `pairs` k-pairs (see qpack_weight).
index_t qpanel_byte(index_t r, index_t k, index_t pairs) {
  return (r / kQNR) * pairs * 2 * kQNR + (k / 2) * 2 * kQNR + 2 * (r % kQNR) + (k & 1);
}

// Scratch for the widened activations (M x Kp int16), the row factors (M floats) and, when the
// avx512vnni kernel is selected, the int8 activations (M x lda8, lda8 = Kp rounded up to 4) with
// their row sums (lda8 = 0 otherwise), from the calling thread's scratch memory (the kernel is
// done with it before the thread's next call).
struct Widened {
  std::int16_t* a;
  float* row_inv;
  std::int8_t* a8;
  std::int32_t* a_sum;
  index_t lda8;
};

bool vnni_selected() { return selected_isa() == Isa::avx512vnni; }

Widened widened_scratch(index_t M, index_t Kp) {
  const index_t a_floats = (M * Kp + 1) / 2;
  const index_t lda8 = vnni_selected() ? (Kp + 3) / 4 * 4 : 0;
  const index_t a8_floats = (M * lda8 + 3) / 4;
  float* s = thread_scratch(static_cast<size_t>(a_floats + 2 * M + a8_floats + 16));
  return {reinterpret_cast<std::int16_t*>(s), s + a_floats,
          reinterpret_cast<std::int8_t*>(s + a_floats + 2 * M),
          reinterpret_cast<std::int32_t*>(s + a_floats + M), lda8};
}

// Runs the product on the kernel the scratch was laid out for (a later force_isa cannot make it
// overrun the int8 rows); the avx512vnni one first gets the activations narrowed to int8 (every
// value fits: quantised rows are in [-127, 127], qgemm_s32's input is int8).
void run_product(QRun& run, const Widened& wide) {
#if defined(PT_HAVE_VNNI)
  if (wide.lda8 > 0) {
    for (index_t m = 0; m < run.M; ++m) {
      const std::int16_t* src = run.a + m * run.lda;
      std::int8_t* dst = wide.a8 + m * wide.lda8;
      std::int32_t sum = 0;
      for (index_t k = 0; k < run.Kp; ++k) {
        dst[k] = static_cast<std::int8_t>(src[k]);
        sum += src[k];
      }
      for (index_t k = run.Kp; k < wide.lda8; ++k) dst[k] = 0;
      // Modulo 2^32, as the kernel's sums: the final difference is exact (see QRun).
      wide.a_sum[m] = static_cast<std::int32_t>(128u * static_cast<std::uint32_t>(sum));
    }
    run.a8 = wide.a8, run.lda8 = wide.lda8, run.a_sum = wide.a_sum;
    return vnni::qgemm_run(run);
  }
#endif
  PT_DISPATCH(qgemm_run)(run);
}

}  // namespace

index_t qpacked_size(index_t N, index_t K) { return (N + kQNR - 1) / kQNR * kQNR * even(K); }

void qpack_weight(std::int8_t* dst, const std::int8_t* w, index_t ldw, index_t N, index_t K) {
  const index_t panels = (N + kQNR - 1) / kQNR, pairs = even(K) / 2;
  std::memset(dst, 0, static_cast<size_t>(qpacked_size(N, K)));
  parallel_for(panels, [&](std::int64_t q) {
    const index_t cols = N - q * kQNR < kQNR ? N - q * kQNR : kQNR;
    for (index_t r = q * kQNR; r < q * kQNR + cols; ++r)
      for (index_t k = 0; k < K; ++k) dst[qpanel_byte(r, k, pairs)] = w[r * ldw + k];
  });
}

void qgather_rows(float* out, const std::int8_t* packed, index_t N, index_t K, const std::int64_t* ids,
                  index_t n, const float* w_scale, float scale) {
  const index_t pairs = even(K) / 2;
  for (index_t i = 0; i < n; ++i) {
    const index_t r = ids[i];
    const float f = scale / w_scale[r];
    float* row = out + i * K;
    for (index_t k = 0; k < K; ++k) row[k] = static_cast<float>(packed[qpanel_byte(r, k, pairs)]) * f;
  }
}

void qgemm_s32(std::int32_t* c, index_t ldc, const std::int8_t* a, index_t lda, const std::int8_t* packed,
               index_t M, index_t N, index_t K) {
  if (M <= 0 || N <= 0) return;
  const index_t Kp = even(K);
  const Widened wide = widened_scratch(M, Kp);
  for (index_t m = 0; m < M; ++m) {
    std::int16_t* row = wide.a + m * Kp;
    for (index_t k = 0; k < K; ++k) row[k] = a[m * lda + k];
    for (index_t k = K; k < Kp; ++k) row[k] = 0;
  }
  QRun run;
  run.a = wide.a, run.lda = Kp, run.b = packed;
  run.M = M, run.N = N, run.Kp = Kp;
  run.c32 = c, run.ldc32 = ldc;
  run_product(run, wide);
}

void quantize_rows(std::int8_t* q, index_t ldq, float* scale, const float* x, index_t ldx, index_t M, index_t K) {
  if (M <= 0 || K <= 0) return;
  // The kernel's own quantisation into int16 rows, narrowed (every value is in [-127, 127]).
  const Widened wide = widened_scratch(M, K);
  PT_DISPATCH(quantize_rows_i16)(wide.a, K, scale, x, ldx, M, K);
  for (index_t m = 0; m < M; ++m)
    for (index_t k = 0; k < K; ++k) q[m * ldq + k] = static_cast<std::int8_t>(wide.a[m * K + k]);
}

void qlinear_forward(const QLinearArgs& p) {
  if (p.M <= 0 || p.N <= 0) return;
  const index_t Kp = even(p.K);
  const Widened wide = widened_scratch(p.M, Kp);
  PT_DISPATCH(quantize_rows_i16)(wide.a, Kp, wide.row_inv, p.x, p.ldx, p.M, p.K);
  for (index_t m = 0; m < p.M; ++m) wide.row_inv[m] = 1.0f / wide.row_inv[m];
  QRun run;
  run.a = wide.a, run.lda = Kp, run.b = p.packed;
  run.M = p.M, run.N = p.N, run.Kp = Kp;
  run.c = p.c, run.ldc = p.ldc;
  run.row_inv = wide.row_inv, run.col_inv = p.w_inv_scale;
  run.bias = p.bias, run.act = p.act;
  run_product(run, wide);
}

}  // namespace pt
