// Embedding gather (forward) and scatter-add (backward).
#pragma once

#include "common.h"

namespace pt {

// out (N, C) = weight[ids[n]] * scale; weight (V, C) row-major; ids (N) already checked to lie
// in [0, V). Parallel over tokens.
void embedding_forward(float* out, const float* weight, const std::int64_t* ids, index_t N, index_t C,
                       float scale);

// dweight (V, C) += scale * dout[n] at row ids[n], for n = 0..N-1 in that order; dout (N, C).
// Parallel over column ranges of C, each walking all tokens in order, so every element sees
// the same additions in the same order for any thread count (no atomics).
void embedding_backward(float* dweight, const float* dout, const std::int64_t* ids, index_t N, index_t C,
                        float scale);

// Naive siblings (scalar, serial): fallback and test oracle.
void embedding_forward_naive(float* out, const float* weight, const std::int64_t* ids, index_t N, index_t C,
                             float scale);
void embedding_backward_naive(float* dweight, const float* dout, const std::int64_t* ids, index_t N,
                              index_t C, float scale);

// Per-ISA bodies (embedding_isa.cc): tokens [n0, n1) for the forward; columns [c0, c1) of every
// token for the backward.
#define PT_EMBEDDING_ISA_DECLS                                                                     \
  void embedding_gather_rows(float* out, const float* weight, const std::int64_t* ids, index_t n0,  \
                             index_t n1, index_t C, float scale);                                   \
  void embedding_scatter_cols(float* dweight, const float* dout, const std::int64_t* ids, index_t N, \
                              index_t C, index_t c0, index_t c1, float scale);
namespace generic {
PT_EMBEDDING_ISA_DECLS
}
namespace avx2 {
PT_EMBEDDING_ISA_DECLS
}
#undef PT_EMBEDDING_ISA_DECLS

}  // namespace pt
