// GEMM packing: op(A) into MR-tall panels (pack_a) and op(B) into NR-wide panels (pack_b, and
// pack_b_panel_transposed for one panel of a B stored (N, K)), with the AVX2 in-register
// transposes they use. Include only from *_isa.cc files.
#pragma once

#include "core/isa_unit.h"
#include "core/vec.h"
#include "gemm/blocking.h"

namespace pt {
namespace PT_ISA_NS {
namespace {  // internal linkage in every *_isa.cc that includes this (see blocking.h)

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
// last one writes only its six lanes, so nothing past d[47] is written.
inline void pack_a_6x8(float* d, const float* s, index_t ld) {
  __m256 r[8];
  for (int i = 0; i < 6; ++i) r[i] = _mm256_loadu_ps(s + i * ld);
  r[6] = r[7] = _mm256_setzero_ps();
  transpose8(r);
  for (int k = 0; k < 7; ++k) _mm256_storeu_ps(d + k * 6, r[k]);
  // Four lanes then two, not a masked store (microcoded on AMD cores).
  _mm_storeu_ps(d + 42, _mm256_castps256_ps128(r[7]));
  _mm_storel_pi(reinterpret_cast<__m64*>(d + 46), _mm256_extractf128_ps(r[7], 1));
}

// Eight k-steps of a full MR = 12 panel from row-major A: d[k * 12 + i] = s[i * ld + k], k < 8.
// Rows 0..7 are one 8 x 8 transpose (eight lanes per k), rows 8..11 another (four lanes per k).
inline void pack_a_12x8(float* d, const float* s, index_t ld) {
  __m256 r[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ld);
  for (int i = 0; i < 4; ++i) u[i] = _mm256_loadu_ps(s + (8 + i) * ld);
  u[4] = u[5] = u[6] = u[7] = _mm256_setzero_ps();
  transpose8(r);
  transpose8(u);
  for (int k = 0; k < 8; ++k) {
    _mm256_storeu_ps(d + k * 12, r[k]);
    _mm_storeu_ps(d + k * 12 + 8, _mm256_castps256_ps128(u[k]));
  }
}

// Eight k-steps of a full panel from row-major A, for this ISA's MR.
inline void pack_a_x8(float* d, const float* s, index_t ld) {
  if constexpr (MR == 12) pack_a_12x8(d, s, ld);
  else pack_a_6x8(d, s, ld);
}
#endif

// pack_a of a transposed A (element (i, k) at a[k * ld + i]: a weight gradient's dy^T). Each k
// is mc contiguous values, so A is read row by row, front to back, and each row is dealt out to
// the panels; read panel by panel instead, every k would be a new cache line for every panel.
[[maybe_unused]] void pack_a_transposed(float* dst, const float* a, index_t ld, index_t mc,
                                        index_t kc) {
  const index_t full = mc / MR, rows = mc - full * MR;
  for (index_t k = 0; k < kc; ++k) {
    const float* src = a + k * ld;
    if (k + 8 < kc)
      for (index_t j = 0; j < mc; j += 16) __builtin_prefetch(src + 8 * ld + j, 0, 3);
    for (index_t q = 0; q < full; ++q)
      __builtin_memcpy(dst + q * MR * kc + k * MR, src + q * MR, MR * sizeof(float));
    if (rows > 0) {  // the ragged last panel, zero-padded
      float* d = dst + full * MR * kc + k * MR;
      for (int i = 0; i < MR; ++i) d[i] = i < rows ? src[full * MR + i] : 0.0f;
    }
  }
}

// Packing. pack_a: mc x kc of op(A) (element (i, k) at a[i * rs + k * cs]) into ceil(mc / MR)
// panels of MR x kc, panel p at dst + p * MR * kc, element (i, k) at [k * MR + i]; rows past mc
// are zero.
[[maybe_unused]] void pack_a(float* dst, const float* a, index_t rs, index_t cs, index_t mc,
                             index_t kc) {
  if (rs == 1 && cs != 1) {
    pack_a_transposed(dst, a, cs, mc, kc);
    return;
  }
  for (index_t p = 0; p < mc; p += MR, dst += MR * kc) {
    const index_t rows = mc - p < MR ? mc - p : MR;
    const float* src = a + p * rs;
    if (rows == MR && cs == 1) {  // row-major A: MR row streams, transposed on the fly
      index_t k = 0;
#if defined(PT_ISA_AVX2)
      for (; k + 8 <= kc; k += 8) pack_a_x8(dst + k * MR, src + k, rs);
#endif
      for (; k < kc; ++k)
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) dst[k * MR + i] = src[i * rs + k];
    } else {
      for (index_t k = 0; k < kc; ++k)
        for (index_t i = 0; i < MR; ++i) dst[k * MR + i] = i < rows ? src[i * rs + k * cs] : 0.0f;
    }
  }
}

// One full NR-wide panel of B stored transposed (element (k, j) at src[j * ld + k]).
[[maybe_unused]] void pack_b_panel_transposed(float* dst, const float* src, index_t ld,
                                              index_t kc) {
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
[[maybe_unused]] void pack_b(float* dst, const float* b, index_t rs, index_t cs, index_t kc,
                             index_t nc) {
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

}  // namespace
}  // namespace PT_ISA_NS
}  // namespace pt
