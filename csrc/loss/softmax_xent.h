// Softmax cross-entropy with label smoothing and an ignore index, and log-softmax.
//
// Each row is read once to get its statistics (running max and sum of exponentials, updated
// online block by block); the cross-entropy sweep also leaves exp(x - running max) in dlogits,
// so the second sweep (over a row still in L2) only rescales it into the gradient;
// log-softmax's second sweep writes x - logsumexp.
// Rows are independent and the loss is added in row order, so results are the same for any
// thread count.
#pragma once

#include "common.h"

namespace pt {

// logits, dlogits are (N, V) row-major (dlogits may alias logits: the in-place mode);
// targets (N) in [0, V) or == ignore_index (checked by the caller).
// Per non-ignored row r with p = softmax(logits[r]) and eps = label_smoothing:
//   loss_r = (1 - eps) * (-log p[t]) + eps * mean_v(-log p[v])
//   dlogits[r] = (p - (1 - eps) * onehot(t) - eps / V) / count
// where count is the number of non-ignored rows; ignored rows get zero gradient.
// Returns sum_r loss_r / count (0 when count is 0). dlogits may be null (loss only).
double softmax_cross_entropy_forward_backward(float* dlogits, const float* logits,
                                              const std::int64_t* targets, index_t N, index_t V,
                                              float label_smoothing, std::int64_t ignore_index);

// out, inp (N, V); out = inp - logsumexp(inp, row). out may alias inp.
void log_softmax_forward(float* out, const float* inp, index_t N, index_t V);

// The k best entries of each row of log_softmax(inp) without writing the row: idx, val (N, k),
// best first, ties by the lower index; val holds the same bits log_softmax_forward writes there.
// For ranking, NaN counts as -inf. 1 <= k <= V. (A beam search step needs only these.)
void log_softmax_topk(std::int64_t* idx, float* val, const float* inp, index_t N, index_t V, index_t k);

// Naive siblings (double precision, scalar, two passes): fallback and test oracle.
double softmax_cross_entropy_naive(float* dlogits, const float* logits, const std::int64_t* targets,
                                   index_t N, index_t V, float label_smoothing, std::int64_t ignore_index);
void log_softmax_naive(float* out, const float* inp, index_t N, index_t V);

// Floats of scratch one xent_rows call needs: 8 per block of 32 values plus 8 per vector of the
// remainder.
inline index_t xent_scratch_floats(index_t V) { return (V / 32 + 4) * 8; }

// Per-ISA row kernels (softmax_xent_isa.cc) over rows [r0, r1).
//   xent_rows: row_loss[r] = loss_r (0 for ignored rows); dlogits rows written when non-null,
//   scaled by inv_count. scratch holds xent_scratch_floats(V) floats (per-block maxima).
#define PT_XENT_ISA_DECLS                                                                          \
  void xent_rows(double* row_loss, float* dlogits, float* scratch, const float* logits,             \
                 const std::int64_t* targets, index_t r0, index_t r1, index_t V, float label_smoothing, \
                 std::int64_t ignore_index, float inv_count);                                      \
  void log_softmax_rows(float* out, const float* inp, index_t r0, index_t r1, index_t V);         \
  void log_softmax_topk_rows(std::int64_t* idx, float* val, const float* inp, index_t r0, index_t r1, \
                             index_t V, index_t k);
namespace generic {
PT_XENT_ISA_DECLS
}
namespace avx2 {
PT_XENT_ISA_DECLS
}
#undef PT_XENT_ISA_DECLS

}  // namespace pt
