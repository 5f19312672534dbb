// Attention tile bodies, written once with Vec and compiled per ISA.
//
// Scores are computed transposed, S^T = K Q^T (keys x queries), with the query tile packed as
// Q^T (D x BQ, pre-scaled). Queries then run along the SIMD lanes, so the online softmax needs no
// horizontal reductions: the row max, the exponentials and the row sums are plain vertical Vec
// operations over the key rows of the tile. Every product is one small GEMM,
//   C (m x n) (+)= A (m x kn) B (kn x n),
// where A is read element-wise through two strides (broadcast operand) and B row-wise (vector
// operand, unit stride), which covers K rows, V rows, packed Q^T and P^T alike.
#include <cmath>
#include <limits>

#include "attention/attention_isa.h"
#include "core/vec.h"

namespace pt {
namespace PT_ISA_NS {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Local min (std::min would instantiate a template the linker may share with baseline code).
inline index_t imin(index_t a, index_t b) { return a < b ? a : b; }
inline index_t imax(index_t a, index_t b) { return a > b ? a : b; }
// Scores are kept in base 2 (q is packed with scale * log2 e), so softmax takes exp2 (core/vec.h),
// whose range reduction is exact, rather than exp; lse is converted back to natural log at the
// end. Positive arguments (clamped to 127 by exp2) are only ever masked out afterwards.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// Micro-kernel: C (R x 8 NV) = cs * C + sum over k < kn of A[r*ars + k*aks] * B[k*ldb + (0 .. 8 NV)],
// with cs[r] = rs[r] (rs not null), 1 (rs null, ACC) or 0 (ACC = false: C is overwritten).
// C is row-major with leading dimension ldc.
template <int R, int NV, bool ACC>
inline void ukernel(float* c, index_t ldc, const float* a, index_t ars, index_t aks, const float* b,
                    index_t ldb, index_t kn, const float* rs) {
  Vec acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const Vec f(rs ? rs[r] : 1.0f);
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) acc[r][u] = ACC ? Vec::load(c + r * ldc + 8 * u) * f : Vec::zero();
  }
  for (index_t k = 0; k < kn; ++k) {
    const float* bk = b + k * ldb;
    const float* ak = a + k * aks;
    Vec bv[NV];
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) bv[u] = Vec::load(bk + 8 * u);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec ar(ak[r * ars]);
#pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) acc[r][u] = fma(ar, bv[u], acc[r][u]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) acc[r][u].store(c + r * ldc + 8 * u);
}

// One column panel (8 NV wide) over all m rows, 6 rows per micro-kernel call.
template <int NV, bool ACC>
inline void gemm_panel(float* c, index_t ldc, const float* a, index_t ars, index_t aks,
                       const float* b, index_t ldb, index_t m, index_t kn, const float* rs) {
  index_t r = 0;
  for (; r + 6 <= m; r += 6)
    ukernel<6, NV, ACC>(c + r * ldc, ldc, a + r * ars, ars, aks, b, ldb, kn, rs ? rs + r : rs);
  c += r * ldc;
  a += r * ars;
  if (rs) rs += r;
  switch (m - r) {
    case 5: ukernel<5, NV, ACC>(c, ldc, a, ars, aks, b, ldb, kn, rs); break;
    case 4: ukernel<4, NV, ACC>(c, ldc, a, ars, aks, b, ldb, kn, rs); break;
    case 3: ukernel<3, NV, ACC>(c, ldc, a, ars, aks, b, ldb, kn, rs); break;
    case 2: ukernel<2, NV, ACC>(c, ldc, a, ars, aks, b, ldb, kn, rs); break;
    case 1: ukernel<1, NV, ACC>(c, ldc, a, ars, aks, b, ldb, kn, rs); break;
    default: break;
  }
}

// C (m x n) = cs * C + A (m x kn) B (kn x n): A[i][k] = a[i*ars + k*aks], B[k][j] = b[k*ldb + j],
// C[i][j] = c[i*ldc + j]; cs as in ukernel (row factors rs, or 1 / 0); n is a multiple of 8.
// Column panels outside, so a B panel stays in L1 while the row groups pass over it.
template <bool ACC>
void small_gemm(float* c, index_t ldc, const float* a, index_t ars, index_t aks, const float* b,
                index_t ldb, index_t m, index_t n, index_t kn, const float* rs = nullptr) {
  index_t j = 0;
  for (; j + 16 <= n; j += 16) gemm_panel<2, ACC>(c + j, ldc, a, ars, aks, b + j, ldb, m, kn, rs);
  if (j < n) gemm_panel<1, ACC>(c + j, ldc, a, ars, aks, b + j, ldb, m, kn, rs);
}

