// Elementwise training kernels: GELU and ReLU backward, GELU forward, dropout.
// All arrays are contiguous with n elements; work is split into fixed blocks over threads and
// every element is computed on its own, so results do not depend on the thread count.
#pragma once

#include "common.h"

namespace pt {

// out = gelu(inp) (exact erf form); out may alias inp.
void gelu_forward(float* out, const float* inp, index_t n);
// dinp = dout * gelu'(inp), inp the pre-activation; dinp may alias dout.
void gelu_backward(float* dinp, const float* dout, const float* inp, index_t n);
// out = swish(inp) = inp * sigmoid(inp) (SiLU); out may alias inp.
void swish_forward(float* out, const float* inp, index_t n);
// dinp = dout * swish'(inp), inp the pre-activation; dinp may alias dout.
void swish_backward(float* dinp, const float* dout, const float* inp, index_t n);
// dinp = dout where out > 0 else 0, out the ReLU output; dinp may alias dout.
void relu_backward(float* dinp, const float* dout, const float* out, index_t n);

// Dropout mask from a counter-based hash: element i is kept when
//   dropout_hash(seed, offset + i) >> 8  >=  threshold,  threshold = round(p * 2^24)
// (24-bit uniform), and a kept element is multiplied by 1 / (1 - p); the others become 0.
// The mask depends only on (seed, offset + i): same for any thread count and ISA.
// out = mask(inp); out may alias inp. Forward and backward are the same operation.
void dropout_forward(float* out, const float* inp, index_t n, float p, std::uint64_t seed, std::uint64_t offset);
std::uint32_t dropout_threshold(float p);
// The 32-bit hash of counter i under a key derived from seed (splitmix64), two murmur3 mixes.
struct DropoutKey {
  std::uint32_t k0, k1;
};
DropoutKey dropout_key(std::uint64_t seed);
inline std::uint32_t fmix32(std::uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}
inline std::uint32_t dropout_hash(DropoutKey key, std::uint64_t i) {
  const std::uint32_t lo = static_cast<std::uint32_t>(i), hi = static_cast<std::uint32_t>(i >> 32);
  return fmix32(fmix32(lo ^ key.k0) + (hi ^ key.k1));
}

// Naive siblings (scalar): fallback and test oracle.
void gelu_forward_naive(float* out, const float* inp, index_t n);
void gelu_backward_naive(float* dinp, const float* dout, const float* inp, index_t n);
void swish_forward_naive(float* out, const float* inp, index_t n);
void swish_backward_naive(float* dinp, const float* dout, const float* inp, index_t n);
void dropout_forward_naive(float* out, const float* inp, index_t n, float p, std::uint64_t seed,
                           std::uint64_t offset);

// Per-ISA bodies (elementwise_isa.cc) over [i0, i1).
#define PT_ELEMENTWISE_ISA_DECLS                                                                  \
  void gelu_forward_range(float* out, const float* inp, index_t i0, index_t i1);                  \
  void gelu_backward_range(float* dinp, const float* dout, const float* inp, index_t i0, index_t i1); \
  void relu_backward_range(float* dinp, const float* dout, const float* out, index_t i0, index_t i1); \
  void swish_forward_range(float* out, const float* inp, index_t i0, index_t i1);                 \
  void swish_backward_range(float* dinp, const float* dout, const float* inp, index_t i0, index_t i1); \
  void dropout_range(float* out, const float* inp, index_t i0, index_t i1, std::uint32_t threshold,  \
                     float scale, DropoutKey key, std::uint64_t offset);
namespace generic {
PT_ELEMENTWISE_ISA_DECLS
}
namespace avx2 {
PT_ELEMENTWISE_ISA_DECLS
}
#undef PT_ELEMENTWISE_ISA_DECLS

}  // namespace pt
