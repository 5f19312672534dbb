// Flash-style masked attention. Forward and dq: one warp per query row, 4 rows per block sharing
// 32-key tiles of K and V in shared memory, online softmax over the tiles (never an Lq x Lk
// matrix). dk/dv: one warp per key row, 4 keys per block sharing 32-query tiles of Q and dout.
// Lane j of a warp owns key (or query) j of the current tile for the scores, and head dimensions
// d = lane + 32 t for the accumulators, so no reduction ever crosses threads non-deterministically.
#include <cmath>

#include "kernels.h"
#include "reduce.cuh"

namespace pt {
namespace cuda {
namespace {

constexpr int WARPS = 4;                       // rows per block
constexpr int TILE = 32;                       // keys (or queries) per shared-memory tile
constexpr int DPL = kAttnMaxD / 32;            // accumulators per lane
constexpr int PAD = kAttnMaxD + 1;             // row pitch of the tiles (lane j reads row j: no bank conflicts)

__device__ __forceinline__ const float* at(const AttnView& t, int b, std::int64_t l, int h) {
  return t.p + b * t.sb + l * t.sl + h * t.sh;
}

__device__ __forceinline__ int key_length(const AttnShape& s, int b) {
  if (!s.key_lengths) return s.Lk;
  const int n = s.key_lengths[b];
  return n < 0 ? 0 : (n > s.Lk ? s.Lk : n);
}

// Keys [0, end) are visible to query i: end = min(key length, query_offset + i + 1 when causal).
__device__ __forceinline__ std::int64_t visible_end(const AttnShape& s, int klen, std::int64_t i) {
  if (!s.causal) return klen;
  const std::int64_t e = s.query_offset + i + 1;
  return e < klen ? e : klen;
}

// Copies rows [r0, r0 + TILE) of a strided (B, L, H, D) tensor into tile[TILE][PAD]; rows at or
// past `end` are zero. All threads of the block take part.
__device__ void load_tile(float (*tile)[PAD], const AttnView& t, int b, int h, std::int64_t r0, std::int64_t end,
                          int D) {
  for (int e = threadIdx.x; e < TILE * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    tile[r][d] = r0 + r < end ? at(t, b, r0 + r, h)[d * t.sd] : 0.0f;
  }
}

__device__ __forceinline__ float dot_shared(const float* x, const float* y, int D) {
  float acc = 0.0f;
  for (int d = 0; d < D; ++d) acc = fmaf(x[d], y[d], acc);
  return acc;
}

__global__ void attention_forward_kernel(float* __restrict__ out, float* __restrict__ lse, AttnView q, AttnView k,
                                         AttnView v, AttnShape s) {
  __shared__ float Ks[TILE][PAD];
  __shared__ float Vs[TILE][PAD];
  __shared__ float Qs[WARPS][kAttnMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y, D = s.D;
  const std::int64_t i_first = static_cast<std::int64_t>(blockIdx.x) * WARPS;
  const std::int64_t i = i_first + warp;
  const bool active = i < s.Lq;
  const std::int64_t i_last = i_first + WARPS - 1 < s.Lq ? i_first + WARPS - 1 : s.Lq - 1;
  const int klen = key_length(s, b);
  const std::int64_t block_end = visible_end(s, klen, i_last);  // the same for every thread of the block
  const std::int64_t end = visible_end(s, klen, i);
  if (active)
    for (int d = lane; d < D; d += 32) Qs[warp][d] = at(q, b, i, h)[d * q.sd];
  float m = -INFINITY, l = 0.0f, acc[DPL] = {};
  for (std::int64_t j0 = 0; j0 < block_end; j0 += TILE) {
    __syncthreads();  // the previous tile is consumed (and Qs written before the first)
    load_tile(Ks, k, b, h, j0, block_end, D);
    load_tile(Vs, v, b, h, j0, block_end, D);
    __syncthreads();
    if (!active) continue;
    const std::int64_t j = j0 + lane;
    const float sc = j < end ? s.scale * dot_shared(Qs[warp], Ks[lane], D) : -INFINITY;
    const float tile_max = warp_max(sc);
    if (tile_max == -INFINITY) continue;  // nothing visible in this tile for this query (warp-uniform)
    const float m_new = fmaxf(m, tile_max);
    const float corr = expf(m - m_new);  // 0 while m is still -inf
    const float p = sc == -INFINITY ? 0.0f : expf(sc - m_new);
    l = l * corr + warp_sum(p);
    for (int t = 0; t < DPL; ++t) acc[t] *= corr;
    for (int jj = 0; jj < TILE; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, p, jj);
      for (int t = 0; t < DPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) acc[t] = fmaf(pj, Vs[jj][d], acc[t]);
      }
    }
    m = m_new;
  }
  if (!active) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  float* o = out + ((static_cast<std::int64_t>(b) * s.Lq + i) * s.H + h) * D;
  for (int t = 0; t < DPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) o[d] = acc[t] * inv;
  }
  if (lse && lane == 0)
    lse[(static_cast<std::int64_t>(b) * s.H + h) * s.Lq + i] = l > 0.0f ? m + logf(l) : -INFINITY;
}

// delta[b,h,i] = sum_d dout[b,i,h,d] * out[b,i,h,d], one warp per row.
__global__ void attention_delta_kernel(float* __restrict__ delta, const float* __restrict__ dout,
                                       const float* __restrict__ out, AttnShape s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y;
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * WARPS + warp;
  if (i >= s.Lq) return;
  const std::int64_t base = ((static_cast<std::int64_t>(b) * s.Lq + i) * s.H + h) * s.D;
  float acc = 0.0f;
  for (int d = lane; d < s.D; d += 32) acc = fmaf(dout[base + d], out[base + d], acc);
  acc = warp_sum(acc);
  if (lane == 0) delta[(static_cast<std::int64_t>(b) * s.H + h) * s.Lq + i] = acc;
}

// dq_i = scale * sum_j P_ij (dP_ij - delta_i) k_j with P_ij = exp(scale q_i.k_j - lse_i), dP_ij = dout_i.v_j.
__global__ void attention_dq_kernel(float* __restrict__ dq, const float* __restrict__ dout,
                                    const float* __restrict__ lse, const float* __restrict__ delta, AttnView q,
                                    AttnView k, AttnView v, AttnShape s) {
  __shared__ float Ks[TILE][PAD];
  __shared__ float Vs[TILE][PAD];
  __shared__ float Qs[WARPS][kAttnMaxD];
  __shared__ float DOs[WARPS][kAttnMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y, D = s.D;
  const std::int64_t i_first = static_cast<std::int64_t>(blockIdx.x) * WARPS;
  const std::int64_t i = i_first + warp;
  const bool active = i < s.Lq;
  const std::int64_t i_last = i_first + WARPS - 1 < s.Lq ? i_first + WARPS - 1 : s.Lq - 1;
  const int klen = key_length(s, b);
  const std::int64_t block_end = visible_end(s, klen, i_last);
  const std::int64_t end = visible_end(s, klen, i);
  const std::int64_t row = ((static_cast<std::int64_t>(b) * s.Lq + i) * s.H + h) * D;
  const std::int64_t stat = (static_cast<std::int64_t>(b) * s.H + h) * s.Lq + i;
  float row_lse = 0.0f, row_delta = 0.0f;
  if (active) {
    for (int d = lane; d < D; d += 32) {
      Qs[warp][d] = at(q, b, i, h)[d * q.sd];
      DOs[warp][d] = dout[row + d];
    }
    row_lse = lse[stat];
    row_delta = delta[stat];
  }
  float acc[DPL] = {};
  for (std::int64_t j0 = 0; j0 < block_end; j0 += TILE) {
    __syncthreads();
    load_tile(Ks, k, b, h, j0, block_end, D);
    load_tile(Vs, v, b, h, j0, block_end, D);
    __syncthreads();
    if (!active) continue;
    const std::int64_t j = j0 + lane;
    float ds = 0.0f;
    if (j < end) {
      const float p = expf(s.scale * dot_shared(Qs[warp], Ks[lane], D) - row_lse);
      ds = p * (dot_shared(DOs[warp], Vs[lane], D) - row_delta);
    }
    for (int jj = 0; jj < TILE; ++jj) {
      const float dsj = __shfl_sync(0xffffffffu, ds, jj);
      for (int t = 0; t < DPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) acc[t] = fmaf(dsj, Ks[jj][d], acc[t]);
      }
    }
  }
  if (!active) return;
  for (int t = 0; t < DPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) dq[row + d] = acc[t] * s.scale;
  }
}