// Copies n rows of D floats, row r at x + r*sl, to dst + r*ld.
void pack_rows(float* dst, index_t ld, const float* x, index_t sl, index_t n, index_t D) {
  for (index_t r = 0; r < n; ++r)
    for (index_t d = 0; d < D; d += 8) Vec::load(x + r * sl + d).store(dst + r * ld + d);
}

// Packs mq rows of D floats (row i at x + i*sl) transposed and scaled: xt[d*ld + i] =
// scale * x[i*sl + d]; columns mq .. ncols are zero.
void pack_transposed(float* xt, index_t ld, index_t ncols, const float* x, index_t sl, index_t D,
                     index_t mq, float scale) {
  for (index_t i = 0; i < mq; ++i)
    for (index_t d = 0; d < D; ++d) xt[d * ld + i] = scale * x[i * sl + d];
  for (index_t d = 0; d < D; ++d)
    for (index_t i = mq; i < ncols; ++i) xt[d * ld + i] = 0.0f;
}

// Keeps s[j*ld + i] where key j0 + j is visible to query i (nfirst[i] <= j0 + j < nvis[i]),
// else sets fill. nfirst null: no window, every query's range starts at key 0 (one select less
// per score on the causal diagonal, which is most of the masking work).
void mask_tile(float* s, index_t ld, index_t kn, index_t ncols, index_t j0, const float* nfirst,
               const float* nvis, float fill) {
  if (nfirst == nullptr) {
    for (index_t i = 0; i < ncols; i += 8) {
      const Vec hi = Vec::load(nvis + i);
      for (index_t j = 0; j < kn; ++j) {
        const Vec row = Vec::load(s + j * ld + i);
        Vec::select(Vec::less(Vec(static_cast<float>(j0 + j)), hi), row, Vec(fill))
            .store(s + j * ld + i);
      }
    }
    return;
  }
  for (index_t i = 0; i < ncols; i += 8) {
    const Vec lo = Vec::load(nfirst + i), hi = Vec::load(nvis + i);
    for (index_t j = 0; j < kn; ++j) {
      const Vec key(static_cast<float>(j0 + j));
      const Vec row = Vec::load(s + j * ld + i);
      const Vec hidden = Vec::select(Vec::less(key, lo), Vec(fill), row);
      Vec::select(Vec::less(key, hi), hidden, Vec(fill)).store(s + j * ld + i);
    }
  }
}

// Clamps the key index x to the tile [j0, j0 + kn), relative to j0.
inline index_t in_tile(index_t x, index_t j0, index_t kn) {
  const index_t n = x - j0;
  return n < 0 ? 0 : (n > kn ? kn : n);
}

// How many of the kn keys of the tile starting at key j0 query i sees, counted from the tile's
// start (keys below nfirst[i] included: they are masked, not skipped).
inline index_t visible_in_tile(const float* nvis, index_t i, index_t j0, index_t kn) {
  return in_tile(static_cast<index_t>(nvis[i]), j0, kn);
}

// Online softmax step over a score tile s (kn keys x ncols queries, leading dimension ld):
// updates the running max m and sum l of each query, turns s into p = 2^(s - m_new) and writes
// the factor alpha = 2^(m_old - m_new) that rescales the query's output accumulator (base 2).
void softmax_update(float* s, index_t ld, index_t kn, index_t ncols, float* m, float* l,
                    float* alpha) {
  for (index_t i = 0; i < ncols; i += 8) {
    Vec mx = Vec(-kInf);
    for (index_t j = 0; j < kn; ++j) mx = max(mx, Vec::load(s + j * ld + i));
    const Vec m_old = Vec::load(m + i);
    const Vec m_new = max(m_old, mx);
    // A query with no visible key yet keeps m = -inf; subtracting 0 then keeps p and alpha at 0.
    const Vec m_sub = Vec::select(Vec::less(m_new, Vec(-std::numeric_limits<float>::max())),
                                  Vec::zero(), m_new);
    Vec sum = Vec::zero();
    for (index_t j = 0; j < kn; ++j) {
      const Vec p = exp2(Vec::load(s + j * ld + i) - m_sub);
      p.store(s + j * ld + i);
      sum = sum + p;
    }
    const Vec a = exp2(m_old - m_sub);
    a.store(alpha + i);
    (Vec::load(l + i) * a + sum).store(l + i);
    m_new.store(m + i);
  }
}

