// Per-ISA GEMM entry points (declared in gemm_kernels.h): gemm_2d picks one of the paths of
// gemm_paths.h from the shape and strides of the product, gemm_2d_prepacked runs the prepacked
// one; both first decide how many threads the product is worth.
#include "core/threading.h"
#include "gemm/epilogue.h"
#include "gemm/gemm_kernels.h"
#include "gemm/gemm_paths.h"

namespace pt {
namespace PT_ISA_NS {
namespace {

// Threads worth using: one per 256k multiply-adds (about where OpenBLAS goes parallel), so small
// products stay on one thread and never wait for a team to wake up.
int useful_threads(const GemmArgs& p) {
  const double work = static_cast<double>(p.M) * static_cast<double>(p.N) * static_cast<double>(p.K);
  const int nt = num_threads();
  const double cap = work / (1 << 18);
  return cap < 1.0 ? 1 : (cap < nt ? static_cast<int>(cap) : nt);
}

}  // namespace

void gemm_2d(const GemmArgs& p) {
  if (p.M <= 0 || p.N <= 0) return;
  if (p.K <= 0) {
    epilogue_rows(p.c, p.ldc, p.M, p.N, p.accumulate, p.bias, p.act);
    return;
  }
  const int nt = useful_threads(p);
  if (p.M <= kTinyM && p.b_cs == 1) {
    gemm_detail::gemm_tiny_m_rowmajor_b(p, nt);
  } else if (p.M <= kSmallM && (p.b_cs == 1 || (p.M > kDotM && p.b_rs == 1))) {
    gemm_detail::gemm_small_m_blocked(p, nt);
  } else if (p.M <= kSmallM && p.b_rs == 1) {
    gemm_detail::gemm_small_m_transposed_b(p, nt);
  } else if (gemm_detail::ksplit_worth(p, nt)) {
    gemm_detail::gemm_blocked_ksplit(p, nt);
  } else {
    gemm_detail::gemm_blocked(p, nt);
  }
}

void gemm_2d_prepacked(const GemmArgs& p) {
  if (p.M <= 0 || p.N <= 0) return;
#if defined(PT_ISA_AVX512)
  // Up to four rows the 12-row panels of A are mostly zeros that the kernel re-reads for every B
  // panel (twice the bytes of a 6-row panel: 0.82-0.97x of avx2 measured); avx2 gives the same bits.
  if (p.M <= kTinyM) {
    avx2::gemm_2d_prepacked(p);
    return;
  }
#endif
  if (p.K <= 0) {
    epilogue_rows(p.c, p.ldc, p.M, p.N, p.accumulate, p.bias, p.act);
    return;
  }
  gemm_detail::gemm_prepacked_b(p, useful_threads(p));
}

}  // namespace PT_ISA_NS
}  // namespace pt
