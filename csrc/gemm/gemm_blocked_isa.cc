// The general GEMM path (any M above the small-M paths, any strides), per ISA: BLIS blocking.
//
//   for each NC-wide column block jc of C:
//     for each KC-deep slice pc of K:
//       pack_b   KC x NC of op(B) into NR-wide panels (shared by the thread team; each thread
//                packs a share, then team_barrier)
//       for each MC-tall row block ic of the thread's rows:
//         pack_a   MC x KC of op(A) into MR-tall panels (thread-local)
//         for each B panel q, for each A panel ir: run_tile (the MR x NR micro-kernel)
//
// Partial sums go to C in K-block order and each C tile belongs to one thread, so the bits of C
// do not depend on the thread count.
#include "core/threading.h"
#include "gemm/blocking.h"
#include "gemm/gemm_paths.h"
#include "gemm/pack.h"
#include "gemm/ukernel.h"

namespace pt {
namespace PT_ISA_NS {
namespace gemm_detail {

// The general path: pack both operands.
void gemm_blocked(const GemmArgs& p, int nt) {
  const index_t M = p.M, N = p.N, K = p.K;
  const index_t kc_max = min_i(K, kKC), nc_max = min_i(round_up(N, NR), kNC);
  const index_t b_size = kc_max * nc_max, a_size = kMC * kc_max;
  float* buf = thread_scratch(static_cast<size_t>(b_size + nt * a_size));
  const index_t m_units = (M + MR - 1) / MR;
  run_team(nt, [&](int t, int team) {
    // Split rows between threads when each gets several MC-ish blocks' worth, else columns.
    const bool split_m = m_units >= 4 * team;
    const int tm = split_m ? team : 1, tn = split_m ? 1 : team;
    const int it = split_m ? t : 0, jt = split_m ? 0 : t;
    const index_t m0 = min_i(M, m_units * it / tm * MR), m1 = min_i(M, m_units * (it + 1) / tm * MR);
    float* bbuf = buf;
    float* abuf = buf + b_size + t * a_size;
    for (index_t jc = 0; jc < N; jc += kNC) {
      const index_t nc = min_i(kNC, N - jc), panels = (nc + NR - 1) / NR;
      const index_t q0 = panels * jt / tn, q1 = panels * (jt + 1) / tn;
      for (index_t pc = 0; pc < K; pc += kKC) {
        const index_t kc = min_i(kKC, K - pc);
        const bool last = pc + kc == K;
        // Every thread packs its share of B's panels; all of them use all of B.
        const index_t s0 = panels * t / team, s1 = panels * (t + 1) / team;
        if (s1 > s0)
          pack_b(bbuf + s0 * kc * NR, p.b + pc * p.b_rs + (jc + s0 * NR) * p.b_cs, p.b_rs, p.b_cs, kc,
                 min_i(nc, s1 * NR) - s0 * NR);
        team_barrier(team);
        for (index_t ic = m0; ic < m1; ic += kMC) {
          const index_t mc = min_i(kMC, m1 - ic);
          pack_a(abuf, p.a + ic * p.a_rs + pc * p.a_cs, p.a_rs, p.a_cs, mc, kc);
          // The A block this thread packs next (same K slice, else the next one) is prefetched a
          // slice per B panel over the last quarter of the panels: packing A from memory would
          // otherwise stall on every row, and an earlier prefetch is evicted from L2 by the B
          // panels streaming through.
          index_t next_ic = ic + kMC, next_pc = pc;
          if (next_ic >= m1) next_ic = m0, next_pc = pc + kc < K ? pc + kc : (jc + kNC < N ? 0 : K);
          const index_t next_mc = min_i(kMC, m1 - next_ic), next_kc = min_i(kKC, K - next_pc);
          const float* next_a = p.a + next_ic * p.a_rs + next_pc * p.a_cs;
          const index_t q_pf = q1 - (q1 - q0 + 3) / 4;
          for (index_t q = q0; q < q1; ++q) {
            if (next_pc < K && q >= q_pf) {
              const index_t r0 = next_mc * (q - q_pf) / (q1 - q_pf), r1 = next_mc * (q + 1 - q_pf) / (q1 - q_pf);
              prefetch_strided(next_a + r0 * p.a_rs, p.a_rs, p.a_cs, r1 - r0, next_kc);
            }
            const int cols = static_cast<int>(min_i(NR, nc - q * NR));
            Epilogue ep;
            ep.load_c = p.accumulate || pc > 0;
            ep.bias = last && p.bias ? p.bias + jc + q * NR : nullptr;
            ep.act = last ? p.act : Activation::none;
            for (index_t ir = 0; ir < mc; ir += MR) {
              const int rows = static_cast<int>(min_i(MR, mc - ir));
              run_tile(rows, kc, abuf + ir * kc, bbuf + q * kc * NR, NR,
                       p.c + (ic + ir) * p.ldc + jc + q * NR, p.ldc, cols, ep);
            }
          }
        }
        team_barrier(team);  // B's buffer is repacked next
      }
    }
  });
}

}  // namespace gemm_detail
}  // namespace PT_ISA_NS
}  // namespace pt
