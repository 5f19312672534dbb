// Blocked GEMM body, compiled once per ISA (namespace pt::PT_ISA_NS) on csrc/core/vec.h.
//
// Structure (BLIS): for each NC-wide column block of B, for each KC-deep slice of K:
//   pack_b   KC x NC of op(B) into NR-wide panels (shared by the thread team),
//   for each MC-tall row block of the thread's rows:
//     pack_a   MC x KC of op(A) into MR-tall panels (thread-local),
//     macro_kernel: for each B panel (jr), for each A panel (ir): MR x NR micro-kernel.
// Partial sums go to C in K-block order and each C tile belongs to one thread, so the bits of C
// do not depend on the thread count. Two paths skip packing B when M is small (decoding).
#include <cstdlib>
#include <new>

#include "core/threading.h"
#include "core/vec.h"
#include "gemm/gemm_kernels.h"

namespace pt {
namespace PT_ISA_NS {
namespace {

constexpr int MR = static_cast<int>(kMR);
constexpr int NR = static_cast<int>(kNR);
static_assert(NR == 2 * Vec::width, "the micro-kernel holds a C row in two vectors");
static_assert(kMC % kMR == 0 && kNC % kNR == 0, "cache blocks hold whole register tiles");

// What the write-back of a C tile does after the FMAs.
struct Epilogue {
  bool load_c = false;               // start from the current C (accumulate, or a later K block)
  const float* bias = nullptr;       // added on the last K block, indexed by tile column
  Activation act = Activation::none; // applied on the last K block
};

inline Vec activate(Vec x, Activation act) {
  // max(0, x): when x is NaN the second operand wins, so NaN propagates.
  if (act == Activation::relu) return max(Vec::zero(), x);
  if (act == Activation::gelu) return gelu(x);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Micro-kernel (the BLIS contract, R <= MR rows, NR = 16 columns):
//
//        C[0:R, 0:16]  :=  act( (load_c ? C : 0) + A_panel @ B_panel + bias )
//
//   a: packed A panel, element (i, k) at a[k * MR + i]            (MR-strided even when R < MR)
//   b: B panel, element (k, j) at b[k * rs_b + j], j < 16          (rs_b = NR when packed,
//                                                                   the row stride of B if not)
//   c: C tile, element (i, j) at c[i * ldc + j]; all 16 columns are read and written.
// Accumulators start from C, so a K-blocked sum rounds exactly like an unblocked one.
template <int R>
void ukernel(index_t kc, const float* a, const float* b, index_t rs_b, float* c, index_t ldc,
             const Epilogue& ep) {
  Vec lo[R], hi[R];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    lo[i] = ep.load_c ? Vec::load(c + i * ldc) : Vec::zero();
    hi[i] = ep.load_c ? Vec::load(c + i * ldc + 8) : Vec::zero();
  }
  for (index_t k = 0; k < kc; ++k) {
    const Vec b0 = Vec::load(b), b1 = Vec::load(b + 8);
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      const Vec ai(a[i]);
      lo[i] = fma(ai, b0, lo[i]);
      hi[i] = fma(ai, b1, hi[i]);
    }
    a += MR;
    b += rs_b;
  }
  const Vec bias0 = ep.bias ? Vec::load(ep.bias) : Vec::zero();
  const Vec bias1 = ep.bias ? Vec::load(ep.bias + 8) : Vec::zero();
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    Vec x0 = lo[i], x1 = hi[i];
    if (ep.bias) {
      x0 = x0 + bias0;
      x1 = x1 + bias1;
    }
    activate(x0, ep.act).store(c + i * ldc);
    activate(x1, ep.act).store(c + i * ldc + 8);
  }
}

// A tile of `rows` x `cols` (rows <= MR, cols <= NR) of C. Narrow tiles go through a 16-wide
// scratch tile so the micro-kernel never touches C (or bias) past column `cols`; B must still be
// readable (zero-padded) for all 16 columns.
template <int R>
void tile(index_t kc, const float* a, const float* b, index_t rs_b, float* c, index_t ldc, int cols,
          const Epilogue& ep) {
  if (cols == NR) {
    ukernel<R>(kc, a, b, rs_b, c, ldc, ep);
    return;
  }
  alignas(64) float t[MR * NR] = {};
  alignas(64) float tb[NR] = {};
  Epilogue e = ep;
  if (ep.bias) {
    for (int j = 0; j < cols; ++j) tb[j] = ep.bias[j];
    e.bias = tb;
  }
  if (ep.load_c)
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < cols; ++j) t[i * NR + j] = c[i * ldc + j];
  ukernel<R>(kc, a, b, rs_b, t, NR, e);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < cols; ++j) c[i * ldc + j] = t[i * NR + j];
}

