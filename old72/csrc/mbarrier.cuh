// Shared-memory mbarriers (sm_90): the full / empty handshake between the
// producer warps that copy K/V tiles and the consumer warps that use them.
#pragma once
#include <cstdint>

#include "csrc/mma.cuh"  // smem_addr

namespace jaxinfer {

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes initialised barriers visible before the CTA barrier that follows.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// One arrival for the calling warp (by lane 0, after the warp has converged),
// tied to `dependent`: the arrive's result, reduced to a signed zero, is added
// to it. ptxas otherwise sinks an arrive below independent arithmetic: in the
// prefill kernel, below the whole softmax, so the producer learned 1500
// cycles late that a K stage was free (benchmarks/NOTES.md P30).
__device__ __forceinline__ void warp_arrive_before(uint64_t* bar, float& dependent) {
  __syncwarp();
  uint64_t state = 0;
  if (threadIdx.x % 32 == 0) {
    asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n" : "=l"(state) : "r"(smem_addr(bar)) : "memory");
  }
  dependent += __int_as_float(static_cast<int>(state) & static_cast<int>(0x80000000u));  // + 0 or - 0
}

// The barrier's pending count rises now and falls when this thread's earlier
// cp.async copies have landed: its phase cannot complete before they have.
__device__ __forceinline__ void mbarrier_arrive_on_cp_async(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Blocks until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

}  // namespace jaxinfer