// Scores s[0, n) of one query and head, padded with -inf to a multiple of 8, turned in place
// into exp(s - max); returns {max, sum of the exponentials}.
struct RowSoftmax {
  float max, sum;
};
RowSoftmax softmax_row(float* s, index_t n) {
  const index_t np = (n + 7) / 8 * 8;
  for (index_t j = n; j < np; ++j) s[j] = -kInf;
  Vec mx(-kInf);
  for (index_t j = 0; j < np; j += 8) mx = max(mx, Vec::load(s + j));
  const Vec mv(mx.max());
  Vec sum = Vec::zero();
  for (index_t j = 0; j < np; j += 8) {
    const Vec p = exp(Vec::load(s + j) - mv);
    p.store(s + j);
    sum = sum + p;
  }
  return {mx.max(), sum.sum()};
}

template <int NV>
void decode_values(float* o, const float* p, const float* vb, index_t vsl, index_t n, float inv) {
  Vec acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = Vec::zero();
  for (index_t j = 0; j < n; ++j) {
    const Vec pj(p[j]);
    const float* row = vb + j * vsl;
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) acc[u] = fma(pj, Vec::load(row + 8 * u), acc[u]);
  }
  for (int u = 0; u < NV; ++u) (acc[u] * Vec(inv)).store(o + 8 * u);
}

}  // namespace

void attention_forward_tile(float* out, float* lse, const AttnView& q, const AttnView& k,
                            const AttnView& v, const AttnConfig& c, index_t b, index_t h,
                            index_t i0, index_t mq, float* scratch) {
  const index_t D = c.D, BQ = kAttnBQ, LD = kAttnLD;
  const index_t ncols = (mq + 7) / 8 * 8;
  float* qt = scratch;          // D x LD, scaled Q^T
  float* s = qt + D * LD;       // kAttnBK x LD scores, then probabilities
  float* o = s + kAttnBK * LD;  // mq x D output accumulator
  float* m = o + BQ * D;
  float* l = m + BQ;
  float* alpha = l + BQ;
  float* nvis = alpha + BQ;     // end of each query's visible keys
  float* nfirst = nvis + BQ;    // start of each query's visible keys
  float* qrows = nfirst + BQ;   // mq x D rows of q

  // Whole-Vec row copies keep many cache misses in flight; the transpose then reads L1.
  pack_rows(qrows, D, q.data + b * q.sb + h * q.sh + i0 * q.sl, q.sl, mq, D);
  pack_transposed(qt, LD, ncols, qrows, D, D, mq, c.scale * kLog2e);
  for (index_t i = 0; i < ncols; ++i) {
    m[i] = -kInf;
    l[i] = 0.0f;
    nvis[i] = i < mq ? static_cast<float>(attn_visible(c, b, i0 + i)) : 0.0f;
    nfirst[i] = i < mq ? static_cast<float>(attn_first(c, b, i0 + i)) : 0.0f;
  }
  for (index_t i = 0; i < mq * D; ++i) o[i] = 0.0f;

  // Both ends of the visible range grow with i: the tile's keys span [kbegin, kend), and every
  // query sees all of [klast, kfull). Tiles start at kbegin, so keys wholly outside a window
  // are never touched.
  const index_t kbegin = attn_first(c, b, i0), klast = attn_first(c, b, i0 + mq - 1);
  const index_t kend = attn_visible(c, b, i0 + mq - 1), kfull = attn_visible(c, b, i0);
  const float* kb = k.data + b * k.sb + h * k.sh;
  const float* vb = v.data + b * v.sb + h * v.sh;
  for (index_t j0 = kbegin; j0 < kend; j0 += kAttnBK) {
    const index_t kn = kend - j0 < kAttnBK ? kend - j0 : kAttnBK;
    const float* kt = kb + j0 * k.sl;
    const float* vt = vb + j0 * v.sl;
    if (j0 >= klast && j0 + kn <= kfull) {  // every query sees every key of the tile
      small_gemm<false>(s, LD, kt, k.sl, 1, qt, LD, kn, ncols, D);
      softmax_update(s, LD, kn, ncols, m, l, alpha);
      // O = alpha * O + P V (the rescale rides on the accumulator load)
      small_gemm<true>(o, D, s, 1, LD, vt, v.sl, mq, D, kn, alpha);
      continue;
    }
    // A partly hidden tile (causal diagonal, window edge): each 16-query panel of S^T computes
    // only the keys between its first query's start and its last query's end, and each 6-query
    // group of O sums only over those; everything else is masked to p = 0 anyway. This halves
    // the work of diagonal tiles.
    for (index_t jc = 0; jc < ncols; jc += 16) {
      const index_t last = imin(jc + 16, mq) - 1;
      const index_t lo = in_tile(static_cast<index_t>(nfirst[jc]), j0, kn);
      const index_t hi = visible_in_tile(nvis, last, j0, kn);
      if (hi <= lo) continue;
      if (ncols - jc >= 16)
        gemm_panel<2, false>(s + lo * LD + jc, LD, kt + lo * k.sl, k.sl, 1, qt + jc, LD, hi - lo,
                             D, nullptr);
      else
        gemm_panel<1, false>(s + lo * LD + jc, LD, kt + lo * k.sl, k.sl, 1, qt + jc, LD, hi - lo,
                             D, nullptr);
    }
    mask_tile(s, LD, kn, ncols, j0, c.window < 0 ? nullptr : nfirst, nvis, -kInf);
    softmax_update(s, LD, kn, ncols, m, l, alpha);
    for (index_t r = 0; r < mq; r += 6) {
      const index_t mr = imin(6, mq - r);
      const index_t lo = in_tile(static_cast<index_t>(nfirst[r]), j0, kn);
      const index_t hi = imax(lo, visible_in_tile(nvis, r + mr - 1, j0, kn));
      // With no key to add the accumulator still takes the rescale (alpha is 1 or 0 there).
      small_gemm<true>(o + r * D, D, s + lo * LD + r, 1, LD, vt + lo * v.sl, v.sl, mr, D,
                       hi - lo, alpha + r);
    }
  }

  for (index_t i = 0; i < mq; ++i) {
    float* row = out + ((b * c.Lq + i0 + i) * c.H + h) * D;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    const Vec iv(inv);
    for (index_t d = 0; d < D; d += 8) (Vec::load(o + i * D + d) * iv).store(row + d);
    if (lse) lse[(b * c.H + h) * c.Lq + i0 + i] = l[i] > 0.0f ? m[i] * kLn2 + std::log(l[i]) : -kInf;
  }
}

