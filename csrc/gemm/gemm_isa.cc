// Blocked GEMM body, compiled once per ISA (namespace pt::PT_ISA_NS) on csrc/core/vec.h.
//
// Structure (BLIS): for each NC-wide column block of B, for each KC-deep slice of K:
//   pack_b   KC x NC of op(B) into NR-wide panels (shared by the thread team),
//   for each MC-tall row block of the thread's rows:
//     pack_a   MC x KC of op(A) into MR-tall panels (thread-local),
//     macro_kernel: for each B panel (jr), for each A panel (ir): MR x NR micro-kernel.
// Partial sums go to C in K-block order and each C tile belongs to one thread, so the bits of C
// do not depend on the thread count. For M <= kSmallM (decoding) A is packed once and B is packed
// a 64-column block at a time (gemm_small_m_blocked), streamed unpacked (tiny M, row-major B) or
// read in place as dot products (B stored transposed).
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
// The block's product is summed from zero and added to C at the end, so the FMAs never wait for
// C's cache lines (prefetched at the start).
template <int R>
void ukernel(index_t kc, const float* a, const float* b, index_t rs_b, float* c, index_t ldc,
             const Epilogue& ep) {
  Vec lo[R], hi[R];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) lo[i] = hi[i] = Vec::zero();
#if defined(PT_ISA_AVX2)
  for (int i = 0; i < R; ++i) {  // C is needed at the end: fetch its lines meanwhile
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 15), _MM_HINT_T0);
  }
#endif
#pragma GCC unroll 4
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
    if (ep.load_c) {
      x0 = Vec::load(c + i * ldc) + x0;
      x1 = Vec::load(c + i * ldc + 8) + x1;
    }
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

#if defined(PT_ISA_AVX2)
// In-register 8 x 8 transpose: r[i] lane j becomes r[j] lane i.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// d[k * NR + j] = s[j * ld + k] for j, k < 8.
inline void transpose8x8(float* d, const float* s, index_t ld) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ld);
  transpose8(r);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(d + i * NR, r[i]);
}

// Eight k-steps of a full MR = 6 panel from row-major A: d[k * 6 + i] = s[i * ld + k], k < 8.
// Each 8-wide store spills two lanes into the next k-step, which the next store overwrites; the
// last one is masked so nothing past d[47] is written.
inline void pack_a_6x8(float* d, const float* s, index_t ld) {
  __m256 r[8];
  for (int i = 0; i < 6; ++i) r[i] = _mm256_loadu_ps(s + i * ld);
  r[6] = r[7] = _mm256_setzero_ps();
  transpose8(r);
  for (int k = 0; k < 7; ++k) _mm256_storeu_ps(d + k * 6, r[k]);
  _mm256_maskstore_ps(d + 42, _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0), r[7]);
}
#endif

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
      index_t k = 0;
#if defined(PT_ISA_AVX2)
      for (; k + 8 <= kc; k += 8) pack_a_6x8(dst + k * MR, src + k, rs);
