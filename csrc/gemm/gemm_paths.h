// The per-ISA GEMM paths gemm_isa.cc dispatches to, one 2-D product each (K, M, N > 0) on a team
// of up to nt threads. Include only from *_isa.cc files.
#pragma once

#include "core/isa_unit.h"
#include "gemm/gemm.h"

namespace pt {
namespace PT_ISA_NS {
namespace gemm_detail {

// gemm_blocked_isa.cc: the general path, both operands packed (BLIS blocking).
void gemm_blocked(const GemmArgs& p, int nt);
// The same product split along K (a small C, a long K); same bits. ksplit_worth says when.
bool ksplit_worth(const GemmArgs& p, int nt);
void gemm_blocked_ksplit(const GemmArgs& p, int nt);

// gemm_small_isa.cc, for M <= kSmallM:
// A packed once, B packed a KC x 64 block at a time (row-major B, or B^T with M > kDotM).
void gemm_small_m_blocked(const GemmArgs& p, int nt);
// M <= kTinyM, B with unit column stride: one sweep over B.
void gemm_tiny_m_rowmajor_b(const GemmArgs& p, int nt);
// B stored transposed (unit row stride): dot products along K, B read in place.
void gemm_small_m_transposed_b(const GemmArgs& p, int nt);

// gemm_prepacked_isa.cc: p.b is a pack_weight buffer.
void gemm_prepacked_b(const GemmArgs& p, int nt);

}  // namespace gemm_detail
}  // namespace PT_ISA_NS
}  // namespace pt
