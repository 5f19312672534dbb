// Block-wide sums in a fixed order (deterministic for a given block size).
#pragma once

namespace pt {
namespace cuda {

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Sum of x over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `buf` is 32 floats of shared memory; the call contains __syncthreads, so every thread must reach it.
__device__ __forceinline__ float block_sum(float x, float* buf) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = x;
  __syncthreads();
  float t = lane < nwarps ? buf[lane] : 0.0f;
  return warp_sum(t);
}
__device__ __forceinline__ float block_max(float x, float* buf) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) buf[warp] = x;
  __syncthreads();
  float t = lane < nwarps ? buf[lane] : -INFINITY;
  return warp_max(t);
}

}  // namespace cuda
}  // namespace pt
