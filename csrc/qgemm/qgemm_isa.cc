// The int8 GEMM kernel, per ISA: register tiles of up to kQMR rows x 16 columns over the packed
// weight panels, int32 accumulation, then the write-back (raw int32, or dequantised floats with
// bias and activation). AVX2 widens each 16-byte half of a weight k-pair row with vpmovsxbw and
// multiplies it by a broadcast activation pair with vpmaddwd; the generic build runs the same sums
// as plain integer loops. The avx512vnni build (PT_ISA_VNNI, also PT_ISA_AVX2) reads int8
// activations and multiplies four k at a time with vpdpbusd (see QRun). Integer sums are exact,
// so every build gives identical int32 results.
#include <cmath>
#include <cstring>

#include "core/isa_unit.h"
#include "core/vec.h"
#include "core/threading.h"
#include "gemm/epilogue.h"
#include "qgemm/qgemm_kernels.h"

#if defined(PT_ISA_AVX2)
#include <immintrin.h>
#endif

namespace pt {
namespace PT_ISA_NS {
namespace {

// Rows per register tile: 6 x 2 int32 accumulators + 2 weight vectors + 1 broadcast = 15 of the
// 16 ymm registers (AVX-512's 32 hold 12 x 2 + 3). Decoding products (M = 3..64) run the same
// tiles with fewer rows, so a small M reads each weight panel once per tile of rows and packs
// nothing but its own activations (M <= 2 has its own two-panel tiles, below).
#if defined(PT_ISA_VNNI)
constexpr int kQMR = 12;
using Act = std::int8_t;
const Act* acts(const QRun& q) { return q.a8; }
index_t act_stride(const QRun& q) { return q.lda8; }
#else
constexpr int kQMR = 6;
using Act = std::int16_t;
const Act* acts(const QRun& q) { return q.a; }
index_t act_stride(const QRun& q) { return q.lda; }
#endif
// Rows per block of tasks: a thread's tasks sweep the panels of one block of rows at a time, so the
// block's activations (kQMC x Kp int16, 96 KiB at K = 512) stay in L2 while the panels stream by.
constexpr index_t kQMC = 96;
// Products of at most kQWideM rows (greedy decoding of one sentence) take tiles two panels wide:
// one activation broadcast then feeds four vpmaddwd, and the loop runs half as often.
constexpr index_t kQWideM = 2;
constexpr int NR = static_cast<int>(kQNR);
// The tiles are inlined into their loop: compiled as separate functions, GCC kept the
// accumulators in stack slots (callgrind: 1.3x the instructions at M = 32).
#define PT_QTILE inline __attribute__((always_inline))
#define PT_QTILE_LAMBDA __attribute__((always_inline))

#if defined(PT_ISA_VNNI)

// acc += the four u8 x s8 products of each 32-bit lane (vpdpbusd). Inline assembly because GCC's
// intrinsic copies the accumulator to a fresh register around every instruction.
PT_QTILE void dpbusd(__m256i& acc, __m256i u8, __m256i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}

// One quad (two k-pair rows, 64 bytes at bp; the second zero unless `full`) of a weight panel as
// vpdpbusd's unsigned operand (w + 128): lo holds columns 0-3 and 8-11, hi 4-7 and 12-15.
PT_QTILE void weight_quad(const std::int8_t* bp, bool full, __m256i& lo, __m256i& hi) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i p0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
  const __m256i p1 = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 32)) : _mm256_setzero_si256();
  lo = _mm256_xor_si256(_mm256_unpacklo_epi16(p0, p1), flip);
  hi = _mm256_xor_si256(_mm256_unpackhi_epi16(p0, p1), flip);
}

