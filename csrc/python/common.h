// Helpers every binding uses to check its arguments: each failure raises a Python exception
// that names the argument (TypeError for dtype/type, ValueError for shape/layout).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace pt::py_helpers {

namespace py = pybind11;

// A checked float32 array: data pointer, shape and strides counted in elements.
struct F32View {
  float* data = nullptr;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;
  std::int64_t dim(int i) const { return shape[static_cast<size_t>(i)]; }
  std::int64_t stride(int i) const { return strides[static_cast<size_t>(i)]; }
  std::int64_t size() const;
  bool c_contiguous() const;
};

std::string shape_str(const std::vector<std::int64_t>& shape);
std::string shape_str(const py::array& a);

// Requires a numpy.ndarray (TypeError otherwise).
py::array as_ndarray(const py::handle& obj, const char* name);

// Requires float32 with one of the allowed ranks (empty = any). Strides must be multiples of 4
// bytes. `writable` also requires a writeable array; `contiguous` requires C order.
F32View f32_view(const py::handle& obj, const char* name, std::vector<int> ranks = {},
                 bool writable = false, bool contiguous = false);

// Requires an integer array (int32 or int64) of one of the ranks, returned as C-contiguous int64.
py::array_t<std::int64_t> int_array(const py::handle& obj, const char* name, std::vector<int> ranks = {});

// ValueError "name: expected shape (a, b), got (c, d)".
[[noreturn]] void shape_error(const char* name, const std::vector<std::int64_t>& expected,
                              const std::vector<std::int64_t>& got);
void require_shape(const F32View& v, const char* name, const std::vector<std::int64_t>& expected);

// A new C-contiguous float32 array of the given shape (uninitialised).
py::array_t<float> new_f32(const std::vector<std::int64_t>& shape);

}  // namespace pt::py_helpers
