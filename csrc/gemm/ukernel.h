// The GEMM micro-kernel: one register tile (up to MR x NR) of C from packed A and B panels, and
// run_tile, which dispatches a tile of any size 1..MR x 1..NR to it. Include only from *_isa.cc.
#pragma once

#include <array>
#include <utility>

#include "core/isa_unit.h"
#include "core/vec.h"
#include "gemm/blocking.h"
#include "gemm/epilogue.h"

namespace pt {
namespace PT_ISA_NS {
namespace {  // internal linkage in every *_isa.cc that includes this (see blocking.h)

static_assert(NR == 2 * Vec::width, "the micro-kernel holds a C row in two 8-lane vectors");

// Micro-kernel (the BLIS contract, R <= MR rows, NR = 16 columns):
//
//        C[0:R, 0:16]  :=  act( (load_c ? C : 0) + A_panel @ B_panel + bias )
//
//   a: packed A panel, element (i, k) at a[k * MR + i]            (MR-strided even when R < MR)
//   b: B panel, element (k, j) at b[k * rs_b + j], j < 16          (rs_b = NR when packed,
//                                                                   the row stride of B if not)
//   c: C tile, element (i, j) at c[i * ldc + j]; all 16 columns are read and written.
// The block's product is summed from zero and added to C at the end, so the FMAs never wait for
// C's cache lines (prefetched at the start). Every ISA sums each element with one FMA per k, in k
// order, so they all give the same bits.

#if defined(PT_ISA_AVX512)
// ukernel16 holds a C row in one 16-lane register, so MR = 12 rows fill 12 of the 32 registers
// and each k step loads one B vector for 12 FMAs (ukernel8 loads two for 12 half-width ones).
template <int R>
void ukernel16(index_t kc, const float* a, const float* b, index_t rs_b, float* c, index_t ldc,
             const Epilogue& ep) {
  __m512 acc[R];
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int i = 0; i < R; ++i) {  // C is needed at the end: fetch its lines meanwhile
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 15), _MM_HINT_T0);
  }
#pragma GCC unroll 2
  for (index_t k = 0; k < kc; ++k) {
    const __m512 bk = _mm512_loadu_ps(b);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i]), bk, acc[i]);
    a += MR;
    b += rs_b;
  }
  const __m512 bias = ep.bias ? _mm512_loadu_ps(ep.bias) : _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i) {
    __m512 x = acc[i];
    // The same adds, in the same operand order, as the two halves of the AVX2 kernel.
    if (ep.load_c) x = _mm512_add_ps(_mm512_loadu_ps(c + i * ldc), x);
    if (ep.bias) x = _mm512_add_ps(x, bias);
    if (ep.act == Activation::none) {
      _mm512_storeu_ps(c + i * ldc, x);
    } else {
      // Through memory, not a 512 -> 256 cast: GCC 12's casts trip -Wmaybe-uninitialized.
      alignas(64) float row[16];
      _mm512_store_ps(row, x);
      const Vec lo = Vec::load(row), hi = Vec::load(row + 8);
      activate(lo, ep.act).store(c + i * ldc);
      activate(hi, ep.act).store(c + i * ldc + 8);
    }
  }
}
#endif

// ukernel8 holds a C row in two 8-lane vectors (AVX2, and the generic build's arrays).
template <int R>
void ukernel8(index_t kc, const float* a, const float* b, index_t rs_b, float* c, index_t ldc,
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

// Below four rows one 16-lane chain a row leaves too few FMAs in flight to hide their latency
// (two pipes x four cycles want eight), so those tiles keep two 8-lane chains a row.
template <int R>
void ukernel(index_t kc, const float* a, const float* b, index_t rs_b, float* c, index_t ldc,
             const Epilogue& ep) {
#if defined(PT_ISA_AVX512)
  if constexpr (R >= 4) {
    ukernel16<R>(kc, a, b, rs_b, c, ldc, ep);
    return;
  }
#endif
  ukernel8<R>(kc, a, b, rs_b, c, ldc, ep);
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

using TileFn = void (*)(index_t, const float*, const float*, index_t, float*, index_t, int,
                        const Epilogue&);

template <int... I>
constexpr std::array<TileFn, sizeof...(I)> tile_table(std::integer_sequence<int, I...>) {
  return {&tile<I + 1>...};
}

// A tile of 1..MR rows (anything else runs as one row).
[[maybe_unused]] void run_tile(int rows, index_t kc, const float* a, const float* b, index_t rs_b,
                               float* c, index_t ldc, int cols, const Epilogue& ep) {
  static constexpr std::array<TileFn, MR> tiles = tile_table(std::make_integer_sequence<int, MR>());
  tiles[rows >= 1 && rows <= MR ? rows - 1 : 0](kc, a, b, rs_b, c, ldc, cols, ep);
}

}  // namespace
}  // namespace PT_ISA_NS
}  // namespace pt
