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
namespace {

// The write-back of C's tiles at column j for the K slice [pc, pc + kc): from C when
// accumulating or past the first slice, with the bias and activation on the last slice.
Epilogue slice_epilogue(const GemmArgs& p, index_t pc, index_t kc, index_t j) {
  Epilogue ep;
  ep.load_c = p.accumulate || pc > 0;
  if (pc + kc == p.K) {
    ep.bias = p.bias ? p.bias + j : nullptr;
    ep.act = p.act;
  }
  return ep;
}

// The MR-row tiles of a packed A block (mc rows) times one packed B panel, into c (row stride ldc).
void panel_tiles(const float* abuf, const float* bpanel, index_t mc, index_t kc, float* c,
                 index_t ldc, int cols, const Epilogue& ep) {
  for (index_t ir = 0; ir < mc; ir += MR)
    run_tile(static_cast<int>(min_i(MR, mc - ir)), kc, abuf + ir * kc, bpanel, NR, c + ir * ldc,
             ldc, cols, ep);
}

}  // namespace

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
            panel_tiles(abuf, bbuf + q * kc * NR, mc, kc, p.c + ic * p.ldc + jc + q * NR, p.ldc,
                        cols, slice_epilogue(p, pc, kc, jc + q * NR));
          }
        }
        team_barrier(team);  // B's buffer is repacked next
      }
    }
  });
}

namespace {

// One K slice [pc, pc + kc) of the whole product on one thread: into C with the slice's
// write-back (into_c), else its sums alone into out (row stride ldo).
void slice_product(const GemmArgs& p, index_t pc, index_t kc, float* out, index_t ldo,
                   bool into_c, float* bbuf, float* abuf) {
  for (index_t jc = 0; jc < p.N; jc += kNC) {
    const index_t nc = min_i(kNC, p.N - jc), panels = (nc + NR - 1) / NR;
    pack_b(bbuf, p.b + pc * p.b_rs + jc * p.b_cs, p.b_rs, p.b_cs, kc, nc);
    for (index_t ic = 0; ic < p.M; ic += kMC) {
      const index_t mc = min_i(kMC, p.M - ic);
      pack_a(abuf, p.a + ic * p.a_rs + pc * p.a_cs, p.a_rs, p.a_cs, mc, kc);
      for (index_t q = 0; q < panels; ++q)
        panel_tiles(abuf, bbuf + q * kc * NR, mc, kc, out + ic * ldo + jc + q * NR, ldo,
                    static_cast<int>(min_i(NR, nc - q * NR)),
                    into_c ? slice_epilogue(p, pc, kc, jc + q * NR) : Epilogue{});
    }
  }
}

// The KC slices of K, and those the threads after the first take (thread 0 takes the first
// slices / team and writes them straight into C).
index_t k_slices(const GemmArgs& p) { return (p.K + kKC - 1) / kKC; }
index_t buffered_slices(index_t slices, int team) { return slices - slices / team; }

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
  if (nt < 2) return false;
  const index_t slices = k_slices(p);
  return slices >= 2 * nt && p.M * p.N <= kKSplitMaxC &&
         buffered_slices(slices, nt) * p.M * p.N <= kKSplitMaxBuffer;
}

void gemm_blocked_ksplit(const GemmArgs& p, int nt) {
  const index_t M = p.M, N = p.N, K = p.K, slices = k_slices(p);
  const index_t b_size = kKC * min_i(round_up(N, NR), kNC), a_size = kMC * kKC;
  float* buf = thread_scratch(static_cast<size_t>(nt * (b_size + a_size) +
                                                  buffered_slices(slices, nt) * M * N));
  run_team(nt, [&](int t, int team) {
    const index_t first_buffered = slices - buffered_slices(slices, team);
    float* bufs = buf + nt * (b_size + a_size);
    float* bbuf = buf + t * (b_size + a_size);
    for (index_t s = slices * t / team; s < slices * (t + 1) / team; ++s) {
      const index_t pc = s * kKC, kc = min_i(kKC, K - pc);
      if (t == 0)
        slice_product(p, pc, kc, p.c, p.ldc, true, bbuf, bbuf + b_size);
      else
        slice_product(p, pc, kc, bufs + (s - first_buffered) * M * N, N, false, bbuf, bbuf + b_size);
    }
    if (team == 1) return;
    team_barrier(team);
    add_slices(p, bufs, buffered_slices(slices, team), M * t / team, M * (t + 1) / team);
  });
}

}  // namespace gemm_detail
}  // namespace PT_ISA_NS
}  // namespace pt
