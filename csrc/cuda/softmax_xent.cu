// Softmax cross-entropy with label smoothing and ignore_index, loss and dlogits in one pass over
// each row (one block per row). Three steps: count the kept rows (and find a bad target), per-row
// loss and gradient, then the mean loss summed in a fixed order (double) by one block.
#include <cmath>

#include "kernels.h"
#include "reduce.cuh"

namespace pt {
namespace cuda {
namespace {

constexpr int THREADS = 256;

// stats[0] = rows whose target is not ignore_index, stats[1] = first row whose target is outside
// [0, V) (or -1). One block; per-thread partials combined by thread 0 in thread order.
template <typename T>
__global__ void xent_check_kernel(std::int64_t* stats, const T* targets, std::int64_t N, int V,
                                  std::int64_t ignore_index) {
  __shared__ std::int64_t kept[THREADS];
  __shared__ std::int64_t bad[THREADS];
  std::int64_t n = 0, first_bad = -1;
  for (std::int64_t r = threadIdx.x; r < N; r += THREADS) {
    const std::int64_t t = static_cast<std::int64_t>(targets[r]);
    if (t == ignore_index) continue;
    ++n;
    if ((t < 0 || t >= V) && first_bad < 0) first_bad = r;  // rows are visited in increasing order
  }
  kept[threadIdx.x] = n;
  bad[threadIdx.x] = first_bad;
  __syncthreads();
  if (threadIdx.x != 0) return;
  std::int64_t total = 0, worst = -1;
  for (int t = 0; t < THREADS; ++t) {
    total += kept[t];
    if (bad[t] >= 0 && (worst < 0 || bad[t] < worst)) worst = bad[t];
  }
  stats[0] = total;
  stats[1] = worst;
}

// One block per row; dlogits may alias logits: every read of the row (including the target's
// logit) happens before the last block reduction, every write after it.
template <typename T>
__global__ void xent_row_kernel(float* dlogits, float* __restrict__ row_loss, const float* logits,
                                const T* __restrict__ targets, const std::int64_t* __restrict__ stats,
                                std::int64_t N, int V, float eps, std::int64_t ignore_index) {
  __shared__ float buf[32];
  const float inv_kept = stats[0] > 0 ? 1.0f / static_cast<float>(stats[0]) : 0.0f;
  for (std::int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const float* x = logits + r * V;
    float* dx = dlogits + r * V;
    const std::int64_t t = static_cast<std::int64_t>(targets[r]);
    if (t == ignore_index) {
      for (int c = threadIdx.x; c < V; c += blockDim.x) dx[c] = 0.0f;
      if (threadIdx.x == 0) row_loss[r] = 0.0f;
      continue;
    }
    const float xt = x[t];
    float mx = -INFINITY, sx = 0.0f;
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
      mx = fmaxf(mx, x[c]);
      sx += x[c];
    }
    mx = block_max(mx, buf);
    const float sum_x = block_sum(sx, buf);
    float se = 0.0f;
    for (int c = threadIdx.x; c < V; c += blockDim.x) se += expf(x[c] - mx);
    const float lse = mx + logf(block_sum(se, buf));
    const float smooth = eps / V;
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
      const float p = expf(x[c] - lse);
      dx[c] = (p - smooth - (c == t ? 1.0f - eps : 0.0f)) * inv_kept;
    }
    if (threadIdx.x == 0) row_loss[r] = (1.0f - eps) * (lse - xt) + eps * (lse - sum_x / V);
  }
}

// loss = sum(row_loss) / kept, in double, fixed order.
__global__ void xent_mean_kernel(float* loss, const float* row_loss, const std::int64_t* stats, std::int64_t N) {
  __shared__ double part[THREADS];
  double acc = 0.0;
  for (std::int64_t r = threadIdx.x; r < N; r += THREADS) acc += row_loss[r];
  part[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double total = 0.0;
  for (int t = 0; t < THREADS; ++t) total += part[t];
  *loss = stats[0] > 0 ? static_cast<float>(total / static_cast<double>(stats[0])) : 0.0f;
}

template <typename T>
cudaError_t run(float* loss, std::int64_t* bad_row, float* dlogits, float* row_loss, std::int64_t* stats,
                const float* logits, const T* targets, std::int64_t N, int V, float eps, std::int64_t ignore_index,
                cudaStream_t stream) {
  xent_check_kernel<T><<<1, THREADS, 0, stream>>>(stats, targets, N, V, ignore_index);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  std::int64_t host_stats[2] = {0, -1};
  err = cudaMemcpyAsync(host_stats, stats, sizeof(host_stats), cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return err;
  *bad_row = host_stats[1];
  if (host_stats[1] >= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(N < (1 << 20) ? N : (1 << 20));
  xent_row_kernel<T><<<blocks, THREADS, 0, stream>>>(dlogits, row_loss, logits, targets, stats, N, V, eps,
                                                     ignore_index);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // The mean lands in row_loss[0]: one block, every read of row_loss precedes its barrier.
  xent_mean_kernel<<<1, THREADS, 0, stream>>>(row_loss, row_loss, stats, N);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = cudaMemcpyAsync(loss, row_loss, sizeof(float), cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  return err;
}

}  // namespace

cudaError_t softmax_xent_forward_backward(float* loss, std::int64_t* bad_row, float* dlogits, float* row_loss,
                                          std::int64_t* stats, const float* logits, const void* targets, bool is64,
                                          std::int64_t N, int V, float label_smoothing,
                                          std::int64_t ignore_index, cudaStream_t stream) {
  if (is64)
    return run(loss, bad_row, dlogits, row_loss, stats, logits, static_cast<const std::int64_t*>(targets), N, V,
               label_smoothing, ignore_index, stream);
  return run(loss, bad_row, dlogits, row_loss, stats, logits, static_cast<const std::int32_t*>(targets), N, V,
             label_smoothing, ignore_index, stream);
}

}  // namespace cuda
}  // namespace pt
