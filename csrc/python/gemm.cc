// Binding of pt::gemm_forward as _C.matmul (and the naive oracle as _C._matmul_naive, for tests).
// Checks and converts only; the product runs with the GIL released.
#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

#include "gemm/gemm.h"
#include "gemm/gemm_kernels.h"
#include "python/common.h"
#include "python/registry.h"

namespace py = pybind11;

namespace pt {
namespace {

using py_helpers::F32View;
using py_helpers::shape_str;

Activation parse_activation(const py::object& activation) {
  if (activation.is_none()) return Activation::none;
  if (!py::isinstance<py::str>(activation))
    throw py::type_error("activation: expected None, 'relu' or 'gelu', got " +
                         std::string(py::str(py::type::of(activation).attr("__name__"))));
  const std::string name = activation.cast<std::string>();
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  throw py::value_error("activation: expected None, 'relu' or 'gelu', got '" + name + "'");
}

// Lowest and one-past-highest byte an array view touches (empty views touch nothing).
std::pair<const char*, const char*> byte_span(const F32View& v) {
  const char* lo = reinterpret_cast<const char*>(v.data);
  const char* hi = lo;
  if (v.size() == 0) return {lo, lo};
  for (size_t i = 0; i < v.shape.size(); ++i) {
    const std::int64_t reach = (v.shape[i] - 1) * v.strides[i] * static_cast<std::int64_t>(sizeof(float));
    (reach < 0 ? lo : hi) += reach;
  }
  return {lo, hi + sizeof(float)};
}

bool overlaps(const F32View& x, const F32View& y) {
  const auto [a0, a1] = byte_span(x);
  const auto [b0, b1] = byte_span(y);
  return a0 < b1 && b0 < a1 && a0 != a1 && b0 != b1;
}

struct Operand {
  std::int64_t batch = 0, rows = 0, cols = 0;  // batch = 0 for a 2-D operand
  std::int64_t bs = 0, rs = 0, cs = 0;         // strides of op(x), in elements
};

Operand op_view(const F32View& v, bool trans) {
  Operand o;
  const int nd = static_cast<int>(v.shape.size());
  if (nd == 3) {
    o.batch = v.dim(0);
    o.bs = v.stride(0);
  }
  const int r = nd - 2, c = nd - 1;
  o.rows = trans ? v.dim(c) : v.dim(r);
  o.cols = trans ? v.dim(r) : v.dim(c);
  o.rs = trans ? v.stride(c) : v.stride(r);
  o.cs = trans ? v.stride(r) : v.stride(c);
  return o;
}

std::string op_desc(const char* name, const F32View& v, bool trans) {
  return std::string(name) + ".shape=" + shape_str(v.shape) + (trans ? " (transposed)" : "");
}

// The product's array: a new one, or `out` once it is checked (C-contiguous, writable, the right
// shape, sharing no memory with `inputs`, which `names` lists for the message); cv views it.
py::object result_array(const py::object& out_obj, const std::vector<std::int64_t>& shape,
                        std::initializer_list<const F32View*> inputs, const char* names, F32View& cv) {
  if (out_obj.is_none()) {
    py::object result = py_helpers::new_f32(shape);
    cv = py_helpers::f32_view(result, "out");
    return result;
  }
  cv = py_helpers::f32_view(out_obj, "out", {}, /*writable=*/true, /*contiguous=*/true);
  py_helpers::require_shape(cv, "out", shape);
  for (const F32View* in : inputs)
    if (in->data && overlaps(cv, *in)) throw py::value_error(std::string("out: must not share memory with ") + names);
  return out_obj;
}

// The (N,) bias, or an empty view for None; a strided bias is copied into `keep` (rare).
F32View checked_bias(const py::object& bias_obj, std::int64_t N, py::array& keep) {
  F32View biasv;
  if (bias_obj.is_none()) return biasv;
  biasv = py_helpers::f32_view(bias_obj, "bias", {1});
  if (biasv.dim(0) != N) py_helpers::shape_error("bias", {N}, biasv.shape);
  if (biasv.stride(0) != 1 && N > 1) {
    keep = py::array_t<float, py::array::c_style>::ensure(bias_obj);
    biasv = py_helpers::f32_view(keep, "bias", {1});
  }
  return biasv;
}

py::object matmul(const py::object& a_obj, const py::object& b_obj, bool trans_a, bool trans_b,
                  const py::object& bias_obj, const py::object& activation, const py::object& out_obj,
                  bool accumulate, bool naive) {
  const F32View av = py_helpers::f32_view(a_obj, "a", {2, 3});
  const F32View bv = py_helpers::f32_view(b_obj, "b", {2, 3});
  const Activation act = parse_activation(activation);
  const Operand a = op_view(av, trans_a), b = op_view(bv, trans_b);
  if (a.cols != b.rows) {
    throw py::value_error("b: inner dimensions differ: op(a) is " + shape_str({a.rows, a.cols}) +
                          " and op(b) is " + shape_str({b.rows, b.cols}) + " (" +
                          op_desc("a", av, trans_a) + ", " + op_desc("b", bv, trans_b) + ")");
  }
  const bool batched = av.shape.size() == 3 || bv.shape.size() == 3;
  if (av.shape.size() == 3 && bv.shape.size() == 3 && a.batch != b.batch) {
    throw py::value_error("b: batch sizes differ: a.shape=" + shape_str(av.shape) +
                          ", b.shape=" + shape_str(bv.shape));
  }
  const std::int64_t batch = av.shape.size() == 3 ? a.batch : (bv.shape.size() == 3 ? b.batch : 1);
  const std::int64_t M = a.rows, N = b.cols, K = a.cols;
  const std::vector<std::int64_t> out_shape =
      batched ? std::vector<std::int64_t>{batch, M, N} : std::vector<std::int64_t>{M, N};

  py::array bias_keep;
  const F32View biasv = checked_bias(bias_obj, N, bias_keep);
  if (accumulate && out_obj.is_none())
    throw py::value_error("out: accumulate=True needs out= (the array to add the product to)");
  if (accumulate && act != Activation::none)
    throw py::value_error("activation: must be None when accumulate=True");

  F32View cv;
  py::object result = result_array(out_obj, out_shape, {&av, &bv, &biasv}, "a, b or bias", cv);

  GemmArgs g;
  g.c = cv.data;
  g.ldc = N;
  g.c_bs = batched ? M * N : 0;
  g.a = av.data;
  g.a_rs = a.rs, g.a_cs = a.cs, g.a_bs = av.shape.size() == 3 ? a.bs : 0;
  g.b = bv.data;
  g.b_rs = b.rs, g.b_cs = b.cs, g.b_bs = bv.shape.size() == 3 ? b.bs : 0;
  g.bias = biasv.data;
  g.act = act;
  g.accumulate = accumulate;
  g.batch = batch, g.M = M, g.N = N, g.K = K;
  {
    py::gil_scoped_release release;
    if (naive) gemm_forward_naive(g);
    else gemm_forward(g);
  }
  return result;
}

// W (N, K) -> its packed form, a (ceil(N / 16), K, 16) float32 array.
py::object pack_weight_py(const py::object& w_obj) {
  const F32View wv = py_helpers::f32_view(w_obj, "weight", {2});
  const std::int64_t N = wv.dim(0), K = wv.dim(1);
  if (N == 0 || K == 0) throw py::value_error("weight: must not be empty, got shape " + shape_str(wv.shape));
  py::array_t<float> w_keep;
  const float* w = wv.data;
  std::int64_t ldw = wv.stride(0);
  if (wv.stride(1) != 1 || ldw < K) {  // rows must be contiguous: copy other layouts once
    w_keep = py::array_t<float, py::array::c_style>::ensure(w_obj);
    w = w_keep.data();
    ldw = K;
  }
  py::object result = py_helpers::new_f32({(N + kNR - 1) / kNR, K, kNR});
  float* dst = py_helpers::f32_view(result, "out").data;
  {
    py::gil_scoped_release release;
    pack_weight(dst, w, ldw, N, K);
  }
  return result;
}

// act(a @ W^T + bias) with W given by pack_weight_py's array and its row count n.
py::object matmul_prepacked(const py::object& a_obj, const py::object& packed_obj, std::int64_t n,
                            const py::object& bias_obj, const py::object& activation,
                            const py::object& out_obj) {
  const F32View av = py_helpers::f32_view(a_obj, "a", {2, 3});
  const F32View pv = py_helpers::f32_view(packed_obj, "packed", {3}, false, true);
  const Activation act = parse_activation(activation);
  const std::int64_t K = av.shape.back(), M = av.dim(static_cast<int>(av.shape.size()) - 2);
  if (pv.dim(2) != kNR || n < 1 || pv.dim(0) != (n + kNR - 1) / kNR)
    throw py::value_error("packed: expected the (ceil(n / 16), K, 16) array of pack_weight for n=" +
                          std::to_string(n) + ", got shape " + shape_str(pv.shape));
  if (pv.dim(1) != K)
    throw py::value_error("a: inner dimensions differ: a.shape=" + shape_str(av.shape) +
                          " and the packed weight has K=" + std::to_string(pv.dim(1)));
  const bool batched = av.shape.size() == 3;
  const std::int64_t batch = batched ? av.dim(0) : 1;
  const std::vector<std::int64_t> out_shape =
      batched ? std::vector<std::int64_t>{batch, M, n} : std::vector<std::int64_t>{M, n};
  py::array bias_keep;
  const F32View biasv = checked_bias(bias_obj, n, bias_keep);
  F32View cv;
  py::object result = result_array(out_obj, out_shape, {&av, &pv, &biasv}, "a, packed or bias", cv);
  const int r = static_cast<int>(av.shape.size()) - 2;
  GemmArgs g;
  g.c = cv.data;
  g.ldc = n;
  g.c_bs = M * n;
  g.a = av.data;
  g.a_rs = av.stride(r), g.a_cs = av.stride(r + 1), g.a_bs = batched ? av.stride(0) : 0;
  g.b = pv.data;
  g.bias = biasv.data;
  g.act = act;
  g.batch = batch, g.M = M, g.N = n, g.K = K;
  {
    py::gil_scoped_release release;
    gemm_forward_prepacked(g);
  }
  return result;
}

}  // namespace

void register_gemm(py::module_& m) {
  m.def(
      "matmul",
      [](const py::object& a, const py::object& b, bool trans_a, bool trans_b, const py::object& bias,
         const py::object& activation, const py::object& out, bool accumulate) {
        return matmul(a, b, trans_a, trans_b, bias, activation, out, accumulate, false);
      },
      py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
      py::arg("bias") = py::none(), py::arg("activation") = py::none(), py::arg("out") = py::none(),
      py::arg("accumulate") = false,
      "act(op(a) @ op(b) + bias), or out += op(a) @ op(b) + bias; see pytransformer.ops.matmul");
  m.def(
      "_matmul_naive",
      [](const py::object& a, const py::object& b, bool trans_a, bool trans_b, const py::object& bias,
         const py::object& activation, const py::object& out, bool accumulate) {
        return matmul(a, b, trans_a, trans_b, bias, activation, out, accumulate, true);
      },
      py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
      py::arg("bias") = py::none(), py::arg("activation") = py::none(), py::arg("out") = py::none(),
      py::arg("accumulate") = false, "Test oracle: the naive triple loop behind the same checks.");
  m.def("pack_weight", &pack_weight_py, py::arg("weight"),
        "W (N, K) -> the (ceil(N / 16), K, 16) packed form; see pytransformer.ops.pack_weight");
  m.def("matmul_prepacked", &matmul_prepacked, py::arg("a"), py::arg("packed"), py::arg("n"),
        py::arg("bias") = py::none(), py::arg("activation") = py::none(), py::arg("out") = py::none(),
        "act(a @ W^T + bias) with W packed by pack_weight; see pytransformer.ops.PackedWeight");
  m.def(
      "_fma_probe",
      [](std::int64_t iters) {
        if (iters < 1) throw py::value_error("iters: must be >= 1");
        py::gil_scoped_release release;
        return fma_probe_seconds(iters);
      },
      py::arg("iters"),
      "Benchmark helper: seconds one thread takes for iters x 192 flops of independent FMAs.");
}

}  // namespace pt
