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
    Isa isa = Isa::generic;
    if (name == "avx2") isa = Isa::avx2;
    else if (name == "avx512") isa = Isa::avx512;
    else if (name == "avx512vnni") isa = Isa::avx512vnni;
    else if (name != "generic")
      throw py::value_error("name: expected 'generic', 'avx2', 'avx512' or 'avx512vnni', got '" + name +
                            "'");
    force_isa(isa);
    return isa_name(selected_isa());
  });
  m.def("cpu_has_avx2_fma", &cpu_has_avx2_fma);
  m.def("cpu_has_avx512", &cpu_has_avx512);
  m.def("cpu_has_avx512_vnni", &cpu_has_avx512_vnni);
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
