// Binding of the native decoder step (csrc/decode): _C.DecoderStepPlan holds pointers into the
// weight arrays of one model (and keeps those arrays alive); run() checks one step's arrays and
// runs every layer with the GIL released. Used by pytransformer/models/state.py. Also the beam
// search step's bookkeeping (csrc/decode/beam.h), used by pytransformer/decode/search.py.
#include <string>
#include <utility>
#include <vector>

#include "decode/beam.h"
#include "decode/decoder_step.h"
#include "python/common.h"
#include "python/registry.h"
#include "qgemm/qgemm.h"

namespace py = pybind11;

namespace pt {
namespace {

using py_helpers::F32View;
using py_helpers::shape_str;

// A float64 array of exactly `shape`, C-contiguous (copied otherwise).
py::array_t<double> f64_array(const py::handle& obj, const char* name, const std::vector<std::int64_t>& shape) {
  const py::array a = py_helpers::as_ndarray(obj, name);
  if (!a.dtype().is(py::dtype::of<double>()))
    throw py::type_error(std::string(name) + ": expected float64, got dtype " + std::string(py::str(a.dtype())));
  auto out = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
  const std::vector<std::int64_t> got(out.shape(), out.shape() + out.ndim());
  if (got != shape) py_helpers::shape_error(name, shape, got);
  return out;
}

// An integer array of exactly `shape` as C-contiguous int64.
py::array_t<std::int64_t> i64_array(const py::handle& obj, const char* name, const std::vector<std::int64_t>& shape) {
  auto a = py_helpers::int_array(obj, name, {static_cast<int>(shape.size())});
  const std::vector<std::int64_t> got(a.shape(), a.shape() + a.ndim());
  if (got != shape) py_helpers::shape_error(name, shape, got);
  return a;
}

// i64_array with every value in [lo, hi).
py::array_t<std::int64_t> i64_array(const py::handle& obj, const char* name, const std::vector<std::int64_t>& shape,
                                    std::int64_t lo, std::int64_t hi) {
  auto a = i64_array(obj, name, shape);
  for (py::ssize_t i = 0; i < a.size(); ++i)
    if (a.data()[i] < lo || a.data()[i] >= hi)
      throw py::value_error(std::string(name) + ": value " + std::to_string(a.data()[i]) + " is outside [" +
                            std::to_string(lo) + ", " + std::to_string(hi) + ")");
  return a;
}

class DecoderStepPlan {
 public:
  DecoderStepPlan(const py::list& layers, const py::object& final_norm, bool norm_first,
                  const std::string& activation, std::int64_t d_model, std::int64_t heads,
                  std::int64_t d_ff, const py::object& window, std::int64_t packed_min_rows,
                  const py::object& embedding, const py::object& output) {
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
    if (!embedding.is_none()) m_.embed = embed(embedding);
    if (!output.is_none()) {
      const std::int64_t V = py::cast<py::tuple>(output)[5].cast<std::int64_t>();
      if (V < 1) throw py::value_error("output: expected at least one output row");
      m_.output = linear(output, "output", V, m_.C);
    }
  }

