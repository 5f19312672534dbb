// GEMM with B packed ahead of time, per ISA: pack_weight writes the panels and gemm_prepacked_b
// multiplies by them.
#include "core/threading.h"
#include "gemm/blocking.h"
#include "gemm/gemm_paths.h"
#include "gemm/pack.h"
#include "gemm/ukernel.h"

namespace pt {
namespace PT_ISA_NS {

// The panels gemm_prepacked_b reads: pack_b of W^T, panel ranges split between threads.
void pack_weight(float* dst, const float* w, index_t ldw, index_t N, index_t K) {
  const index_t panels = (N + NR - 1) / NR;
  const int nt = N * K >= (1 << 20) ? num_threads() : 1;
  run_team(nt, [&](int t, int team) {
    const index_t q0 = panels * t / team, q1 = panels * (t + 1) / team;
    if (q1 > q0) pack_b(dst + q0 * K * NR, w + q0 * NR * ldw, 1, ldw, K, min_i(N, q1 * NR) - q0 * NR);
  });
}

namespace gemm_detail {

// ---------------------------------------------------------------------------------------------
// B packed ahead of time (pack_weight): ceil(N / NR) panels of K x NR, so the K slice of panel q
// that the micro-kernel reads is packed + q * K * NR + pc * NR with row stride NR. Only A is
// packed here, once per MC-row block; the team splits B's panels, so each thread streams its
// share of B once per row block while A's block stays in L2. Partial sums go to C in KC order,
// as in gemm_blocked and gemm_small_m_blocked: the same M gives the same bits as those paths.
void gemm_prepacked_b(const GemmArgs& p, int nt) {
  const index_t M = p.M, N = p.N, K = p.K;
  const index_t panels = (N + NR - 1) / NR;
  index_t start[kMC / MR];
  int height[kMC / MR];
  float* abuf = thread_scratch(static_cast<size_t>(min_i(round_up(M, MR), kMC) * K));
  for (index_t ic = 0; ic < M; ic += kMC) {
    const index_t mc = min_i(kMC, M - ic);
    const int np = small_m_panels(mc, start, height);
    for (int i = 0; i < np; ++i)
      pack_a(abuf + i * MR * K, p.a + (ic + start[i]) * p.a_rs, p.a_rs, p.a_cs, height[i], K);
    run_team(nt, [&](int t, int team) {
      const index_t q1 = panels * (t + 1) / team;
      for (index_t q = panels * t / team; q < q1; ++q) {
        const int cols = static_cast<int>(min_i(NR, N - q * NR));
        // Panels lie one after another, so the hardware prefetchers stream B (software
        // prefetching of the next panel was measured slower: it evicts the working set).
        const float* bq = p.b + q * K * NR;
        for (index_t pc = 0; pc < K; pc += kKC) {
          const index_t kc = min_i(kKC, K - pc);
          const bool last = pc + kc == K;
          Epilogue ep;
          ep.load_c = p.accumulate || pc > 0;
          ep.bias = last && p.bias ? p.bias + q * NR : nullptr;
          ep.act = last ? p.act : Activation::none;
          for (int i = 0; i < np; ++i)
            run_tile(height[i], kc, abuf + i * MR * K + pc * MR, bq + pc * NR, NR,
                     p.c + (ic + start[i]) * p.ldc + q * NR, p.ldc, cols, ep);
        }
      }
    });
  }
}

}  // namespace gemm_detail
}  // namespace PT_ISA_NS
}  // namespace pt
