// pybind11 bindings of pytransformer._cuda. The Python layer (pytransformer/cuda.py) reads
// __cuda_array_interface__, validates dtype, shape, contiguity and sizes, and passes raw device
// pointers as integers; here each pointer is checked to be device memory on the current device,
// the GIL is released, the kernel is queued and a launch error becomes a RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "pool.h"

namespace py = pybind11;
using pt::cuda::Activation;
using pt::cuda::MemoryKind;
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

// A pool block (pool.h) for the duration of one call: given back at scope exit, after the
// kernels that use it were queued on `stream`, so its next user is ordered after them. A size
// of 0 holds no block.
class Scratch {
 public:
  Scratch(MemoryKind kind, size_t bytes, cudaStream_t stream) : kind_(kind), stream_(stream) {
    if (bytes > 0) check(pt::cuda::pool_acquire(kind, bytes, stream, &block_), "scratch allocation");
  }
  ~Scratch() { pt::cuda::pool_release(kind_, block_, stream_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(block_.p);
  }

 private:
  MemoryKind kind_;
  cudaStream_t stream_;
  pt::cuda::PoolBlock block_;
};

// The key lengths on the device for one call. They are staged in pinned host memory and copied
// with cudaMemcpyAsync on the caller's stream: the copy is ordered with the kernel that reads
// the lengths and waits for nothing else (a plain cudaMemcpy runs on the legacy stream and
// blocks). The host buffer must outlive the copy: the pool lends a pinned block again only once
// the event recorded at its release (after the copy and the kernel) has completed.
class DeviceLengths {
 public:
  DeviceLengths(const std::vector<int>& lengths, cudaStream_t stream)
      : host_(MemoryKind::pinned_host, lengths.size() * sizeof(int), stream),
        device_(MemoryKind::device, lengths.size() * sizeof(int), stream) {
    if (lengths.empty()) return;
    std::memcpy(host_.as<int>(), lengths.data(), lengths.size() * sizeof(int));
    check(cudaMemcpyAsync(device_.as<int>(), host_.as<int>(), lengths.size() * sizeof(int),
                          cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync of key_lengths");
  }
  const int* get() const { return device_.as<const int>(); }  // null without lengths

 private:
  Scratch host_, device_;  // destroyed device first, then host: both after the kernel is queued
};

void matmul(std::uintptr_t c, std::uintptr_t a, std::uintptr_t b, std::uintptr_t bias, int batch, int M, int N,
            int K, int64_t stride_a, int64_t stride_b, bool trans_a, bool trans_b, bool accumulate, int act,
            bool naive, std::uintptr_t stream) {
  float* pc = device_ptr<float>(c, "out");
  // With K = 0, a and b hold no elements and the kernel never reads them (C = bias, or C left
  // as it is plus bias when accumulating). CuPy and PyTorch give an empty array a null pointer,
  // so demanding device memory here would refuse the documented case.
  const float* pa = K == 0 ? nullptr : device_ptr<const float>(a, "a");
  const float* pb = K == 0 ? nullptr : device_ptr<const float>(b, "b");
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
    const size_t floats = static_cast<size_t>(pt::cuda::layer_norm_backward_scratch(N, C));
    const Scratch partial(MemoryKind::device, floats * sizeof(float), as_stream(stream));
    err = pt::cuda::layer_norm_backward(pdx, pdg, pdb, partial.as<float>(), pdy, px, pg, pm, pr, N, C,
                                        as_stream(stream));
  }
  check(err, "layer_norm_backward kernel launch");
}

pt::cuda::AttnView view(std::uintptr_t ptr, const std::vector<int64_t>& strides, const char* name) {
  if (strides.size() != 4) throw py::value_error(std::string(name) + ": expected 4 strides");
  return {device_ptr<const float>(ptr, name), strides[0], strides[1], strides[2], strides[3]};
}

// key_lengths arrive as a host list (checked in [0, Lk] by the Python layer).
pt::cuda::AttnShape attn_shape(int B, int Lq, int Lk, int H, int D, bool causal, int64_t query_offset, float scale,
                               const DeviceLengths& lengths) {
  return {B, Lq, Lk, H, D, causal, query_offset, scale, lengths.get()};
}

void attention(std::uintptr_t out, std::uintptr_t lse, std::uintptr_t q, std::vector<int64_t> sq, std::uintptr_t k,
               std::vector<int64_t> sk, std::uintptr_t v, std::vector<int64_t> sv, int B, int Lq, int Lk, int H, int D,
               std::vector<int> key_lengths, bool causal, int64_t query_offset, float scale, std::uintptr_t stream) {
  float* pout = device_ptr<float>(out, "out");
  float* plse = optional_ptr<float>(lse, "lse");
  const auto vq = view(q, sq, "q"), vk = view(k, sk, "k"), vv = view(v, sv, "v");
  cudaError_t err;
  {
    py::gil_scoped_release release;
    const DeviceLengths lengths(key_lengths, as_stream(stream));
    err = pt::cuda::attention_forward(pout, plse, vq, vk, vv,
                                      attn_shape(B, Lq, Lk, H, D, causal, query_offset, scale, lengths),
                                      as_stream(stream));
  }
  check(err, "attention kernel launch");
}

void attention_backward(std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t dout,
                        std::uintptr_t out, std::uintptr_t lse, std::uintptr_t q, std::vector<int64_t> sq,
                        std::uintptr_t k, std::vector<int64_t> sk, std::uintptr_t v, std::vector<int64_t> sv, int B,
                        int Lq, int Lk, int H, int D, std::vector<int> key_lengths, bool causal,
                        int64_t query_offset, float scale, std::uintptr_t stream) {
  float* pdq = device_ptr<float>(dq, "dq");
  float* pdk = device_ptr<float>(dk, "dk");
  float* pdv = device_ptr<float>(dv, "dv");
  const float* pdout = device_ptr<const float>(dout, "dout");
  const float* pout = device_ptr<const float>(out, "out");
  const float* plse = device_ptr<const float>(lse, "lse");
  const auto vq = view(q, sq, "q"), vk = view(k, sk, "k"), vv = view(v, sv, "v");
  cudaError_t err;
  {
    py::gil_scoped_release release;
    const DeviceLengths lengths(key_lengths, as_stream(stream));
    const Scratch delta(MemoryKind::device, static_cast<size_t>(B) * H * Lq * sizeof(float), as_stream(stream));
    err = pt::cuda::attention_backward(pdq, pdk, pdv, delta.as<float>(), pdout, pout, plse, vq, vk, vv,
                                       attn_shape(B, Lq, Lk, H, D, causal, query_offset, scale, lengths),
                                       as_stream(stream));
  }
  check(err, "attention_backward kernel launch");
}

// Returns (loss, bad_row): bad_row >= 0 names the first row whose target is out of range (the
// Python layer raises IndexError), in which case nothing was computed.
py::tuple softmax_cross_entropy(std::uintptr_t dlogits, std::uintptr_t logits, std::uintptr_t targets, bool is64,
                                int64_t N, int V, float label_smoothing, int64_t ignore_index,
                                std::uintptr_t stream) {
  float* pd = device_ptr<float>(dlogits, "dlogits");
  const float* pl = device_ptr<const float>(logits, "logits");
  const void* pt_ = device_ptr<const void>(targets, "targets");
  float loss = 0.0f;
  int64_t bad_row = -1;
  cudaError_t err;
  {
    py::gil_scoped_release release;
    const Scratch row_loss(MemoryKind::device, static_cast<size_t>(N) * sizeof(float), as_stream(stream));
    const Scratch stats(MemoryKind::device, 2 * sizeof(int64_t), as_stream(stream));
    err = pt::cuda::softmax_xent_forward_backward(&loss, &bad_row, pd, row_loss.as<float>(),
                                                  stats.as<int64_t>(), pl, pt_, is64, N, V,
                                                  label_smoothing, ignore_index, as_stream(stream));
  }
  check(err, "softmax_cross_entropy");
  return py::make_tuple(loss, bad_row);
}

void adam_step(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t m, std::uintptr_t v, int64_t n, float lr,
               float beta1, float beta2, float eps, float weight_decay, int64_t step, bool decoupled,
               std::uintptr_t stream) {
  float* pp = device_ptr<float>(param, "param");
  const float* pg = device_ptr<const float>(grad, "grad");
  float* pm = device_ptr<float>(m, "m");
  float* pv = device_ptr<float>(v, "v");
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = pt::cuda::adam_step(pp, pg, pm, pv, n, lr, beta1, beta2, eps, weight_decay, step, decoupled,
                              as_stream(stream));
  }
  check(err, "adam_step kernel launch");
}

void synchronize() {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = cudaDeviceSynchronize();
  }
  check(err, "cudaDeviceSynchronize");
}

