// CUDA kernels of pytransformer._cuda: the same contracts as the CPU kernels (see ops in
// pytransformer/ops and csrc/common.h for the dimension legend: B batch, H heads, D head dim,
// Lq/Lk query/key lengths, C channels, V vocabulary). Plain C++ declarations so the pybind11
// bindings compile with the host compiler; the bodies live in *.cu.
//
// Every pointer is a device pointer to float32 (or int where stated), row-major. Every launcher
// queues its kernels on `stream` and returns cudaGetLastError() (launch errors), except where it
// says it synchronises. Sizes are validated by the caller (pytransformer/cuda.py): all > 0 unless
// stated, every index fits in int64.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace pt {
namespace cuda {

enum class Activation : int { none = 0, relu = 1, gelu = 2 };

// C[z] (M,N), ldc = N  =  op(A[z]) (M,K) @ op(B[z]) (K,N)  (+ C[z] if accumulate) (+ bias (N,)) then act.
// A[z] starts at a + z*stride_a: (M,K) with lda = K, or (K,M) with lda = M when trans_a.
// B[z] starts at b + z*stride_b: (K,N) with ldb = N, or (N,K) with ldb = K when trans_b.
// stride_b = 0 broadcasts one B over the batch. bias may be null. accumulate requires act = none.
// K = 0 is allowed (C = act(bias), or C + bias when accumulating); a and b are then never read
// and may be null. Overwrites c only. ReLU keeps NaN, as the CPU kernel does.
cudaError_t sgemm_forward(float* c, const float* a, const float* b, const float* bias, int batch, int M, int N,
                          int K, std::int64_t stride_a, std::int64_t stride_b, bool trans_a, bool trans_b,
                          bool accumulate, Activation act, cudaStream_t stream);
// Oracle: one thread per output, plain dot product in float. Same contract as sgemm_forward.
cudaError_t sgemm_forward_naive(float* c, const float* a, const float* b, const float* bias, int batch, int M,
                                int N, int K, std::int64_t stride_a, std::int64_t stride_b, bool trans_a,
                                bool trans_b, bool accumulate, Activation act, cudaStream_t stream);

// x, y (N,C); gamma, beta (C,); mean, rstd (N,). y = (x - mean) * rstd * gamma + beta with the biased
// variance. Overwrites y, mean, rstd.
cudaError_t layer_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* gamma,
                               const float* beta, std::int64_t N, int C, float eps, cudaStream_t stream);
// dy, x, dx (N,C); mean, rstd (N,) from the forward; dgamma, dbeta (C,) overwritten (not accumulated).
// dx may alias dy. `scratch` holds layer_norm_backward_scratch(N, C) floats (per-chunk partial sums
// of dgamma and dbeta). Deterministic: dgamma/dbeta sum rows in a fixed order that depends on N only.
std::int64_t layer_norm_backward_scratch(std::int64_t N, int C);
cudaError_t layer_norm_backward(float* dx, float* dgamma, float* dbeta, float* scratch, const float* dy,
                                const float* x, const float* gamma, const float* mean, const float* rstd,
                                std::int64_t N, int C, cudaStream_t stream);

// Strided view of a (B, L, H, D) tensor, strides in elements.
struct AttnView {
  const float* p;
  std::int64_t sb, sl, sh, sd;
};
struct AttnShape {
  int B, Lq, Lk, H, D;
  bool causal;
  std::int64_t query_offset;  // query i of the block sits at key position query_offset + i (causal)
  float scale;
  const int* key_lengths;     // (B,) device, each in [0, Lk], or null (all Lk visible)
};
constexpr int kAttnMaxD = 128;  // head dimension limit of the attention kernels
// out (B,Lq,H,D) C-contiguous; lse (B,H,Lq) or null. Key j is visible to query i of batch b iff
// j < key_lengths[b] and (not causal or j <= query_offset + i). Rows with no visible key give
// out = 0 and lse = -inf. Overwrites out, lse.
cudaError_t attention_forward(float* out, float* lse, AttnView q, AttnView k, AttnView v, AttnShape s,
                              cudaStream_t stream);
// dq, dk, dv C-contiguous of the shapes of q, k, v; dout, out (B,Lq,H,D) C-contiguous; lse (B,H,Lq) from
// the forward. `scratch` holds B*H*Lq floats (rowsum(dout*out)). Overwrites dq, dk, dv, scratch.
cudaError_t attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                               const float* out, const float* lse, AttnView q, AttnView k, AttnView v,
                               AttnShape s, cudaStream_t stream);

// logits, dlogits (N,V) (may alias: in place); targets (N,) int32 or int64 (is64). row_loss (N,) floats
// and stats (2 int64) are device scratch. Checks targets first and synchronises: a target outside [0, V) other
// than ignore_index stores its row in *bad_row and returns cudaSuccess without computing. Otherwise
// *bad_row = -1, *loss = mean over kept rows of (1-eps) nll + eps mean_v(-log p_v) (0 if none kept)
// and dlogits = d loss / d logits (ignored rows zero).
cudaError_t softmax_xent_forward_backward(float* loss, std::int64_t* bad_row, float* dlogits, float* row_loss,
                                          std::int64_t* stats, const float* logits, const void* targets, bool is64,
                                          std::int64_t N, int V, float label_smoothing,
                                          std::int64_t ignore_index, cudaStream_t stream);

// In place on param, m, v (n,): Adam (L2 weight decay added to the gradient) or AdamW (decoupled),
// bias-corrected with step >= 1, the same arithmetic as the CPU kernel.
cudaError_t adam_step(float* param, const float* grad, float* m, float* v, std::int64_t n, float lr,
                      float beta1, float beta2, float eps, float weight_decay, std::int64_t step, bool decoupled,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace pt
