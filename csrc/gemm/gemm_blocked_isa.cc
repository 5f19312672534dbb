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
//
// gemm_blocked_ksplit, for a small C and a long K (weight gradients: dW = dy^T x, K = tokens),
// splits K instead: each thread packs and multiplies its own run of KC slices over the whole of
// C, the first thread's straight into C and the others' into one buffer per slice, which are
// added to C in slice order afterwards. Each slice's sums are the same FMAs from zero as above and
// C takes them in the same order, so the bits are those of gemm_blocked at any thread count.
#include "core/threading.h"
#include "core/vec.h"
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

namespace {

// One K slice [pc, pc + kc) of the whole product on one thread, into out (row stride ldo):
// out = act((load_c ? out : 0) + A[:, slice] @ B[slice, :] + bias).
void slice_product(const GemmArgs& p, index_t pc, index_t kc, float* out, index_t ldo,
                   const Epilogue& ep, float* bbuf, float* abuf) {
  for (index_t jc = 0; jc < p.N; jc += kNC) {
    const index_t nc = min_i(kNC, p.N - jc), panels = (nc + NR - 1) / NR;
    pack_b(bbuf, p.b + pc * p.b_rs + jc * p.b_cs, p.b_rs, p.b_cs, kc, nc);
    for (index_t ic = 0; ic < p.M; ic += kMC) {
      const index_t mc = min_i(kMC, p.M - ic);
      pack_a(abuf, p.a + ic * p.a_rs + pc * p.a_cs, p.a_rs, p.a_cs, mc, kc);
      for (index_t q = 0; q < panels; ++q) {
        Epilogue e = ep;
        if (ep.bias) e.bias = ep.bias + jc + q * NR;
        const int cols = static_cast<int>(min_i(NR, nc - q * NR));
        for (index_t ir = 0; ir < mc; ir += MR)
          run_tile(static_cast<int>(min_i(MR, mc - ir)), kc, abuf + ir * kc, bbuf + q * kc * NR, NR,
                   out + (ic + ir) * ldo + jc + q * NR, ldo, cols, e);
      }
    }
  }
}

// Rows [r0, r1) of C take the buffered slices in order: C = C + P_s, and on the last one the
// bias and activation, the micro-kernel's write-back done element by element.
void add_slices(const GemmArgs& p, const float* bufs, index_t count, index_t r0, index_t r1) {
  const index_t size = p.M * p.N;
  for (index_t m = r0; m < r1; ++m) {
    float* row = p.c + m * p.ldc;
    for (index_t n = 0; n < p.N; n += Vec::width) {
      const int w = p.N - n < Vec::width ? static_cast<int>(p.N - n) : Vec::width;
      Vec x = Vec::load(row + n, w);
      for (index_t s = 0; s < count; ++s) x = x + Vec::load(bufs + s * size + m * p.N + n, w);
      if (p.bias) x = x + Vec::load(p.bias + n, w);
      activate(x, p.act).store(row + n, w);
    }
  }
}

}  // namespace

bool ksplit_worth(const GemmArgs& p, int nt) {
#if defined(_OPENMP)
  if (omp_in_parallel()) return false;  // a team of one (run_team): no split, no buffers
#endif
  const index_t slices = (p.K + kKC - 1) / kKC;
  const index_t buffered = slices - slices / (nt > 1 ? nt : 1);
  return nt > 1 && slices >= 2 * nt && p.M * p.N <= kKSplitMaxC &&
         buffered * p.M * p.N <= kKSplitMaxBuffer;
}

void gemm_blocked_ksplit(const GemmArgs& p, int nt) {
  const index_t M = p.M, N = p.N, K = p.K, slices = (K + kKC - 1) / kKC;
  const index_t b_size = kKC * min_i(round_up(N, NR), kNC), a_size = kMC * kKC;
  float* buf = thread_scratch(static_cast<size_t>(nt * (b_size + a_size) +
                                                  (slices - slices / nt) * M * N));
  run_team(nt, [&](int t, int team) {
    const index_t first_buffered = slices / team;  // thread 0 takes [0, slices / team)
    float* bufs = buf + nt * (b_size + a_size);
    float* bbuf = buf + t * (b_size + a_size);
    for (index_t s = slices * t / team; s < slices * (t + 1) / team; ++s) {
      const index_t pc = s * kKC, kc = min_i(kKC, K - pc);
      Epilogue ep;
      if (t == 0) {
        ep.load_c = p.accumulate || pc > 0;
        if (pc + kc == K) ep.bias = p.bias, ep.act = p.act;
      }
      float* out = t == 0 ? p.c : bufs + (s - first_buffered) * M * N;
      slice_product(p, pc, kc, out, t == 0 ? p.ldc : N, ep, bbuf, bbuf + b_size);
    }
    if (team == 1) return;
    team_barrier(team);
    add_slices(p, bufs, slices - first_buffered, M * t / team, M * (t + 1) / team);
  });
}

}  // namespace gemm_detail
}  // namespace PT_ISA_NS
}  // namespace pt