#endif
      for (; k < kc; ++k) {
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
  const index_t full = nc / NR;  // whole panels
  if (cs == 1) {
    // Row by row across all whole panels, so B is read front to back (prefetcher-friendly).
    for (index_t k = 0; k < kc; ++k) {
      const float* src = b + k * rs;
      for (index_t q = 0; q < full; ++q) {
        Vec::load(src + q * NR).store(dst + q * kc * NR + k * NR);
        Vec::load(src + q * NR + 8).store(dst + q * kc * NR + k * NR + 8);
      }
    }
  } else if (rs == 1) {  // B stored (N, K): the Linear weight layout
    for (index_t q = 0; q < full; ++q) pack_b_panel_transposed(dst + q * kc * NR, b + q * NR * cs, cs, kc);
  } else {
    for (index_t q = 0; q < full; ++q)
      for (index_t k = 0; k < kc; ++k)
        for (index_t j = 0; j < NR; ++j) dst[q * kc * NR + k * NR + j] = b[k * rs + (q * NR + j) * cs];
  }
  const index_t cols = nc - full * NR;
  if (cols > 0) {  // the ragged last panel, zero-padded
    float* d = dst + full * kc * NR;
    const float* src = b + full * NR * cs;
    for (index_t k = 0; k < kc; ++k)
      for (index_t j = 0; j < NR; ++j) d[k * NR + j] = j < cols ? src[k * rs + j * cs] : 0.0f;
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
    note_team();
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

// Threads worth using: one per 256k multiply-adds (about where OpenBLAS goes parallel), so small
// products stay on one thread and never wait for a team to wake up.
int useful_threads(const GemmArgs& p) {
  const double work = static_cast<double>(p.M) * static_cast<double>(p.N) * static_cast<double>(p.K);
  const int nt = num_threads();
  const double cap = work / (1 << 18);
  return cap < 1.0 ? 1 : (cap < nt ? static_cast<int>(cap) : nt);
}

// Asks for the cache lines of rows x cols floats (row stride ld) to be fetched.
inline void prefetch_block(const float* b, index_t ld, index_t rows, index_t cols) {
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < cols; j += 16) __builtin_prefetch(b + r * ld + j, 0, 3);
}

// Prefetches rows x cols of a strided matrix (element (i, j) at x[i * rs + j * cs]) when one of
// the strides is 1; other layouts are left to the hardware.
inline void prefetch_strided(const float* x, index_t rs, index_t cs, index_t rows, index_t cols) {
  if (cs == 1) prefetch_block(x, rs, rows, cols);
  else if (rs == 1) prefetch_block(x, cs, cols, rows);
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

// Row panels for a small M: MR rows each, except that a short last panel (1..3 rows) is merged
// with the one before and the two split evenly (8 = 4 + 4, not 6 + 2): a micro-kernel with fewer
// than four rows has too few accumulators to hide the FMA latency. Returns the panel count.
int small_m_panels(index_t M, index_t* start, int* height) {
  int n = static_cast<int>((M + MR - 1) / MR);
  for (int i = 0; i < n; ++i) {
    start[i] = i * MR;
    height[i] = static_cast<int>(min_i(MR, M - i * MR));
  }
  if (n >= 2 && height[n - 1] < 4) {
    const int both = MR + height[n - 1];
    height[n - 2] = (both + 1) / 2;
    height[n - 1] = both / 2;
    start[n - 1] = start[n - 2] + height[n - 2];
  }
  return n;
}

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
  float* buf = tl_scratch.get(static_cast<size_t>(a_size + nt * blk_size));
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

// ---------------------------------------------------------------------------------------------
// B packed ahead of time (pack_weight): ceil(N / NR) panels of K x NR, so the K slice of panel q
// that the micro-kernel reads is packed + q * K * NR + pc * NR with row stride NR. Only A is
// packed here, once per MC-row block; the team splits B's panels, so each thread streams its
// share of B once per row block while A's block stays in L2. Partial sums go to C in KC order,
// as in gemm_packed and gemm_small_m_blocked: the same M gives the same bits as those paths.
void gemm_prepacked_b(const GemmArgs& p, int nt) {
  const index_t M = p.M, N = p.N, K = p.K;
  const index_t panels = (N + NR - 1) / NR;
  index_t start[kMC / MR];
  int height[kMC / MR];
  float* abuf = tl_scratch.get(static_cast<size_t>(min_i(round_up(M, MR), kMC) * K));
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

}  // namespace

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

void gemm_2d(const GemmArgs& p) {
  if (p.M <= 0 || p.N <= 0) return;
  if (p.K <= 0) {
    epilogue_rows(p.c, p.ldc, p.M, p.N, p.accumulate, p.bias, p.act);
    return;
  }
  const int nt = useful_threads(p);
  if (p.M <= kTinyM && p.b_cs == 1) {
    gemm_tiny_m_rowmajor_b(p, nt);
  } else if (p.M <= kSmallM && (p.b_cs == 1 || (p.M > kDotM && p.b_rs == 1))) {
    gemm_small_m_blocked(p, nt);
  } else if (p.M <= kSmallM && p.b_rs == 1) {
    gemm_small_m_transposed_b(p, nt);
  } else {
    gemm_packed(p, nt);
  }
}

void pack_weight(float* dst, const float* w, index_t ldw, index_t N, index_t K) {
  const index_t panels = (N + NR - 1) / NR;
  const int nt = N * K >= (1 << 20) ? num_threads() : 1;
  run_team(nt, [&](int t, int team) {
    const index_t q0 = panels * t / team, q1 = panels * (t + 1) / team;
    if (q1 > q0) pack_b(dst + q0 * K * NR, w + q0 * NR * ldw, 1, ldw, K, min_i(N, q1 * NR) - q0 * NR);
  });
}

void gemm_2d_prepacked(const GemmArgs& p) {
  if (p.M <= 0 || p.N <= 0) return;
  if (p.K <= 0) {
    epilogue_rows(p.c, p.ldc, p.M, p.N, p.accumulate, p.bias, p.act);
    return;
  }
  gemm_prepacked_b(p, useful_threads(p));
}

}  // namespace PT_ISA_NS
}  // namespace pt
