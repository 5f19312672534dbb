// Layer normalisation over the last axis, forward and backward, plus the fused residual add.
//
// Rows are independent, so every kernel parallelises over rows; the parameter gradients
// (dweight, dbias) are summed over fixed row blocks whose layout depends only on N, then the
// blocks are added in order, so results are bit-identical for any thread count.
#pragma once

#include "common.h"

namespace pt {

// out, inp are (N, C) row-major; weight, bias are (C); mean, rstd are (N) and may be null.
// out = (inp - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps) (biased variance).
// out may alias inp.
void layer_norm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                        const float* bias, index_t N, index_t C, float eps);

// Fused residual add: s = inp + residual; out = layer_norm(s). sum (N, C) receives s and may
// be null (then only out is written). mean, rstd (N) may be null.
void add_layer_norm_forward(float* out, float* sum, float* mean, float* rstd, const float* inp,
                            const float* residual, const float* weight, const float* bias, index_t N,
                            index_t C, float eps);

// dinp (N, C) is overwritten; dweight, dbias (C) are overwritten (not accumulated) with the sums
// over rows. dout, inp (N, C); weight (C); mean, rstd (N) as saved by the forward.
void layer_norm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                         const float* weight, const float* mean, const float* rstd, index_t N, index_t C);

// Naive siblings: scalar, one row after another, double accumulation. Fallback and test oracle.
void layer_norm_forward_naive(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                              const float* bias, index_t N, index_t C, float eps);
void layer_norm_backward_naive(float* dinp, float* dweight, float* dbias, const float* dout,
                               const float* inp, const float* weight, const float* mean,
                               const float* rstd, index_t N, index_t C);

// Per-ISA row kernels (layer_norm_isa.cc), called on row ranges [r0, r1) by the functions above.
//   forward_rows: when residual is non-null the row is first summed into sum (or into out when
//   sum is null) and normalised from there.
//   backward_rows: writes dinp rows and adds this range's contributions into dweight, dbias.
#define PT_LAYER_NORM_ISA_DECLS                                                                   \
  void layer_norm_forward_rows(float* out, float* sum, float* mean, float* rstd, const float* inp, \
                               const float* residual, const float* weight, const float* bias,     \
                               index_t r0, index_t r1, index_t C, float eps);                     \
  void layer_norm_backward_rows(float* dinp, float* dweight, float* dbias, const float* dout,      \
                                const float* inp, const float* weight, const float* mean,          \
                                const float* rstd, index_t r0, index_t r1, index_t C);
namespace generic {
PT_LAYER_NORM_ISA_DECLS
}
namespace avx2 {
PT_LAYER_NORM_ISA_DECLS
}
#undef PT_LAYER_NORM_ISA_DECLS

}  // namespace pt
