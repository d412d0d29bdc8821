// mbarrier.cuh — shared-memory barriers with transaction counts (sm_90), for the copy engines:
// 10_decode.cu's bulk copies (decode_common.cuh) and 08_flash_wgmma.cu's TMA loads (wgmma.cuh).
#pragma once
#include <stdint.h>

namespace {

// A copy engine's transfer (bulk copy, TMA) counts its bytes against an mbarrier's transaction
// bytes; a phase completes when its one arrival (arrive_expect_tx) and all the bytes it expects
// have landed. mbar_wait spins on the phase's parity.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
// A plain arrival (no transaction bytes): a consumer hands a buffer back to the producer
// (08_flash_wgmma.cu's warp-specialised kernel).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
}  // namespace