void run_tile(int rows, index_t kc, const float* a, const float* b, index_t rs_b, float* c, index_t ldc,
              int cols, const Epilogue& ep) {
  switch (rows) {
    case 6: tile<6>(kc, a, b, rs_b, c, ldc, cols, ep); break;
    case 5: tile<5>(kc, a, b, rs_b, c, ldc, cols, ep); break;
    case 4: tile<4>(kc, a, b, rs_b, c, ldc, cols, ep); break;
    case 3: tile<3>(kc, a, b, rs_b, c, ldc, cols, ep); break;
    case 2: tile<2>(kc, a, b, rs_b, c, ldc, cols, ep); break;
    default: tile<1>(kc, a, b, rs_b, c, ldc, cols, ep); break;
  }
}
static_assert(MR == 6, "run_tile dispatches 1..6 rows");

// ---------------------------------------------------------------------------------------------
// Packing. pack_a: mc x kc of op(A) (element (i, k) at a[i * rs + k * cs]) into ceil(mc / MR)
// panels of MR x kc, panel p at dst + p * MR * kc, element (i, k) at [k * MR + i]; rows past mc
// are zero.
void pack_a(float* dst, const float* a, index_t rs, index_t cs, index_t mc, index_t kc) {
  for (index_t p = 0; p < mc; p += MR, dst += MR * kc) {
    const index_t rows = mc - p < MR ? mc - p : MR;
    const float* src = a + p * rs;
    if (rows == MR && cs == 1) {  // row-major A: six row streams, transposed on the fly
      const float *r0 = src, *r1 = src + rs, *r2 = src + 2 * rs, *r3 = src + 3 * rs,
                  *r4 = src + 4 * rs, *r5 = src + 5 * rs;
      for (index_t k = 0; k < kc; ++k) {
        float* d = dst + k * MR;
        d[0] = r0[k], d[1] = r1[k], d[2] = r2[k], d[3] = r3[k], d[4] = r4[k], d[5] = r5[k];
      }
    } else if (rows == MR && rs == 1) {  // transposed A: MR contiguous values per k
      for (index_t k = 0; k < kc; ++k)
        for (int i = 0; i < MR; ++i) dst[k * MR + i] = src[k * cs + i];
    } else {
      for (index_t k = 0; k < kc; ++k)
        for (index_t i = 0; i < MR; ++i) dst[k * MR + i] = i < rows ? src[i * rs + k * cs] : 0.0f;
    }
  }
}

