// The scratch-memory pool of pool.h: per device, a mutex and one list of cached blocks per kind.
#include "pool.h"

#include <map>
#include <mutex>
#include <vector>

namespace pt {
namespace cuda {
namespace {

struct Cache {
  std::vector<PoolBlock> blocks;  // released, not lent
  PoolStats stats;
};

struct DevicePools {
  std::mutex mutex;
  Cache caches[2];  // indexed by kind_index
};

int kind_index(MemoryKind kind) { return kind == MemoryKind::device ? 0 : 1; }

std::size_t rounded(std::size_t bytes) {
  std::size_t n = 512;
  while (n < bytes) n <<= 1;
  return n;
}

DevicePools& pools_of(int device) {
  static std::mutex registry_mutex;
  static auto* registry = new std::map<int, DevicePools*>();  // never freed (see pool.h)
  std::lock_guard<std::mutex> lock(registry_mutex);
  DevicePools*& pools = (*registry)[device];
  if (!pools) pools = new DevicePools();
  return *pools;
}

// A cudaEventQuery that found the work still queued returns cudaErrorNotReady; it is not a
// failure, so it must not linger where the next launch check (cudaGetLastError) would see it.
void forget_not_ready() {
  if (cudaPeekAtLastError() == cudaErrorNotReady) cudaGetLastError();
}

// Whether a cached block may be lent now: a device block always (the new stream will wait on
// its event), a pinned host block only once the copy that read it is done.
bool lendable(MemoryKind kind, const PoolBlock& block) {
  if (kind == MemoryKind::device) return true;
  const cudaError_t done = cudaEventQuery(block.released);
  if (done == cudaErrorNotReady) forget_not_ready();
  return done == cudaSuccess;
}

// Takes a lendable cached block of exactly `bytes` out of the cache; false when there is none.
bool take_cached(Cache& cache, MemoryKind kind, std::size_t bytes, PoolBlock* out) {
  for (std::size_t i = 0; i < cache.blocks.size(); ++i) {
    if (cache.blocks[i].bytes != bytes || !lendable(kind, cache.blocks[i])) continue;
    *out = cache.blocks[i];
    cache.blocks.erase(cache.blocks.begin() + static_cast<std::ptrdiff_t>(i));
    cache.stats.cached_bytes -= static_cast<std::int64_t>(bytes);
    cache.stats.reuses += 1;
    cache.stats.lent_blocks += 1;
    return true;
  }
  return false;
}

// Frees a block once the last work recorded on its event is done. Errors are ignored: this runs
// on release paths that cannot report them, and a failing device fails the next call anyway.
void free_block(MemoryKind kind, const PoolBlock& block) {
  if (block.released) {
    cudaEventSynchronize(block.released);
    cudaEventDestroy(block.released);
  }
  if (kind == MemoryKind::device)
    cudaFree(block.p);
  else
    cudaFreeHost(block.p);
}

cudaError_t allocate(MemoryKind kind, std::size_t bytes, int device, PoolBlock* out) {
  PoolBlock block;
  block.bytes = bytes;
  block.device = device;
  cudaError_t err = kind == MemoryKind::device ? cudaMalloc(&block.p, bytes)
                                               : cudaHostAlloc(&block.p, bytes, cudaHostAllocDefault);
  if (err != cudaSuccess) return err;
  err = cudaEventCreateWithFlags(&block.released, cudaEventDisableTiming);
  if (err != cudaSuccess) {
    block.released = nullptr;
    free_block(kind, block);
    return err;
  }
  *out = block;
  return cudaSuccess;
}

}  // namespace

cudaError_t pool_acquire(MemoryKind kind, std::size_t bytes, cudaStream_t stream, PoolBlock* out) {
  *out = PoolBlock{};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::size_t size = rounded(bytes);
  DevicePools& pools = pools_of(device);
  Cache& cache = pools.caches[kind_index(kind)];
  PoolBlock block;
  bool cached;
  {
    std::lock_guard<std::mutex> lock(pools.mutex);
    cached = take_cached(cache, kind, size, &block);
  }
  if (cached && kind == MemoryKind::device) {
    err = cudaStreamWaitEvent(stream, block.released, 0);
    if (err != cudaSuccess) {
      pool_release(kind, block, nullptr);  // back to the cache, ordered after all legacy work
      return err;
    }
  }
  if (!cached) {
    err = allocate(kind, size, device, &block);
    if (err != cudaSuccess) return err;
    std::lock_guard<std::mutex> lock(pools.mutex);
    cache.stats.allocations += 1;
    cache.stats.lent_blocks += 1;
  }
  *out = block;
  return cudaSuccess;
}

void pool_release(MemoryKind kind, const PoolBlock& block, cudaStream_t stream) {
  if (!block.p) return;
  const bool recorded = cudaEventRecord(block.released, stream) == cudaSuccess;
  DevicePools& pools = pools_of(block.device);
  Cache& cache = pools.caches[kind_index(kind)];
  {
    std::lock_guard<std::mutex> lock(pools.mutex);
    cache.stats.lent_blocks -= 1;
    if (recorded && cache.stats.cached_bytes + static_cast<std::int64_t>(block.bytes) <=
                        static_cast<std::int64_t>(kPoolCacheBytes)) {
      cache.blocks.push_back(block);
      cache.stats.cached_bytes += static_cast<std::int64_t>(block.bytes);
      return;
    }
  }
  if (!recorded) {
    cudaGetLastError();       // the failed record must not be blamed on the next launch
    cudaDeviceSynchronize();  // without the event, only this covers the work queued on the block
  }
  free_block(kind, block);
}

PoolStats pool_stats(MemoryKind kind, int device) {
  DevicePools& pools = pools_of(device);
  std::lock_guard<std::mutex> lock(pools.mutex);
  return pools.caches[kind_index(kind)].stats;
}

cudaError_t pool_empty(int device) {
  DevicePools& pools = pools_of(device);
  std::vector<PoolBlock> cached[2];
  {
    std::lock_guard<std::mutex> lock(pools.mutex);
    for (int k = 0; k < 2; ++k) {
      cached[k].swap(pools.caches[k].blocks);
      pools.caches[k].stats.cached_bytes = 0;
    }
  }
  for (const PoolBlock& block : cached[0]) free_block(MemoryKind::device, block);
  for (const PoolBlock& block : cached[1]) free_block(MemoryKind::pinned_host, block);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pt
