// The per-step bookkeeping of batched beam search (pytransformer/decode/search.py's
// beam_search), native because at one sentence a step its two dozen numpy calls on arrays of a
// few elements cost about as much as the decoder's kernels.
//
// Legend: g sentences, k live slots each (rows = g * k decoder rows, row = sentence * k + slot),
// V vocabulary, C candidates kept per sentence (2 * beam size).
#pragma once

#include <cstdint>

#include "common.h"

namespace pt {

// The C best extensions of each sentence's k slots: logits (g * k, V) row-major, cum (g, k)
// each slot's summed log-probability. Candidate (slot j, token v) has value cum[j] +
// log_softmax(row j)[v] (the float32 log-probability widened to double); the kept ones are the
// best by value, ties by j * V + v ascending, NaN below -inf, and fill val/slot/tok (g, C) in that
// order; past k * min(C, V) candidates a row holds value -inf, slot 0, token 0. Only the
// min(C, V) best tokens of each row are looked at (a sentence's best C lie among them).
void beam_candidates(double* val, std::int64_t* slot, std::int64_t* tok, const float* logits,
                     const double* cum, index_t g, index_t k, index_t V, index_t C);

// The beams a step keeps. Inputs (n, C): c_val, c_slot, c_tok, the candidates of the n sentences
// of the step; pick (n, >= k_new) the candidate each kept slot continues with (nullptr: slot j
// takes candidate j), ldpick its row length; ci (r,) the sentences that go on. For each, slot j
// takes candidate pick[j]; a dead slot (value not > -inf) copies the slot and token of the first
// live one. When k_new == k_old the slots are then reordered so that every parent's first child
// stays in the parent's own slot (fewer cache rows move). Writes s_val and s_tok (r, k_new) and
// parents (r * k_new): row ci * k_old + slot of the step's decoder rows. Returns whether parents
// differs from 0, 1, ..., n * k_old - 1 (the decoder state must be reordered).
bool beam_settle(double* s_val, std::int64_t* s_tok, std::int64_t* parents, const double* c_val,
                 const std::int64_t* c_slot, const std::int64_t* c_tok, const std::int64_t* pick,
                 index_t ldpick, const std::int64_t* ci, index_t n, index_t r, index_t C, index_t k_old,
                 index_t k_new);

}  // namespace pt