  py::array_t<float> run(const py::object& x_obj, std::int64_t pos, const py::list& caches,
                         const py::object& cross_obj, const py::object& lengths_obj) const {
    const F32View xv = py_helpers::f32_view(x_obj, "x", {2});
    const std::int64_t B = xv.dim(0), C = m_.C;
    if (B < 1 || xv.dim(1) != C) py_helpers::shape_error("x", {B, C}, xv.shape);
    if (pos < 0) throw py::value_error("pos: must be >= 0, got " + std::to_string(pos));
    py::array_t<std::int64_t> lengths;
    const StepState s = step_state(caches, cross_obj, lengths_obj, B, pos, lengths);
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

  py::array_t<float> run_tokens(const py::object& tokens_obj, std::int64_t pos, const py::list& caches,
                                const py::object& cross_obj, const py::object& lengths_obj, bool project) const {
    if (m_.embed.V == 0) throw py::value_error("run_tokens: the plan was made without an embedding");
    if (project && m_.output.N == 0) throw py::value_error("run_tokens: the plan was made without an output");
    const py::array_t<std::int64_t> tokens = checked_tokens(tokens_obj);
    const std::int64_t B = tokens.size();
    if (pos < 0 || pos >= m_.embed.max_pos)
      throw py::value_error("pos: " + std::to_string(pos) + " is outside the position table [0, " +
                            std::to_string(m_.embed.max_pos) + ")");
    py::array_t<std::int64_t> lengths;
    const StepState s = step_state(caches, cross_obj, lengths_obj, B, pos, lengths);
    py::array_t<float> out = py_helpers::new_f32({B, project ? m_.output.N : m_.C});
    {
      float* y = out.mutable_data();
      py::gil_scoped_release release;
      decoder_step_tokens(m_, s, tokens.data(), B, pos, project, y);
    }
    return out;
  }

  bool has_embedding() const { return m_.embed.V > 0; }
  bool has_output() const { return m_.output.N > 0; }

 private:
  StepModel m_;
  std::vector<py::object> keep_;  // the arrays m_ points into

  // The caches and memory of B rows at position pos; lengths keeps the checked cross lengths alive.
  StepState step_state(const py::list& caches, const py::object& cross_obj, const py::object& lengths_obj,
                       std::int64_t B, std::int64_t pos, py::array_t<std::int64_t>& lengths) const {
    StepState s;
    s.self_kv = kv_list(caches, "kv_caches", B, pos + 1, false, true);
    if (needs_cross()) cross(s, cross_obj, lengths_obj, B, lengths);
    return s;
  }

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
      l.qpacked = int8_panels(t[2], name, N, K);
      l.inv_scale = f32(t[3], name + ".inv_scale", {N});
      return l;
    }
    l.w = f32(t[0], name + ".weight", {N, K});
    l.ldw = K;
    if (!t[1].is_none()) l.packed = f32(t[1], name + ".packed", {(N + 15) / 16, K, 16});
    return l;
  }

  // (float table (V, C) or None, int8 panels or None, their row scales (V,) or None,
  //  positions (max_pos, C), scale, V)
  StepEmbedding embed(const py::handle& spec) {
    const py::tuple t = py::cast<py::tuple>(spec);
    if (t.size() != 6) throw py::value_error("embedding: expected a 6-tuple");
    StepEmbedding e;
    e.V = t[5].cast<std::int64_t>();
    if (e.V < 1) throw py::value_error("embedding: expected at least one row");
    const F32View pv = py_helpers::f32_view(t[3], "embedding.positions", {2}, false, true);
    if (pv.dim(1) != m_.C) py_helpers::shape_error("embedding.positions", {pv.dim(0), m_.C}, pv.shape);
    keep_.push_back(py::reinterpret_borrow<py::object>(t[3]));
    e.positions = pv.data, e.max_pos = pv.dim(0);
    e.scale = static_cast<float>(t[4].cast<double>());
    if (t[1].is_none()) {
      e.table = f32(t[0], "embedding.table", {e.V, m_.C});
      return e;
    }
    e.qpacked = int8_panels(t[1], "embedding", e.V, m_.C);
    e.w_scale = f32(t[2], "embedding.w_scale", {e.V});
    return e;
  }

  const std::int8_t* int8_panels(const py::handle& obj, const std::string& name, std::int64_t N, std::int64_t K) {
    const py::array_t<std::int8_t> q = py::cast<py::array_t<std::int8_t>>(obj);
    const std::int64_t size = (N + kQNR - 1) / kQNR * ((K + 1) / 2) * 2 * kQNR;
    if (!q.dtype().is(py::dtype::of<std::int8_t>()) || q.size() != size || !(q.flags() & py::array::c_style))
      throw py::value_error(name + ": int8 panels of the wrong size or layout");
    keep_.push_back(q);
    return q.data();
  }

