#include "python/common.h"
#include "python/registry.h"

namespace py = pybind11;

namespace pt {

void register_attention(py::module_& m) {}

}  // namespace pt
