// Bindings for layer norm, cross-entropy and log-softmax (the training-only kernels are bound in
// ops_train.cc). Bindings check and convert; the kernels compute with the GIL released.
#include <sstream>

#include "loss/softmax_xent.h"
#include "norm/layer_norm.h"
#include "python/ops_util.h"
#include "python/registry.h"

namespace py = pybind11;

namespace pt {

using namespace py_helpers;

namespace {

// x (..., C) with gamma, beta (C); returns y or (y, [s,] mean, rstd). y is written into `out`
// when given (C-contiguous float32 of x's shape; the Python wrapper checks it shares no memory).
py::object layer_norm_py(const py::object& x, const py::object& residual, const py::object& gamma,
                         const py::object& beta, double eps, bool return_stats, const py::object& out) {
  const bool fused = !residual.is_none();
  const F32In X = f32_in(x, "x");
  const std::int64_t C = last_axis(X.shape, "x");
  F32In R;
  if (fused) {
    R = f32_in(residual, "residual");
    require_same_shape(R.shape, "residual", X.shape);
  }
  const F32In G = f32_in(gamma, "gamma", {1}), Bt = f32_in(beta, "beta", {1});
  require_same_shape(G.shape, "gamma", {C});
  require_same_shape(Bt.shape, "beta", {C});
  if (!(std::isfinite(eps) && eps >= 0.0))
    throw py::value_error("eps: expected a finite value >= 0, got " + std::to_string(eps));
  const std::int64_t N = X.size / C;
  float* y;
  const py::object y_obj = out_or_new(out, X.shape, &y);
  py::array_t<float> s, mean, rstd;
  if (return_stats) {
    mean = new_f32(leading(X.shape));
    rstd = new_f32(leading(X.shape));
    if (fused) s = new_f32(X.shape);
  }
  {
    py::gil_scoped_release nogil;
    add_layer_norm_forward(y, return_stats && fused ? s.mutable_data() : nullptr,
                           return_stats ? mean.mutable_data() : nullptr,
                           return_stats ? rstd.mutable_data() : nullptr, X.data, fused ? R.data : nullptr,
                           G.data, Bt.data, N, C, static_cast<float>(eps));
  }
  if (!return_stats) return y_obj;
  if (fused) return py::make_tuple(y_obj, s, mean, rstd);
  return py::make_tuple(y_obj, mean, rstd);
}

py::tuple layer_norm_backward_py(const py::object& dy, const py::object& x, const py::object& gamma,
                                 const py::object& mean, const py::object& rstd) {
  const F32In X = f32_in(x, "x");
  const std::int64_t C = last_axis(X.shape, "x");
  const F32In DY = f32_in(dy, "dy");
  require_same_shape(DY.shape, "dy", X.shape);
  const F32In G = f32_in(gamma, "gamma", {1});
  require_same_shape(G.shape, "gamma", {C});
  const F32In M = f32_in(mean, "mean"), S = f32_in(rstd, "rstd");
  require_same_shape(M.shape, "mean", leading(X.shape));
  require_same_shape(S.shape, "rstd", leading(X.shape));
  auto dx = new_f32(X.shape);
  auto dgamma = new_f32({C}), dbeta = new_f32({C});
  {
    py::gil_scoped_release nogil;
    layer_norm_backward(dx.mutable_data(), dgamma.mutable_data(), dbeta.mutable_data(), DY.data, X.data, G.data,
                        M.data, S.data, X.size / C, C);
  }
  return py::make_tuple(dx, dgamma, dbeta);
}

// IndexError naming the first target outside [0, V) that is not ignore_index.
void check_targets(const std::int64_t* t, std::int64_t N, std::int64_t V, std::int64_t ignore_index) {
  for (std::int64_t i = 0; i < N; ++i) {
    if (t[i] == ignore_index || (t[i] >= 0 && t[i] < V)) continue;
    std::ostringstream s;
    s << "targets: targets[" << i << "] = " << t[i] << " is out of range [0, " << V
      << ") and is not ignore_index (" << ignore_index << ")";
    throw py::index_error(s.str());
  }
}

py::tuple softmax_cross_entropy_py(const py::object& logits, const py::object& targets, double label_smoothing,
                                   std::int64_t ignore_index, bool inplace) {
  F32In L;
  float* dlogits = nullptr;
  py::array_t<float> grad;
  std::vector<std::int64_t> shape;
  if (inplace) {
    const F32View v = f32_inout(logits, "logits", {2});
    shape = v.shape;
    L.data = dlogits = v.data;
    grad = py::reinterpret_borrow<py::array_t<float>>(logits);
  } else {
    L = f32_in(logits, "logits", {2});
    shape = L.shape;
  }
  const std::int64_t N = shape[0], V = shape[1];
  if (V == 0 && N > 0) throw py::value_error("logits: the vocabulary axis (V) must be non-empty");
  const auto T = int_array(targets, "targets", {1});
  if (T.shape(0) != N) shape_error("targets", {N}, {T.shape(0)});
  require_range(label_smoothing, "label_smoothing", 0.0, 1.0);
  check_targets(T.data(), N, V, ignore_index);
  if (!inplace) {
    grad = new_f32(shape);
    dlogits = grad.mutable_data();
  }
  double loss;
  {
    py::gil_scoped_release nogil;
    loss = softmax_cross_entropy_forward_backward(dlogits, L.data, T.data(), N, V,
                                                  static_cast<float>(label_smoothing), ignore_index);
  }
  return py::make_tuple(loss, grad);
}

py::object log_softmax_py(const py::object& x, const py::object& out) {
  const F32In X = f32_in(x, "x");
  const std::int64_t V = last_axis(X.shape, "x");
  float* y;
  py::object result = out_or_new(out, X.shape, &y);
  {
    py::gil_scoped_release nogil;
    log_softmax_forward(y, X.data, X.size / V, V);
  }
  return result;
}

py::tuple log_softmax_topk_py(const py::object& x, std::int64_t k) {
  const F32In X = f32_in(x, "x", {2});
  const std::int64_t N = X.shape[0], V = X.shape[1];
  if (k < 1 || k > V)
    throw py::value_error("k: must be in [1, " + std::to_string(V) + "] (the row length), got " + std::to_string(k));
  py::array_t<std::int64_t> idx({N, k});
  py::array_t<float> val({N, k});
  {
    std::int64_t* pi = idx.mutable_data();
    float* pv = val.mutable_data();
    py::gil_scoped_release nogil;
    log_softmax_topk(pi, pv, X.data, N, V, k);
  }
  return py::make_tuple(idx, val);
}

}  // namespace

void register_ops(py::module_& m) {
  m.def(
      "layer_norm",
      [](const py::object& x, const py::object& gamma, const py::object& beta, double eps, bool return_stats,
         const py::object& out) { return layer_norm_py(x, py::none(), gamma, beta, eps, return_stats, out); },
      py::arg("x"), py::arg("gamma"), py::arg("beta"), py::arg("eps") = 1e-5, py::kw_only(),
      py::arg("return_stats") = false, py::arg("out") = py::none());
  m.def(
      "add_layer_norm",
      [](const py::object& x, const py::object& residual, const py::object& gamma, const py::object& beta,
         double eps, bool return_stats, const py::object& out) {
        as_ndarray(residual, "residual");  // None must not silently mean "no residual"
        return layer_norm_py(x, residual, gamma, beta, eps, return_stats, out);
      },
      py::arg("x"), py::arg("residual"), py::arg("gamma"), py::arg("beta"),
        py::arg("eps") = 1e-5, py::kw_only(), py::arg("return_stats") = false, py::arg("out") = py::none());
  m.def("layer_norm_backward", &layer_norm_backward_py, py::arg("dy"), py::arg("x"), py::arg("gamma"),
        py::arg("mean"), py::arg("rstd"));
  m.def("softmax_cross_entropy", &softmax_cross_entropy_py, py::arg("logits"), py::arg("targets"), py::kw_only(),
        py::arg("label_smoothing") = 0.0, py::arg("ignore_index") = -100, py::arg("inplace") = false);
  m.def("log_softmax", &log_softmax_py, py::arg("x"), py::kw_only(), py::arg("out") = py::none());
  m.def("log_softmax_topk", &log_softmax_topk_py, py::arg("x"), py::arg("k"));
  register_train_ops(m);
  register_naive_ops(m);
}

}  // namespace pt
