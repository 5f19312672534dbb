// pytransformer native core: shared conventions.
//
// Dimension legend (used in every contract comment):
//   B = batch size, S = source length, T = target length, L = any sequence length,
//   C = d_model (channels), H = heads, D = head dim (C = H * D), V = vocabulary size,
//   M, N, K = matrix product sizes (op(A) is M x K, op(B) is K x N, C is M x N).
// Layout: float32, row-major; a stride is counted in elements, not bytes.
// Argument order: outputs, then inputs and weights, then sizes; gradients are prefixed `d`.
//
// Source layout (CMakeLists.txt picks files by name):
//   *.cc        baseline target: op logic, shape checks, dispatch, packing
//   *_isa.cc    compiled once per ISA inside namespace pt::PT_ISA_NS (generic, avx2);
//               write SIMD through csrc/core/vec.h so one body serves every ISA
//   *_avx2*.cc  hand-written AVX2+FMA intrinsics, x86 only
// ISA translation units must not define non-inline functions outside pt::PT_ISA_NS and should
// avoid instantiating STL templates, which the linker could share with baseline code.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pt {
using index_t = std::int64_t;
}  // namespace pt
