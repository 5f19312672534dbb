// Cross-entropy and log-softmax row kernels, one body for every ISA through Vec.
#include <cfloat>
#include <cmath>

#include "core/vec.h"
#include "loss/softmax_xent.h"

namespace pt {
namespace PT_ISA_NS {

namespace {

struct RowStats {
  float lse;    // log(sum_v exp(x_v))
  float sum_x;  // sum_v x_v
};

// One sweep over x[0:V]: per lane a running max m and sum s of exp(x - m). Each block of 32
// values updates the max once, so the rescaling exp(m_old - m_new) costs one exp per block.
inline RowStats row_stats(const float* x, index_t V) {
  Vec m(-FLT_MAX), s = Vec::zero(), sx = Vec::zero();
  index_t c = 0;
  for (; c + 32 <= V; c += 32) {
    const Vec x0 = Vec::load(x + c), x1 = Vec::load(x + c + 8);
    const Vec x2 = Vec::load(x + c + 16), x3 = Vec::load(x + c + 24);
    const Vec mn = max(m, max(max(x0, x1), max(x2, x3)));
    const Vec e = (exp(x0 - mn) + exp(x1 - mn)) + (exp(x2 - mn) + exp(x3 - mn));
    s = fma(s, exp(m - mn), e);
    m = mn;
    sx = sx + ((x0 + x1) + (x2 + x3));
  }
  for (; c < V; c += 8) {
    const int n = V - c < 8 ? static_cast<int>(V - c) : 8;
    const Vec x0 = n == 8 ? Vec::load(x + c) : load_tail(x + c, n, -FLT_MAX);
    const Vec mn = max(m, x0);
    s = fma(s, exp(m - mn), exp(x0 - mn));  // padded lanes: exp(-FLT_MAX - mn) = 0
    m = mn;
    sx = sx + (n == 8 ? x0 : Vec::load(x + c, n));
  }
  const float mx = m.max();
  const float total = (s * exp(m - Vec(mx))).sum();
  return {mx + std::log(total), sx.sum()};
}

}  // namespace

// Sweep 1 for a row with a gradient: like row_stats, but also stores e = exp(x - m) into d and
// the per-lane max m each block used into block_max, so sweep 2 turns e into softmax with one
// multiply by exp(m - lse) per block instead of a second exp per element. d may alias x.
inline RowStats row_stats_store(float* d, float* block_max, const float* x, index_t V) {
  Vec m(-FLT_MAX), s = Vec::zero(), sx = Vec::zero();
  index_t c = 0, blk = 0;
  for (; c + 32 <= V; c += 32, ++blk) {
    const Vec x0 = Vec::load(x + c), x1 = Vec::load(x + c + 8);
    const Vec x2 = Vec::load(x + c + 16), x3 = Vec::load(x + c + 24);
    const Vec mn = max(m, max(max(x0, x1), max(x2, x3)));
    const Vec e0 = exp(x0 - mn), e1 = exp(x1 - mn), e2 = exp(x2 - mn), e3 = exp(x3 - mn);
    e0.store(d + c);
    e1.store(d + c + 8);
    e2.store(d + c + 16);
    e3.store(d + c + 24);
    mn.store(block_max + blk * 8);
    s = fma(s, exp(m - mn), (e0 + e1) + (e2 + e3));
    m = mn;
    sx = sx + ((x0 + x1) + (x2 + x3));
  }
  for (; c < V; c += 8, ++blk) {  // the last < 32 values, one vector per block
    const int n = V - c < 8 ? static_cast<int>(V - c) : 8;
    const Vec x0 = n == 8 ? Vec::load(x + c) : load_tail(x + c, n, -FLT_MAX);
    sx = sx + (n == 8 ? x0 : Vec::load(x + c, n));  // before the store: d may alias x
    const Vec mn = max(m, x0);
    const Vec e0 = exp(x0 - mn);  // padded lanes: 0
    e0.store(d + c, n);
    mn.store(block_max + blk * 8);
    s = fma(s, exp(m - mn), e0);
    m = mn;
  }
  const float mx = m.max();
  const float total = (s * exp(m - Vec(mx))).sum();
  return {mx + std::log(total), sx.sum()};
}

void xent_rows(double* row_loss, float* dlogits, float* scratch, const float* logits, const std::int64_t* targets,
               index_t r0, index_t r1, index_t V, float label_smoothing, std::int64_t ignore_index,
               float inv_count) {
  const float eps = label_smoothing;
  for (index_t r = r0; r < r1; ++r) {
    const float* x = logits + r * V;
    float* d = dlogits ? dlogits + r * V : nullptr;
    const std::int64_t t = targets[r];
    if (t == ignore_index) {
      row_loss[r] = 0.0;
      if (d)
        for (index_t v = 0; v < V; ++v) d[v] = 0.0f;
      continue;
    }
    const float xt = x[t];  // read before an in-place sweep overwrites it
    const RowStats st = d ? row_stats_store(d, scratch, x, V) : row_stats(x, V);
    row_loss[r] = (1.0 - eps) * (static_cast<double>(st.lse) - xt) +
                  eps * (static_cast<double>(st.lse) - static_cast<double>(st.sum_x) / static_cast<double>(V));
    if (!d) continue;
    // d = (exp(x - lse) - eps / V) / count = e * exp(m_block - lse) / count - eps / (V count);
    // then the target takes -(1 - eps) / count.
    const Vec vlse(st.lse), vscale(inv_count), vshift(-eps / static_cast<float>(V) * inv_count);
    index_t c = 0, blk = 0;
    for (; c + 32 <= V; c += 32, ++blk) {
      const Vec f = exp(Vec::load(scratch + blk * 8) - vlse) * vscale;
      for (int j = 0; j < 32; j += 8) fma(Vec::load(d + c + j), f, vshift).store(d + c + j);
    }
    for (; c < V; c += 8, ++blk) {
      const int n = V - c < 8 ? static_cast<int>(V - c) : 8;
      const Vec f = exp(Vec::load(scratch + blk * 8) - vlse) * vscale;
      fma(Vec::load(d + c, n), f, vshift).store(d + c, n);
    }
    d[t] -= (1.0f - eps) * inv_count;
  }
}

void log_softmax_rows(float* out, const float* inp, index_t r0, index_t r1, index_t V) {
  for (index_t r = r0; r < r1; ++r) {
    const float* x = inp + r * V;
    float* y = out + r * V;
    const Vec vlse(row_stats(x, V).lse);
    index_t c = 0;
    for (; c + 8 <= V; c += 8) (Vec::load(x + c) - vlse).store(y + c);
    if (c < V) {
      const int n = static_cast<int>(V - c);
      (Vec::load(x + c, n) - vlse).store(y + c, n);
    }
  }
}

namespace {

// The k best (key, index) seen so far, keys descending, equal keys by ascending index; filled in
// index order, so a newcomer goes after the equal keys already there.
struct TopK {
  std::int64_t* idx;
  float* key;
  index_t k, count = 0;

