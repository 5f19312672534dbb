// Per-ISA tile bodies of attention (defined in attention_isa.cc, compiled once per ISA).
// Preconditions every body relies on (attention.cc guarantees them): sd == 1 for every view and
// D a multiple of 8; outputs are C-contiguous.
#pragma once

#include "attention/attention.h"

namespace pt {

// Query tile and key tile sizes; scratch sizes (floats) each body needs per thread.
constexpr index_t kAttnBQ = 64;
constexpr index_t kAttnBK = 64;
// Backward walks key tiles in blocks of this many tiles (see attention_backward_head).
constexpr index_t kAttnKeyBlock = 4;
// Up to this many queries a row take the decode kernel (attention_decode_row) instead of tiles.
constexpr index_t kAttnDecodeRows = 8;
// Leading dimension of the per-thread score tiles and packed Q^T: padded past a power of two so
// that the column a micro-kernel walks does not map every row to the same few L1 sets.
constexpr index_t kAttnLD = kAttnBQ + 8;
// Row stride for packed rows of D floats, padded likewise when 4*D is a multiple of 256 bytes.
inline index_t attn_row_stride(index_t D) { return D % 64 == 0 ? D + 8 : D; }

inline index_t attn_forward_scratch(index_t D) {
  return D * kAttnLD + kAttnBK * kAttnLD + 2 * kAttnBQ * D + 5 * kAttnBQ;
}
inline index_t attn_decode_scratch(index_t D, index_t Lk) { return D + Lk + 8; }
inline index_t attn_decode_row_scratch(index_t H, index_t D, index_t Lk) {
  return 2 * H * D + H * (Lk + 8) + H;
}
inline index_t attn_backward_scratch(index_t D, index_t Lq) {
  const index_t lqp = (Lq + kAttnBQ - 1) / kAttnBQ * kAttnBQ;
  return 2 * lqp / kAttnBQ * D * kAttnLD + Lq * D + 2 * Lq * attn_row_stride(D) + 4 * lqp +
         2 * kAttnBK * kAttnLD + 2 * kAttnKeyBlock * kAttnBK * (D + attn_row_stride(D));
}

#define PT_ATTENTION_ISA_DECLS                                                                  \
  /* One query tile [i0, i0 + mq) (mq <= kAttnBQ) of head (b, h): writes its out rows and, when \
     lse is not null, its lse entries. */                                                       \
  void attention_forward_tile(float* out, float* lse, const AttnView& q, const AttnView& k,     \
                              const AttnView& v, const AttnConfig& c, index_t b, index_t h,     \
                              index_t i0, index_t mq, float* scratch);                          \
  /* Lq == 1: the single query of head (b, h) against the Lk cached keys. */                    \
  void attention_decode_head(float* out, float* lse, const AttnView& q, const AttnView& k,      \
                             const AttnView& v, const AttnConfig& c, index_t b, index_t h,      \
                             float* scratch);                                                   \
  /* Query i of row b, every head at once, each with attention_decode_head's arithmetic (the \
     same bits for Lq == 1), reading each key and value row front to back. */                   \
  void attention_decode_row(float* out, float* lse, const AttnView& q, const AttnView& k,       \
                            const AttnView& v, const AttnConfig& c, index_t b, index_t i,       \
                            float* scratch);                                                    \
  /* All of head (b, h): writes its rows of dq, dk and dv. */                                   \
  void attention_backward_head(float* dq, float* dk, float* dv, const AttnView& dout,           \
                               const AttnView& q, const AttnView& k, const AttnView& v,         \
                               const AttnView& out, const float* lse, const AttnConfig& c,      \
                               index_t b, index_t h, float* scratch);

namespace generic {
PT_ATTENTION_ISA_DECLS
}
namespace avx2 {
PT_ATTENTION_ISA_DECLS
}

}  // namespace pt
