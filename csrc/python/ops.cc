#include "python/common.h"
#include "python/registry.h"

namespace py = pybind11;

namespace pt {

void register_ops(py::module_& m) {}

}  // namespace pt