void attention_decode_head(float* out, float* lse, const AttnView& q, const AttnView& k,
                           const AttnView& v, const AttnConfig& c, index_t b, index_t h,
                           float* scratch) {
  // A window leaves the keys [first, end): only those are read.
  const index_t D = c.D, first = attn_first(c, b, 0), n = attn_visible(c, b, 0) - first;
  float* o = out + (b * c.H + h) * D;
  float* lse_out = lse ? lse + b * c.H + h : nullptr;
  if (n <= 0) {
    for (index_t d = 0; d < D; ++d) o[d] = 0.0f;
    if (lse_out) *lse_out = -kInf;
    return;
  }
  float* qs = scratch;  // D scaled query
  float* s = qs + D;    // n scores padded with -inf to a multiple of 8
  const float* qrow = q.data + b * q.sb + h * q.sh;
  for (index_t d = 0; d < D; d += 8) (Vec::load(qrow + d) * Vec(c.scale)).store(qs + d);

  const float* kb = k.data + b * k.sb + h * k.sh + first * k.sl;
  index_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four keys at a time to overlap the dot products
    Vec a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
    const float* k0 = kb + j * k.sl;
    for (index_t d = 0; d < D; d += 8) {
      const Vec qv = Vec::load(qs + d);
      a0 = fma(qv, Vec::load(k0 + d), a0);
      a1 = fma(qv, Vec::load(k0 + k.sl + d), a1);
      a2 = fma(qv, Vec::load(k0 + 2 * k.sl + d), a2);
      a3 = fma(qv, Vec::load(k0 + 3 * k.sl + d), a3);
    }
    s[j] = a0.sum();
    s[j + 1] = a1.sum();
    s[j + 2] = a2.sum();
    s[j + 3] = a3.sum();
  }
  for (; j < n; ++j) {
    Vec a0 = Vec::zero();
    for (index_t d = 0; d < D; d += 8) a0 = fma(Vec::load(qs + d), Vec::load(kb + j * k.sl + d), a0);
    s[j] = a0.sum();
  }
  const RowSoftmax sm = softmax_row(s, n);
  const float inv = 1.0f / sm.sum;

  const float* vb = v.data + b * v.sb + h * v.sh + first * v.sl;
  index_t d = 0;
  for (; d + 32 <= D; d += 32) decode_values<4>(o + d, s, vb + d, v.sl, n, inv);
  switch ((D - d) / 8) {
    case 3: decode_values<3>(o + d, s, vb + d, v.sl, n, inv); break;
    case 2: decode_values<2>(o + d, s, vb + d, v.sl, n, inv); break;
    case 1: decode_values<1>(o + d, s, vb + d, v.sl, n, inv); break;
    default: break;
  }
  if (lse_out) *lse_out = sm.max + std::log(sm.sum);
}

