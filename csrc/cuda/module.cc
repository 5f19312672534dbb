// pybind11 bindings of pytransformer._cuda. The Python layer (pytransformer/cuda.py) reads
// __cuda_array_interface__, validates dtype, shape, contiguity and sizes, and passes raw device
// pointers as integers; here each pointer is checked to be device memory on the current device,
// the GIL is released, the kernel is queued and a launch error becomes a RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace py = pybind11;
using pt::cuda::Activation;
using std::int64_t;

namespace {

[[noreturn]] void raise_cuda(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string("pytransformer._cuda: ") + what + " failed: " + cudaGetErrorName(err) +
                           ": " + cudaGetErrorString(err));
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) raise_cuda(err, what);
}

// Number of CUDA devices, 0 when there is no driver or no device (never raises).
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

// Checks that `ptr` (an integer from __cuda_array_interface__) is device or managed memory
// visible to the current device; raises ValueError naming the argument otherwise.
template <typename T>
T* device_ptr(std::uintptr_t ptr, const char* name) {
  if (ptr == 0) throw py::value_error(std::string(name) + ": null device pointer");
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw py::value_error(std::string(name) + ": not a CUDA device pointer (" + cudaGetErrorString(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw py::value_error(std::string(name) + ": memory is not on a CUDA device");
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (attr.type == cudaMemoryTypeDevice && attr.device != dev)
    throw py::value_error(std::string(name) + ": array is on device " + std::to_string(attr.device) +
                          " but the current device is " + std::to_string(dev));
  return reinterpret_cast<T*>(ptr);
}

template <typename T>
T* optional_ptr(std::uintptr_t ptr, const char* name) {
  return ptr == 0 ? nullptr : device_ptr<T>(ptr, name);
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Device copy of the host key lengths for the duration of one call.
struct DeviceInts {
  int* p = nullptr;
  explicit DeviceInts(const std::vector<int>& host) {
    if (host.empty()) return;
    check(cudaMalloc(reinterpret_cast<void**>(&p), host.size() * sizeof(int)), "cudaMalloc");
    const cudaError_t err = cudaMemcpy(p, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice);
    if (err != cudaSuccess) {
      cudaFree(p);
      raise_cuda(err, "cudaMemcpy");
    }
  }
  ~DeviceInts() {
    if (p) cudaFree(p);  // cudaFree waits for the kernels that read it
  }
  DeviceInts(const DeviceInts&) = delete;
  DeviceInts& operator=(const DeviceInts&) = delete;
};

// Scratch device buffer freed at scope exit.
struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) { check(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

void matmul(std::uintptr_t c, std::uintptr_t a, std::uintptr_t b, std::uintptr_t bias, int batch, int M, int N,
            int K, int64_t stride_a, int64_t stride_b, bool trans_a, bool trans_b, bool accumulate, int act,
            bool naive, std::uintptr_t stream) {
  float* pc = device_ptr<float>(c, "out");
  const float* pa = device_ptr<const float>(a, "a");
  const float* pb = device_ptr<const float>(b, "b");
  const float* pbias = optional_ptr<const float>(bias, "bias");
  cudaError_t err;
  {
    py::gil_scoped_release release;
    auto f = naive ? pt::cuda::sgemm_forward_naive : pt::cuda::sgemm_forward;
    err = f(pc, pa, pb, pbias, batch, M, N, K, stride_a, stride_b, trans_a, trans_b, accumulate,
            static_cast<Activation>(act), as_stream(stream));
  }
  check(err, "matmul kernel launch");
}

void layer_norm(std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t x, std::uintptr_t gamma,
                std::uintptr_t beta, int64_t N, int C, float eps, std::uintptr_t stream) {
  float* py_ = device_ptr<float>(y, "y");
  float* pm = device_ptr<float>(mean, "mean");
  float* pr = device_ptr<float>(rstd, "rstd");
  const float* px = device_ptr<const float>(x, "x");
  const float* pg = device_ptr<const float>(gamma, "gamma");
  const float* pb = device_ptr<const float>(beta, "beta");
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = pt::cuda::layer_norm_forward(py_, pm, pr, px, pg, pb, N, C, eps, as_stream(stream));
  }
  check(err, "layer_norm kernel launch");
}

void layer_norm_backward(std::uintptr_t dx, std::uintptr_t dgamma, std::uintptr_t dbeta, std::uintptr_t dy,
                         std::uintptr_t x, std::uintptr_t gamma, std::uintptr_t mean, std::uintptr_t rstd, int64_t N,
                         int C, std::uintptr_t stream) {
  float* pdx = device_ptr<float>(dx, "dx");
  float* pdg = device_ptr<float>(dgamma, "dgamma");
  float* pdb = device_ptr<float>(dbeta, "dbeta");
  const float* pdy = device_ptr<const float>(dy, "dy");
  const float* px = device_ptr<const float>(x, "x");
  const float* pg = device_ptr<const float>(gamma, "gamma");
  const float* pm = device_ptr<const float>(mean, "mean");
  const float* pr = device_ptr<const float>(rstd, "rstd");
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = pt::cuda::layer_norm_backward(pdx, pdg, pdb, pdy, px, pg, pm, pr, N, C, as_stream(stream));
  }
  check(err, "layer_norm_backward kernel launch");
}

void synchronize() {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = cudaDeviceSynchronize();
  }
  check(err, "cudaDeviceSynchronize");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pytransformer CUDA kernels (raw device pointers; use pytransformer.cuda instead)";
  m.def("device_count", &device_count);
  m.def("synchronize", &synchronize);
  m.def("matmul", &matmul);
  m.def("layer_norm", &layer_norm);
  m.def("layer_norm_backward", &layer_norm_backward);
  m.attr("ATTN_MAX_D") = pt::cuda::kAttnMaxD;
}
