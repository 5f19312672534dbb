// The GEMM micro-kernel: one register tile (up to MR x NR) of C from packed A and B panels, and
// run_tile, which dispatches a tile of any size 1..MR x 1..NR to it. Include only from *_isa.cc.
#pragma once

#include "core/isa_unit.h"
#include "core/vec.h"
#include "gemm/blocking.h"
#include "gemm/epilogue.h"

namespace pt {
namespace PT_ISA_NS {
namespace {  // internal linkage in every *_isa.cc that includes this (see blocking.h)

static_assert(NR == 2 * Vec::width, "the micro-kernel holds a C row in two vectors");

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

[[maybe_unused]] void run_tile(int rows, index_t kc, const float* a, const float* b, index_t rs_b,
                               float* c, index_t ldc, int cols, const Epilogue& ep) {
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

}  // namespace
}  // namespace PT_ISA_NS
}  // namespace pt
