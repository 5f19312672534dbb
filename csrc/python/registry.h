// One register_* function per area; module.cc calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace pt {
void register_core(pybind11::module_& m);
void register_gemm(pybind11::module_& m);
void register_attention(pybind11::module_& m);
void register_ops(pybind11::module_& m);
void register_qgemm(pybind11::module_& m);
void register_decode(pybind11::module_& m);
}  // namespace pt
