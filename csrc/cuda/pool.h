// A small caching pool for the scratch memory of one kernel call: device buffers (softmax
// cross-entropy's per-row losses, attention's row sums, layer norm's partial column sums, the
// key lengths) and the pinned host buffers the key lengths are staged in.
//
// Why: cudaMalloc and cudaFree synchronise the device, so a call that allocated its scratch
// each time serialised every stream behind it. The pool keeps released blocks and lends them
// again; it calls cudaMalloc only when no cached block fits.
//
// The rules that keep a reused block safe while earlier kernels may still be queued:
//   - Each block carries an event, recorded on the caller's stream when the block is released
//     (after the kernels that use it were queued).
//   - A device block can be lent again at once: the new caller's stream first waits on that
//     event (cudaStreamWaitEvent, no host wait), so its kernels start after the old ones.
//   - A pinned host block is written by the host as soon as it is lent, so it is lent again only
//     once its event has completed (the copy out of it is done); otherwise a new one is made.
//
// One pool per device, each behind its own mutex: calls from any number of threads are safe.
// Sizes are rounded up to a power of two (at least 512 bytes) so blocks fit later calls of
// nearby sizes. At most kPoolCacheBytes per kind and device stay cached; a larger or surplus
// block is freed on release (after waiting for its event). The pools are never destroyed: at
// process exit the CUDA runtime may already be gone, and the driver reclaims the memory anyway.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace pt {
namespace cuda {

enum class MemoryKind { device, pinned_host };

constexpr std::size_t kPoolCacheBytes = std::size_t(64) << 20;

struct PoolBlock {
  void* p = nullptr;
  std::size_t bytes = 0;  // the rounded size
  cudaEvent_t released = nullptr;
  int device = 0;
};

// Lends a block of at least `bytes` (0 is taken as 1) of `kind` on the current device, ordered
// after its previous users as described above. On failure returns the CUDA error, `*out` empty.
cudaError_t pool_acquire(MemoryKind kind, std::size_t bytes, cudaStream_t stream, PoolBlock* out);
// Gives the block back after the work that uses it was queued on `stream`. Never fails: when
// the event cannot be recorded the block is freed instead of cached (after a device sync).
void pool_release(MemoryKind kind, const PoolBlock& block, cudaStream_t stream);

struct PoolStats {
  std::int64_t allocations = 0;  // cudaMalloc / cudaHostAlloc calls so far
  std::int64_t reuses = 0;       // blocks lent from the cache
  std::int64_t cached_bytes = 0; // held in the cache now (not lent)
  std::int64_t lent_blocks = 0;  // lent and not yet released
};
PoolStats pool_stats(MemoryKind kind, int device);
// Waits for the cached blocks' events and frees them all (lent blocks are untouched).
cudaError_t pool_empty(int device);

}  // namespace cuda
}  // namespace pt
