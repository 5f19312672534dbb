// Naive attention: one query row at a time, a full row of scores, double accumulation.
// Slow on purpose; it is the fallback and the oracle the optimised kernels are tested against.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/attention.h"

namespace pt {

namespace {

inline const float* at(const AttnView& x, index_t b, index_t l, index_t h) {
  return x.data + b * x.sb + l * x.sl + h * x.sh;
}

// p[j] = softmax of the visible scores of query (b, i, h) for first <= j < n; returns n and
// the lse, and sets first.
index_t row_probs(std::vector<double>& p, double& lse, index_t& first, const AttnView& q,
                  const AttnView& k, const AttnConfig& c, index_t b, index_t i, index_t h) {
  const index_t n = attn_visible(c, b, i);
  first = attn_first(c, b, i);
  lse = -std::numeric_limits<double>::infinity();
  if (n <= first) return first;
  const float* qr = at(q, b, i, h);
  double mx = -std::numeric_limits<double>::infinity();
  for (index_t j = first; j < n; ++j) {
    const float* kr = at(k, b, j, h);
    double s = 0.0;
    for (index_t d = 0; d < c.D; ++d) s += static_cast<double>(qr[d * q.sd]) * kr[d * k.sd];
    p[static_cast<size_t>(j)] = s * c.scale;
    mx = std::max(mx, p[static_cast<size_t>(j)]);
  }
  double sum = 0.0;
  for (index_t j = first; j < n; ++j) sum += (p[static_cast<size_t>(j)] = std::exp(p[static_cast<size_t>(j)] - mx));
  for (index_t j = first; j < n; ++j) p[static_cast<size_t>(j)] /= sum;
  lse = mx + std::log(sum);
  return n;
}

}  // namespace

void attention_forward_naive(float* out, float* lse, AttnView q, AttnView k, AttnView v,
                             const AttnConfig& c) {
  std::vector<double> p(static_cast<size_t>(c.Lk)), o(static_cast<size_t>(c.D));
  for (index_t b = 0; b < c.B; ++b)
    for (index_t i = 0; i < c.Lq; ++i)
      for (index_t h = 0; h < c.H; ++h) {
        double row_lse;
        index_t first;
        const index_t n = row_probs(p, row_lse, first, q, k, c, b, i, h);
        std::fill(o.begin(), o.end(), 0.0);
        for (index_t j = first; j < n; ++j) {
          const float* vr = at(v, b, j, h);
          for (index_t d = 0; d < c.D; ++d) o[static_cast<size_t>(d)] += p[static_cast<size_t>(j)] * vr[d * v.sd];
        }
        float* orow = out + ((b * c.Lq + i) * c.H + h) * c.D;
        for (index_t d = 0; d < c.D; ++d) orow[d] = static_cast<float>(o[static_cast<size_t>(d)]);
        if (lse) lse[(b * c.H + h) * c.Lq + i] = static_cast<float>(row_lse);
      }
}

// Recomputes the probabilities from q and k (the lse argument is not needed in double).
void attention_backward_naive(float* dq, float* dk, float* dv, AttnView dout, AttnView q,
                              AttnView k, AttnView v, AttnView out, const float* lse,
                              const AttnConfig& c) {
  const index_t D = c.D;
  std::vector<double> p(static_cast<size_t>(c.Lk)), ds(static_cast<size_t>(c.Lk));
  std::vector<double> dkd(static_cast<size_t>(c.Lk * D)), dvd(dkd.size()), dqd(static_cast<size_t>(D));
  for (index_t b = 0; b < c.B; ++b)
    for (index_t h = 0; h < c.H; ++h) {
      std::fill(dkd.begin(), dkd.end(), 0.0);
      std::fill(dvd.begin(), dvd.end(), 0.0);
      for (index_t i = 0; i < c.Lq; ++i) {
        double row_lse;
        index_t first;
        const index_t n = row_probs(p, row_lse, first, q, k, c, b, i, h);
        const float* dor = at(dout, b, i, h);
        const float* orow = at(out, b, i, h);
        const float* qr = at(q, b, i, h);
        double delta = 0.0;
        for (index_t d = 0; d < D; ++d) delta += static_cast<double>(dor[d * dout.sd]) * orow[d * out.sd];
        std::fill(dqd.begin(), dqd.end(), 0.0);
        for (index_t j = first; j < n; ++j) {
          const float* kr = at(k, b, j, h);
          const float* vr = at(v, b, j, h);
          double dp = 0.0;
          for (index_t d = 0; d < D; ++d) dp += static_cast<double>(dor[d * dout.sd]) * vr[d * v.sd];
          const double pj = p[static_cast<size_t>(j)], dsj = pj * (dp - delta) * c.scale;
          for (index_t d = 0; d < D; ++d) {
            dvd[static_cast<size_t>(j * D + d)] += pj * dor[d * dout.sd];
            dkd[static_cast<size_t>(j * D + d)] += dsj * qr[d * q.sd];
            dqd[static_cast<size_t>(d)] += dsj * kr[d * k.sd];
          }
        }
        float* dqr = dq + ((b * c.Lq + i) * c.H + h) * D;
        for (index_t d = 0; d < D; ++d) dqr[d] = static_cast<float>(dqd[static_cast<size_t>(d)]);
      }
      for (index_t j = 0; j < c.Lk; ++j) {
        float* dkr = dk + ((b * c.Lk + j) * c.H + h) * D;
        float* dvr = dv + ((b * c.Lk + j) * c.H + h) * D;
        for (index_t d = 0; d < D; ++d) {
          dkr[d] = static_cast<float>(dkd[static_cast<size_t>(j * D + d)]);
          dvr[d] = static_cast<float>(dvd[static_cast<size_t>(j * D + d)]);
        }
      }
    }
}

}  // namespace pt
