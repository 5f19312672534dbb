// GEMM op logic: batch handling and ISA dispatch. The per-ISA kernels start at gemm_isa.cc.
#include "gemm/gemm.h"

#include <chrono>
#include <cmath>

#include "core/isa.h"
#include "gemm/gemm_kernels.h"

namespace pt {

namespace {

// PT_DISPATCH, plus the float GEMM's AVX-512 kernel for the avx512 level and above.
#if defined(PT_HAVE_AVX512)
#define GEMM_DISPATCH(sym) \
  (::pt::selected_isa() >= ::pt::Isa::avx512 ? ::pt::avx512::sym : PT_DISPATCH(sym))
#else
#define GEMM_DISPATCH(sym) PT_DISPATCH(sym)
#endif

// Runs kernel(one 2-D product) for each batch item of args. A batch of row blocks that share B
// and lie evenly spaced in A and C is one taller product (the (batch, M, K) @ (K, N) of a Linear
// layer): fewer, larger blocks and one thread team.
template <class Kernel>
void for_each_item(const GemmArgs& args, Kernel kernel) {
  if (args.batch <= 0 || args.M <= 0 || args.N <= 0) return;
  GemmArgs one = args;
  one.batch = 1;
  if (args.batch > 1 && args.b_bs == 0 && args.a_bs == args.M * args.a_rs && args.c_bs == args.M * args.ldc) {
    one.M = args.M * args.batch;
    kernel(one);
    return;
  }
  for (index_t t = 0; t < args.batch; ++t) {
    one.a = args.a + t * args.a_bs;
    one.b = args.b + t * args.b_bs;
    one.c = args.c + t * args.c_bs;
    kernel(one);
  }
}

}  // namespace

void gemm_forward(const GemmArgs& args) { for_each_item(args, GEMM_DISPATCH(gemm_2d)); }

index_t packed_weight_size(index_t N, index_t K) { return (N + kNR - 1) / kNR * kNR * K; }

void pack_weight(float* dst, const float* w, index_t ldw, index_t N, index_t K) {
  if (N > 0 && K > 0) GEMM_DISPATCH(pack_weight)(dst, w, ldw, N, K);
}

void gemm_forward_prepacked(const GemmArgs& args) {
  GemmArgs shared = args;
  shared.b_bs = 0;  // every item reads the one packed W
  for_each_item(shared, GEMM_DISPATCH(gemm_2d_prepacked));
}

double fma_probe_seconds(index_t iters) {
  const auto t0 = std::chrono::steady_clock::now();
  volatile float sink = GEMM_DISPATCH(fma_probe)(iters);
  (void)sink;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

static float activate_scalar(float x, Activation act) {
  switch (act) {
    case Activation::relu:
      return x > 0.0f || std::isnan(x) ? x : 0.0f;
    case Activation::gelu:
      return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    default:
      return x;
  }
}

void gemm_forward_naive(const GemmArgs& p) {
  for (index_t t = 0; t < p.batch; ++t) {
    const float* a = p.a + t * p.a_bs;
    const float* b = p.b + t * p.b_bs;
    float* c = p.c + t * p.c_bs;
    for (index_t m = 0; m < p.M; ++m) {
      for (index_t n = 0; n < p.N; ++n) {
        float s = p.accumulate ? c[m * p.ldc + n] : 0.0f;
        for (index_t k = 0; k < p.K; ++k) s += a[m * p.a_rs + k * p.a_cs] * b[k * p.b_rs + n * p.b_cs];
        if (p.bias) s += p.bias[n];
        c[m * p.ldc + n] = activate_scalar(s, p.act);
      }
    }
  }
}

}  // namespace pt
