// Scaled dot-product attention, forward and backward (flash-style: query tiles x key tiles with
// an online softmax; no Lq x Lk matrix is ever stored beyond one per-thread tile).
//
// Legend (csrc/common.h): B batch, H heads, D head dim; Lq query length, Lk key length.
// Masks: query i of batch b sits at position p = i + query_offset and sees the keys j with
//   j < key_lengths[b] (or Lk),  j <= p when causal,  |p - j| <= window when windowed,
// that is the range [attn_first(b, i), attn_visible(b, i)). Both ends grow with i, which the
// tile loops rely on. A query that sees no key gets a zero output row and a log-sum-exp of -inf.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace pt {

// A read-only (B, L, H, D) float32 view: element (b, l, h, d) is
// data[b*sb + l*sl + h*sh + d*sd] (strides in elements, any sign; views into a fused
// (B, L, 3, H, D) projection are typical).
struct AttnView {
  const float* data;
  index_t sb, sl, sh, sd;
};

// Sizes, masks and scale shared by forward and backward.
struct AttnConfig {
  index_t B, Lq, Lk, H, D;
  const std::int64_t* key_lengths;  // (B,) with values in [0, Lk], or nullptr: all Lk keys
  bool causal;
  index_t query_offset;  // >= 0; query i sits at position i + query_offset of the key sequence
  float scale;           // scores are scale * q.k (the caller supplies 1/sqrt(D) by default)
  index_t window = -1;   // >= 0: restricted attention, |p - j| <= window; < 0: no window
  // Decoding (Lq == 1): the query sits at the last key it may see (key_lengths[b] - 1, or
  // Lk - 1) whatever query_offset says, so the window keeps the last window + 1 cached keys.
  bool window_at_last_key = false;
};

// End of the keys query i of batch b may see: the keys below it, bounded by key_lengths and,
// relative to the query's position, by the causal mask and the window.
inline index_t attn_visible(const AttnConfig& c, index_t b, index_t i) {
  index_t n = c.key_lengths ? static_cast<index_t>(c.key_lengths[b]) : c.Lk;
  if (c.window_at_last_key) return n;
  const index_t p = i + c.query_offset;
  if (c.causal && p + 1 < n) n = p + 1;
  if (c.window >= 0 && p + c.window + 1 < n) n = p + c.window + 1;
  return n;
}

// First key query i of batch b may see (0 without a window; may be >= attn_visible, when the
// query sees no key).
inline index_t attn_first(const AttnConfig& c, index_t b, index_t i) {
  if (c.window < 0) return 0;
  const index_t p = c.window_at_last_key ? attn_visible(c, b, i) - 1 : i + c.query_offset;
  return p - c.window > 0 ? p - c.window : 0;
}

// The scale of scores when the caller gives none: 1 / sqrt(D), rounded from double.
inline float attn_default_scale(index_t D) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
}

// Sets c.query_offset and c.window from the caller's query offset (c.window holding the
// caller's window), brought into a range where positions cannot overflow while keeping which
// keys each query sees: only off - window matters once the queries sit past every key, and a
// window wider than any distance between a query and a key is none. Needs c.Lq and c.Lk.
void attn_clamp_positions(AttnConfig& c, std::int64_t query_offset);

// out (B, Lq, H, D) C-contiguous, overwritten: softmax(scale q k^T + mask) v per (b, h).
// lse (B, H, Lq) C-contiguous, overwritten with the row log-sum-exp of the masked scaled
// scores, or nullptr. q is (B, Lq, H, D); k, v are (B, Lk, H, D); any strides.
// Parallel over (b, h, query tile); bit-identical for any thread count. Lq == 1 takes a decode
// path (one query per (b, h) against a cache of Lk keys). Extra memory: per-thread tiles, plus a
// contiguous (B, H, Lk, D) copy of k and v when their rows are strided (fused projections).
void attention_forward(float* out, float* lse, AttnView q, AttnView k, AttnView v,
                       const AttnConfig& c);

// dq (B, Lq, H, D), dk and dv (B, Lk, H, D), all C-contiguous, overwritten with the gradients of
// sum(dout * out) where out = attention_forward(q, k, v). out is the forward output and lse
// (B, H, Lq) C-contiguous its log-sum-exp; probabilities are recomputed tile by tile.
// Parallel over (b, h); bit-identical for any thread count. Extra memory: per-thread scratch of
// about 5 * Lq * D floats (packed q, dout, their transposes, the dq accumulator).
void attention_backward(float* dq, float* dk, float* dv, AttnView dout, AttnView q, AttnView k,
                        AttnView v, AttnView out, const float* lse, const AttnConfig& c);

// Naive siblings (fallback and test oracle): the same contracts, one query row at a time with
// double accumulation and a full row of scores.
void attention_forward_naive(float* out, float* lse, AttnView q, AttnView k, AttnView v,
                             const AttnConfig& c);
void attention_backward_naive(float* dq, float* dk, float* dv, AttnView dout, AttnView q,
                              AttnView k, AttnView v, AttnView out, const float* lse,
                              const AttnConfig& c);

}  // namespace pt
