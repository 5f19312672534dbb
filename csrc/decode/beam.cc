#include "decode/beam.h"

#include <cmath>
#include <vector>

#include "loss/softmax_xent.h"

namespace pt {

namespace {

struct Candidate {
  double value;
  std::int64_t flat;  // slot * V + token
};

// Strictly better: a higher value, NaN below everything (numpy sorts NaN last), ties by the lower
// flat index (the order np.lexsort((flat, -value)) gives).
bool better(const Candidate& a, const Candidate& b) {
  const bool an = std::isnan(a.value), bn = std::isnan(b.value);
  if (an != bn) return bn;
  if (!an && a.value != b.value) return a.value > b.value;
  return a.flat < b.flat;
}

}  // namespace

void beam_candidates(double* val, std::int64_t* slot, std::int64_t* tok, const float* logits,
                     const double* cum, index_t g, index_t k, index_t V, index_t C) {
  const index_t kk = C < V ? C : V, rows = g * k;
  std::vector<std::int64_t> idx(static_cast<size_t>(rows * kk));
  std::vector<float> lp(static_cast<size_t>(rows * kk));
  log_softmax_topk(idx.data(), lp.data(), logits, rows, V, kk);
  std::vector<Candidate> best(static_cast<size_t>(C));
  for (index_t s = 0; s < g; ++s) {
    index_t count = 0;
    for (index_t j = 0; j < k; ++j) {
      const index_t row = s * k + j;
      for (index_t i = 0; i < kk; ++i) {
        const Candidate c{cum[row] + static_cast<double>(lp[row * kk + i]), j * V + idx[row * kk + i]};
        if (count == C && !better(c, best[C - 1])) continue;
        index_t pos = count < C ? count++ : C - 1;
        for (; pos > 0 && better(c, best[pos - 1]); --pos) best[pos] = best[pos - 1];
        best[pos] = c;
      }
    }
    for (index_t i = 0; i < C; ++i) {
      const bool kept = i < count;
      val[s * C + i] = kept ? best[i].value : -INFINITY;
      slot[s * C + i] = kept ? best[i].flat / V : 0;
      tok[s * C + i] = kept ? best[i].flat % V : 0;
    }
  }
}

bool beam_settle(double* s_val, std::int64_t* s_tok, std::int64_t* parents, const double* c_val,
                 const std::int64_t* c_slot, const std::int64_t* c_tok, const std::int64_t* pick,
                 index_t ldpick, const std::int64_t* ci, index_t n, index_t r, index_t C, index_t k_old,
                 index_t k_new) {
  std::vector<double> v(static_cast<size_t>(k_new));
  std::vector<std::int64_t> sl(static_cast<size_t>(k_new)), tk(static_cast<size_t>(k_new));
  std::vector<index_t> place(static_cast<size_t>(k_new));
  bool moved = r * k_new != n * k_old;
  for (index_t i = 0; i < r; ++i) {
    const index_t s = ci[i];
    index_t first_live = -1;
    for (index_t j = 0; j < k_new; ++j) {
      const index_t c = s * C + (pick ? pick[s * ldpick + j] : j);
      v[j] = c_val[c], sl[j] = c_slot[c], tk[j] = c_tok[c];
      if (first_live < 0 && v[j] > -INFINITY) first_live = j;
    }
    const index_t src = first_live < 0 ? 0 : first_live;
    for (index_t j = 0; j < k_new; ++j)
      if (!(v[j] > -INFINITY)) sl[j] = sl[src], tk[j] = tk[src];
    for (index_t j = 0; j < k_new; ++j) place[j] = k_new == k_old ? -1 : j;
    if (k_new == k_old) {
      // Each parent's first child into the parent's slot, the other children into the slots left
      // free, in order.
      for (index_t j = 0; j < k_new; ++j)
        if (place[sl[j]] < 0) place[sl[j]] = j;
      index_t free_slot = 0;
      for (index_t j = 0; j < k_new; ++j) {
        if (place[sl[j]] == j) continue;
        while (place[free_slot] >= 0) ++free_slot;
        place[free_slot] = j;
      }
    }
    for (index_t p = 0; p < k_new; ++p) {
      const index_t j = place[p], out = i * k_new + p;
      s_val[out] = v[j], s_tok[out] = tk[j];
      parents[out] = s * k_old + sl[j];
      moved = moved || parents[out] != out;
    }
  }
  return moved;
}

}  // namespace pt
