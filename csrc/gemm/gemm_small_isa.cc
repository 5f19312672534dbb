// The small-M GEMM paths (M <= kSmallM: decoding, batch x beam rows), per ISA. A is tiny, so
// these avoid the general path's repacking of A per block and read B once:
//   gemm_small_m_blocked       A packed once, B packed a KC x 64 block at a time, micro-kernel
//   gemm_tiny_m_rowmajor_b     M <= kTinyM, row-major B: a GEMV-like sweep (stream_rows)
//   gemm_small_m_transposed_b  M <= kDotM, B stored (N, K): dot products along K (dot_tile)
// gemm_isa.cc chooses between them.
#include "core/threading.h"
#include "gemm/blocking.h"
#include "gemm/epilogue.h"
#include "gemm/gemm_paths.h"
#include "gemm/pack.h"
#include "gemm/ukernel.h"

namespace pt {
namespace PT_ISA_NS {
namespace gemm_detail {

// Small M (5..32; 17..32 when B is stored transposed). A is packed once (it is tiny). B is packed
// KC x 64 at a time into a thread-local buffer (reading a row-major B in place thrashes L1 sets
// when its row stride is a multiple of 4 KiB) and each panel is swept once per A panel from L1.
// Reading B from L3 or memory is a large part of the cost here, so while one block is computed
// the next one's lines are prefetched, a thin slice before each micro-kernel call.
void gemm_small_m_blocked(const GemmArgs& p, int nt) {
  constexpr index_t kNB = 4 * NR;
  const index_t M = p.M, N = p.N, K = p.K;
  index_t start[(kSmallM + MR - 1) / MR];
  int height[(kSmallM + MR - 1) / MR];
  const int np = small_m_panels(M, start, height);
  const index_t a_size = np * MR * K, blk_size = min_i(K, kKC) * kNB;
  float* buf = thread_scratch(static_cast<size_t>(a_size + nt * blk_size));
  for (int i = 0; i < np; ++i) pack_a(buf + i * MR * K, p.a + start[i] * p.a_rs, p.a_rs, p.a_cs, height[i], K);
  const index_t blocks = (N + kNB - 1) / kNB;
  run_team(nt, [&](int t, int team) {
    float* bbuf = buf + a_size + t * blk_size;
    const index_t blk1 = blocks * (t + 1) / team;
    for (index_t blk = blocks * t / team; blk < blk1; ++blk) {
      const index_t n0 = blk * kNB, nb = min_i(kNB, N - n0);
      for (index_t pc = 0; pc < K; pc += kKC) {
        const index_t kc = min_i(kKC, K - pc);
        const bool last = pc + kc == K;
        pack_b(bbuf, p.b + pc * p.b_rs + n0 * p.b_cs, p.b_rs, p.b_cs, kc, nb);
        // The next block this thread packs: the next K slice, or the next columns from k = 0.
        const index_t next_pc = last ? 0 : pc + kc, next_n0 = last ? n0 + kNB : n0;
        const bool has_next = !last || blk + 1 < blk1;
        const index_t next_kc = min_i(kKC, K - next_pc), next_nb = min_i(kNB, N - next_n0);
        const index_t q_count = (nb + NR - 1) / NR;
        const index_t calls = q_count * np;
        const float* next_b = p.b + next_pc * p.b_rs + next_n0 * p.b_cs;
        for (index_t q = 0; q < q_count; ++q) {
          const int cols = static_cast<int>(min_i(NR, nb - q * NR));
          Epilogue ep;
          ep.load_c = p.accumulate || pc > 0;
          ep.bias = last && p.bias ? p.bias + n0 + q * NR : nullptr;
          ep.act = last ? p.act : Activation::none;
          for (int i = 0; i < np; ++i) {
            if (has_next) {  // a thin slice of the next block before each micro-kernel call
              const index_t c = q * np + i, r0 = next_kc * c / calls, r1 = next_kc * (c + 1) / calls;
              prefetch_strided(next_b + r0 * p.b_rs, p.b_rs, p.b_cs, r1 - r0, next_nb);
            }
            run_tile(height[i], kc, buf + i * MR * K + pc * MR, bbuf + q * kc * NR, NR,
                     p.c + start[i] * p.ldc + n0 + q * NR, p.ldc, cols, ep);
          }
        }
      }
    }
  });
}

namespace {

// R (1..4) rows of C, columns [0, w), for B with unit column stride:
//   C[m, :] = (load_c ? C[m, :] : 0) + sum_k A[m, k] * B[k, :]
// The C row pieces stay in L1 while B's rows stream past once, four at a time; each element is
// summed in k order.
template <int R>
void stream_rows(index_t K, const float* a, index_t a_rs, index_t a_cs, const float* b, index_t b_rs,
                 float* c, index_t ldc, index_t w, bool load_c) {
  if (!load_c)
    for (int m = 0; m < R; ++m)
      for (index_t n = 0; n < w; ++n) c[m * ldc + n] = 0.0f;
  const index_t wv = w / Vec::width * Vec::width;
  const int tail = static_cast<int>(w - wv);
  index_t k = 0;
  for (; k + 4 <= K; k += 4) {
    Vec am[R][4];
    for (int m = 0; m < R; ++m)
      for (int u = 0; u < 4; ++u) am[m][u] = Vec(a[m * a_rs + (k + u) * a_cs]);
    const float *b0 = b + k * b_rs, *b1 = b0 + b_rs, *b2 = b1 + b_rs, *b3 = b2 + b_rs;
    for (index_t n = 0; n < wv; n += Vec::width) {
      const Vec x0 = Vec::load(b0 + n), x1 = Vec::load(b1 + n), x2 = Vec::load(b2 + n), x3 = Vec::load(b3 + n);
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m) {
        float* cm = c + m * ldc + n;
        Vec acc = Vec::load(cm);
        acc = fma(am[m][0], x0, acc);
        acc = fma(am[m][1], x1, acc);
        acc = fma(am[m][2], x2, acc);
        acc = fma(am[m][3], x3, acc);
        acc.store(cm);
      }
    }
    if (tail) {
      const Vec x0 = Vec::load(b0 + wv, tail), x1 = Vec::load(b1 + wv, tail),
                x2 = Vec::load(b2 + wv, tail), x3 = Vec::load(b3 + wv, tail);
      for (int m = 0; m < R; ++m) {
        float* cm = c + m * ldc + wv;
        Vec acc = Vec::load(cm, tail);
        acc = fma(am[m][0], x0, acc);
        acc = fma(am[m][1], x1, acc);
        acc = fma(am[m][2], x2, acc);
        acc = fma(am[m][3], x3, acc);
        acc.store(cm, tail);
      }
    }
  }
  for (; k < K; ++k) {
    const float* bk = b + k * b_rs;
    for (int m = 0; m < R; ++m) {
      const Vec am(a[m * a_rs + k * a_cs]);
      float* cm = c + m * ldc;
      for (index_t n = 0; n < wv; n += Vec::width) fma(am, Vec::load(bk + n), Vec::load(cm + n)).store(cm + n);
      if (tail) fma(am, Vec::load(bk + wv, tail), Vec::load(cm + wv, tail)).store(cm + wv, tail);
    }
  }
}

}  // namespace

// Tiny M (1..4, decoding one beam or a few), B with unit column stride: a GEMV-like sweep that
// reads B exactly once, in address order where it can: column chunks are as wide as 16 KiB of C
// rows allows (whole rows of B when N is moderate), split between threads.
void gemm_tiny_m_rowmajor_b(const GemmArgs& p, int nt) {
  const index_t N = p.N;
  const index_t per_thread = round_up((N + nt - 1) / nt, Vec::width);
  const index_t kChunk = min_i(round_up(4096 / p.M, Vec::width), per_thread);
  const index_t chunks = (N + kChunk - 1) / kChunk;
  run_team(nt, [&](int t, int team) {
    for (index_t ch = chunks * t / team; ch < chunks * (t + 1) / team; ++ch) {
      const index_t n0 = ch * kChunk, w = min_i(kChunk, N - n0);
      const float* b = p.b + n0;
      float* c = p.c + n0;
      switch (p.M) {
        case 4: stream_rows<4>(p.K, p.a, p.a_rs, p.a_cs, b, p.b_rs, c, p.ldc, w, p.accumulate); break;
        case 3: stream_rows<3>(p.K, p.a, p.a_rs, p.a_cs, b, p.b_rs, c, p.ldc, w, p.accumulate); break;
        case 2: stream_rows<2>(p.K, p.a, p.a_rs, p.a_cs, b, p.b_rs, c, p.ldc, w, p.accumulate); break;
        default: stream_rows<1>(p.K, p.a, p.a_rs, p.a_cs, b, p.b_rs, c, p.ldc, w, p.accumulate); break;
      }
      if (p.bias || p.act != Activation::none)
        epilogue_rows(c, p.ldc, p.M, w, true, p.bias ? p.bias + n0 : nullptr, p.act);
    }
  });
}

namespace {

// Dot products of R rows of A with S rows of B^T (both contiguous along K):
//   c[i * ldc + j] = (load_c ? c[i * ldc + j] : 0) + sum_k a[i * lda + k] * bt[j * ldb + k].
// Lane partial sums are reduced in a fixed order.
template <int R, int S>
void dot_tile(index_t K, const float* a, index_t lda, const float* bt, index_t ldb, float* c,
              index_t ldc, bool load_c) {
  Vec acc[R][S];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < S; ++j) acc[i][j] = Vec::zero();
  index_t k = 0;
  for (; k + Vec::width <= K; k += Vec::width) {
    Vec bv[S];
#pragma GCC unroll 8
    for (int j = 0; j < S; ++j) bv[j] = Vec::load(bt + j * ldb + k);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const Vec av = Vec::load(a + i * lda + k);
#pragma GCC unroll 8
      for (int j = 0; j < S; ++j) acc[i][j] = fma(av, bv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const int w = static_cast<int>(K - k);
    Vec bv[S];
    for (int j = 0; j < S; ++j) bv[j] = Vec::load(bt + j * ldb + k, w);
    for (int i = 0; i < R; ++i) {
      const Vec av = Vec::load(a + i * lda + k, w);
      for (int j = 0; j < S; ++j) acc[i][j] = fma(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < S; ++j) {
      const float s = acc[i][j].sum();
      c[i * ldc + j] = load_c ? c[i * ldc + j] + s : s;
    }
}

template <int S>
void dot_rows(int rows, index_t K, const float* a, index_t lda, const float* bt, index_t ldb, float* c,
              index_t ldc, bool load_c) {
  switch (rows) {
    case 4: dot_tile<4, S>(K, a, lda, bt, ldb, c, ldc, load_c); break;
    case 3: dot_tile<3, S>(K, a, lda, bt, ldb, c, ldc, load_c); break;
    case 2: dot_tile<2, S>(K, a, lda, bt, ldb, c, ldc, load_c); break;
    default: dot_tile<1, S>(K, a, lda, bt, ldb, c, ldc, load_c); break;
  }
}

}  // namespace

// Small M, B stored transposed (N, K) (the Linear weight layout): C is a grid of dot products
// along K, which reads B^T where it lies instead of transposing it into panels. 4 x 3 tiles keep
// 12 accumulators in registers; each thread takes a range of 48-column chunks and applies the
// bias/activation to a chunk while it is still in L1.
void gemm_small_m_transposed_b(const GemmArgs& p, int nt) {
  const index_t M = p.M, N = p.N, K = p.K;
  const float* a = p.a;
  index_t lda = p.a_rs;
  if (p.a_cs != 1) {  // gather A into rows (M x K, small)
    float* buf = thread_scratch(static_cast<size_t>(M * K));
    for (index_t m = 0; m < M; ++m)
      for (index_t k = 0; k < K; ++k) buf[m * K + k] = p.a[m * p.a_rs + k * p.a_cs];
    a = buf;
    lda = K;
  }
  constexpr index_t kChunk = 48;
  const index_t chunks = (N + kChunk - 1) / kChunk;
  run_team(nt, [&](int t, int team) {
    for (index_t ch = chunks * t / team; ch < chunks * (t + 1) / team; ++ch) {
      const index_t n0 = ch * kChunk, n1 = min_i(N, n0 + kChunk);
      index_t j = n0;
      if (M == 1)  // one row: eight B rows at a time keep more loads in flight
        for (; j + 8 <= n1; j += 8)
          dot_tile<1, 8>(K, a, lda, p.b + j * p.b_cs, p.b_cs, p.c + j, p.ldc, p.accumulate);
      for (; j < n1; j += 3) {
        const int s = static_cast<int>(min_i(3, n1 - j));
        const float* bt = p.b + j * p.b_cs;
        for (index_t i = 0; i < M; i += 4) {
          const int r = static_cast<int>(min_i(4, M - i));
          float* c = p.c + i * p.ldc + j;
          const float* ai = a + i * lda;
          if (s == 3) dot_rows<3>(r, K, ai, lda, bt, p.b_cs, c, p.ldc, p.accumulate);
          else if (s == 2) dot_rows<2>(r, K, ai, lda, bt, p.b_cs, c, p.ldc, p.accumulate);
          else dot_rows<1>(r, K, ai, lda, bt, p.b_cs, c, p.ldc, p.accumulate);
        }
      }
      if (p.bias || p.act != Activation::none)
        epilogue_rows(p.c + n0, p.ldc, M, n1 - n0, true, p.bias ? p.bias + n0 : nullptr, p.act);
    }
  });
}

}  // namespace gemm_detail
}  // namespace PT_ISA_NS
}  // namespace pt
