// Per-ISA GEMM entry points (csrc/gemm/*_isa.cc, compiled once per ISA; gemm_isa.cc dispatches to
// the paths) and the blocking constants; gemm.cc picks an ISA with PT_DISPATCH.
#pragma once

#include "gemm/gemm.h"

namespace pt {

// Blocking constants (BLIS names). MR x NR is the register tile of the micro-kernel (6 x 16 =
// 12 eight-lane accumulators, leaving 4 of AVX2's 16 ymm registers for B loads and A broadcasts;
// the AVX-512 build's tile is 12 x 16, one 16-lane register a row: blocking.h).
// KC x NR floats of B (16 KiB) stay in L1 while a micro-kernel runs, MC x KC of A (144 KiB) in L2,
// KC x NC of B (up to 4 MiB) in L3. KC alone fixes the rounding (partial sums are added to C in
// K-block order), so MC and NC may change with the shape or the thread count without changing bits.
inline constexpr index_t kMR = 6;
inline constexpr index_t kNR = 16;
inline constexpr index_t kKC = 256;
inline constexpr index_t kMC = 144;
inline constexpr index_t kNC = 4080;
// The K-split path (gemm_blocked_isa.cc) for products whose C has at most kKSplitMaxC elements,
// while its per-slice buffers stay within kKSplitMaxBuffer floats (16 MB).
inline constexpr index_t kKSplitMaxC = 512 * 512;
inline constexpr index_t kKSplitMaxBuffer = index_t{4} << 20;
// Products with at most kSmallM rows (decoding: batch x beam) take the small-M paths in
// gemm_small_isa.cc, which pack A once and B a block at a time: up to kTinyM rows a GEMV-like
// sweep reads a row-major B once, in address order; up to kDotM rows a B stored transposed (N, K)
// is read in place as rows of dot products.
inline constexpr index_t kSmallM = 32;
inline constexpr index_t kTinyM = 4;
inline constexpr index_t kDotM = 16;

// Seconds the selected ISA takes for fma_probe(iters) (single thread): the bench's peak probe.
double fma_probe_seconds(index_t iters);

// The entry points of each kernel set (namespaces generic, avx2, avx512):
//   gemm_2d            one 2-D product (args.batch is ignored; the caller loops over batch
//                      items). K >= 0, M, N > 0.
//   fma_probe          peak-rate probe for the benchmark: 12 independent FMA chains, iters
//                      rounds of 192 flops.
//   gemm_2d_prepacked  gemm_2d with args.b a pack_weight buffer (b strides unused).
//   pack_weight        see pt::pack_weight.
#define PT_GEMM_ENTRY_POINTS                    \
  void gemm_2d(const GemmArgs& args);           \
  float fma_probe(index_t iters);               \
  void gemm_2d_prepacked(const GemmArgs& args); \
  void pack_weight(float* dst, const float* w, index_t ldw, index_t N, index_t K);

namespace generic {
PT_GEMM_ENTRY_POINTS
}  // namespace generic

#if defined(PT_HAVE_AVX2) || defined(PT_ISA_AVX2)
namespace avx2 {
PT_GEMM_ENTRY_POINTS
}  // namespace avx2
#endif

#if defined(PT_HAVE_AVX512) || defined(PT_ISA_AVX512)
namespace avx512 {  // AVX-512 F/VL/BW/DQ: the 12 x 16 micro-kernel, the same bits as avx2
PT_GEMM_ENTRY_POINTS
}  // namespace avx512
#endif

#undef PT_GEMM_ENTRY_POINTS

}  // namespace pt
