// Argument helpers shared by the norm/loss/training bindings (ops.cc, ops_train.cc).
#pragma once

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "python/common.h"

namespace pt::py_helpers {

// A checked float32 input as a C-contiguous array (the caller's own buffer when it already is
// C-contiguous, else a copy), kept alive by `arr`.
// Hidden visibility like the pybind11 types it holds.
struct __attribute__((visibility("hidden"))) F32In {
  py::array_t<float> arr;
  const float* data = nullptr;
  std::vector<std::int64_t> shape;
  std::int64_t size = 0;
};

inline F32In f32_in(const py::handle& obj, const char* name, std::vector<int> ranks = {}) {
  F32View v = f32_view(obj, name, std::move(ranks));
  F32In r;
  r.arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(as_ndarray(obj, name));
  r.data = r.arr.data();
  r.shape = v.shape;
  r.size = v.size();
  return r;
}

// A writable C-contiguous float32 array the kernel updates in place.
inline F32View f32_inout(const py::handle& obj, const char* name, std::vector<int> ranks = {}) {
  return f32_view(obj, name, std::move(ranks), /*writable=*/true, /*contiguous=*/true);
}

inline void require_same_shape(const std::vector<std::int64_t>& got, const char* name,
                               const std::vector<std::int64_t>& expected) {
  if (got != expected) shape_error(name, expected, got);
}

// A kernel's output: `out` once checked (writable C-contiguous float32 of `shape`), or a new
// array when out is None; *data points at its elements.
inline py::object out_or_new(const py::object& out, const std::vector<std::int64_t>& shape, float** data) {
  if (out.is_none()) {
    py::array_t<float> result = new_f32(shape);
    *data = result.mutable_data();
    return std::move(result);
  }
  const F32View o = f32_inout(out, "out");
  require_same_shape(o.shape, "out", shape);
  *data = o.data;
  return out;
}

// ValueError unless lo <= x <= hi (and x is not NaN).
inline void require_range(double x, const char* name, double lo, double hi) {
  if (x >= lo && x <= hi) return;
  std::ostringstream s;
  s << name << ": expected a value in [" << lo << ", " << hi << "], got " << x;
  throw py::value_error(s.str());
}

// ValueError unless x is finite and >= 0.
inline void require_nonnegative(double x, const char* name) {
  if (std::isfinite(x) && x >= 0.0) return;
  std::ostringstream s;
  s << name << ": expected a finite value >= 0, got " << x;
  throw py::value_error(s.str());
}

// (..., C) → C, with the rank and non-empty last axis checked.
inline std::int64_t last_axis(const std::vector<std::int64_t>& shape, const char* name) {
  if (shape.empty()) throw py::value_error(std::string(name) + ": expected at least a 1-D array, got 0-D");
  if (shape.back() == 0) throw py::value_error(std::string(name) + ": the last axis must be non-empty");
  return shape.back();
}

inline std::vector<std::int64_t> leading(const std::vector<std::int64_t>& shape) {
  return std::vector<std::int64_t>(shape.begin(), shape.end() - 1);
}

}  // namespace pt::py_helpers

namespace pt {
void register_train_ops(pybind11::module_& m);
void register_naive_ops(pybind11::module_& m);  // pytransformer._C._naive (test oracles)
}  // namespace pt