#if defined(PT_ISA_AVX2)
// 8 x 8 transpose: d[k * NR + j] = s[j * ld + k] for j, k < 8.
inline void transpose8x8(float* d, const float* s, index_t ld) {
  __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ld), r2 = _mm256_loadu_ps(s + 2 * ld),
         r3 = _mm256_loadu_ps(s + 3 * ld), r4 = _mm256_loadu_ps(s + 4 * ld),
         r5 = _mm256_loadu_ps(s + 5 * ld), r6 = _mm256_loadu_ps(s + 6 * ld),
         r7 = _mm256_loadu_ps(s + 7 * ld);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(d + 0 * NR, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(d + 1 * NR, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(d + 2 * NR, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(d + 3 * NR, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(d + 4 * NR, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(d + 5 * NR, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(d + 6 * NR, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(d + 7 * NR, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// One full NR-wide panel of B stored transposed (element (k, j) at src[j * ld + k]).
void pack_b_panel_transposed(float* dst, const float* src, index_t ld, index_t kc) {
  index_t k = 0;
#if defined(PT_ISA_AVX2)
  for (; k + 8 <= kc; k += 8) {
    transpose8x8(dst + k * NR, src + k, ld);
    transpose8x8(dst + k * NR + 8, src + 8 * ld + k, ld);
  }
#endif
  for (; k < kc; ++k)
    for (int j = 0; j < NR; ++j) dst[k * NR + j] = src[j * ld + k];
}

// pack_b: kc x nc of op(B) (element (k, j) at b[k * rs + j * cs]) into ceil(nc / NR) panels of
// kc x NR, panel p at dst + p * kc * NR, element (k, j) at [k * NR + j]; columns past nc are zero.
void pack_b(float* dst, const float* b, index_t rs, index_t cs, index_t kc, index_t nc) {
  for (index_t p = 0; p < nc; p += NR, dst += kc * NR) {
    const index_t cols = nc - p < NR ? nc - p : NR;
    const float* src = b + p * cs;
    if (cols == NR && cs == 1) {
      for (index_t k = 0; k < kc; ++k) {
        Vec::load(src + k * rs).store(dst + k * NR);
        Vec::load(src + k * rs + 8).store(dst + k * NR + 8);
      }
    } else if (cols == NR && rs == 1) {  // B stored (N, K): the Linear weight layout
      pack_b_panel_transposed(dst, src, cs, kc);
    } else {
      for (index_t k = 0; k < kc; ++k)
        for (index_t j = 0; j < NR; ++j) dst[k * NR + j] = j < cols ? src[k * rs + j * cs] : 0.0f;
    }
  }
}

// C rows without a product (K = 0, or after the dot path): C = act((load_c ? C : 0) + bias).
void epilogue_rows(float* c, index_t ldc, index_t M, index_t N, bool load_c, const float* bias,
                   Activation act) {
  for (index_t m = 0; m < M; ++m) {
    float* row = c + m * ldc;
    for (index_t n = 0; n < N; n += Vec::width) {
      const int w = N - n < Vec::width ? static_cast<int>(N - n) : Vec::width;
      Vec x = load_c ? Vec::load(row + n, w) : Vec::zero();
      if (bias) x = x + Vec::load(bias + n, w);
      activate(x, act).store(row + n, w);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Thread-local packing memory: grown on demand, reused across calls, freed at thread exit. Only
// the calling thread allocates; its team gets slices, so nothing allocates inside a parallel region.
struct Scratch {
  float* p = nullptr;
  size_t n = 0;
  ~Scratch() { std::free(p); }
  float* get(size_t floats) {
    if (floats > n) {
      std::free(p);
      p = nullptr;
      n = 0;
      const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      p = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!p) throw std::bad_alloc();
      n = floats;
    }
    return p;
  }
};
thread_local Scratch tl_scratch;

inline index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }
inline index_t min_i(index_t a, index_t b) { return a < b ? a : b; }

// Runs fn(thread, team_size) on a team of up to nt threads (one when already inside a team).
template <class Fn>
void run_team(int nt, Fn&& fn) {
#if defined(_OPENMP)
  if (nt > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(nt)
    fn(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  fn(0, 1);
}

inline void team_barrier(int team) {
#if defined(_OPENMP)
  if (team > 1) {
#pragma omp barrier
  }
#endif
}

// Threads worth using: about 256k multiply-adds each, so tiny products stay on one thread.
int useful_threads(const GemmArgs& p) {
  const double work = static_cast<double>(p.M) * static_cast<double>(p.N) * static_cast<double>(p.K);
  const int nt = num_threads();
  const double cap = work / (1 << 18);
  return cap < 1.0 ? 1 : (cap < nt ? static_cast<int>(cap) : nt);
}

// ---------------------------------------------------------------------------------------------
// The general path: pack both operands.
void gemm_packed(const GemmArgs& p, int nt) {
  const index_t M = p.M, N = p.N, K = p.K;
  const index_t kc_max = min_i(K, kKC), nc_max = min_i(round_up(N, NR), kNC);
  const index_t b_size = kc_max * nc_max, a_size = kMC * kc_max;
  float* buf = tl_scratch.get(static_cast<size_t>(b_size + nt * a_size));
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
          for (index_t q = q0; q < q1; ++q) {
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

// Small M, B with unit column stride (the NN layout): A is packed once (it is tiny) and the
// micro-kernel reads B where it lies, row stride and all; only a ragged last panel is copied.
void gemm_small_m_rowmajor_b(const GemmArgs& p, int nt) {
  const index_t M = p.M, N = p.N, K = p.K;
  const index_t a_size = round_up(M, MR) * K, edge_size = min_i(K, kKC) * NR;
  float* buf = tl_scratch.get(static_cast<size_t>(a_size + nt * edge_size));
  pack_a(buf, p.a, p.a_rs, p.a_cs, M, K);
  const index_t panels = (N + NR - 1) / NR;
  run_team(nt, [&](int t, int team) {
    float* edge = buf + a_size + t * edge_size;
    for (index_t q = panels * t / team; q < panels * (t + 1) / team; ++q) {
      const int cols = static_cast<int>(min_i(NR, N - q * NR));
      for (index_t pc = 0; pc < K; pc += kKC) {
        const index_t kc = min_i(kKC, K - pc);
        const bool last = pc + kc == K;
        const float* b = p.b + pc * p.b_rs + q * NR;
        index_t rs_b = p.b_rs;
        if (cols < NR) {
          pack_b(edge, b, p.b_rs, 1, kc, cols);
          b = edge;
          rs_b = NR;
        }
        Epilogue ep;
        ep.load_c = p.accumulate || pc > 0;
        ep.bias = last && p.bias ? p.bias + q * NR : nullptr;
        ep.act = last ? p.act : Activation::none;
        for (index_t ir = 0; ir < M; ir += MR) {
          const int rows = static_cast<int>(min_i(MR, M - ir));
          run_tile(rows, kc, buf + ir * K + pc * MR, b, rs_b, p.c + ir * p.ldc + q * NR, p.ldc, cols, ep);
        }
      }
    }
  });
}

// Dot products of R rows of A with S rows of B^T (both contiguous along K):
//   c[i * ldc + j] = (load_c ? c[i * ldc + j] : 0) + sum_k a[i * lda + k] * bt[j * ldb + k].
// Lane partial sums are reduced in a fixed order.
template <int R, int S>
void dot_tile(index_t K, const float* a, index_t lda, const float* bt, index_t ldb, float* c,
              index_t ldc, bool load_c) {
  Vec acc[R][S];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < S; ++j) acc[i][j] = Vec::zero();
  index_t k = 0;
  for (; k + Vec::width <= K; k += Vec::width) {
    Vec bv[S];
#pragma GCC unroll 4
    for (int j = 0; j < S; ++j) bv[j] = Vec::load(bt + j * ldb + k);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const Vec av = Vec::load(a + i * lda + k);
#pragma GCC unroll 4
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

// Small M, B stored transposed (N, K) (the Linear weight layout): C is a grid of dot products
// along K, which reads B^T where it lies instead of transposing it into panels. 4 x 3 tiles keep
// 12 accumulators in registers; each thread takes a range of 48-column chunks and applies the
// bias/activation to a chunk while it is still in L1.
void gemm_small_m_transposed_b(const GemmArgs& p, int nt) {
  const index_t M = p.M, N = p.N, K = p.K;
  const float* a = p.a;
  index_t lda = p.a_rs;
  if (p.a_cs != 1) {  // gather A into rows (M x K, small)
    float* buf = tl_scratch.get(static_cast<size_t>(M * K));
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
      for (index_t j = n0; j < n1; j += 3) {
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

}  // namespace

void gemm_2d(const GemmArgs& p) {
  if (p.M <= 0 || p.N <= 0) return;
  if (p.K <= 0) {
    epilogue_rows(p.c, p.ldc, p.M, p.N, p.accumulate, p.bias, p.act);
    return;
  }
  const int nt = useful_threads(p);
  if (p.M <= kSmallM && p.b_cs == 1) {
    gemm_small_m_rowmajor_b(p, nt);
  } else if (p.M <= kSmallM && p.b_rs == 1) {
    gemm_small_m_transposed_b(p, nt);
  } else {
    gemm_packed(p, nt);
  }
}

}  // namespace PT_ISA_NS
}  // namespace pt
