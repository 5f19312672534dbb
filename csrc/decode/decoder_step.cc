#include "decode/decoder_step.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "attention/attention.h"
#include "norm/layer_norm.h"
#include "qgemm/qgemm.h"
#include "train/embedding.h"

namespace pt {
namespace {

// The arguments the matmul, matmul_prepacked and qlinear bindings would build for this input.
void linear(const StepLinear& l, float* y, const float* x, index_t M, Activation act,
            index_t packed_min_rows) {
  if (l.qpacked) {
    QLinearArgs q;
    q.c = y, q.ldc = l.N;
    q.x = x, q.ldx = l.K;
    q.packed = l.qpacked, q.w_inv_scale = l.inv_scale, q.bias = l.bias;
    q.act = act;
    q.M = M, q.N = l.N, q.K = l.K;
    qlinear_forward(q);
    return;
  }
  GemmArgs g;
  g.c = y, g.ldc = l.N;
  g.a = x, g.a_rs = l.K, g.a_cs = 1;
  g.bias = l.bias;
  g.act = act;
  g.M = M, g.N = l.N, g.K = l.K;
  if (l.packed && M >= packed_min_rows) {
    g.b = l.packed;
    g.c_bs = M * l.N;
    gemm_forward_prepacked(g);
  } else {
    g.b = l.w, g.b_rs = 1, g.b_cs = l.ldw;
    gemm_forward(g);
  }
}

void norm(const StepNorm& n, float* y, const float* x, const float* residual, index_t B, index_t C) {
  add_layer_norm_forward(y, nullptr, nullptr, nullptr, x, residual, n.weight, n.bias, B, C, n.eps);
}

AttnView keys_of(const StepKV& kv, index_t kv_index) {
  return AttnView{kv.data + kv_index * kv.s_kv, kv.s_row, kv.s_pos, kv.s_head, kv.s_dim};
}

// The scratch of one step; x and y swap as each residual block writes its output.
struct Buffers {
  std::vector<float> a, b, h, wide;
  float* x;
  float* y;
};

// Self-attention of the rows at position pos over the cache positions [0, pos] (the window's
// last ones), this position's keys and values written into the cache first.
void self_attention(const StepModel& m, const StepLayer& l, const StepKV& kv, float* out,
                    const float* in, Buffers& buf, index_t B, index_t pos) {
  const index_t C = m.C, H = m.H, D = C / H;
  float* qkv = buf.wide.data();
  linear(l.qkv, qkv, in, B, Activation::none, m.packed_min_rows);
  for (index_t r = 0; r < B; ++r) {
    float* dst = kv.data + r * kv.s_row + pos * kv.s_pos;
    for (index_t part = 0; part < 2; ++part)
      for (index_t h = 0; h < H; ++h)
        std::memcpy(dst + part * kv.s_kv + h * kv.s_head, qkv + r * 3 * C + (1 + part) * C + h * D,
                    sizeof(float) * static_cast<size_t>(D));
  }
  AttnConfig c{B, 1, pos + 1, H, D, nullptr, false, 0, attn_default_scale(D), m.window, false};
  attn_clamp_positions(c, pos);
  const AttnView q{qkv, 3 * C, 3 * C, D, 1};
  float* ctx = buf.h.data();
  attention_forward(ctx, nullptr, q, keys_of(kv, 0), keys_of(kv, 1), c);
  linear(l.self_out, out, ctx, B, Activation::none, m.packed_min_rows);
}

// The g = B / G rows of each source attend as g queries of its one memory row.
void cross_attention(const StepModel& m, const StepLayer& l, const StepState& s, const StepKV& kv,
                     float* out, const float* in, Buffers& buf, index_t B) {
  const index_t C = m.C, H = m.H, D = C / H, g = B / s.G;
  float* q = buf.wide.data();
  linear(l.cross_q, q, in, B, Activation::none, m.packed_min_rows);
  AttnConfig c{s.G, g, s.S, H, D, s.cross_lengths, false, 0, attn_default_scale(D), -1, false};
  attn_clamp_positions(c, 0);
  float* ctx = buf.h.data();
  attention_forward(ctx, nullptr, AttnView{q, g * C, C, D, 1}, keys_of(kv, 0), keys_of(kv, 1), c);
  linear(l.cross_out, out, ctx, B, Activation::none, m.packed_min_rows);
}

void feed_forward(const StepModel& m, const StepLayer& l, float* out, const float* in, Buffers& buf,
                  index_t B) {
  float* h = buf.wide.data();
  linear(l.fc1, h, in, B, m.ffn_act, m.packed_min_rows);
  linear(l.fc2, out, h, B, Activation::none, m.packed_min_rows);
}

// One residual block: post-norm y = LN(x + f(x)); pre-norm y = x + f(LN(x)).
template <class F>
void residual(const StepModel& m, const StepNorm& n, Buffers& buf, index_t B, F&& f) {
  const index_t C = m.C;
  float* sub = buf.a.data();
  if (m.norm_first) {
    float* normed = buf.b.data();
    norm(n, normed, buf.x, nullptr, B, C);
    f(sub, normed);
    for (index_t i = 0; i < B * C; ++i) buf.y[i] = sub[i] + buf.x[i];
  } else {
    f(sub, buf.x);
    norm(n, buf.y, sub, buf.x, B, C);
  }
  std::swap(buf.x, buf.y);
}

}  // namespace

void decoder_step(const StepModel& m, const StepState& s, float* x, index_t B, index_t pos) {
  const index_t C = m.C;
  const size_t rows = static_cast<size_t>(B * C);
  const index_t widest = std::max(3 * C, m.F);
  std::vector<float> other(rows);
  Buffers buf{std::vector<float>(rows), std::vector<float>(rows), std::vector<float>(rows),
              std::vector<float>(static_cast<size_t>(B * widest)), x, other.data()};
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const StepLayer& l = m.layers[i];
    residual(m, l.norm1, buf, B, [&](float* out, const float* in) {
      self_attention(m, l, s.self_kv[i], out, in, buf, B, pos);
    });
    if (l.cross)
      residual(m, l.norm2, buf, B, [&](float* out, const float* in) {
        cross_attention(m, l, s, s.cross_kv[i], out, in, buf, B);
      });
    residual(m, l.norm3, buf, B, [&](float* out, const float* in) { feed_forward(m, l, out, in, buf, B); });
  }
  if (m.final_norm.weight) {
    norm(m.final_norm, buf.y, buf.x, nullptr, B, C);
    std::swap(buf.x, buf.y);
  }
  if (buf.x != x) std::memcpy(x, buf.x, sizeof(float) * rows);
}

