// The benchmark's peak-rate probe, per ISA (see fma_probe_seconds in gemm_kernels.h).
#include "core/vec.h"
#include "gemm/gemm_kernels.h"

namespace pt {
namespace PT_ISA_NS {

float fma_probe(index_t iters) {
  // 12 independent chains: enough to cover the FMA latency on two pipes.
  Vec acc[12];
  for (int j = 0; j < 12; ++j) acc[j] = Vec(1.0f + 0.01f * static_cast<float>(j));
  const Vec x(0.9999999f), y(1e-7f);
  for (index_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) acc[j] = fma(acc[j], x, y);
  }
  Vec s = acc[0];
  for (int j = 1; j < 12; ++j) s = s + acc[j];
  return s.sum();
}

}  // namespace PT_ISA_NS
}  // namespace pt