  // tokens (B,) integers in [0, V), B >= 1: IndexError names the first one outside, as check_ids.
  py::array_t<std::int64_t> checked_tokens(const py::object& obj) const {
    const py::array_t<std::int64_t> t = py_helpers::int_array(obj, "tokens", {1});
    if (t.size() == 0) throw py::value_error("tokens: empty batch (shape (0,))");
    for (py::ssize_t i = 0; i < t.size(); ++i)
      if (t.data()[i] < 0 || t.data()[i] >= m_.embed.V)
        throw py::index_error("tokens: id " + std::to_string(t.data()[i]) + " at (" + std::to_string(i) +
                              ",) is out of range [0, " + std::to_string(m_.embed.V) + ")");
    return t;
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
    lengths = i64_array(lengths_obj, "cross_lengths", {s.G}, 0, s.S + 1);
    s.cross_lengths = lengths.data();
  }
};

// caches: (rows, positions, 2, H, D) float32 writable arrays (D contiguous) of one shape;
// indices (B2,) in [0, rows) with B2 <= rows; t <= positions.
void move_cache_rows_py(const py::list& caches, const py::object& indices_obj, std::int64_t t) {
  std::vector<StepKV> kvs;
  std::vector<std::int64_t> shape;
  for (const py::handle& a : caches) {
    const F32View v = py_helpers::f32_view(a, "caches", {5}, true);
    if (!shape.empty() && v.shape != shape) throw py::value_error("caches: arrays of different shapes");
    if (v.stride(4) != 1 || v.dim(2) != 2) throw py::value_error("caches: expected (rows, positions, 2, H, D), D contiguous");
    shape = v.shape;
    kvs.push_back(StepKV{v.data, v.stride(0), v.stride(1), v.stride(2), v.stride(3), v.stride(4)});
  }
  if (kvs.empty()) throw py::value_error("caches: expected at least one array");
  const std::int64_t rows = shape[0];
  const std::int64_t B2 = py_helpers::as_ndarray(indices_obj, "indices").size();
  if (B2 < 1 || B2 > rows) throw py::value_error("indices: expected 1 to " + std::to_string(rows) + " rows");
  const auto idx = i64_array(indices_obj, "indices", {B2}, 0, rows);
  if (t < 0 || t > shape[1]) throw py::value_error("t: outside [0, " + std::to_string(shape[1]) + "]");
  const std::int64_t* ip = idx.data();
  py::gil_scoped_release release;
  for (const StepKV& kv : kvs) move_cache_rows(kv, shape[3], shape[4], ip, B2, t);
}

py::tuple beam_candidates_py(const py::object& logits_obj, const py::object& cum_obj, std::int64_t C) {
  const F32View x = py_helpers::f32_view(logits_obj, "logits", {2}, false, true);
  const py::array cum_in = py_helpers::as_ndarray(cum_obj, "cum");
  if (cum_in.ndim() != 2) throw py::value_error("cum: expected 2 dimensions (sentences, slots)");
  const std::int64_t g = cum_in.shape(0), k = cum_in.shape(1), V = x.dim(1);
  if (g < 1 || k < 1 || x.dim(0) != g * k) py_helpers::shape_error("logits", {g * k, V}, x.shape);
  if (V < 1) throw py::value_error("logits: empty rows");
  if (C < 1) throw py::value_error("C: must be >= 1, got " + std::to_string(C));
  const py::array_t<double> cum = f64_array(cum_obj, "cum", {g, k});
  py::array_t<double> val({g, C});
  py::array_t<std::int64_t> slot({g, C}), tok({g, C});
  {
    double* pv = val.mutable_data();
    std::int64_t *ps = slot.mutable_data(), *pt = tok.mutable_data();
    py::gil_scoped_release release;
    beam_candidates(pv, ps, pt, x.data, cum.data(), g, k, V, C);
  }
  return py::make_tuple(val, slot, tok);
}

py::tuple beam_settle_py(const py::object& c_val_obj, const py::object& c_slot_obj, const py::object& c_tok_obj,
                         const py::object& pick_obj, const py::object& ci_obj, std::int64_t k_old,
                         std::int64_t k_new) {
  const py::array v_in = py_helpers::as_ndarray(c_val_obj, "c_val");
  if (v_in.ndim() != 2) throw py::value_error("c_val: expected 2 dimensions (sentences, candidates)");
  const std::int64_t n = v_in.shape(0), C = v_in.shape(1);
  if (k_old < 1 || k_new < 1 || k_new > C)
    throw py::value_error("k_old, k_new: must be >= 1 and k_new <= " + std::to_string(C));
  const auto c_val = f64_array(c_val_obj, "c_val", {n, C});
  const auto c_slot = i64_array(c_slot_obj, "c_slot", {n, C}, 0, k_old);
  const auto c_tok = i64_array(c_tok_obj, "c_tok", {n, C});
  const std::int64_t r = py_helpers::as_ndarray(ci_obj, "ci").size();
  const auto ci = i64_array(ci_obj, "ci", {r}, 0, n);
  py::array_t<std::int64_t> pick;
  std::int64_t ldpick = 0;
  if (!pick_obj.is_none()) {
    const auto p_in = py_helpers::int_array(pick_obj, "pick", {2});
    ldpick = p_in.shape(1);
    if (ldpick < k_new) py_helpers::shape_error("pick", {n, k_new}, {p_in.shape(0), ldpick});
    pick = i64_array(p_in, "pick", {n, ldpick}, 0, C);
  }
  py::array_t<double> s_val({r, k_new});
  py::array_t<std::int64_t> s_tok({r, k_new}), parents(r * k_new);
  bool moved;
  {
    double* pv = s_val.mutable_data();
    std::int64_t *pt = s_tok.mutable_data(), *pp = parents.mutable_data();
    const std::int64_t* pk = pick_obj.is_none() ? nullptr : pick.data();
    py::gil_scoped_release release;
    moved = beam_settle(pv, pt, pp, c_val.data(), c_slot.data(), c_tok.data(), pk, ldpick, ci.data(), n, r, C,
                        k_old, k_new);
  }
  return py::make_tuple(s_val, s_tok, parents, moved);
}

}  // namespace

