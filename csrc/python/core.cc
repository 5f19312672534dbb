#include "core/isa.h"
#include "core/threading.h"
#include "python/registry.h"

#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace pt {

void register_core(py::module_& m) {
  m.def("selected_isa", [] { return isa_name(selected_isa()); });
  m.def("_force_isa", [](const std::string& name) {
    if (name != "generic" && name != "avx2") throw py::value_error("name: expected 'generic' or 'avx2', got '" + name + "'");
    force_isa(name == "avx2" ? Isa::avx2 : Isa::generic);
    return isa_name(selected_isa());
  });
  m.def("cpu_has_avx2_fma", &cpu_has_avx2_fma);
  m.def("have_openmp", &have_openmp);
  m.def("get_num_threads", &num_threads);
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("n: the thread count must be >= 1, got " + std::to_string(n));
    if (n > 1 && threads_lost_to_fork())
      throw std::runtime_error(
          "n: this process was forked after pytransformer ran a multi-threaded kernel, and the "
          "OpenMP thread pool does not survive fork(), so it runs on one thread; use the 'spawn' "
          "or 'forkserver' start method of multiprocessing for multi-threaded workers");
    set_num_threads(n);
  });
}

}  // namespace pt
