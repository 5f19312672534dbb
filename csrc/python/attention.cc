// Bindings of attention: argument checks (naming the argument), output allocation, GIL release.
#include <cmath>
#include <string>

#include "attention/attention.h"
#include "python/common.h"
#include "python/registry.h"

namespace py = pybind11;

namespace pt {

namespace {

using py_helpers::F32View;

AttnView view_of(const F32View& x) {
  return AttnView{x.data, x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

void require_nonempty(const F32View& x, const char* name) {
  for (auto d : x.shape)
    if (d == 0) throw py::value_error(std::string(name) + ": empty array of shape " + py_helpers::shape_str(x.shape));
}

std::int64_t window_of(const py::object& window) {
  if (window.is_none()) return -1;
  const std::int64_t w = window.cast<std::int64_t>();
  if (w < 0) throw py::value_error("window: must be >= 0, got " + std::to_string(w));
  return w;
}

// Checks q, k, v, key_lengths, query_offset, scale and window; fills the config. `lengths`
// keeps the int64 copy of key_lengths alive.
AttnConfig check_qkv(const F32View& q, const F32View& k, const F32View& v, const py::object& key_lengths,
                     std::int64_t query_offset, const py::object& scale, bool causal,
                     const py::object& window, bool window_at_last_key,
                     py::array_t<std::int64_t>& lengths) {
  require_nonempty(q, "q");
  if (query_offset < 0) throw py::value_error("query_offset: must be >= 0, got " + std::to_string(query_offset));
  const std::int64_t B = q.dim(0), Lq = q.dim(1), H = q.dim(2), D = q.dim(3);
  if (k.dim(0) != B || k.dim(2) != H || k.dim(3) != D)
    py_helpers::shape_error("k", {B, k.dim(1), H, D}, k.shape);
  require_nonempty(k, "k");
  const std::int64_t Lk = k.dim(1);
  // Masks compare positions as float32 lanes, exact up to 2^24.
  if (Lk > (std::int64_t{1} << 24))
    throw py::value_error("k: at most 2^24 keys are supported, got " + std::to_string(Lk));
  py_helpers::require_shape(v, "v", k.shape);
  AttnConfig c{B, Lq, Lk, H, D, nullptr, causal, 0, 0.0f, window_of(window), window_at_last_key};
  attn_clamp_positions(c, query_offset);
  if (!key_lengths.is_none()) {
    lengths = py_helpers::int_array(key_lengths, "key_lengths", {1});
    if (lengths.shape(0) != B)
      py_helpers::shape_error("key_lengths", {B}, {static_cast<std::int64_t>(lengths.shape(0))});
    const std::int64_t* kl = lengths.data();
    for (std::int64_t b = 0; b < B; ++b)
      if (kl[b] < 0 || kl[b] > Lk)
        throw py::value_error("key_lengths: value " + std::to_string(kl[b]) + " at index " + std::to_string(b) +
                              " is outside [0, " + std::to_string(Lk) + "]");
    c.key_lengths = kl;
  }
  if (scale.is_none()) {
    c.scale = attn_default_scale(D);
  } else {
    const double s = scale.cast<double>();
    if (!std::isfinite(s)) throw py::value_error("scale: must be finite");
    c.scale = static_cast<float>(s);
  }
  return c;
}

py::object attention_py(const py::object& qo, const py::object& ko, const py::object& vo,
                        const py::object& key_lengths, bool causal, std::int64_t query_offset,
                        const py::object& scale, bool return_lse, const py::object& window,
                        bool window_at_last_key, bool naive) {
  const F32View q = py_helpers::f32_view(qo, "q", {4});
  const F32View k = py_helpers::f32_view(ko, "k", {4});
  const F32View v = py_helpers::f32_view(vo, "v", {4});
  py::array_t<std::int64_t> lengths;
  const AttnConfig c = check_qkv(q, k, v, key_lengths, query_offset, scale, causal, window,
                                 window_at_last_key, lengths);
  py::array_t<float> out = py_helpers::new_f32(q.shape);
  py::array_t<float> lse;
  if (return_lse) lse = py_helpers::new_f32({c.B, c.H, c.Lq});
  float* out_p = out.mutable_data();
  float* lse_p = return_lse ? lse.mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    if (naive)
      attention_forward_naive(out_p, lse_p, view_of(q), view_of(k), view_of(v), c);
    else
      attention_forward(out_p, lse_p, view_of(q), view_of(k), view_of(v), c);
  }
  if (return_lse) return py::make_tuple(out, lse);
  return std::move(out);
}

py::tuple attention_backward_py(const py::object& douto, const py::object& qo, const py::object& ko,
                                const py::object& vo, const py::object& outo, const py::object& lseo,
                                const py::object& key_lengths, bool causal, std::int64_t query_offset,
                                const py::object& scale, const py::object& window, bool naive) {
  const F32View dout = py_helpers::f32_view(douto, "dout", {4});
  const F32View q = py_helpers::f32_view(qo, "q", {4});
  const F32View k = py_helpers::f32_view(ko, "k", {4});
  const F32View v = py_helpers::f32_view(vo, "v", {4});
  const F32View out = py_helpers::f32_view(outo, "out", {4});
  const F32View lse_v = py_helpers::f32_view(lseo, "lse", {3});
  py::array_t<std::int64_t> lengths;
  const AttnConfig c = check_qkv(q, k, v, key_lengths, query_offset, scale, causal, window, false,
                                 lengths);
  py_helpers::require_shape(dout, "dout", q.shape);
  py_helpers::require_shape(out, "out", q.shape);
  py_helpers::require_shape(lse_v, "lse", {c.B, c.H, c.Lq});
  // The kernels read lse per head as a contiguous row; copy only when it is not already C order.
  auto lse = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(lseo);
  py::array_t<float> dq = py_helpers::new_f32(q.shape), dk = py_helpers::new_f32(k.shape),
                     dv = py_helpers::new_f32(k.shape);
  float *dq_p = dq.mutable_data(), *dk_p = dk.mutable_data(), *dv_p = dv.mutable_data();
  const float* lse_p = lse.data();
  {
    py::gil_scoped_release release;
    if (naive)
      attention_backward_naive(dq_p, dk_p, dv_p, view_of(dout), view_of(q), view_of(k), view_of(v),
                               view_of(out), lse_p, c);
    else
      attention_backward(dq_p, dk_p, dv_p, view_of(dout), view_of(q), view_of(k), view_of(v),
                         view_of(out), lse_p, c);
  }
  return py::make_tuple(dq, dk, dv);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention", &attention_py, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_lengths"),
        py::arg("causal"), py::arg("query_offset"), py::arg("scale"), py::arg("return_lse"),
        py::arg("window") = py::none(), py::arg("window_at_last_key") = false,
        py::arg("naive") = false);
  m.def("attention_backward", &attention_backward_py, py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("key_lengths"), py::arg("causal"),
        py::arg("query_offset"), py::arg("scale"), py::arg("window") = py::none(),
        py::arg("naive") = false);
}

}  // namespace pt
