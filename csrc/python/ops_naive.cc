// pytransformer._C._naive: the naive (scalar, serial) siblings of the norm, loss and training
// kernels, bound for the tests to use as oracles. Same checks as the public bindings' core
// cases; 2-D inputs only where the public op flattens leading axes.
#include <sstream>

#include "loss/softmax_xent.h"
#include "norm/layer_norm.h"
#include "python/ops_util.h"
#include "train/adam.h"
#include "train/elementwise.h"
#include "train/embedding.h"

namespace py = pybind11;

namespace pt {

using namespace py_helpers;

namespace {

py::tuple ln_naive(const py::object& x, const py::object& g, const py::object& b, double eps) {
  const F32In X = f32_in(x, "x", {2}), G = f32_in(g, "gamma", {1}), B = f32_in(b, "beta", {1});
  const std::int64_t N = X.shape[0], C = X.shape[1];
  require_same_shape(G.shape, "gamma", {C});
  require_same_shape(B.shape, "beta", {C});
  auto y = new_f32({N, C}), mean = new_f32({N}), rstd = new_f32({N});
  layer_norm_forward_naive(y.mutable_data(), mean.mutable_data(), rstd.mutable_data(), X.data, G.data, B.data, N,
                           C, static_cast<float>(eps));
  return py::make_tuple(y, mean, rstd);
}

py::tuple ln_bwd_naive(const py::object& dy, const py::object& x, const py::object& g, const py::object& mean,
                       const py::object& rstd) {
  const F32In X = f32_in(x, "x", {2}), DY = f32_in(dy, "dy", {2}), G = f32_in(g, "gamma", {1});
  const F32In M = f32_in(mean, "mean", {1}), S = f32_in(rstd, "rstd", {1});
  const std::int64_t N = X.shape[0], C = X.shape[1];
  require_same_shape(DY.shape, "dy", X.shape);
  require_same_shape(G.shape, "gamma", {C});
  require_same_shape(M.shape, "mean", {N});
  require_same_shape(S.shape, "rstd", {N});
  auto dx = new_f32({N, C}), dg = new_f32({C}), db = new_f32({C});
  layer_norm_backward_naive(dx.mutable_data(), dg.mutable_data(), db.mutable_data(), DY.data, X.data, G.data,
                            M.data, S.data, N, C);
  return py::make_tuple(dx, dg, db);
}

py::tuple xent_naive(const py::object& logits, const py::object& targets, double eps, std::int64_t ignore) {
  const F32In L = f32_in(logits, "logits", {2});
  const std::int64_t N = L.shape[0], V = L.shape[1];
  const auto T = int_array(targets, "targets", {1});
  if (T.shape(0) != N) shape_error("targets", {N}, {T.shape(0)});
  for (std::int64_t i = 0; i < N; ++i)
    if (T.data()[i] != ignore && (T.data()[i] < 0 || T.data()[i] >= V)) throw py::index_error("targets: out of range");
  auto d = new_f32({N, V});
  const double loss =
      softmax_cross_entropy_naive(d.mutable_data(), L.data, T.data(), N, V, static_cast<float>(eps), ignore);
  return py::make_tuple(loss, d);
}

py::array log_softmax_naive_py(const py::object& x) {
  const F32In X = f32_in(x, "x", {2});
  auto y = new_f32(X.shape);
  log_softmax_naive(y.mutable_data(), X.data, X.shape[0], X.shape[1]);
  return std::move(y);
}

void check_ids(const py::array_t<std::int64_t>& ids, std::int64_t V) {
  for (py::ssize_t i = 0; i < ids.size(); ++i)
    if (ids.data()[i] < 0 || ids.data()[i] >= V) throw py::index_error("ids: out of range");
}

py::array embedding_naive(const py::object& w, const py::object& ids, double scale) {
  const F32In W = f32_in(w, "weight", {2});
  const auto I = int_array(ids, "ids", {1});
  check_ids(I, W.shape[0]);
  auto y = new_f32({I.shape(0), W.shape[1]});
  embedding_forward_naive(y.mutable_data(), W.data, I.data(), I.shape(0), W.shape[1], static_cast<float>(scale));
  return std::move(y);
}

void embedding_backward_naive_py(const py::object& dout, const py::object& ids, const py::object& dweight,
                                 double scale) {
  const F32View DW = f32_inout(dweight, "dweight", {2});
  const auto I = int_array(ids, "ids", {1});
  const F32In D = f32_in(dout, "dout", {2});
  require_same_shape(D.shape, "dout", {I.shape(0), DW.dim(1)});
  check_ids(I, DW.dim(0));
  embedding_backward_naive(DW.data, D.data, I.data(), I.shape(0), DW.dim(1), static_cast<float>(scale));
}

py::array dropout_naive(const py::object& x, double p, std::uint64_t seed, std::uint64_t offset) {
  const F32In X = f32_in(x, "x");
  require_range(p, "p", 0.0, 1.0);
  auto y = new_f32(X.shape);
  dropout_forward_naive(y.mutable_data(), X.data, X.size, static_cast<float>(p), seed, offset);
  return std::move(y);
}

template <class Kernel>
py::array unary_naive(const py::object& x, Kernel k) {
  const F32In X = f32_in(x, "x");
  auto y = new_f32(X.shape);
  k(y.mutable_data(), X.data, X.size);
  return std::move(y);
}

template <void (*Kernel)(float*, const float*, const float*, index_t)>
py::array activation_backward_naive_py(const py::object& dout, const py::object& x) {
  const F32In D = f32_in(dout, "dout"), X = f32_in(x, "x");
  require_same_shape(X.shape, "x", D.shape);
  auto dx = new_f32(D.shape);
  Kernel(dx.mutable_data(), D.data, X.data, D.size);
  return std::move(dx);
}

void adam_naive(const py::object& param, const py::object& grad, const py::object& m, const py::object& v, double lr,
                double beta1, double beta2, double eps, double wd, std::int64_t step, bool decoupled) {
  const F32View P = f32_inout(param, "param"), M = f32_inout(m, "m"), Vv = f32_inout(v, "v");
  const F32In G = f32_in(grad, "grad");
  require_same_shape(M.shape, "m", P.shape);
  require_same_shape(Vv.shape, "v", P.shape);
  require_same_shape(G.shape, "grad", P.shape);
  if (step < 1) throw py::value_error("step: expected an integer >= 1");
  const AdamParams hp{static_cast<float>(lr),  static_cast<float>(beta1), static_cast<float>(beta2),
                      static_cast<float>(eps), static_cast<float>(wd),    step,
                      decoupled};
  adam_step_naive(P.data, G.data, M.data, Vv.data, P.size(), hp);
}

}  // namespace

void register_naive_ops(py::module_& m) {
  auto n = m.def_submodule("_naive", "naive siblings of the norm/loss/training kernels (test oracles)");
  n.def("layer_norm", &ln_naive, py::arg("x"), py::arg("gamma"), py::arg("beta"), py::arg("eps") = 1e-5);
  n.def("layer_norm_backward", &ln_bwd_naive, py::arg("dy"), py::arg("x"), py::arg("gamma"), py::arg("mean"),
        py::arg("rstd"));
  n.def("softmax_cross_entropy", &xent_naive, py::arg("logits"), py::arg("targets"), py::arg("label_smoothing") = 0.0,
        py::arg("ignore_index") = -100);
  n.def("log_softmax", &log_softmax_naive_py, py::arg("x"));
  n.def("embedding", &embedding_naive, py::arg("weight"), py::arg("ids"), py::arg("scale") = 1.0);
  n.def("embedding_backward", &embedding_backward_naive_py, py::arg("dout"), py::arg("ids"), py::arg("dweight"),
        py::arg("scale") = 1.0);
  n.def("dropout", &dropout_naive, py::arg("x"), py::arg("p"), py::arg("seed"), py::arg("offset") = 0);
  n.def(
      "gelu", [](const py::object& x) { return unary_naive(x, &gelu_forward_naive); }, py::arg("x"));
  n.def("gelu_backward", &activation_backward_naive_py<&gelu_backward_naive>, py::arg("dout"), py::arg("x"));
  n.def(
      "swish", [](const py::object& x) { return unary_naive(x, &swish_forward_naive); }, py::arg("x"));
  n.def("swish_backward", &activation_backward_naive_py<&swish_backward_naive>, py::arg("dout"), py::arg("x"));
  n.def("adam_step", &adam_naive, py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        py::arg("decoupled"));
}

}  // namespace pt
