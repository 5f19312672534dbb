#include "python/registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pytransformer native kernels (use pytransformer.ops, not this module directly)";
  pt::register_core(m);
  pt::register_gemm(m);
  pt::register_attention(m);
  pt::register_ops(m);
  pt::register_qgemm(m);
  pt::register_decode(m);
}