// R rows x P adjacent panels (16 P columns; panel i at b + i * panel_bytes): out is R x 16 P int32.
// Two k-pair rows of a panel, interleaved by 16-bit units (vpunpck{l,h}wd), hold four consecutive
// k per column, as vpdpbusd wants them: the low half gives columns 0-3 and 8-11, the high half
// 4-7 and 12-15, put back in order as they are stored. a_sum (R,) is subtracted (see QRun).
template <int R, int P>
PT_QTILE void tile_panels(const Act* a, index_t lda, const std::int8_t* b, index_t panel_bytes, index_t pairs,
                 const std::int32_t* a_sum, std::int32_t* out) {
  __m256i acc[R][2 * P];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2 * P; ++v) acc[r][v] = _mm256_setzero_si256();
  // Quad qd = pairs 2 qd and 2 qd + 1 (k = 4 qd .. 4 qd + 3).
  const auto step = [&](index_t qd, bool full) PT_QTILE_LAMBDA {
    __m256i w[2 * P];
    for (int i = 0; i < P; ++i) weight_quad(b + i * panel_bytes + 64 * qd, full, w[2 * i], w[2 * i + 1]);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      std::int32_t quad;
      std::memcpy(&quad, a + r * lda + 4 * qd, sizeof quad);
      const __m256i av = _mm256_set1_epi32(quad);
#pragma GCC unroll 4
      for (int v = 0; v < 2 * P; ++v) dpbusd(acc[r][v], w[v], av);
    }
  };
  const index_t quads = pairs / 2;
  for (index_t qd = 0; qd < quads; ++qd) step(qd, true);
  // An odd last pair runs with a zero second pair: its activation bytes are zero padding, so the
  // w + 128 that pair turns into adds nothing.
  if (pairs & 1) step(quads, false);
  for (int r = 0; r < R; ++r) {
    const __m256i corr = _mm256_set1_epi32(a_sum[r]);
    for (int i = 0; i < P; ++i) {
      const __m256i lo = _mm256_sub_epi32(acc[r][2 * i], corr), hi = _mm256_sub_epi32(acc[r][2 * i + 1], corr);
      std::int32_t* o = out + r * NR * P + NR * i;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
}

// acc += vpdpbusd on 512-bit registers.
PT_QTILE void dpbusd(__m512i& acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}

// tile_panels<R, 1> with a row's 16 columns in one 512-bit register: one vpdpbusd a row and quad
// instead of two. The register holds the two 256-bit halves' column groups as 0-3, 8-11, 4-7,
// 12-15; the store puts them back in order. Same integer sums, so the same int32 results.
template <int R>
PT_QTILE void tile_panel_zmm(const Act* a, index_t lda, const std::int8_t* b, index_t pairs,
                             const std::int32_t* a_sum, std::int32_t* out) {
  __m512i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  const auto step = [&](index_t qd, bool full) PT_QTILE_LAMBDA {
    __m256i lo, hi;
    weight_quad(b + 64 * qd, full, lo, hi);
    // (maskz forms: the plain ones' undefined sources trip GCC 12's -Wmaybe-uninitialized)
    const __m512i w = _mm512_maskz_inserti64x4(0xFF, _mm512_castsi256_si512(lo), hi, 1);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      std::int32_t quad;
      std::memcpy(&quad, a + r * lda + 4 * qd, sizeof quad);
      dpbusd(acc[r], w, _mm512_set1_epi32(quad));
    }
  };
  const index_t quads = pairs / 2;
  for (index_t qd = 0; qd < quads; ++qd) step(qd, true);
  if (pairs & 1) step(quads, false);  // as in tile_panels
  for (int r = 0; r < R; ++r) {
    const __m512i x = _mm512_sub_epi32(acc[r], _mm512_set1_epi32(a_sum[r]));
    // 128-bit groups 0, 2, 1, 3: columns 0-3, 4-7, 8-11, 12-15.
    _mm512_storeu_si512(out + r * NR, _mm512_maskz_shuffle_i64x2(0xFF, x, x, 0xD8));
  }
}

#elif defined(PT_ISA_AVX2)

// R rows x P adjacent panels (16 P columns; panel i at b + i * panel_bytes): out is R x 16 P int32.
// P = 1 holds 6 x 2 accumulators + 2 weight vectors + 1 broadcast in registers; P = 2 (M <= 2)
// feeds four vpmaddwd from one broadcast.
template <int R, int P>
PT_QTILE void tile_panels(const Act* a, index_t lda, const std::int8_t* b, index_t panel_bytes, index_t pairs,
                 const std::int32_t*, std::int32_t* out) {
  __m256i acc[R][2 * P];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2 * P; ++v) acc[r][v] = _mm256_setzero_si256();
  for (index_t p = 0; p < pairs; ++p) {
    __m256i w[2 * P];
    for (int v = 0; v < 2 * P; ++v)
      w[v] = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (v / 2) * panel_bytes + 32 * p + 16 * (v % 2))));
    for (int r = 0; r < R; ++r) {
      std::int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof pair);
      const __m256i av = _mm256_set1_epi32(pair);
      for (int v = 0; v < 2 * P; ++v) acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(av, w[v]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2 * P; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * NR * P + 8 * v), acc[r][v]);
}

#else