int current_device() {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

py::dict as_dict(const pt::cuda::PoolStats& s) {
  py::dict d;
  d["allocations"] = s.allocations;
  d["reuses"] = s.reuses;
  d["cached_bytes"] = s.cached_bytes;
  d["lent_blocks"] = s.lent_blocks;
  return d;
}

// The scratch pool of the current device: {"device": {...}, "pinned_host": {...}}.
py::dict memory_pool_stats() {
  const int dev = current_device();
  py::dict d;
  d["device"] = as_dict(pt::cuda::pool_stats(MemoryKind::device, dev));
  d["pinned_host"] = as_dict(pt::cuda::pool_stats(MemoryKind::pinned_host, dev));
  return d;
}

void empty_memory_pool() {
  const int dev = current_device();
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = pt::cuda::pool_empty(dev);
  }
  check(err, "emptying the scratch pool");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pytransformer CUDA kernels (raw device pointers; use pytransformer.cuda instead)";
  m.def("device_count", &device_count);
  m.def("synchronize", &synchronize);
  m.def("matmul", &matmul);
  m.def("layer_norm", &layer_norm);
  m.def("layer_norm_backward", &layer_norm_backward);
  m.def("attention", &attention);
  m.def("attention_backward", &attention_backward);
  m.def("softmax_cross_entropy", &softmax_cross_entropy);
  m.def("adam_step", &adam_step);
  m.def("memory_pool_stats", &memory_pool_stats);
  m.def("empty_memory_pool", &empty_memory_pool);
  m.attr("ATTN_MAX_D") = pt::cuda::kAttnMaxD;
}
