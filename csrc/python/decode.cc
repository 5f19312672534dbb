// Binding of the native decoder step (csrc/decode): _C.DecoderStepPlan holds pointers into the
// weight arrays of one model (and keeps those arrays alive); run() checks one step's arrays and
// runs every layer with the GIL released. Used by pytransformer/models/state.py.
#include <string>
#include <utility>
#include <vector>

#include "decode/decoder_step.h"
#include "python/common.h"
#include "python/registry.h"
#include "qgemm/qgemm.h"

namespace py = pybind11;

namespace pt {
namespace {

using py_helpers::F32View;
using py_helpers::shape_str;

class DecoderStepPlan {
 public:
  DecoderStepPlan(const py::list& layers, const py::object& final_norm, bool norm_first,
                  const std::string& activation, std::int64_t d_model, std::int64_t heads,
                  std::int64_t d_ff, const py::object& window, std::int64_t packed_min_rows) {
    if (d_model < 1 || heads < 1 || d_model % heads || d_ff < 1 || layers.empty())
      throw py::value_error("DecoderStepPlan: inconsistent sizes d_model=" + std::to_string(d_model) +
                            ", heads=" + std::to_string(heads) + ", d_ff=" + std::to_string(d_ff) +
                            ", " + std::to_string(layers.size()) + " layers");
    m_.C = d_model, m_.H = heads, m_.F = d_ff;
    m_.norm_first = norm_first;
    m_.packed_min_rows = packed_min_rows;
    m_.window = window.is_none() ? -1 : window.cast<std::int64_t>();
    if (activation == "relu") m_.ffn_act = Activation::relu;
    else if (activation == "gelu") m_.ffn_act = Activation::gelu;
    else throw py::value_error("activation: the native step runs 'relu' or 'gelu', got '" + activation + "'");
    for (const py::handle& spec : layers) m_.layers.push_back(layer(py::cast<py::dict>(spec)));
    if (!final_norm.is_none()) m_.final_norm = norm(final_norm, "final_norm");
  }

  py::array_t<float> run(const py::object& x_obj, std::int64_t pos, const py::list& caches,
                         const py::object& cross_obj, const py::object& lengths_obj) const {
    const F32View xv = py_helpers::f32_view(x_obj, "x", {2});
    const std::int64_t B = xv.dim(0), C = m_.C;
    if (B < 1 || xv.dim(1) != C) py_helpers::shape_error("x", {B, C}, xv.shape);
    if (pos < 0) throw py::value_error("pos: must be >= 0, got " + std::to_string(pos));
    StepState s;
    s.self_kv = kv_list(caches, "kv_caches", B, pos + 1, false, true);
    py::array_t<std::int64_t> lengths;
    if (needs_cross()) cross(s, cross_obj, lengths_obj, B, lengths);
    py::array_t<float> out = py_helpers::new_f32({B, C});
    float* y = out.mutable_data();
    for (std::int64_t r = 0; r < B; ++r)
      for (std::int64_t c = 0; c < C; ++c) y[r * C + c] = xv.data[r * xv.stride(0) + c * xv.stride(1)];
    {
      py::gil_scoped_release release;
      decoder_step(m_, s, y, B, pos);
    }
    return out;
  }

 private:
  StepModel m_;
  std::vector<py::object> keep_;  // the arrays m_ points into

  bool needs_cross() const {
    for (const StepLayer& l : m_.layers)
      if (l.cross) return true;
    return false;
  }

  const float* f32(const py::handle& obj, const std::string& name, std::vector<std::int64_t> shape) {
    const F32View v = py_helpers::f32_view(obj, name.c_str(), {static_cast<int>(shape.size())}, false, true);
    py_helpers::require_shape(v, name.c_str(), shape);
    keep_.push_back(py::reinterpret_borrow<py::object>(obj));
    return v.data;
  }

  StepNorm norm(const py::handle& spec, const std::string& name) {
    const py::tuple t = py::cast<py::tuple>(spec);
    StepNorm n;
    n.weight = f32(t[0], name + ".weight", {m_.C});
    n.bias = f32(t[1], name + ".bias", {m_.C});
    n.eps = static_cast<float>(t[2].cast<double>());
    return n;
  }

  // (weight (N, K) or None, packed float panels or None, int8 panels or None, inv_scale or None,
  //  bias or None, N, K)
  StepLinear linear(const py::handle& spec, const std::string& name, std::int64_t N, std::int64_t K) {
    const py::tuple t = py::cast<py::tuple>(spec);
    if (t.size() != 7 || t[5].cast<std::int64_t>() != N || t[6].cast<std::int64_t>() != K)
      throw py::value_error(name + ": expected a (" + std::to_string(N) + ", " + std::to_string(K) + ") linear");
    StepLinear l;
    l.N = N, l.K = K;
    if (!t[4].is_none()) l.bias = f32(t[4], name + ".bias", {N});
    if (!t[2].is_none()) {
      const py::array_t<std::int8_t> q = py::cast<py::array_t<std::int8_t>>(t[2]);
      const std::int64_t size = (N + kQNR - 1) / kQNR * ((K + 1) / 2) * 2 * kQNR;
      if (!q.dtype().is(py::dtype::of<std::int8_t>()) || q.size() != size || !(q.flags() & py::array::c_style))
        throw py::value_error(name + ": int8 panels of the wrong size or layout");
      keep_.push_back(q);
      l.qpacked = q.data();
      l.inv_scale = f32(t[3], name + ".inv_scale", {N});
      return l;
    }
    l.w = f32(t[0], name + ".weight", {N, K});
    l.ldw = K;
    if (!t[1].is_none()) l.packed = f32(t[1], name + ".packed", {(N + 15) / 16, K, 16});
    return l;
  }