// R rows x P panels (16 P columns) as plain integer loops: out is R x 16 P int32.
template <int R, int P>
PT_QTILE void tile_panels(const Act* a, index_t lda, const std::int8_t* b, index_t panel_bytes, index_t pairs,
                 const std::int32_t*, std::int32_t* out) {
  std::int32_t acc[R][kQNR * P] = {};
  for (int i = 0; i < P; ++i) {
    for (index_t p = 0; p < pairs; ++p) {
      const std::int8_t* bp = b + i * panel_bytes + 32 * p;
      for (int r = 0; r < R; ++r) {
        const std::int32_t a0 = a[r * lda + 2 * p], a1 = a[r * lda + 2 * p + 1];
        for (int j = 0; j < NR; ++j) acc[r][i * NR + j] += a0 * bp[2 * j] + a1 * bp[2 * j + 1];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR * P; ++j) out[r * NR * P + j] = acc[r][j];
}

#endif

template <int R>
PT_QTILE void tile(const Act* a, index_t lda, const std::int8_t* b, index_t pairs, const std::int32_t* a_sum,
                   std::int32_t* out) {
#if defined(PT_ISA_VNNI)
  // Below four rows, one 512-bit chain a row leaves too few vpdpbusd in flight.
  if constexpr (R >= 4) {
    tile_panel_zmm<R>(a, lda, b, pairs, a_sum, out);
    return;
  }
#endif
  tile_panels<R, 1>(a, lda, b, 0, pairs, a_sum, out);
}

template <int R>
PT_QTILE void tile_wide(const Act* a, index_t lda, const std::int8_t* b, index_t panel_bytes, index_t pairs,
                        const std::int32_t* a_sum, std::int32_t* out) {
  tile_panels<R, 2>(a, lda, b, panel_bytes, pairs, a_sum, out);
}

// The tile of `rows` (1..R) rows.
template <int R>
PT_QTILE void run_tile(int rows, const Act* a, index_t lda, const std::int8_t* b, index_t pairs,
                       const std::int32_t* a_sum, std::int32_t* out) {
  if constexpr (R > 1) {
    if (rows < R) return run_tile<R - 1>(rows, a, lda, b, pairs, a_sum, out);
  }
  tile<R>(a, lda, b, pairs, a_sum, out);
}

// Writes rows [m0, m0 + rows) x columns [n0, n0 + cols) of the result from the tile's sums
// (row stride ld).
void write_tile(const QRun& q, const std::int32_t* acc, int ld, index_t m0, int rows, index_t n0, int cols) {
  if (q.c32) {
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < cols; ++j) q.c32[(m0 + r) * q.ldc32 + n0 + j] = acc[r * ld + j];
    return;
  }
  const float* bias = q.bias ? q.bias + n0 : nullptr;
  const bool epilogue = bias || q.act != Activation::none;
  for (int r = 0; r < rows; ++r) {
    float* row = q.c + (m0 + r) * q.ldc + n0;
    const float ra = q.row_inv[m0 + r];
    const float* cw = q.col_inv + n0;
    const std::int32_t* sums = acc + r * ld;
    int j = 0;
#if defined(PT_ISA_AVX2)
    // The scalar loop's float(sum) * (ra * cw) eight columns at a time, with the bias and the
    // activation applied before the one store (a second pass over C cost ~10% of a decode step).
    const __m256 rv = _mm256_set1_ps(ra);
    for (; j + 8 <= cols; j += 8) {
      const __m256 f = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + j)));
      __m256 y = _mm256_mul_ps(f, _mm256_mul_ps(rv, _mm256_loadu_ps(cw + j)));
      // Rounded before the bias is added, as the other kernel sets do: no fused multiply-add.
      asm("" : "+x"(y));
      Vec x(y);
      if (bias) x = x + Vec::load(bias + j);
      activate(x, q.act).store(row + j);
    }
#endif
    if (j == cols) continue;
    for (int t = j; t < cols; ++t) row[t] = static_cast<float>(sums[t]) * (ra * cw[t]);
    if (epilogue) epilogue_rows(row + j, q.ldc, 1, cols - j, true, bias ? bias + j : nullptr, q.act);
  }
}

// One row's quantisation (see quantize_rows_i16); returns its scale.
float quantize_row(std::int16_t* q, const float* x, index_t K) {
  // amax over |x|; `poison` turns NaN (and stays NaN) as soon as one x is inf or NaN.
  Vec amax = Vec::zero(), poison = Vec::zero();
  for (index_t k = 0; k < K; k += Vec::width) {
    const int w = K - k < Vec::width ? static_cast<int>(K - k) : Vec::width;
    const Vec v = Vec::load(x + k, w);
    amax = max(amax, max(v, Vec::zero() - v));
    poison = poison + v * Vec::zero();
  }
  if (std::isnan(poison.sum())) {
    std::memset(q, 0, static_cast<size_t>(K) * sizeof(std::int16_t));
    return std::nanf("");
  }
  const float top = amax.max();
  const float s = top > 0.0f ? 127.0f / top : 1.0f;
  index_t k = 0;
#if defined(PT_ISA_AVX2)
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (; k + 8 <= K; k += 8) {
    // cvtps rounds half to even (the default MXCSR mode), as nearbyint below.
    __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), sv));
    i = _mm256_max_epi32(_mm256_min_epi32(i, hi), lo);
    const __m128i p = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), p);
  }
