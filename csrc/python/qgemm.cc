// Bindings of the int8 GEMM (csrc/qgemm): weight packing, row quantisation, the raw int32 product
// (for tests) and the quantised Linear. Checks and converts only; kernels run with the GIL released.
#include <string>
#include <vector>

#include "python/common.h"
#include "python/registry.h"
#include "qgemm/qgemm.h"

namespace py = pybind11;

namespace pt {
namespace {

using py_helpers::shape_str;

std::string dtype_name(const py::array& a) { return std::string(py::str(a.dtype())); }

// A C-contiguous int8 array of the given rank (a strided one is copied).
py::array_t<std::int8_t> int8_array(const py::handle& obj, const char* name, int rank) {
  py::array a = py_helpers::as_ndarray(obj, name);
  if (!a.dtype().is(py::dtype::of<std::int8_t>()))
    throw py::type_error(std::string(name) + ": expected dtype int8, got " + dtype_name(a));
  if (a.ndim() != rank)
    throw py::value_error(std::string(name) + ": expected a " + std::to_string(rank) + "-D array, got shape " +
                          shape_str(a));
  return py::array_t<std::int8_t, py::array::c_style>::ensure(a);
}

// A C-contiguous float32 array of rank 2 or 3 (a strided one is copied).
py::array_t<float> f32_rows(const py::handle& obj, const char* name) {
  py_helpers::f32_view(obj, name, {2, 3});  // dtype and rank checks with the usual messages
  return py::array_t<float, py::array::c_style>::ensure(obj);
}

void check_k(std::int64_t K, const char* name) {
  if (K < 1) throw py::value_error(std::string(name) + ": the inner dimension K must be >= 1");
  if (K > kQMaxK)
    throw py::value_error(std::string(name) + ": K=" + std::to_string(K) + " exceeds " + std::to_string(kQMaxK) +
                          ", past which the int32 sums could overflow");
}

// The packed array of qpack_weight for an (n, k) weight, checked against the operand's K.
const std::int8_t* checked_packed(const py::array_t<std::int8_t>& pk, std::int64_t n, std::int64_t k,
                                  std::int64_t K) {
  const std::int64_t panels = (n + kQNR - 1) / kQNR;
  if (n < 1 || pk.shape(0) != panels || pk.shape(2) != 2 * kQNR)
    throw py::value_error("packed: expected the (ceil(n / 16), ceil(K / 2), 32) array of qpack_weight for n=" +
                          std::to_string(n) + ", got shape " + shape_str(pk));
  if (k < 1 || pk.shape(1) != (k + 1) / 2)
    throw py::value_error("packed: " + std::to_string(pk.shape(1)) + " k-pairs do not hold k=" + std::to_string(k) +
                          " columns");
  if (K != k)
    throw py::value_error("a: inner dimension K=" + std::to_string(K) + " differs from the weight's " +
                          std::to_string(k) + " columns");
  return pk.data();
}

Activation parse_act(const py::object& activation) {
  if (activation.is_none()) return Activation::none;
  if (py::isinstance<py::str>(activation)) {
    const std::string name = activation.cast<std::string>();
    if (name == "relu") return Activation::relu;
    if (name == "gelu") return Activation::gelu;
  }
  throw py::value_error("activation: expected None, 'relu' or 'gelu', got " + std::string(py::repr(activation)));
}

py::object qpack_weight_py(const py::object& w_obj) {
  const py::array_t<std::int8_t> w = int8_array(w_obj, "weight", 2);
  const std::int64_t N = w.shape(0), K = w.shape(1);
  if (N == 0 || K == 0) throw py::value_error("weight: must not be empty, got shape " + shape_str(w));
  check_k(K, "weight");
  py::array_t<std::int8_t> out(std::vector<py::ssize_t>{(N + kQNR - 1) / kQNR, (K + 1) / 2, 2 * kQNR});
  std::int8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    qpack_weight(dst, w.data(), K, N, K);
  }
  return out;
}

py::object qgemm_s32_py(const py::object& a_obj, const py::object& packed_obj, std::int64_t n, std::int64_t k) {
  const py::array_t<std::int8_t> a = int8_array(a_obj, "a", 2);
  const py::array_t<std::int8_t> pk = int8_array(packed_obj, "packed", 3);
  const std::int64_t M = a.shape(0), K = a.shape(1);
  check_k(K, "a");
  const std::int8_t* b = checked_packed(pk, n, k, K);
  py::array_t<std::int32_t> out(std::vector<py::ssize_t>{M, n});
  std::int32_t* c = out.mutable_data();
  {
    py::gil_scoped_release release;
    qgemm_s32(c, n, a.data(), K, b, M, n, K);
  }
  return out;
}

// Rows ids (any shape, int32/int64) of the (n, k) packed weight times scale / w_scale[id]:
// (ids.size, k) float32. IndexError names the first id outside [0, n).
py::object qgather_rows_py(const py::object& packed_obj, std::int64_t n, std::int64_t k, const py::object& scale_obj,
                           const py::object& ids_obj, double scale) {
  const py::array_t<std::int8_t> pk = int8_array(packed_obj, "packed", 3);
  const std::int8_t* b = checked_packed(pk, n, k, k);
  py_helpers::F32View sv = py_helpers::f32_view(scale_obj, "w_scale", {1}, false, true);
  if (sv.dim(0) != n) py_helpers::shape_error("w_scale", {n}, sv.shape);
  const py::array_t<std::int64_t> ids = py_helpers::int_array(ids_obj, "ids");
  const std::int64_t count = ids.size();
  const std::int64_t* id = ids.data();
  for (std::int64_t i = 0; i < count; ++i)
    if (id[i] < 0 || id[i] >= n)
      throw py::index_error("ids: id " + std::to_string(id[i]) + " at flat position " + std::to_string(i) +
                            " is outside [0, " + std::to_string(n) + ")");
  py::array_t<float> out(std::vector<py::ssize_t>{count, k});
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    qgather_rows(dst, b, n, k, id, count, sv.data, static_cast<float>(scale));
  }
  return out;
}

