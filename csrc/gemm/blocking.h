// GEMM blocking arithmetic shared by the per-ISA paths: the register tile as ints, index helpers,
// software prefetch of the next block, and the row panels of a small-M product.
// Include only from *_isa.cc files.
//
// The helpers of the csrc/gemm/*.h headers live in an unnamed namespace, as they did when all
// the paths were one file: each *_isa.cc gets its own copy (nothing for the linker to share
// between the generic and avx2 objects, or with baseline code), called directly rather than
// through the PLT and cloned for the constant arguments of its callers. Functions that were not
// inline are still not (the compiler decides as before); they are [[maybe_unused]] because not
// every *_isa.cc calls every one.
#pragma once

#include "core/isa_unit.h"
#include "gemm/gemm_kernels.h"

namespace pt {
namespace PT_ISA_NS {
namespace {  // internal linkage in every *_isa.cc that includes this (see blocking.h)

// The register tile's height is the ISA's (the AVX-512 micro-kernel holds twice the rows); its
// width, and so the packed-B layout, is the same for all.
#if defined(PT_ISA_AVX512)
constexpr int MR = 12;
#else
constexpr int MR = static_cast<int>(kMR);
#endif
constexpr int NR = static_cast<int>(kNR);
static_assert(kMC % MR == 0 && kNC % kNR == 0, "cache blocks hold whole register tiles");

inline index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }
inline index_t min_i(index_t a, index_t b) { return a < b ? a : b; }

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

// Row panels for a small M: MR rows each, except that a short last panel (1..3 rows) is merged
// with the one before and the two split evenly (8 = 4 + 4, not 6 + 2): a micro-kernel with fewer
// than four rows has too few accumulators to hide the FMA latency. Returns the panel count.
[[maybe_unused]] int small_m_panels(index_t M, index_t* start, int* height) {
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

}  // namespace
}  // namespace PT_ISA_NS
}  // namespace pt
