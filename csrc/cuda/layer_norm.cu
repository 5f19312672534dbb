// Layer norm over the last axis: one block per row (two passes over the row: mean, then the
// centred variance, which stays accurate when |mean| >> std). The backward's dx is one block per
// row too; its parameter gradients are a two-stage column reduction (see below).
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

// dgamma[c] = sum_r dy[r,c] * xhat[r,c] and dbeta[c] = sum_r dy[r,c] in two stages, so that many
// blocks share the rows (one thread per column walking all N rows left most of the device idle):
//   1. the rows are cut into `chunks` runs of consecutive rows; block (column tile, chunk) sums
//      its run for 32 columns, 8 rows side by side (each of the 8 row lanes adds every 8th row,
//      then lane 0 adds the 8 lane sums in lane order), into partial[chunk][c];
//   2. one thread per column adds its `chunks` partial sums in chunk order.
// The chunking depends on N only, and every sum runs in a fixed order: the result is the same
// bits on every run and every device.
constexpr int DP_COLS = 32;          // columns per stage-1 block: one coalesced 128-byte row read
constexpr int DP_ROW_LANES = 8;      // rows a stage-1 block reads side by side
constexpr int DP_MIN_CHUNK = 64;     // rows per chunk at least: enough work per block
constexpr int DP_MAX_CHUNKS = 256;   // bounds stage 2's serial sum and the scratch

__global__ void layer_norm_dparams_partial_kernel(float* __restrict__ part_g, float* __restrict__ part_b,
                                                  const float* __restrict__ dy, const float* __restrict__ x,
                                                  const float* __restrict__ mean, const float* __restrict__ rstd,
                                                  std::int64_t N, int C, std::int64_t chunk_rows) {
  __shared__ float sg_lanes[DP_ROW_LANES][DP_COLS];
  __shared__ float sb_lanes[DP_ROW_LANES][DP_COLS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * DP_COLS + tx;
  const std::int64_t r0 = blockIdx.y * chunk_rows;
  const std::int64_t r1 = r0 + chunk_rows < N ? r0 + chunk_rows : N;
  float sg = 0.0f, sb = 0.0f;
  if (c < C)
    for (std::int64_t r = r0 + ty; r < r1; r += DP_ROW_LANES) {
      const float d = dy[r * C + c];
      sb += d;
      sg = fmaf(d, (x[r * C + c] - mean[r]) * rstd[r], sg);
    }
  sg_lanes[ty][tx] = sg;
  sb_lanes[ty][tx] = sb;
  __syncthreads();
  if (ty != 0 || c >= C) return;
  float tg = 0.0f, tb = 0.0f;
  for (int lane = 0; lane < DP_ROW_LANES; ++lane) {
    tg += sg_lanes[lane][tx];
    tb += sb_lanes[lane][tx];
  }
  part_g[blockIdx.y * static_cast<std::int64_t>(C) + c] = tg;
  part_b[blockIdx.y * static_cast<std::int64_t>(C) + c] = tb;
}

__global__ void layer_norm_dparams_reduce_kernel(float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                 const float* __restrict__ part_g,
                                                 const float* __restrict__ part_b, int C, int chunks) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float tg = 0.0f, tb = 0.0f;
  for (int k = 0; k < chunks; ++k) {
    tg += part_g[static_cast<std::int64_t>(k) * C + c];
    tb += part_b[static_cast<std::int64_t>(k) * C + c];
  }
  dgamma[c] = tg;
  dbeta[c] = tb;
}

int dparam_chunks(std::int64_t N) {
  const std::int64_t want = (N + DP_MIN_CHUNK - 1) / DP_MIN_CHUNK;
  return static_cast<int>(want < DP_MAX_CHUNKS ? want : DP_MAX_CHUNKS);
}

cudaError_t layer_norm_dparams(float* dgamma, float* dbeta, float* scratch, const float* dy, const float* x,
                               const float* mean, const float* rstd, std::int64_t N, int C, cudaStream_t stream) {
  const int chunks = dparam_chunks(N);
  const std::int64_t chunk_rows = (N + chunks - 1) / chunks;
  float* part_g = scratch;
  float* part_b = scratch + static_cast<std::int64_t>(chunks) * C;
  const dim3 grid(static_cast<unsigned>((C + DP_COLS - 1) / DP_COLS), static_cast<unsigned>(chunks));
  layer_norm_dparams_partial_kernel<<<grid, dim3(DP_COLS, DP_ROW_LANES), 0, stream>>>(part_g, part_b, dy, x, mean,
                                                                                      rstd, N, C, chunk_rows);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  layer_norm_dparams_reduce_kernel<<<(C + THREADS - 1) / THREADS, THREADS, 0, stream>>>(dgamma, dbeta, part_g,
                                                                                        part_b, C, chunks);
  return cudaGetLastError();
}

}  // namespace

cudaError_t layer_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* gamma,
                               const float* beta, std::int64_t N, int C, float eps, cudaStream_t stream) {
  layer_norm_forward_kernel<<<row_blocks(N), THREADS, 0, stream>>>(y, mean, rstd, x, gamma, beta, N, C, eps);
  return cudaGetLastError();
}

std::int64_t layer_norm_backward_scratch(std::int64_t N, int C) {
  return 2 * static_cast<std::int64_t>(dparam_chunks(N)) * C;
}

cudaError_t layer_norm_backward(float* dx, float* dgamma, float* dbeta, float* scratch, const float* dy,
                                const float* x, const float* gamma, const float* mean, const float* rstd,
                                std::int64_t N, int C, cudaStream_t stream) {
  // Parameter gradients first: they read dy, which dx may overwrite.
  cudaError_t err = layer_norm_dparams(dgamma, dbeta, scratch, dy, x, mean, rstd, N, C, stream);
  if (err != cudaSuccess) return err;
  layer_norm_dx_kernel<<<row_blocks(N), THREADS, 0, stream>>>(dx, dy, x, gamma, mean, rstd, N, C);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pt
