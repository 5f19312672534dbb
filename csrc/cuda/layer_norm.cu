// Layer norm over the last axis: one block per row (two passes over the row: mean, then the
// centred variance, which stays accurate when |mean| >> std).
#include <cmath>

#include "kernels.h"
#include "reduce.cuh"

namespace pt {
namespace cuda {
namespace {

constexpr int THREADS = 256;

unsigned row_blocks(std::int64_t n) { return static_cast<unsigned>(n < (1 << 20) ? n : (1 << 20)); }

__global__ void layer_norm_forward_kernel(float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                                          const float* __restrict__ x, const float* __restrict__ gamma,
                                          const float* __restrict__ beta, std::int64_t N, int C, float eps) {
  __shared__ float buf[32];
  for (std::int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const float* xr = x + r * C;
    float s = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += xr[c];
    const float mu = block_sum(s, buf) / C;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float d = xr[c] - mu;
      ss = fmaf(d, d, ss);
    }
    const float rs = rsqrtf(block_sum(ss, buf) / C + eps);
    float* yr = y + r * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) yr[c] = (xr[c] - mu) * rs * gamma[c] + beta[c];
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * gamma, one block per row.
__global__ void layer_norm_dx_kernel(float* dx, const float* dy, const float* __restrict__ x,
                                     const float* __restrict__ gamma, const float* __restrict__ mean,
                                     const float* __restrict__ rstd, std::int64_t N, int C) {
  __shared__ float buf[32];
  for (std::int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const float* xr = x + r * C;
    const float* dyr = dy + r * C;
    const float mu = mean[r], rs = rstd[r];
    float sg = 0.0f, sgx = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float g = dyr[c] * gamma[c];
      sg += g;
      sgx = fmaf(g, (xr[c] - mu) * rs, sgx);
    }
    const float mg = block_sum(sg, buf) / C;
    const float mgx = block_sum(sgx, buf) / C;
    float* dxr = dx + r * C;  // may alias dy: each element is read then written by the same thread
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float xhat = (xr[c] - mu) * rs;
      dxr[c] = rs * (dyr[c] * gamma[c] - mg - xhat * mgx);
    }
  }
}

// dgamma[c] = sum_r dy[r,c] * xhat[r,c], dbeta[c] = sum_r dy[r,c]: one thread per column walking the
// rows in order (coalesced across the warp, deterministic, no atomics).
__global__ void layer_norm_dparams_kernel(float* __restrict__ dgamma, float* __restrict__ dbeta,
                                          const float* __restrict__ dy, const float* __restrict__ x,
                                          const float* __restrict__ mean, const float* __restrict__ rstd,
                                          std::int64_t N, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sg = 0.0f, sb = 0.0f;
  for (std::int64_t r = 0; r < N; ++r) {
    const float d = dy[r * C + c];
    sb += d;
    sg = fmaf(d, (x[r * C + c] - mean[r]) * rstd[r], sg);
  }
  dgamma[c] = sg;
  dbeta[c] = sb;
}

}  // namespace

cudaError_t layer_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* gamma,
                               const float* beta, std::int64_t N, int C, float eps, cudaStream_t stream) {
  layer_norm_forward_kernel<<<row_blocks(N), THREADS, 0, stream>>>(y, mean, rstd, x, gamma, beta, N, C, eps);
  return cudaGetLastError();
}

cudaError_t layer_norm_backward(float* dx, float* dgamma, float* dbeta, const float* dy, const float* x,
                                const float* gamma, const float* mean, const float* rstd, std::int64_t N, int C,
                                cudaStream_t stream) {
  // Parameter gradients first: they read dy, which dx may overwrite.
  layer_norm_dparams_kernel<<<(C + THREADS - 1) / THREADS, THREADS, 0, stream>>>(dgamma, dbeta, dy, x, mean, rstd,
                                                                                 N, C);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  layer_norm_dx_kernel<<<row_blocks(N), THREADS, 0, stream>>>(dx, dy, x, gamma, mean, rstd, N, C);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pt
