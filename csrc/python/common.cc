#include "python/common.h"

#include <sstream>

namespace pt::py_helpers {

std::int64_t F32View::size() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

bool F32View::c_contiguous() const {
  if (size() == 0) return true;  // nothing to address: numpy's strides for empty arrays vary
  std::int64_t expect = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && strides[i] != expect) return false;
    expect *= shape[i];
  }
  return true;
}

std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) s << ",";
  s << ")";
  return s.str();
}

std::string shape_str(const py::array& a) {
  return shape_str(std::vector<std::int64_t>(a.shape(), a.shape() + a.ndim()));
}

py::array as_ndarray(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + ": expected a numpy.ndarray, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  return py::reinterpret_borrow<py::array>(obj);
}

static void check_rank(const py::array& a, const char* name, const std::vector<int>& ranks) {
  if (ranks.empty()) return;
  for (int r : ranks)
    if (a.ndim() == r) return;
  std::ostringstream s;
  s << name << ": expected ";
  for (size_t i = 0; i < ranks.size(); ++i) s << (i ? " or " : "") << ranks[i] << "-D";
  s << " array, got " << a.ndim() << "-D with shape " << shape_str(a);
  throw py::value_error(s.str());
}

F32View f32_view(const py::handle& obj, const char* name, std::vector<int> ranks, bool writable,
                 bool contiguous) {
  py::array a = as_ndarray(obj, name);
  if (!a.dtype().is(py::dtype::of<float>())) {
    throw py::type_error(std::string(name) + ": expected dtype float32, got " +
                         std::string(py::str(a.dtype())));
  }
  check_rank(a, name, ranks);
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  F32View v;
  // Read-only inputs are never written through this pointer; `writable` guards outputs.
  v.data = const_cast<float*>(static_cast<const float*>(a.data()));
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (a.strides(i) % static_cast<py::ssize_t>(sizeof(float)) != 0) {
      throw py::value_error(std::string(name) + ": strides must be multiples of the item size");
    }
    v.shape.push_back(a.shape(i));
    v.strides.push_back(a.strides(i) / static_cast<py::ssize_t>(sizeof(float)));
  }
  if (contiguous && !v.c_contiguous()) {
    throw py::value_error(std::string(name) + ": expected a C-contiguous array");
  }
  return v;
}

py::array_t<std::int64_t> int_array(const py::handle& obj, const char* name, std::vector<int> ranks) {
  py::array a = as_ndarray(obj, name);
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw py::type_error(std::string(name) + ": expected an integer array, got dtype " +
                         std::string(py::str(a.dtype())));
  }
  check_rank(a, name, ranks);
  return py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

void shape_error(const char* name, const std::vector<std::int64_t>& expected,
                 const std::vector<std::int64_t>& got) {
  throw py::value_error(std::string(name) + ": expected shape " + shape_str(expected) + ", got " +
                        shape_str(got));
}

void require_shape(const F32View& v, const char* name, const std::vector<std::int64_t>& expected) {
  if (v.shape != expected) shape_error(name, expected, v.shape);
}

py::array_t<float> new_f32(const std::vector<std::int64_t>& shape) {
  return py::array_t<float>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
}

}  // namespace pt::py_helpers