void register_decode(py::module_& m) {
  py::class_<DecoderStepPlan>(m, "DecoderStepPlan",
                              "Pointers into one model's decoder weights for the native step; see "
                              "pytransformer.models.state")
      .def(py::init<const py::list&, const py::object&, bool, const std::string&, std::int64_t, std::int64_t,
                    std::int64_t, const py::object&, std::int64_t, const py::object&, const py::object&>(),
           py::arg("layers"), py::arg("final_norm"), py::arg("norm_first"), py::arg("activation"),
           py::arg("d_model"), py::arg("heads"), py::arg("d_ff"), py::arg("window"), py::arg("packed_min_rows"),
           py::arg("embedding") = py::none(), py::arg("output") = py::none())
      .def("run", &DecoderStepPlan::run, py::arg("x"), py::arg("pos"), py::arg("kv_caches"),
           py::arg("cross_kvs"), py::arg("cross_lengths"),
           "x (B, C) embedded tokens at position pos -> the decoder's output (B, C)")
      .def("run_tokens", &DecoderStepPlan::run_tokens, py::arg("tokens"), py::arg("pos"), py::arg("kv_caches"),
           py::arg("cross_kvs"), py::arg("cross_lengths"), py::arg("project") = true,
           "tokens (B,) at position pos -> the logits (B, V) (project) or the decoder's output (B, C)")
      .def_property_readonly("has_embedding", [](const DecoderStepPlan& p) { return p.has_embedding(); })
      .def_property_readonly("has_output", [](const DecoderStepPlan& p) { return p.has_output(); });
  m.def("move_cache_rows", &move_cache_rows_py, py::arg("caches"), py::arg("indices"), py::arg("t"),
        "in place, row i of every cache becomes its row indices[i] (i < len(indices)), positions < t");
  m.def("beam_candidates", &beam_candidates_py, py::arg("logits"), py::arg("cum"), py::arg("C"),
        "logits (g*k, V) float32, cum (g, k) float64 -> the C best extensions (val, slot, tok) of each "
        "sentence; see csrc/decode/beam.h");
  m.def("beam_settle", &beam_settle_py, py::arg("c_val"), py::arg("c_slot"), py::arg("c_tok"), py::arg("pick"),
        py::arg("ci"), py::arg("k_old"), py::arg("k_new"),
        "the beams a step keeps -> (s_val, s_tok, parents, moved); see csrc/decode/beam.h");
}

}  // namespace pt