// dk_j = scale * sum_i dS_ij q_i, dv_j = sum_i P_ij dout_i: one warp per key, queries in tiles.
__global__ void attention_dkv_kernel(float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout,
                                     const float* __restrict__ lse, const float* __restrict__ delta, AttnView q,
                                     AttnView k, AttnView v, AttnShape s) {
  __shared__ float Qs[TILE][PAD];
  __shared__ float DOs[TILE][PAD];
  __shared__ float Ks[WARPS][kAttnMaxD];
  __shared__ float Vs[WARPS][kAttnMaxD];
  __shared__ float lse_s[TILE];
  __shared__ float delta_s[TILE];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y, D = s.D;
  const std::int64_t j_first = static_cast<std::int64_t>(blockIdx.x) * WARPS;
  const std::int64_t j = j_first + warp;
  const int klen = key_length(s, b);
  const bool in_range = j < s.Lk;
  const bool active = j < klen;  // keys past the length get zero gradients
  // Queries that may see a key of this block: all, or from j_first - query_offset on when causal.
  std::int64_t i_start = 0;
  if (s.causal && j_first - s.query_offset > 0) i_start = j_first - s.query_offset;
  if (j_first >= klen) i_start = s.Lq;  // no key of this block is visible to anyone
  if (active)
    for (int d = lane; d < D; d += 32) {
      Ks[warp][d] = at(k, b, j, h)[d * k.sd];
      Vs[warp][d] = at(v, b, j, h)[d * v.sd];
    }
  const AttnView dout_view{dout, static_cast<std::int64_t>(s.Lq) * s.H * D, static_cast<std::int64_t>(s.H) * D, D, 1};
  const std::int64_t stat0 = (static_cast<std::int64_t>(b) * s.H + h) * s.Lq;
  float dk_acc[DPL] = {}, dv_acc[DPL] = {};
  for (std::int64_t i0 = i_start; i0 < s.Lq; i0 += TILE) {
    __syncthreads();
    load_tile(Qs, q, b, h, i0, s.Lq, D);
    load_tile(DOs, dout_view, b, h, i0, s.Lq, D);
    if (threadIdx.x < TILE) {
      const std::int64_t ii = i0 + threadIdx.x;
      lse_s[threadIdx.x] = ii < s.Lq ? lse[stat0 + ii] : 0.0f;
      delta_s[threadIdx.x] = ii < s.Lq ? delta[stat0 + ii] : 0.0f;
    }
    __syncthreads();
    if (!active) continue;
    const std::int64_t i = i0 + lane;
    const bool visible = i < s.Lq && (!s.causal || j <= s.query_offset + i);
    float p = 0.0f, ds = 0.0f;
    if (visible) {
      p = expf(s.scale * dot_shared(Qs[lane], Ks[warp], D) - lse_s[lane]);
      ds = p * (dot_shared(DOs[lane], Vs[warp], D) - delta_s[lane]);
    }
    for (int ii = 0; ii < TILE; ++ii) {
      const float pi = __shfl_sync(0xffffffffu, p, ii);
      const float dsi = __shfl_sync(0xffffffffu, ds, ii);
      for (int t = 0; t < DPL; ++t) {
        const int d = lane + 32 * t;
        if (d < D) {
          dv_acc[t] = fmaf(pi, DOs[ii][d], dv_acc[t]);
          dk_acc[t] = fmaf(dsi, Qs[ii][d], dk_acc[t]);
        }
      }
    }
  }
  if (!in_range) return;
  const std::int64_t row = ((static_cast<std::int64_t>(b) * s.Lk + j) * s.H + h) * D;
  for (int t = 0; t < DPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) {
      dk[row + d] = dk_acc[t] * s.scale;
      dv[row + d] = dv_acc[t];
    }
  }
}

dim3 rows_grid(int L, const AttnShape& s) {
  return dim3(static_cast<unsigned>((L + WARPS - 1) / WARPS), static_cast<unsigned>(s.H), static_cast<unsigned>(s.B));
}

}  // namespace

cudaError_t attention_forward(float* out, float* lse, AttnView q, AttnView k, AttnView v, AttnShape s,
                              cudaStream_t stream) {
  attention_forward_kernel<<<rows_grid(s.Lq, s), WARPS * 32, 0, stream>>>(out, lse, q, k, v, s);
  return cudaGetLastError();
}

cudaError_t attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                               const float* out, const float* lse, AttnView q, AttnView k, AttnView v,
                               AttnShape s, cudaStream_t stream) {
  attention_delta_kernel<<<rows_grid(s.Lq, s), WARPS * 32, 0, stream>>>(scratch, dout, out, s);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  attention_dq_kernel<<<rows_grid(s.Lq, s), WARPS * 32, 0, stream>>>(dq, dout, lse, scratch, q, k, v, s);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  attention_dkv_kernel<<<rows_grid(s.Lk, s), WARPS * 32, 0, stream>>>(dk, dv, dout, lse, scratch, q, k, v, s);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pt
