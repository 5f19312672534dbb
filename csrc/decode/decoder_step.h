// One incremental decoder step of every layer in a single native call.
//
// The Python step (pytransformer/models/state.py) runs about 35 kernels a position, one binding
// call each; at one sentence (or one beam) per step the Python between them cost as much as the
// kernels. decoder_step runs the same kernels in the same order on the same operands, so its
// result has the same bits as the Python step: it only removes the interpreter from the loop.
//
// Legend (csrc/common.h): B rows decoded, C = H * D, F = d_ff, G sources (B = G * g: the g
// consecutive rows of a source share its cross-attention keys/values), S source length.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "gemm/gemm.h"

namespace pt {

// y = act(x W^T + bias) by the kernel Linear.forward would take: int8 panels when qpacked is
// set, else the packed float panels when set and the input has at least packed_min_rows rows,
// else the plain float W (N, K) with row stride ldw.
struct StepLinear {
  const float* w = nullptr;
  index_t ldw = 0;
  const float* packed = nullptr;
  const std::int8_t* qpacked = nullptr;
  const float* inv_scale = nullptr;  // (N,) for qpacked
  const float* bias = nullptr;       // (N,) or nullptr
  index_t N = 0, K = 0;
};

struct StepNorm {
  const float* weight = nullptr;
  const float* bias = nullptr;
  float eps = 1e-5f;
};

struct StepLayer {
  StepLinear qkv, self_out, cross_q, cross_out, fc1, fc2;
  StepNorm norm1, norm2, norm3;
  bool cross = false;
};

// The target embedding a step starts from: x = table[token] * scale + positions[pos], the table
// float (V, C) or int8 panels with per-row scales (the rows qgather_rows dequantises).
struct StepEmbedding {
  const float* table = nullptr;
  const std::int8_t* qpacked = nullptr;
  const float* w_scale = nullptr;  // (V,) for qpacked
  const float* positions = nullptr;  // (max_pos, C)
  index_t V = 0, max_pos = 0;
  float scale = 1.0f;
};

struct StepModel {
  std::vector<StepLayer> layers;
  StepEmbedding embed;  // embed.V == 0: none (the caller embeds)
  StepLinear output;    // output.N == 0: none (the caller projects)
  StepNorm final_norm;  // weight == nullptr: none (post-norm stacks)
  bool norm_first = false;
  Activation ffn_act = Activation::relu;
  index_t C = 0, H = 0, F = 0;
  index_t window = -1;  // self-attention window (< 0: none)
  index_t packed_min_rows = 4;
};

// A (rows, positions, 2, H, D) float32 cache or cross K/V view: element (r, t, kv, h, d) is
// data[r*s_row + t*s_pos + kv*s_kv + h*s_head + d*s_dim].
struct StepKV {
  float* data = nullptr;
  index_t s_row = 0, s_pos = 0, s_kv = 0, s_head = 0, s_dim = 0;
};

// Per-call state: per layer the self-attention cache (B rows, position pos is written) and, for
// layers with cross-attention, the memory's K/V of G sources with S positions and their lengths
// (nullptr: all S).
struct StepState {
  std::vector<StepKV> self_kv;
  std::vector<StepKV> cross_kv;
  const std::int64_t* cross_lengths = nullptr;
  index_t G = 0, S = 0;
};

// Row i of the cache becomes its row indices[i] for i < B2 (indices in [0, rows), B2 <= rows),
// positions [0, t) only, in place: only the rows that change are written, and a source row that is
// itself overwritten is saved first. The beams a search keeps mostly stay in their rows, so a
// step moves a few rows of each layer.
void move_cache_rows(const StepKV& kv, index_t H, index_t D, const std::int64_t* indices, index_t B2,
                     index_t t);

// x (B, C) C-contiguous: the embedded tokens at position pos on entry, the decoder's output (after
// the final norm of a pre-norm stack) on return. Threads: each kernel's own; same bits for any
// thread count.
void decoder_step(const StepModel& m, const StepState& s, float* x, index_t B, index_t pos);

// The whole step from tokens (B,) in [0, embed.V) at pos < embed.max_pos: the embedding, every
// layer, and with project the output projection into out (B, output.N); without, the decoder's
// output into out (B, C). Needs m.embed (and m.output to project). The same kernels in the same
// order as the Python embedding, decoder_step and output Linear, so the same bits.
void decoder_step_tokens(const StepModel& m, const StepState& s, const std::int64_t* tokens, index_t B,
                         index_t pos, bool project, float* out);

}  // namespace pt
