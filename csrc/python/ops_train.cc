// Bindings for the training kernels: activations' backward, embedding, dropout, Adam, gradient
// norm. Bindings check and convert; the kernels compute with the GIL released.
#include <set>
#include <sstream>

#include "python/ops_util.h"
#include "train/adam.h"
#include "train/elementwise.h"
#include "train/embedding.h"
#include "train/rows.h"

namespace py = pybind11;

namespace pt {

using namespace py_helpers;

namespace {

// The array to write into: a new one shaped like `shape`, or the caller's `out` (checked).
py::array_t<float> output_like(const py::object& out, const std::vector<std::int64_t>& shape, float** data) {
  if (out.is_none()) {
    auto r = new_f32(shape);
    *data = r.mutable_data();
    return r;
  }
  const F32View o = f32_inout(out, "out");
  require_same_shape(o.shape, "out", shape);
  *data = o.data;
  return py::reinterpret_borrow<py::array_t<float>>(out);
}

// An elementwise activation x -> y (y may be a given `out`, which may be x).
template <void (*Kernel)(float*, const float*, index_t)>
py::array activation_py(const py::object& x, const py::object& out) {
  const F32In X = f32_in(x, "x");
  float* y;
  auto r = output_like(out, X.shape, &y);
  {
    py::gil_scoped_release nogil;
    Kernel(y, X.data, X.size);
  }
  return std::move(r);
}

// dout and a second same-shaped input (named second) → dx.
template <class Kernel>
py::array backward_py(const py::object& dout, const py::object& other, const char* other_name, Kernel k) {
  const F32In D = f32_in(dout, "dout");
  const F32In O = f32_in(other, other_name);
  require_same_shape(O.shape, other_name, D.shape);
  auto dx = new_f32(D.shape);
  {
    py::gil_scoped_release nogil;
    k(dx.mutable_data(), D.data, O.data, D.size);
  }
  return std::move(dx);
}

// IndexError naming the first id outside [0, V).
void check_ids(const std::int64_t* ids, std::int64_t n, std::int64_t V) {
  for (std::int64_t i = 0; i < n; ++i) {
    if (ids[i] >= 0 && ids[i] < V) continue;
    std::ostringstream s;
    s << "ids: id " << ids[i] << " at flat position " << i << " is out of range [0, " << V << ")";
    throw py::index_error(s.str());
  }
}

std::vector<std::int64_t> ids_shape(const py::array& ids) {
  return std::vector<std::int64_t>(ids.shape(), ids.shape() + ids.ndim());
}

py::array embedding_py(const py::object& weight, const py::object& ids, double scale) {
  const F32In W = f32_in(weight, "weight", {2});
  const auto I = int_array(ids, "ids");
  const std::int64_t V = W.shape[0], C = W.shape[1];
  check_ids(I.data(), I.size(), V);
  auto shape = ids_shape(I);
  shape.push_back(C);
  auto out = new_f32(shape);
  {
    py::gil_scoped_release nogil;
    embedding_forward(out.mutable_data(), W.data, I.data(), I.size(), C, static_cast<float>(scale));
  }
  return std::move(out);
}

void embedding_backward_py(const py::object& dout, const py::object& ids, const py::object& dweight, double scale) {
  const F32View DW = f32_inout(dweight, "dweight", {2});
  const auto I = int_array(ids, "ids");
  const std::int64_t V = DW.dim(0), C = DW.dim(1);
  const F32In D = f32_in(dout, "dout");
  auto shape = ids_shape(I);
  shape.push_back(C);
  require_same_shape(D.shape, "dout", shape);
  check_ids(I.data(), I.size(), V);
  py::gil_scoped_release nogil;
  embedding_backward(DW.data, D.data, I.data(), I.size(), C, static_cast<float>(scale));
}

py::array dropout_py(const py::object& x, double p, std::uint64_t seed, std::uint64_t offset, const char* name) {
  const F32In X = f32_in(x, name);
  require_range(p, "p", 0.0, 1.0);
  auto y = new_f32(X.shape);
  {
    py::gil_scoped_release nogil;
    dropout_forward(y.mutable_data(), X.data, X.size, static_cast<float>(p), seed, offset);
  }
  return std::move(y);
}

void adam_step_py(const py::object& param, const py::object& grad, const py::object& m, const py::object& v,
                  double lr, double beta1, double beta2, double eps, double weight_decay, std::int64_t step,
                  bool decoupled) {
  const F32View P = f32_inout(param, "param"), M = f32_inout(m, "m"), Vv = f32_inout(v, "v");
  require_same_shape(M.shape, "m", P.shape);
  require_same_shape(Vv.shape, "v", P.shape);
  const F32In G = f32_in(grad, "grad");
  require_same_shape(G.shape, "grad", P.shape);
  if (P.size() > 0 && (P.data == M.data || P.data == Vv.data || M.data == Vv.data))
    throw py::value_error("m, v: param, m and v must be distinct arrays");
  if (step < 1) throw py::value_error("step: expected an integer >= 1, got " + std::to_string(step));
  require_nonnegative(lr, "lr");
  require_range(beta1, "beta1", 0.0, 1.0);
  require_range(beta2, "beta2", 0.0, 1.0);
  if (beta1 >= 1.0) throw py::value_error("beta1: expected a value below 1");
  if (beta2 >= 1.0) throw py::value_error("beta2: expected a value below 1");
  require_nonnegative(eps, "eps");
  require_nonnegative(weight_decay, "weight_decay");
  const AdamParams hp{static_cast<float>(lr),  static_cast<float>(beta1),        static_cast<float>(beta2),
                      static_cast<float>(eps), static_cast<float>(weight_decay), step,
                      decoupled};
  py::gil_scoped_release nogil;
  adam_step(P.data, G.data, M.data, Vv.data, P.size(), hp);
}

// A list or tuple of arrays; a bare ndarray (itself a sequence) is refused as ambiguous.
void require_array_sequence(const py::object& arrays) {
  if (!py::isinstance<py::sequence>(arrays) || py::isinstance<py::str>(arrays) || py::isinstance<py::array>(arrays))
    throw py::type_error("arrays: expected a sequence (list or tuple) of numpy arrays");
}

std::string item_name(size_t i) { return "arrays[" + std::to_string(i) + "]"; }

double global_norm_py(const py::object& arrays) {
  require_array_sequence(arrays);
  const auto seq = py::reinterpret_borrow<py::sequence>(arrays);
  std::vector<F32In> in;
  std::vector<const float*> ptrs;
  std::vector<index_t> sizes;
  for (size_t i = 0; i < seq.size(); ++i) {
    const std::string name = item_name(i);
    in.push_back(f32_in(seq[i], name.c_str()));
    ptrs.push_back(in.back().data);
    sizes.push_back(in.back().size);
  }
  py::gil_scoped_release nogil;
  return global_norm(ptrs.data(), sizes.data(), ptrs.size());
}

double clip_grad_norm_py(const py::object& arrays, double max_norm) {
  require_array_sequence(arrays);
  if (!(std::isfinite(max_norm) && max_norm > 0.0))
    throw py::value_error("max_norm: expected a finite value > 0, got " + std::to_string(max_norm));
  const auto seq = py::reinterpret_borrow<py::sequence>(arrays);
  std::vector<float*> ptrs;
  std::vector<index_t> sizes;
  std::set<float*> seen;
  for (size_t i = 0; i < seq.size(); ++i) {
    const std::string name = item_name(i);
    const F32View a = f32_inout(seq[i], name.c_str());
    if (a.size() > 0 && !seen.insert(a.data).second)
      throw py::value_error(name + ": the same array appears twice (it would be scaled twice)");
    ptrs.push_back(a.data);
    sizes.push_back(a.size());
  }
  py::gil_scoped_release nogil;
  std::vector<const float*> cptrs(ptrs.begin(), ptrs.end());
  const double norm = global_norm(cptrs.data(), sizes.data(), cptrs.size());
  if (norm > max_norm) {
    // As torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6).
    const float s = static_cast<float>(max_norm / (norm + 1e-6));
    for (size_t i = 0; i < ptrs.size(); ++i) scale_inplace(ptrs[i], sizes[i], s);
  }
  return norm;
}

// A float32 matrix of the given rank read through its outer strides; the last axis must have unit
// stride, else `keep` holds a C-contiguous copy. strides: in elements.
struct RowsIn {
  py::array_t<float> keep;
  const float* data = nullptr;
  std::vector<std::int64_t> shape, strides;
};

RowsIn rows_in(const py::object& obj, const char* name, int rank) {
  F32View v = f32_view(obj, name, {rank});
  RowsIn r{py::array_t<float>(), v.data, v.shape, v.strides};
  if (v.shape.back() > 1 && v.strides.back() != 1) {
    const F32In c = f32_in(obj, name, {rank});
    r.keep = c.arr;
    r.data = c.data;
    std::int64_t s = 1;
    for (int i = rank - 1; i >= 0; --i) {
      r.strides[static_cast<size_t>(i)] = s;
      s *= r.shape[static_cast<size_t>(i)];
    }
  }
  return r;
}

// lengths (B,) with every entry in [0, L]; returns them (C-contiguous int64) and their sum.
py::array_t<std::int64_t> checked_lengths(const py::object& lengths, std::int64_t L, std::int64_t* total) {
  auto Ls = int_array(lengths, "lengths", {1});
  const std::int64_t* l = Ls.data();
  *total = 0;
  for (py::ssize_t b = 0; b < Ls.size(); ++b) {
    if (l[b] < 0 || l[b] > L) {
      std::ostringstream s;
      s << "lengths: entry " << l[b] << " at position " << b << " is outside [0, " << L << "]";
      throw py::value_error(s.str());
    }
    *total += l[b];
  }
  return Ls;
}

py::array pad_rows_py(const py::object& x, const py::object& lengths, std::int64_t L) {
  if (L < 0) throw py::value_error("L: expected a length >= 0, got " + std::to_string(L));
  const RowsIn X = rows_in(x, "x", 2);
  std::int64_t N = 0;
  const auto Ls = checked_lengths(lengths, L, &N);
  if (X.shape[0] != N) {
    std::ostringstream s;
    s << "x: expected sum(lengths) = " << N << " rows, got " << X.shape[0];
    throw py::value_error(s.str());
  }
  const std::int64_t B = Ls.size(), R = X.shape[1];
  auto out = new_f32({B, L, R});
  {
    py::gil_scoped_release nogil;
    pad_rows(out.mutable_data(), X.data, X.strides[0], Ls.data(), B, L, R);
  }
  return std::move(out);
}

py::object pack_rows_py(const py::object& y, const py::object& lengths, const py::object& out) {
  const RowsIn Y = rows_in(y, "y", 3);
  const std::int64_t B = Y.shape[0], R = Y.shape[2];
  std::int64_t N = 0;
  const auto Ls = checked_lengths(lengths, Y.shape[1], &N);
  if (Ls.size() != B) {
    std::ostringstream s;
    s << "lengths: expected " << B << " entries (y's batch), got " << Ls.size();
    throw py::value_error(s.str());
  }
  py::object result = out;
  float* o = nullptr;
  std::int64_t out_rs = R;
  if (out.is_none()) {
    auto r = new_f32({N, R});
    o = r.mutable_data();
    result = std::move(r);
  } else {
    const F32View O = f32_view(out, "out", {2}, /*writable=*/true);
    require_shape(O, "out", {N, R});
    if (N > 0 && ((R > 1 && O.stride(1) != 1) || (N > 1 && O.stride(0) < R)))
      throw py::value_error("out: rows must be unit-stride and must not overlap (row stride >= row length)");
    o = O.data;
    out_rs = O.stride(0);
  }
  {
    py::gil_scoped_release nogil;
    pack_rows(o, out_rs, Y.data, Y.strides[0], Y.strides[1], Ls.data(), B, R);
  }
  return result;
}

py::object add_column_sums_py(const py::object& out, const py::object& x) {
  const RowsIn X = rows_in(x, "x", 2);
  const F32View O = f32_view(out, "out", {1}, /*writable=*/true);
  require_shape(O, "out", {X.shape[1]});
  if (O.shape[0] > 1 && O.stride(0) != 1) throw py::value_error("out: must be contiguous");
  {
    py::gil_scoped_release nogil;
    add_column_sums(O.data, X.data, X.strides[0], X.shape[0], X.shape[1]);
  }
  return out;
}

}  // namespace

void register_train_ops(py::module_& m) {
  m.def("gelu", &activation_py<&gelu_forward>, py::arg("x"), py::kw_only(), py::arg("out") = py::none());
  m.def("swish", &activation_py<&swish_forward>, py::arg("x"), py::kw_only(), py::arg("out") = py::none());
  m.def(
      "swish_backward",
      [](const py::object& dout, const py::object& x) { return backward_py(dout, x, "x", &swish_backward); },
      py::arg("dout"), py::arg("x"));
  m.def(
      "gelu_backward",
      [](const py::object& dout, const py::object& x) { return backward_py(dout, x, "x", &gelu_backward); },
      py::arg("dout"), py::arg("x"));
  m.def(
      "relu_backward",
      [](const py::object& dout, const py::object& out) { return backward_py(dout, out, "out", &relu_backward); },
      py::arg("dout"), py::arg("out"));
  m.def("embedding", &embedding_py, py::arg("weight"), py::arg("ids"), py::kw_only(), py::arg("scale") = 1.0);
  m.def("embedding_backward", &embedding_backward_py, py::arg("dout"), py::arg("ids"), py::arg("dweight"),
        py::kw_only(), py::arg("scale") = 1.0);
  m.def(
      "dropout",
      [](const py::object& x, double p, std::uint64_t seed, std::uint64_t offset) {
        return dropout_py(x, p, seed, offset, "x");
      },
      py::arg("x"), py::arg("p"), py::kw_only(), py::arg("seed"), py::arg("offset") = 0);
  m.def(
      "dropout_backward",
      [](const py::object& dy, double p, std::uint64_t seed, std::uint64_t offset) {
        return dropout_py(dy, p, seed, offset, "dy");
      },
      py::arg("dy"), py::arg("p"), py::kw_only(), py::arg("seed"), py::arg("offset") = 0);
  m.def("adam_step", &adam_step_py, py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"), py::kw_only(),
        py::arg("lr"), py::arg("beta1") = 0.9, py::arg("beta2") = 0.98, py::arg("eps") = 1e-9,
        py::arg("weight_decay") = 0.0, py::arg("step"), py::arg("decoupled") = false);
  m.def("pad_rows", &pad_rows_py, py::arg("x"), py::arg("lengths"), py::arg("L"));
  m.def("pack_rows", &pack_rows_py, py::arg("y"), py::arg("lengths"), py::kw_only(), py::arg("out") = py::none());
  m.def("add_column_sums", &add_column_sums_py, py::arg("out"), py::arg("x"));
  m.def("global_norm", &global_norm_py, py::arg("arrays"));
  m.def("clip_grad_norm", &clip_grad_norm_py, py::arg("arrays"), py::arg("max_norm"));
}

}  // namespace pt