  StepLayer layer(const py::dict& d) {
    const std::int64_t C = m_.C, F = m_.F;
    const std::string p = "layers[" + std::to_string(m_.layers.size()) + "].";
    StepLayer l;
    l.qkv = linear(d["qkv"], p + "qkv", 3 * C, C);
    l.self_out = linear(d["self_out"], p + "self_out", C, C);
    l.fc1 = linear(d["fc1"], p + "fc1", F, C);
    l.fc2 = linear(d["fc2"], p + "fc2", C, F);
    l.norm1 = norm(d["norm1"], p + "norm1");
    l.norm3 = norm(d["norm3"], p + "norm3");
    l.cross = d.contains("cross_q");
    if (l.cross) {
      l.cross_q = linear(d["cross_q"], p + "cross_q", C, C);
      l.cross_out = linear(d["cross_out"], p + "cross_out", C, C);
      l.norm2 = norm(d["norm2"], p + "norm2");
    }
    return l;
  }

  // One (rows, positions, 2, H, D) float32 array per layer with `positions` positions (at least
  // that many unless exact); D contiguous.
  std::vector<StepKV> kv_list(const py::handle& list_obj, const char* name, std::int64_t rows,
                              std::int64_t positions, bool exact, bool writable) const {
    const py::list arrays = py::cast<py::list>(list_obj);
    if (arrays.size() != m_.layers.size())
      throw py::value_error(std::string(name) + ": expected " + std::to_string(m_.layers.size()) +
                            " arrays, got " + std::to_string(arrays.size()));
    std::vector<StepKV> out;
    const std::int64_t H = m_.H, D = m_.C / m_.H;
    for (const py::handle& a : arrays) {
      const F32View v = py_helpers::f32_view(a, name, {5}, writable);
      if (v.dim(0) != rows || v.dim(1) < positions || (exact && v.dim(1) != positions) || v.dim(2) != 2 ||
          v.dim(3) != H || v.dim(4) != D || v.stride(4) != 1)
        throw py::value_error(std::string(name) + ": expected (" + std::to_string(rows) + (exact ? ", " : ", >=") +
                              std::to_string(positions) + ", 2, " + std::to_string(H) + ", " +
                              std::to_string(D) + ") with unit last stride, got " + shape_str(v.shape));
      out.push_back(StepKV{v.data, v.stride(0), v.stride(1), v.stride(2), v.stride(3), v.stride(4)});
    }
    return out;
  }

  void cross(StepState& s, const py::object& kvs, const py::object& lengths_obj, std::int64_t B,
             py::array_t<std::int64_t>& lengths) const {
    if (kvs.is_none()) throw py::value_error("cross_kvs: the layers attend to a memory, got None");
    const py::list arrays = py::cast<py::list>(kvs);
    const F32View first = py_helpers::f32_view(arrays[0], "cross_kvs", {5});
    s.G = first.dim(0), s.S = first.dim(1);
    if (s.G < 1 || s.S < 1 || B % s.G)
      throw py::value_error("cross_kvs: " + std::to_string(B) + " rows cannot share " + std::to_string(s.G) +
                            " memory rows of " + std::to_string(s.S) + " positions");
    s.cross_kv = kv_list(arrays, "cross_kvs", s.G, s.S, true, false);
    if (lengths_obj.is_none()) return;
    lengths = py_helpers::int_array(lengths_obj, "cross_lengths", {1});
    if (lengths.shape(0) != s.G) py_helpers::shape_error("cross_lengths", {s.G}, {lengths.shape(0)});
    for (std::int64_t g = 0; g < s.G; ++g)
      if (lengths.data()[g] < 0 || lengths.data()[g] > s.S)
        throw py::value_error("cross_lengths: value " + std::to_string(lengths.data()[g]) + " is outside [0, " +
                              std::to_string(s.S) + "]");
    s.cross_lengths = lengths.data();
  }
};

}  // namespace

void register_decode(py::module_& m) {
  py::class_<DecoderStepPlan>(m, "DecoderStepPlan",
                              "Pointers into one model's decoder weights for the native step; see "
                              "pytransformer.models.state")
      .def(py::init<const py::list&, const py::object&, bool, const std::string&, std::int64_t, std::int64_t,
                    std::int64_t, const py::object&, std::int64_t>(),
           py::arg("layers"), py::arg("final_norm"), py::arg("norm_first"), py::arg("activation"),
           py::arg("d_model"), py::arg("heads"), py::arg("d_ff"), py::arg("window"), py::arg("packed_min_rows"))
      .def("run", &DecoderStepPlan::run, py::arg("x"), py::arg("pos"), py::arg("kv_caches"),
           py::arg("cross_kvs"), py::arg("cross_lengths"),
           "x (B, C) embedded tokens at position pos -> the decoder's output (B, C)");
}

}  // namespace pt