  float threshold() const { return count < k ? -INFINITY : key[k - 1]; }
  void offer(index_t i, float v) {
    const float kv = v != v ? -INFINITY : v;
    if (count == k && !(kv > key[k - 1])) return;
    index_t pos = count < k ? count++ : k - 1;
    for (; pos > 0 && key[pos - 1] < kv; --pos) {
      key[pos] = key[pos - 1];
      idx[pos] = idx[pos - 1];
    }
    key[pos] = kv;
    idx[pos] = i;
  }
};

}  // namespace

void log_softmax_topk_rows(std::int64_t* idx, float* val, const float* inp, index_t r0, index_t r1,
                           index_t V, index_t k) {
  for (index_t r = r0; r < r1; ++r) {
    const float* x = inp + r * V;
    const float lse = row_stats(x, V).lse;
    const Vec vlse(lse);
    TopK best{idx + r * k, val + r * k, k};
    index_t c = 0;
    for (; c < k; ++c) best.offer(c, x[c] - lse);
    // A block of 8 is looked at lane by lane only when its maximum passes the threshold. x - lse
    // is NaN either nowhere (lse finite: every x is finite or -inf) or everywhere (lse NaN or
    // -inf), and an all-NaN maximum fails `<=`, so no block that matters is skipped.
    for (; c + 8 <= V; c += 8) {
      const Vec v = Vec::load(x + c) - vlse;
      if (v.max() <= best.threshold()) continue;
      alignas(32) float lanes[8];
      v.store(lanes);
      for (int j = 0; j < 8; ++j) best.offer(c + j, lanes[j]);
    }
    for (; c < V; ++c) best.offer(c, x[c] - lse);
    // The values are log_softmax_rows's expression, x - lse, not the ranking keys.
    for (index_t j = 0; j < k; ++j) best.key[j] = x[best.idx[j]] - lse;
  }
}

}  // namespace PT_ISA_NS
}  // namespace pt
