// Single-precision matrix product with a fused epilogue (bias, ReLU/GELU, accumulate).
//
// The C++ entry point other kernels call. Operands are strided views, so transposes and
// non-contiguous inputs cost nothing up front: the packing routines read through the strides.
#pragma once

#include "common.h"

namespace pt {

enum class Activation : int { none = 0, relu = 1, gelu = 2 };

// One (possibly batched) product. Element (m, k) of op(A) for batch item t is
//   a[t * a_bs + m * a_rs + k * a_cs],
// element (k, n) of op(B) is b[t * b_bs + k * b_rs + n * b_cs], element (m, n) of C is
//   c[t * c_bs + m * ldc + n]   (unit column stride).
// Any stride may be negative or zero (broadcast). A transpose is just swapped strides:
// A stored (K, M) row-major with lda = M is a_rs = 1, a_cs = M.
struct GemmArgs {
  float* c = nullptr;
  index_t ldc = 0, c_bs = 0;
  const float* a = nullptr;
  index_t a_rs = 0, a_cs = 0, a_bs = 0;
  const float* b = nullptr;
  index_t b_rs = 0, b_cs = 0, b_bs = 0;
  const float* bias = nullptr;  // (N,) contiguous, or nullptr
  Activation act = Activation::none;
  bool accumulate = false;  // C += ... instead of C = ...; requires act == none
  index_t batch = 1, M = 0, N = 0, K = 0;
};

// gemm_forward: for each batch item,
//   accumulate == false:  C = act(op(A) @ op(B) + bias)
//   accumulate == true:   C = C + op(A) @ op(B) + bias         (act must be none)
// K = 0 gives act(bias) (or zeros; C + bias when accumulating). C must not overlap A, B or bias.
// Threads: pt::num_threads(); the bits of C do not depend on it (K is never split between
// threads). Safe to call from several threads at once (packing buffers are thread-local).
void gemm_forward(const GemmArgs& args);

// Naive reference (triple loop, float accumulation in k order, then bias and activation).
// The oracle for the optimised kernel and its fallback; same contract as gemm_forward.
void gemm_forward_naive(const GemmArgs& args);

// Weights packed once for many products (inference): W (N, K), row stride ldw, is the Linear
// layout (op(B) = W^T). The packed form is ceil(N / 16) panels of K x 16 floats: element (k, j)
// of panel q is W[16 q + j, k], zero past row N. packed_weight_size counts its floats.
index_t packed_weight_size(index_t N, index_t K);
void pack_weight(float* dst, const float* w, index_t ldw, index_t N, index_t K);

// gemm_forward with op(B) = W^T read from pack_weight's buffer: args.b points at it, b_rs, b_cs
// and b_bs are ignored (every batch item uses the same W). Skips packing B, which is most of a
// small-M product's memory traffic. Same bits as gemm_forward for M > 32 (and M 17..32).
void gemm_forward_prepacked(const GemmArgs& args);

}  // namespace pt
