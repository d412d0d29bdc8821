// 12_flash_bwd_wgmma.cu — the backward pass of 08_flash_wgmma: flash_bwd.cuh's three kernels (the
// same algorithm, CTAs, tiles and shared code as 07_flash_bwd.cu) with their four tile products on
// Hopper's warpgroup tensor cores (sm_90a, kernels/wgmma.cuh) instead of mma.sync.
//
// A CTA's 4 warps are one warpgroup, and a wgmma m64nN gives warp w rows 16w .. 16w+15 of its
// 64-row accumulator in mma.sync's layout: exactly the rows 07 gives each warp. So only the
// products change:
//   * xyt (S^T = K Q^T, dP^T = V dO^T; S = Q K^T, dP = dO V^T): D/16 wgmma m64n64k16, both
//     operands read by the tensor cores from shared memory through descriptors (K-major);
//   * acc_y (dV += P^T dO, dK += dS^T Q; dQ += dS K): 4 wgmma m64nDk16 with the 16-bit-rounded
//     accumulators as the register A operand and the tile as a transposed ("MN-major") B;
//   * tiles in wgmma's 128-byte swizzled layout (sw128), 1024-byte aligned; a tile cp.async
//     wrote is made visible to the tensor cores by fence.proxy.async before the block's barrier.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mqa_params.cuh"
#include "mma.cuh"        // cp.async, Mma<T>::pack
#include "wgmma.cuh"      // descriptors, fences, Wgmma<T, N>
#include "flash_bwd.cuh"  // the kernels, their launch and the algorithm

// Dev knob: FASTMQA_BWD_SYNC=1 waits for every product as soon as it is issued (the first version;
// scripts/dev_bwd_time.py times it against the default).
#ifndef FASTMQA_BWD_SYNC
#define FASTMQA_BWD_SYNC 0
#endif
// FASTMQA_BWD_PIPE: block it-1's last products run on under block it's first two (flash_bwd.cuh):
// 1 in both kernels, 2 in the dK/dV kernel only, at D = 128 (results/bwd_pipe_dev.json: 2 was
// 1.00-1.05x off at D = 128; 1 was 0.87-0.99x, and at D = 64 ptxas serialises the products).
#ifndef FASTMQA_BWD_PIPE
#define FASTMQA_BWD_PIPE 2
#endif
// FASTMQA_BWD_MINB64: CTAs per SM the D = 64 kernels are compiled for (their tiles take half the
// shared memory of D = 128's, which holds 2): 3 fits them in 160 registers without spills and was
// 1.01-1.07x 2 (results/bwd_minb_dev.json); 4 spills.
#ifndef FASTMQA_BWD_MINB64
#define FASTMQA_BWD_MINB64 3
#endif

namespace {

// The products of flash_bwd.cuh's kernels on wgmma (see its header for the interface).
template <typename T, int Dim>
struct WgmmaProducts {
  static constexpr int D = Dim, ALIGN = 1024, MINB = D == 64 ? FASTMQA_BWD_MINB64 : 2;
  static constexpr bool PIPE_KV = FASTMQA_BWD_PIPE >= 1 && D == 128, PIPE_Q = FASTMQA_BWD_PIPE == 1 && D == 128;
  static __device__ __forceinline__ int pad(const unsigned char* smem) { return (1024 - (smem_u32(smem) & 1023)) & 1023; }
  static __device__ __forceinline__ uint32_t off(int r, int ch) { return sw128<64>(r, ch); }
  struct Ctx {
    __device__ __forceinline__ explicit Ctx(int) {}
  };
  using Frag = uint32_t[4][4];  // acc_y's A operand: p packed to 16 bits, k-step by k-step
  static __device__ __forceinline__ void landed() { fence_async_shared(); }
  template <int N>
  static __device__ __forceinline__ void wait() { wgmma_wait<N>(); }
  // The warpgroup's 64 rows of tile x times tile y^T; warp w's rows 16w.. are the xrow of 07's call.
  static __device__ __forceinline__ void xyt(float (&acc)[8][4], uint32_t x, int, uint32_t y, const Ctx&) {
    float(&d)[32] = reinterpret_cast<float(&)[32]>(acc);
#pragma unroll
    for (int e = 0; e < 32; ++e) d[e] = 0.f;  // defined before the products (else ptxas copies one and serialises them)
    wgmma_fence();
    const GmmaBase dx(x, 16, 1024), dy(y, 16, 1024);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {  // k-step ks: 16 columns (32 bytes) of a 64-column atom
      const uint32_t at = (ks >> 2) * (64 * 128) + (ks & 3) * 32;
      Wgmma<T, 64>::ss(d, dx.at(at), dy.at(at), ks > 0);
    }
    wgmma_commit();
    if (FASTMQA_BWD_SYNC) wgmma_wait<0>();
  }
  // acc (64 x D over the warpgroup) += p (64 x 64) * tile y (64 rows x D): k-step kk is rows
  // 16kk .. 16kk+15 of y, 16 rows of 128 bytes in every 64-column atom.
  static __device__ __forceinline__ void acc_y(float (&acc)[D / 8][4], const float (&p)[8][4], uint32_t y, const Ctx&,
                                               Frag& a) {
    float(&d)[D / 2] = reinterpret_cast<float(&)[D / 2]>(acc);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      a[kk][0] = Mma<T>::pack(p[2 * kk][0], p[2 * kk][1]);
      a[kk][1] = Mma<T>::pack(p[2 * kk][2], p[2 * kk][3]);
      a[kk][2] = Mma<T>::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
      a[kk][3] = Mma<T>::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
    }
    wgmma_fence();
    const GmmaBase dy(y, 64 * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) Wgmma<T, D>::rs(d, a[kk], dy.at(kk * 16 * 128), 1);
    wgmma_commit();
    if (FASTMQA_BWD_SYNC) wgmma_wait<0>();
  }
};

}  // namespace

int fastmqa_k12_flash_bwd_wgmma(const MQAParams& p) {
  if (!device_is_sm90()) return FASTMQA_UNSUPPORTED;  // wgmma is sm_90a only
  return flash_bwd<WgmmaProducts>(p);
}
