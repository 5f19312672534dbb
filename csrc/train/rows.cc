#include "train/rows.h"

#include <cstring>
#include <vector>

#include "core/threading.h"

namespace pt {

namespace {

// First packed row of every batch row.
std::vector<index_t> row_starts(const std::int64_t* lengths, index_t B) {
  std::vector<index_t> start(static_cast<size_t>(B));
  index_t n = 0;
  for (index_t b = 0; b < B; ++b) {
    start[static_cast<size_t>(b)] = n;
    n += lengths[b];
  }
  return start;
}

// Copies rows x cols floats between row-strided matrices (one memcpy when both are compact).
void copy_rows(float* dst, index_t dst_rs, const float* src, index_t src_rs, index_t rows, index_t cols) {
  const size_t bytes = static_cast<size_t>(cols) * sizeof(float);
  if (dst_rs == cols && src_rs == cols) {
    std::memcpy(dst, src, bytes * static_cast<size_t>(rows));
    return;
  }
  for (index_t i = 0; i < rows; ++i) std::memcpy(dst + i * dst_rs, src + i * src_rs, bytes);
}

}  // namespace

void pad_rows(float* out, const float* x, index_t x_rs, const std::int64_t* lengths, index_t B, index_t L,
              index_t R) {
  if (B <= 0 || L <= 0 || R <= 0) return;
  const std::vector<index_t> start = row_starts(lengths, B);
  parallel_for(B, [&](index_t b) {
    const index_t n = lengths[b];
    float* row = out + b * L * R;
    copy_rows(row, R, x + start[static_cast<size_t>(b)] * x_rs, x_rs, n, R);
    std::memset(row + n * R, 0, static_cast<size_t>((L - n) * R) * sizeof(float));
  });
}

void pack_rows(float* out, index_t out_rs, const float* y, index_t y_bs, index_t y_ls,
               const std::int64_t* lengths, index_t B, index_t R) {
  if (B <= 0 || R <= 0) return;
  const std::vector<index_t> start = row_starts(lengths, B);
  parallel_for(B, [&](index_t b) {
    copy_rows(out + start[static_cast<size_t>(b)] * out_rs, out_rs, y + b * y_bs, y_ls, lengths[b], R);
  });
}

void add_column_sums(float* out, const float* x, index_t x_rs, index_t M, index_t N) {
  constexpr index_t kCols = 64;
  parallel_for((N + kCols - 1) / kCols, [&](index_t blk) {
    const index_t j0 = blk * kCols, n = N - j0 < kCols ? N - j0 : kCols;
    float acc[kCols] = {};
    for (index_t i = 0; i < M; ++i) {
      const float* row = x + i * x_rs + j0;
      for (index_t j = 0; j < n; ++j) acc[j] += row[j];
    }
    for (index_t j = 0; j < n; ++j) out[j0 + j] += acc[j];
  });
}

}  // namespace pt
