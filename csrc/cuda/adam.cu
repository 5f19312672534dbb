// Fused Adam / AdamW update, one thread per element (grid-stride), the CPU kernel's arithmetic.
#include <cmath>

#include "kernels.h"

namespace pt {
namespace cuda {
namespace {

__global__ void adam_kernel(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
                            float* __restrict__ v, std::int64_t n, float beta1, float beta2, float eps,
                            float step_size, float inv_sqrt_bc2, float decay, bool decoupled) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float p = param[i], g = grad[i];
    if (decoupled)
      p *= decay;  // decay = 1 - lr * weight_decay
    else
      g = fmaf(decay, p, g);  // decay = weight_decay (L2 term in the gradient)
    const float mi = fmaf(beta1, m[i], (1.0f - beta1) * g);
    const float vi = fmaf(beta2, v[i], (1.0f - beta2) * (g * g));
    param[i] = p - step_size * mi / fmaf(sqrtf(vi), inv_sqrt_bc2, eps);
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace

cudaError_t adam_step(float* param, const float* grad, float* m, float* v, std::int64_t n, float lr,
                      float beta1, float beta2, float eps, float weight_decay, std::int64_t step, bool decoupled,
                      cudaStream_t stream) {
  // Bias corrections in double on the host, as the CPU kernel does.
  const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  const float step_size = static_cast<float>(lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float decay = decoupled ? 1.0f - lr * weight_decay : weight_decay;
  const int threads = 256;
  const std::int64_t want = (n + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 65536 ? want : 65536);
  adam_kernel<<<blocks, threads, 0, stream>>>(param, grad, m, v, n, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay,
                                              decoupled);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pt