namespace {

// Scores of key row kr (all heads) for heads [h, h + R): the per-key expression of
// attention_decode_head (an FMA chain over d from zero, then the lane sum), R heads at once.
template <int R>
void score_heads(float* s, index_t np, index_t j, const float* qs, const float* kr, index_t sh,
                 index_t D, index_t h) {
  Vec a[R];
  for (int r = 0; r < R; ++r) a[r] = Vec::zero();
  for (index_t d = 0; d < D; d += 8)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r] = fma(Vec::load(qs + (h + r) * D + d), Vec::load(kr + (h + r) * sh + d), a[r]);
  for (int r = 0; r < R; ++r) s[(h + r) * np + j] = a[r].sum();
}

}  // namespace

void attention_decode_row(float* out, float* lse, const AttnView& q, const AttnView& k,
                          const AttnView& v, const AttnConfig& c, index_t b, index_t i,
                          float* scratch) {
  const index_t D = c.D, H = c.H, first = attn_first(c, b, i), n = attn_visible(c, b, i) - first;
  float* o = out + (b * c.Lq + i) * H * D;
  if (n <= 0) {
    for (index_t e = 0; e < H * D; ++e) o[e] = 0.0f;
    if (lse)
      for (index_t h = 0; h < H; ++h) lse[(b * H + h) * c.Lq + i] = -kInf;
    return;
  }
  const index_t np = (n + 7) / 8 * 8;
  float* qs = scratch;     // H x D scaled queries
  float* s = qs + H * D;   // H x np scores, then probabilities
  float* acc = s + H * np; // H x D value sums
  for (index_t h = 0; h < H; ++h) {
    const float* qrow = q.data + b * q.sb + i * q.sl + h * q.sh;
    for (index_t d = 0; d < D; d += 8) (Vec::load(qrow + d) * Vec(c.scale)).store(qs + h * D + d);
  }
  // Key by key, every head of it: the row is read front to back (the per-head kernel reads one
  // head's slice of every row, a stride the prefetchers miss once the cache left L2).
  const float* kb = k.data + b * k.sb + first * k.sl;
  for (index_t j = 0; j < n; ++j) {
    const float* kr = kb + j * k.sl;
    index_t h = 0;
    for (; h + 4 <= H; h += 4) score_heads<4>(s, np, j, qs, kr, k.sh, D, h);
    for (; h < H; ++h) score_heads<1>(s, np, j, qs, kr, k.sh, D, h);
  }
  float* inv = acc + H * D;  // H
  for (index_t h = 0; h < H; ++h) {
    const RowSoftmax sm = softmax_row(s + h * np, n);
    inv[h] = 1.0f / sm.sum;
    if (lse) lse[(b * H + h) * c.Lq + i] = sm.max + std::log(sm.sum);
  }
  for (index_t i = 0; i < H * D; i += 8) Vec::zero().store(acc + i);
  const float* vb = v.data + b * v.sb + first * v.sl;
  for (index_t j = 0; j < n; ++j) {  // the same FMA chain per element as decode_values
    const float* vr = vb + j * v.sl;
    for (index_t h = 0; h < H; ++h) {
      const Vec pj(s[h * np + j]);
      const float* vh = vr + h * v.sh;
      float* ah = acc + h * D;
      for (index_t d = 0; d < D; d += 8) fma(pj, Vec::load(vh + d), Vec::load(ah + d)).store(ah + d);
    }
  }
  for (index_t h = 0; h < H; ++h)
    for (index_t d = 0; d < D; d += 8) (Vec::load(acc + h * D + d) * Vec(inv[h])).store(o + h * D + d);
}