#endif
  for (; k < K; ++k) {
    float r = std::nearbyint(x[k] * s);
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);  // x * s may round just past 127
    q[k] = static_cast<std::int16_t>(r);
  }
  return s;
}

// Threads worth using: one per 256k multiply-adds, as the float GEMM.
int useful_threads(const QRun& q) {
  const double work = static_cast<double>(q.M) * static_cast<double>(q.N) * static_cast<double>(q.Kp);
  const int nt = num_threads();
  const double cap = work / (1 << 18);
  return cap < 1.0 ? 1 : (cap < nt ? static_cast<int>(cap) : nt);
}

}  // namespace

void quantize_rows_i16(std::int16_t* q, index_t ldq, float* scale, const float* x, index_t ldx, index_t M,
                       index_t K) {
  const auto row = [&](std::int64_t m) {
    scale[m] = quantize_row(q + m * ldq, x + m * ldx, K);
    for (index_t k = K; k < ldq; ++k) q[m * ldq + k] = 0;
  };
  if (M * K >= (1 << 16)) {
    parallel_for(M, row);
  } else {
    for (index_t m = 0; m < M; ++m) row(m);
  }
}

// The decoding path for M <= kQWideM: tasks are pairs of adjacent panels (the last may be single).
static void qgemm_wide(const QRun& q) {
  const index_t panels = (q.N + kQNR - 1) / kQNR, units = (panels + 1) / 2;
  const index_t pairs = q.Kp / 2, panel_bytes = pairs * 2 * kQNR;
  const int rows = static_cast<int>(q.M);
  run_team(useful_threads(q), [&](int t, int team) {
    // Room for run_tile's largest tile too (only 1 or 2 rows are used here).
    alignas(32) std::int32_t acc[kQMR * kQNR];
    static_assert(kQMR * kQNR >= kQWideM * 2 * kQNR, "two-panel tiles fit");
    const index_t u1 = units * (t + 1) / team;
    for (index_t u = units * t / team; u < u1; ++u) {
      const index_t n0 = 2 * u * kQNR;
      const int cols = static_cast<int>(q.N - n0 < 2 * kQNR ? q.N - n0 : 2 * kQNR);
      const std::int8_t* b = q.b + 2 * u * panel_bytes;
      if (cols > NR) {
        if (rows == 1) tile_wide<1>(acts(q), act_stride(q), b, panel_bytes, pairs, q.a_sum, acc);
        else tile_wide<2>(acts(q), act_stride(q), b, panel_bytes, pairs, q.a_sum, acc);
        write_tile(q, acc, 2 * NR, 0, rows, n0, cols);
      } else {
        run_tile<kQMR>(rows, acts(q), act_stride(q), b, pairs, q.a_sum, acc);
        write_tile(q, acc, NR, 0, rows, n0, cols);
      }
    }
  });
}

// Tasks are (row block, panel) pairs in row-block-major order; each thread takes one contiguous
// range. Every output element is one exact integer sum and one fixed float expression, so the
// split (and the thread count) never changes a bit.
void qgemm_run(const QRun& q) {
  if (q.M <= kQWideM) return qgemm_wide(q);
  const index_t panels = (q.N + kQNR - 1) / kQNR, blocks = (q.M + kQMC - 1) / kQMC;
  const index_t tasks = panels * blocks, pairs = q.Kp / 2;
  run_team(useful_threads(q), [&](int t, int team) {
    alignas(32) std::int32_t acc[kQMR * kQNR];
    const index_t t1 = tasks * (t + 1) / team;
    for (index_t task = tasks * t / team; task < t1; ++task) {
      const index_t blk = task / panels, panel = task % panels;
      const index_t n0 = panel * kQNR, m_end = blk * kQMC + kQMC < q.M ? blk * kQMC + kQMC : q.M;
      const int cols = static_cast<int>(q.N - n0 < kQNR ? q.N - n0 : kQNR);
      const std::int8_t* b = q.b + panel * pairs * 2 * kQNR;
      for (index_t m0 = blk * kQMC; m0 < m_end; m0 += kQMR) {
        const int rows = static_cast<int>(m_end - m0 < kQMR ? m_end - m0 : kQMR);
        run_tile<kQMR>(rows, acts(q) + m0 * act_stride(q), act_stride(q), b, pairs,
                       q.a_sum ? q.a_sum + m0 : nullptr, acc);
        write_tile(q, acc, NR, m0, rows, n0, cols);
      }
    }
  });
}

}  // namespace PT_ISA_NS
}  // namespace pt
