// Attention op logic: layout normalisation, work split and per-thread scratch; the per-ISA tile
// bodies live in attention_isa.cc.
#include "attention/attention.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "attention/attention_isa.h"
#include "core/isa.h"
#include "core/threading.h"

namespace pt {

void attn_clamp_positions(AttnConfig& c, std::int64_t off) {
  std::int64_t w = c.window;
  if (c.window_at_last_key) {
    if (w >= c.Lk) w = -1;
  } else if (w >= 0) {
    if (off - w > c.Lk) {  // every window lies past the last key
      off = c.Lk + 1;
      w = 0;
    } else if (w - off >= c.Lq + c.Lk) {
      w = -1;
    } else if (off > c.Lk) {
      w = c.Lk - (off - w);
      off = c.Lk;
    }
  }
  c.window = w;
  c.query_offset = w < 0 && off > c.Lk ? c.Lk : off;  // then any offset >= Lk shows every key
}


namespace {

// The tile bodies want unit stride along D and D a multiple of 8 (whole Vec rows).
bool kernel_ready(index_t D, std::initializer_list<const AttnView*> views) {
  if (D % 8 != 0) return false;
  for (const AttnView* x : views)
    if (x->sd != 1) return false;
  return true;
}

// Copies a (B, L, H, D) view into a C-contiguous (B, L, H, Dp) buffer, zero past D.
AttnView pad_copy(std::vector<float>& buf, const AttnView& x, index_t B, index_t L, index_t H,
                  index_t D, index_t Dp) {
  buf.assign(static_cast<size_t>(B * L * H * Dp), 0.0f);
  for (index_t b = 0; b < B; ++b)
    for (index_t l = 0; l < L; ++l)
      for (index_t h = 0; h < H; ++h) {
        const float* src = x.data + b * x.sb + l * x.sl + h * x.sh;
        float* dst = buf.data() + ((b * L + l) * H + h) * Dp;
        for (index_t d = 0; d < D; ++d) dst[d] = src[d * x.sd];
      }
  return AttnView{buf.data(), L * H * Dp, H * Dp, Dp, 1};
}

// Drops the padding: dst (rows, D) from src (rows, Dp), both C-contiguous.
void unpad(float* dst, const float* src, index_t rows, index_t D, index_t Dp) {
  for (index_t r = 0; r < rows; ++r) std::memcpy(dst + r * D, src + r * Dp, sizeof(float) * D);
}

index_t padded_dim(index_t D) { return (D + 7) / 8 * 8; }

// Uninitialised float buffer (std::vector would zero-fill megabytes on every call).
std::unique_ptr<float[]> uninit_floats(index_t n) {
  return std::unique_ptr<float[]>(new float[static_cast<size_t>(n > 0 ? n : 1)]);
}

// Runs task(i, scratch) for i in [0, n) over up to num_threads() workers, each with its own
// slice of one scratch allocation made here (never inside the parallel region). Workers take the
// next task in index order from a shared counter: on a shared machine a descheduled thread does
// not hold the others up, and causal tiles of unequal cost balance by themselves. A task's
// result depends only on its index, so any thread count and any schedule give the same bits.
template <class Task>
void run_tasks(index_t n, index_t scratch_per_task, Task&& task) {
  const index_t workers = std::max<index_t>(1, std::min<index_t>(num_threads(), n));
  auto scratch = uninit_floats(workers * scratch_per_task);
  float* base = scratch.get();
  if (workers == 1) {
    for (index_t i = 0; i < n; ++i) task(i, base);
    return;
  }
  std::atomic<index_t> next{0};
  parallel_for(workers, [&](index_t w) {
    for (index_t i = next.fetch_add(1); i < n; i = next.fetch_add(1))
      task(i, base + w * scratch_per_task);
  });
}

// Whether the tasks of a training pass take a whole sentence (every head, one after another)
// rather than one head: with short sentences (one query tile) and enough of them to share out.
// A row's heads sit side by side in memory, and tasks of one head each sent neighbouring heads to
// different cores: on the demo's training at 2 threads a task a sentence ran the forward in 28 %
// and the backward in 20 % less time (no change at 1 thread). Each head's sums are unchanged.
bool by_sentence(const AttnConfig& c) {
  return c.Lq <= kAttnBQ && c.B >= 4 * num_threads();
}

// Copies the (B, L, H, D) view x (unit stride along D) into dst laid out (B, H, L, D) and
// returns the view of the copy. Walks the source in memory order (all heads of a position are
// adjacent), which the prefetchers follow; parallel over blocks of positions.
AttnView pack_heads(float* dst, const AttnView& x, index_t B, index_t L, index_t H, index_t D) {
  constexpr index_t kRows = 64;
  const index_t blocks = (L + kRows - 1) / kRows;
  parallel_for(B * blocks, [&](index_t t) {
    const index_t b = t / blocks, l0 = (t % blocks) * kRows, l1 = std::min(L, l0 + kRows);
    for (index_t l = l0; l < l1; ++l)
      for (index_t h = 0; h < H; ++h)
        std::memcpy(dst + ((b * H + h) * L + l) * D, x.data + b * x.sb + l * x.sl + h * x.sh,
                    sizeof(float) * static_cast<size_t>(D));
  });
  return AttnView{dst, H * L * D, D, L * D, 1};
}

}  // namespace

void attention_forward(float* out, float* lse, AttnView q, AttnView k, AttnView v,
                       const AttnConfig& c) {
  if (!kernel_ready(c.D, {&q, &k, &v})) {
    const index_t Dp = padded_dim(c.D);
    std::vector<float> qb, kb, vb, ob(static_cast<size_t>(c.B * c.Lq * c.H * Dp));
    AttnConfig cp = c;
    cp.D = Dp;
    attention_forward(ob.data(), lse, pad_copy(qb, q, c.B, c.Lq, c.H, c.D, Dp),
                      pad_copy(kb, k, c.B, c.Lk, c.H, c.D, Dp), pad_copy(vb, v, c.B, c.Lk, c.H, c.D, Dp), cp);
    unpad(out, ob.data(), c.B * c.Lq * c.H, c.D, Dp);
    return;
  }
  const index_t heads = c.B * c.H;
  // Decoding: one query a row, or the few queries of a source's beams (cross-attention). With
  // enough (row, query) pairs to share out, each task runs every head of one pair; a row's keys
  // and values then stay in L2 across its queries, and the one-query-a-row bits are kept.
  if (c.Lq <= kAttnDecodeRows && c.B * c.Lq >= 2 * num_threads() && (c.Lq == 1 || !c.window_at_last_key)) {
    auto body = PT_DISPATCH(attention_decode_row);
    run_tasks(c.B * c.Lq, attn_decode_row_scratch(c.H, c.D, c.Lk), [&](index_t t, float* scratch) {
      body(out, lse, q, k, v, c, t / c.Lq, t % c.Lq, scratch);
    });
    return;
  }
  if (c.Lq == 1) {
    auto body = PT_DISPATCH(attention_decode_head);
    run_tasks(heads, attn_decode_scratch(c.D, c.Lk), [&](index_t t, float* scratch) {
      body(out, lse, q, k, v, c, t / c.H, t % c.H, scratch);
    });
    return;
  }
  // Every query tile of a head streams all of the head's keys and values: rows H*D (or 3*H*D)
  // apart defeat the prefetchers and alias to few cache sets, so such layouts are first copied
  // to contiguous (B, H, Lk, D) (memory O(B*H*Lk*D), paid back many times over).
  const index_t nqt = (c.Lq + kAttnBQ - 1) / kAttnBQ;
  std::unique_ptr<float[]> packed;
  if (nqt > 2 && (k.sl != c.D || v.sl != c.D)) {
    const index_t n = c.B * c.Lk * c.H * c.D;
    packed = uninit_floats(2 * n);
    k = pack_heads(packed.get(), k, c.B, c.Lk, c.H, c.D);
    v = pack_heads(packed.get() + n, v, c.B, c.Lk, c.H, c.D);
  }
  auto body = PT_DISPATCH(attention_forward_tile);
  if (by_sentence(c)) {
    run_tasks(c.B, attn_forward_scratch(c.D), [&](index_t b, float* scratch) {
      for (index_t h = 0; h < c.H; ++h) body(out, lse, q, k, v, c, b, h, 0, c.Lq, scratch);
    });
    return;
  }
  run_tasks(heads * nqt, attn_forward_scratch(c.D), [&](index_t t, float* scratch) {
    const index_t bh = t / nqt, i0 = (t % nqt) * kAttnBQ;
    body(out, lse, q, k, v, c, bh / c.H, bh % c.H, i0, std::min(kAttnBQ, c.Lq - i0), scratch);
  });
}

void attention_backward(float* dq, float* dk, float* dv, AttnView dout, AttnView q, AttnView k,
                        AttnView v, AttnView out, const float* lse, const AttnConfig& c) {
  if (!kernel_ready(c.D, {&dout, &q, &k, &v, &out})) {
    const index_t Dp = padded_dim(c.D);
    std::vector<float> dob, qb, kb, vb, obuf;
    std::vector<float> dqb(static_cast<size_t>(c.B * c.Lq * c.H * Dp));
    std::vector<float> dkb(static_cast<size_t>(c.B * c.Lk * c.H * Dp)), dvb(dkb.size());
    AttnConfig cp = c;
    cp.D = Dp;
    attention_backward(dqb.data(), dkb.data(), dvb.data(), pad_copy(dob, dout, c.B, c.Lq, c.H, c.D, Dp),
                       pad_copy(qb, q, c.B, c.Lq, c.H, c.D, Dp), pad_copy(kb, k, c.B, c.Lk, c.H, c.D, Dp),
                       pad_copy(vb, v, c.B, c.Lk, c.H, c.D, Dp),
                       pad_copy(obuf, out, c.B, c.Lq, c.H, c.D, Dp), lse, cp);
    unpad(dq, dqb.data(), c.B * c.Lq * c.H, c.D, Dp);
    unpad(dk, dkb.data(), c.B * c.Lk * c.H, c.D, Dp);
    unpad(dv, dvb.data(), c.B * c.Lk * c.H, c.D, Dp);
    return;
  }
  auto body = PT_DISPATCH(attention_backward_head);
  if (by_sentence(c)) {
    run_tasks(c.B, attn_backward_scratch(c.D, c.Lq), [&](index_t b, float* scratch) {
      for (index_t h = 0; h < c.H; ++h) body(dq, dk, dv, dout, q, k, v, out, lse, c, b, h, scratch);
    });
    return;
  }
  run_tasks(c.B * c.H, attn_backward_scratch(c.D, c.Lq), [&](index_t t, float* scratch) {
    body(dq, dk, dv, dout, q, k, v, out, lse, c, t / c.H, t % c.H, scratch);
  });
}

}  // namespace pt
