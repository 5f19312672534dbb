// 8-bit integer matrix product for inference: int8 activations x int8 weights, exact int32
// accumulation, dequantised (row scale x column scale), bias and activation fused in the write-back.
//
// Quantisation follows CTranslate2's symmetric scheme: a row x is stored as q = round(x * s) with
// s = 127 / max|x| (s = 1 for an all-zero row), so x ~= q / s.
//
// The kernel widens both operands to int16 and multiplies pairs with vpmaddwd (int16 x int16 -> the
// int32 sum of two products). Unlike the u8 x s8 vpmaddubsw route, that never saturates: every
// int8 input, -128 included, gives the exact sum as long as |sum| < 2^31, which holds for
// K <= kQMaxK (128 * 128 * K < 2^31). Where the CPU has AVX-512 VNNI (the avx512vnni level),
// vpdpbusd sums four u8 x s8 products per lane without saturating; see QRun for how the signed
// weights become unsigned. Integer sums are exact, so the int32 results are identical for every
// ISA and any thread count.
#pragma once

#include "common.h"
#include "gemm/gemm.h"

namespace pt {

// Largest K for which the int32 accumulation cannot overflow, whatever the int8 values.
inline constexpr index_t kQMaxK = 131071;
// Columns per packed weight panel.
inline constexpr index_t kQNR = 16;

// Packed int8 weight: W (N, K) row stride ldw (the Linear layout, op(B) = W^T) as ceil(N / 16)
// panels of ceil(K / 2) k-pairs x 16 columns x 2 bytes: byte 2 j + (k & 1) of pair k / 2 of panel q
// is W[16 q + j, k]; zero past row N and past column K. qpacked_size counts its bytes.
index_t qpacked_size(index_t N, index_t K);
void qpack_weight(std::int8_t* dst, const std::int8_t* w, index_t ldw, index_t N, index_t K);

// out (n, K) float32, row i = row ids[i] of the packed weight (N, K) times factor_i, where
// factor_i = float(scale) / w_scale[ids[i]] (float32 division; ids already checked in [0, N)):
// an int8 embedding lookup read straight from the panels.
void qgather_rows(float* out, const std::int8_t* packed, index_t N, index_t K, const std::int64_t* ids,
                  index_t n, const float* w_scale, float scale);

// C (M, N) int32, row stride ldc = A (M, K) int8 (row stride lda) @ W^T, W from qpack_weight.
void qgemm_s32(std::int32_t* c, index_t ldc, const std::int8_t* a, index_t lda, const std::int8_t* packed,
               index_t M, index_t N, index_t K);

// Dynamic per-row quantisation: q (M, K) int8 (row stride ldq) and scale (M,) = 127 / max|row|.
// A row holding inf or NaN gets scale NaN and zeros in q.
void quantize_rows(std::int8_t* q, index_t ldq, float* scale, const float* x, index_t ldx, index_t M, index_t K);

// The quantised Linear: C = act(dequant(quantize_rows(X) @ W^T) + bias), with
//   dequant(acc)[m, n] = acc[m, n] * ((1 / x_scale[m]) * (1 / w_scale[n])).
// X (M, K) float32 row stride ldx, C (M, N) row stride ldc, w_inv_scale (N,) = 1 / w_scale (one
// division per weight row when the weight is made, not per product), bias (N,) or nullptr. A row of X with inf or NaN gives a row of NaN.
struct QLinearArgs {
  float* c = nullptr;
  index_t ldc = 0;
  const float* x = nullptr;
  index_t ldx = 0;
  const std::int8_t* packed = nullptr;
  const float* w_inv_scale = nullptr;
  const float* bias = nullptr;
  Activation act = Activation::none;
  index_t M = 0, N = 0, K = 0;
};
void qlinear_forward(const QLinearArgs& args);

}  // namespace pt
