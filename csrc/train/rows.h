// Copies between a batch's packed rows and its padded layout. Batch row b of a padded (B, L, R)
// array holds lengths[b] real positions followed by padding; the packed (N, R) array holds the
// N = sum(lengths) real positions in batch order. Position-wise layers run on the packed rows,
// attention on the padded layout (see pytransformer/nn/layout.py).
#pragma once

#include <cstdint>

#include "common.h"

namespace pt {

// out (B, L, R) C-contiguous = x's rows placed at the real positions, zeros at padding. x (N, R)
// with row stride x_rs (elements, unit inner stride). lengths already checked: each in [0, L],
// summing to N. Parallel over batch rows.
void pad_rows(float* out, const float* x, index_t x_rs, const std::int64_t* lengths, index_t B, index_t L,
              index_t R);

// out (N, R) with row stride out_rs = the real positions of y (B, L, R), element (b, l, r) at
// y[b * y_bs + l * y_ls + r]. lengths as for pad_rows. Parallel over batch rows.
void pack_rows(float* out, index_t out_rs, const float* y, index_t y_bs, index_t y_ls,
               const std::int64_t* lengths, index_t B, index_t R);

// out[j] += sum over i of x[i * x_rs + j] for j < N, the rows summed in order from zero (numpy's
// x.sum(axis=0) order for N > 1): a bias gradient. Parallel over blocks of columns.
void add_column_sums(float* out, const float* x, index_t x_rs, index_t M, index_t N);

}  // namespace pt