py::tuple quantize_rows_py(const py::object& x_obj) {
  py_helpers::f32_view(x_obj, "x", {2});
  const py::array_t<float> x = py::array_t<float, py::array::c_style>::ensure(x_obj);
  const std::int64_t M = x.shape(0), K = x.shape(1);
  py::array_t<std::int8_t> q(std::vector<py::ssize_t>{M, K});
  py::array_t<float> scale(std::vector<py::ssize_t>{M});
  std::int8_t* qd = q.mutable_data();
  float* sd = scale.mutable_data();
  {
    py::gil_scoped_release release;
    quantize_rows(qd, K, sd, x.data(), K, M, K);
  }
  return py::make_tuple(q, scale);
}

py::object qlinear_py(const py::object& x_obj, const py::object& packed_obj, std::int64_t n, std::int64_t k,
                      const py::object& scale_obj, const py::object& bias_obj, const py::object& activation) {
  const py::array_t<float> x = f32_rows(x_obj, "x");
  const py::array_t<std::int8_t> pk = int8_array(packed_obj, "packed", 3);
  const Activation act = parse_act(activation);
  const std::int64_t K = x.shape(x.ndim() - 1);
  const std::int64_t M = x.ndim() == 3 ? x.shape(0) * x.shape(1) : x.shape(0);
  check_k(K, "x");
  const std::int8_t* b = checked_packed(pk, n, k, K);
  const auto vec_n = [n](const py::object& obj, const char* name) {
    py_helpers::F32View v = py_helpers::f32_view(obj, name, {1});
    if (v.dim(0) != n) py_helpers::shape_error(name, {n}, v.shape);
    return py::array_t<float, py::array::c_style>::ensure(obj);
  };
  const py::array_t<float> inv_scale = vec_n(scale_obj, "inv_scale");
  py::array_t<float> bias;
  if (!bias_obj.is_none()) bias = vec_n(bias_obj, "bias");
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  shape.back() = n;
  py::array_t<float> out(shape);
  QLinearArgs g;
  g.c = out.mutable_data(), g.ldc = n;
  g.x = x.data(), g.ldx = K;
  g.packed = b, g.w_inv_scale = inv_scale.data();
  g.bias = bias_obj.is_none() ? nullptr : bias.data();
  g.act = act;
  g.M = M, g.N = n, g.K = K;
  {
    py::gil_scoped_release release;
    qlinear_forward(g);
  }
  return out;
}

}  // namespace

void register_qgemm(py::module_& m) {
  m.def("qpack_weight", &qpack_weight_py, py::arg("weight"),
        "int8 W (N, K) -> the (ceil(N / 16), ceil(K / 2), 32) int8 panels; see pytransformer.ops.QuantizedWeight");
  m.def("qgemm_s32", &qgemm_s32_py, py::arg("a"), py::arg("packed"), py::arg("n"), py::arg("k"),
        "Exact int32 a (M, K) int8 @ W^T with W packed by qpack_weight; see pytransformer.ops.qmatmul_s32");
  m.def("quantize_rows", &quantize_rows_py, py::arg("x"),
        "float32 x (M, K) -> (int8 q, float32 scale (M,)), q = round(x * scale), scale = 127 / max|row|");
  m.def("qgather_rows", &qgather_rows_py, py::arg("packed"), py::arg("n"), py::arg("k"), py::arg("w_scale"),
        py::arg("ids"), py::arg("scale"),
        "Rows ids of the packed int8 weight times scale / w_scale[id]; see QuantizedWeight.dequantize_rows");
  m.def("qlinear", &qlinear_py, py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("k"), py::arg("inv_scale"),
        py::arg("bias") = py::none(), py::arg("activation") = py::none(),
        "act(dequant(quantize_rows(x) @ W^T) + bias); see pytransformer.ops.qlinear");
}

}  // namespace pt