namespace {

// Copies positions [0, t) of one cache row, from (src, its strides) to row dst of kv.
void copy_row(const StepKV& kv, float* dst, const float* src, const StepKV& from, index_t H, index_t D,
              index_t t) {
  for (index_t part = 0; part < 2; ++part)
    for (index_t h = 0; h < H; ++h) {
      float* d = dst + part * kv.s_kv + h * kv.s_head;
      const float* s = src + part * from.s_kv + h * from.s_head;
      if (kv.s_pos == D && from.s_pos == D) {
        std::memcpy(d, s, sizeof(float) * static_cast<size_t>(t * D));
        continue;
      }
      for (index_t p = 0; p < t; ++p)
        std::memcpy(d + p * kv.s_pos, s + p * from.s_pos, sizeof(float) * static_cast<size_t>(D));
    }
}

}  // namespace

void move_cache_rows(const StepKV& kv, index_t H, index_t D, const std::int64_t* indices, index_t B2,
                     index_t t) {
  if (t <= 0) return;
  // Sources that are also destinations of a move, saved (head-major) before any row is written:
  // saved_at[j] is row j's place in `saved` (-1: not saved).
  std::vector<index_t> saved_at(static_cast<size_t>(B2), -1), saved_rows;
  for (index_t i = 0; i < B2; ++i) {
    const index_t j = indices[i];
    if (j != i && j < B2 && indices[j] != j && saved_at[static_cast<size_t>(j)] < 0) {
      saved_at[static_cast<size_t>(j)] = static_cast<index_t>(saved_rows.size());
      saved_rows.push_back(j);
    }
  }
  const StepKV packed{nullptr, 2 * H * t * D, D, H * t * D, t * D, 1};
  std::vector<float> saved(saved_rows.size() * static_cast<size_t>(packed.s_row));
  for (size_t n = 0; n < saved_rows.size(); ++n)
    copy_row(packed, saved.data() + n * packed.s_row, kv.data + saved_rows[n] * kv.s_row, kv, H, D, t);
  for (index_t i = 0; i < B2; ++i) {
    const index_t j = indices[i];
    if (j == i) continue;
    const index_t at = j < B2 ? saved_at[static_cast<size_t>(j)] : -1;
    if (at >= 0)
      copy_row(kv, kv.data + i * kv.s_row, saved.data() + at * packed.s_row, packed, H, D, t);
    else
      copy_row(kv, kv.data + i * kv.s_row, kv.data + j * kv.s_row, kv, H, D, t);
  }
}

void decoder_step_tokens(const StepModel& m, const StepState& s, const std::int64_t* tokens, index_t B,
                         index_t pos, bool project, float* out) {
  const StepEmbedding& e = m.embed;
  const index_t C = m.C;
  std::vector<float> x_own;
  float* x = out;
  if (project) {
    x_own.resize(static_cast<size_t>(B * C));
    x = x_own.data();
  }
  if (e.qpacked)
    qgather_rows(x, e.qpacked, e.V, C, tokens, B, e.w_scale, e.scale);
  else
    embedding_forward(x, e.table, tokens, B, C, e.scale);
  const float* p = e.positions + pos * C;
  for (index_t r = 0; r < B; ++r)
    for (index_t c = 0; c < C; ++c) x[r * C + c] += p[c];
  decoder_step(m, s, x, B, pos);
  if (project) linear(m.output, out, x, B, Activation::none, m.packed_min_rows);
}

}  // namespace pt
