// Tiled SGEMM: each 256-thread block computes a 64x64 tile of C; A and B tiles of depth 16 are
// staged in shared memory, each thread keeps a 4x4 set of accumulators in registers.
#include <cmath>

#include "kernels.h"

namespace pt {
namespace cuda {
namespace {

constexpr int TM = 64, TN = 64, TK = 16;   // block tile of C and depth of one stage
constexpr int THREADS = 256;               // 16 x 16 threads, 4 x 4 outputs each

__device__ __forceinline__ float apply_act(float x, Activation act) {
  // As the CPU kernel (maxps(0, x)): the second operand wins unless 0 > x, so NaN and -0 pass.
  if (act == Activation::relu) return 0.0f > x ? 0.0f : x;
  if (act == Activation::gelu) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  return x;
}

// Element (row, col) of op(X) where X is stored row-major with leading dimension ld.
__device__ __forceinline__ float load_op(const float* x, bool trans, int row, int col, int ld) {
  return trans ? x[static_cast<std::int64_t>(col) * ld + row] : x[static_cast<std::int64_t>(row) * ld + col];
}

__device__ __forceinline__ void write_out(float* c, const float* bias, int N, int row, int col, float acc,
                                          bool accumulate, Activation act) {
  const std::int64_t idx = static_cast<std::int64_t>(row) * N + col;
  float v = acc;
  if (accumulate) v += c[idx];
  if (bias) v += bias[col];
  c[idx] = apply_act(v, act);
}

__global__ void sgemm_tiled_kernel(float* __restrict__ c, const float* __restrict__ a, const float* __restrict__ b,
                                   const float* __restrict__ bias, int batch, int M, int N, int K,
                                   std::int64_t stride_a, std::int64_t stride_b, bool trans_a, bool trans_b,
                                   bool accumulate, Activation act) {
  // As[k][m] and Bs[k][n]; the +1 padding keeps the transposing stores free of bank conflicts.
  __shared__ float As[TK][TM + 1];
  __shared__ float Bs[TK][TN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int row0 = blockIdx.y * TM, col0 = blockIdx.x * TN;
  const int lda = trans_a ? M : K, ldb = trans_b ? K : N;
  for (int z = blockIdx.z; z < batch; z += gridDim.z) {
    const float* az = a + z * stride_a;
    const float* bz = b + z * stride_b;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += TK) {
      // Each thread loads 4 of the 64x16 elements of each tile; the mapping makes consecutive
      // threads read consecutive addresses of the stored (possibly transposed) matrix.
      for (int r = 0; r < 4; ++r) {
        const int l = threadIdx.x + r * THREADS;
        const int am = trans_a ? l % TM : l / TK, ak = trans_a ? l / TM : l % TK;
        const int gm = row0 + am, gk = k0 + ak;
        As[ak][am] = (gm < M && gk < K) ? load_op(az, trans_a, gm, gk, lda) : 0.0f;
        const int bn = trans_b ? l / TK : l % TN, bk = trans_b ? l % TK : l / TN;
        const int gn = col0 + bn, gkb = k0 + bk;
        Bs[bk][bn] = (gn < N && gkb < K) ? load_op(bz, trans_b, gkb, gn, ldb) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < TK; ++kk) {
        float ra[4], rb[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ra[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) rb[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
      }
      __syncthreads();
    }
    float* cz = c + z * static_cast<std::int64_t>(M) * N;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int row = row0 + ty + 16 * i, col = col0 + tx + 16 * j;
        if (row < M && col < N) write_out(cz, bias, N, row, col, acc[i][j], accumulate, act);
      }
  }
}

__global__ void sgemm_naive_kernel(float* c, const float* a, const float* b, const float* bias, int batch, int M,
                                   int N, int K, std::int64_t stride_a, std::int64_t stride_b, bool trans_a,
                                   bool trans_b, bool accumulate, Activation act) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y * blockDim.y + threadIdx.y;
  if (row >= M || col >= N) return;
  const int lda = trans_a ? M : K, ldb = trans_b ? K : N;
  for (int z = blockIdx.z; z < batch; z += gridDim.z) {
    float acc = 0.0f;
    for (int k = 0; k < K; ++k)
      acc = fmaf(load_op(a + z * stride_a, trans_a, row, k, lda), load_op(b + z * stride_b, trans_b, k, col, ldb),
                 acc);
    write_out(c + z * static_cast<std::int64_t>(M) * N, bias, N, row, col, acc, accumulate, act);
  }
}

unsigned batch_blocks(int batch) { return static_cast<unsigned>(batch < 65535 ? batch : 65535); }

}  // namespace

cudaError_t sgemm_forward(float* c, const float* a, const float* b, const float* bias, int batch, int M, int N,
                          int K, std::int64_t stride_a, std::int64_t stride_b, bool trans_a, bool trans_b,
                          bool accumulate, Activation act, cudaStream_t stream) {
  const dim3 grid((N + TN - 1) / TN, (M + TM - 1) / TM, batch_blocks(batch));
  sgemm_tiled_kernel<<<grid, THREADS, 0, stream>>>(c, a, b, bias, batch, M, N, K, stride_a, stride_b, trans_a,
                                                   trans_b, accumulate, act);
  return cudaGetLastError();
}

cudaError_t sgemm_forward_naive(float* c, const float* a, const float* b, const float* bias, int batch, int M,
                                int N, int K, std::int64_t stride_a, std::int64_t stride_b, bool trans_a,
                                bool trans_b, bool accumulate, Activation act, cudaStream_t stream) {
  const dim3 block(16, 16);
  const dim3 grid((N + 15) / 16, (M + 15) / 16, batch_blocks(batch));
  sgemm_naive_kernel<<<grid, block, 0, stream>>>(c, a, b, bias, batch, M, N, K, stride_a, stride_b, trans_a,
                                                 trans_b, accumulate, act);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pt