void attention_backward_head(float* dq, float* dk, float* dv, const AttnView& dout,
                             const AttnView& q, const AttnView& k, const AttnView& v,
                             const AttnView& out, const float* lse, const AttnConfig& c, index_t b,
                             index_t h, float* scratch) {
  const index_t D = c.D, BQ = kAttnBQ, BK = kAttnBK, LD = kAttnLD, Lq = c.Lq, Lk = c.Lk;
  const index_t nqt = (Lq + BQ - 1) / BQ, lqp = nqt * BQ, RS = attn_row_stride(D);
  float* qt = scratch;            // nqt tiles of D x LD: scaled Q^T
  float* dot = qt + nqt * D * LD; // nqt tiles of D x LD: dOut^T
  float* dqa = dot + nqt * D * LD;  // Lq x D accumulator of dS K
  float* delta = dqa + Lq * D;    // lqp: rowsum(dout * out)
  float* lse_h = delta + lqp;     // lqp: lse of this head (+inf past Lq, so p = 0 there)
  float* nvis = lse_h + lqp;      // lqp: end of each query's visible keys
  float* nfirst = nvis + lqp;     // lqp: start of each query's visible keys
  float* pt = nfirst + lqp;       // BK x LD: P^T
  float* dst = pt + BK * LD;      // BK x LD: dP^T, then dS^T
  const index_t KB = kAttnKeyBlock * BK;
  float* dka = dst + BK * LD;     // KB x D accumulator of dS^T Q
  float* dva = dka + KB * D;      // KB x D accumulator of P^T dOut
  float* qr = dva + KB * D;       // Lq rows of q, RS apart
  float* dor = qr + Lq * RS;      // Lq rows of dOut, RS apart
  float* kp = dor + Lq * RS;      // KB rows of k, RS apart
  float* vp = kp + KB * RS;       // KB rows of v, RS apart

  const float* dob = dout.data + b * dout.sb + h * dout.sh;
  const float* ob = out.data + b * out.sb + h * out.sh;
  const float* qb = q.data + b * q.sb + h * q.sh;
  // Rows of q and dOut are re-read for every key tile: pack them once (strided rows alias in L1),
  // with whole-Vec loads, then transpose from the packed copy.
  pack_rows(qr, RS, qb, q.sl, Lq, D);
  pack_rows(dor, RS, dob, dout.sl, Lq, D);
  for (index_t t = 0; t < nqt; ++t) {
    const index_t i0 = t * BQ, mq = Lq - i0 < BQ ? Lq - i0 : BQ;
    pack_transposed(qt + t * D * LD, LD, BQ, qr + i0 * RS, RS, D, mq, c.scale * kLog2e);
    pack_transposed(dot + t * D * LD, LD, BQ, dor + i0 * RS, RS, D, mq, 1.0f);
  }
  for (index_t i = 0; i < lqp; ++i) {
    if (i < Lq) {
      Vec acc = Vec::zero();
      for (index_t d = 0; d < D; d += 8)
        acc = fma(Vec::load(dob + i * dout.sl + d), Vec::load(ob + i * out.sl + d), acc);
      delta[i] = acc.sum();
      lse_h[i] = lse[(b * c.H + h) * Lq + i] * kLog2e;  // base 2, like the packed scores
      nvis[i] = static_cast<float>(attn_visible(c, b, i));
      nfirst[i] = static_cast<float>(attn_first(c, b, i));
    } else {
      delta[i] = 0.0f;
      lse_h[i] = kInf;
      nvis[i] = nfirst[i] = 0.0f;
    }
  }
  for (index_t i = 0; i < Lq * D; ++i) dqa[i] = 0.0f;

  // Key tiles go in blocks of kAttnKeyBlock: each query tile's packed data (about 90 KB) is
  // fetched once per block rather than once per key tile, while the block's packed k, v and
  // dK, dV accumulators stay in L2.
  const float* kb = k.data + b * k.sb + h * k.sh;
  const float* vb = v.data + b * v.sb + h * v.sh;
  const index_t valid = c.key_lengths ? static_cast<index_t>(c.key_lengths[b]) : Lk;
  for (index_t jb = 0; jb < Lk; jb += kAttnKeyBlock * BK) {
    const index_t nkeys = imin(Lk - jb, kAttnKeyBlock * BK);
    for (index_t i = 0; i < nkeys * D; ++i) dka[i] = dva[i] = 0.0f;
    pack_rows(kp, RS, kb + jb * k.sl, k.sl, nkeys, D);  // these keys serve every query tile
    pack_rows(vp, RS, vb + jb * v.sl, v.sl, nkeys, D);
    // Rows past the key length are padding and may hold anything (inf, NaN): zeroed, so that
    // a masked entry's 0 x row never turns into NaN in dS, dQ or dK.
    for (index_t j = imax(valid - jb, 0); j < nkeys; ++j)
      for (index_t d = 0; d < RS; ++d) kp[j * RS + d] = vp[j * RS + d] = 0.0f;
    for (index_t t = 0; t < nqt; ++t) {
      const index_t i0 = t * BQ, mq = Lq - i0 < BQ ? Lq - i0 : BQ;
      // As in the forward: the tile's queries see keys in [kbegin, kend), all of them [klast, kfull).
      const index_t kbegin = attn_first(c, b, i0), klast = attn_first(c, b, i0 + mq - 1);
      const index_t kend = attn_visible(c, b, i0 + mq - 1), kfull = attn_visible(c, b, i0);
      const index_t ncols = (mq + 7) / 8 * 8;
      for (index_t jt = 0; jt < nkeys; jt += BK) {
        const index_t j0 = jb + jt, kn = imin(nkeys - jt, BK);
        if (kend <= j0) break;  // no query of this tile sees these keys (nor later ones)
        if (j0 + kn <= kbegin) continue;  // below the window of every query of this tile
        const float* kt = kp + jt * RS;
        const float* vt = vp + jt * RS;
        float* dkt = dka + jt * D;
        float* dvt = dva + jt * D;
        // P^T = 2^(S^T - lse log2 e), masked to 0 after the power (lse may be -inf there).
        small_gemm<false>(pt, LD, kt, RS, 1, qt + t * D * LD, LD, kn, ncols, D);
        for (index_t i = 0; i < ncols; i += 8) {
          const Vec lv = Vec::load(lse_h + i0 + i);
          for (index_t j = 0; j < kn; ++j)
            exp2(Vec::load(pt + j * LD + i) - lv).store(pt + j * LD + i);
        }
        if (j0 < klast || j0 + kn > kfull)
          mask_tile(pt, LD, kn, ncols, j0, c.window < 0 ? nullptr : nfirst + i0, nvis + i0, 0.0f);
        // dV += P^T dOut
        small_gemm<true>(dvt, D, pt, LD, 1, dor + i0 * RS, RS, kn, D, mq);
        // dS^T = P^T * (V dOut^T - delta)
        small_gemm<false>(dst, LD, vt, RS, 1, dot + t * D * LD, LD, kn, ncols, D);
        for (index_t i = 0; i < ncols; i += 8) {
          const Vec dl = Vec::load(delta + i0 + i);
          for (index_t j = 0; j < kn; ++j) {
            const index_t at = j * LD + i;
            (Vec::load(pt + at) * (Vec::load(dst + at) - dl)).store(dst + at);
          }
        }
        // dK += dS^T Q ; dQ += dS K (both scaled at the end)
        small_gemm<true>(dkt, D, dst, LD, 1, qr + i0 * RS, RS, kn, D, mq);
        small_gemm<true>(dqa + i0 * D, D, dst, 1, LD, kt, RS, mq, D, kn);
      }
    }
    for (index_t j = 0; j < nkeys; ++j) {
      float* dkrow = dk + ((b * Lk + jb + j) * c.H + h) * D;
      float* dvrow = dv + ((b * Lk + jb + j) * c.H + h) * D;
      for (index_t d = 0; d < D; d += 8) {
        (Vec::load(dka + j * D + d) * Vec(c.scale)).store(dkrow + d);
        Vec::load(dva + j * D + d).store(dvrow + d);
      }
    }
  }
  for (index_t i = 0; i < Lq; ++i) {
    float* row = dq + ((b * Lq + i) * c.H + h) * D;
    for (index_t d = 0; d < D; d += 8) (Vec::load(dqa + i * D + d) * Vec(c.scale)).store(row + d);
  }
}

}  // namespace PT_ISA_NS
}  // namespace pt
