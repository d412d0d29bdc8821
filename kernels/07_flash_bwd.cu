// 07_flash_bwd.cu — the backward pass of 06_flash_mma on tensor cores: FlashAttention-2's
// algorithm with the MQA reduction of dK and dV over the heads done inside the kernel. The three
// kernels (prep, dK/dV, dQ), their launch and everything between the tile products are in
// flash_bwd.cuh, shared with 12_flash_bwd_wgmma.cu; this file gives them their products on
// mma.sync m16n8k16, one warp at a time, operands from shared memory by ldmatrix.
// Shared-memory tiles use 06's XOR swizzle; each operand comes from one ldmatrix pattern:
//   "A"  rows of a tile as the A operand (K, V in dkdv; Q, dO in dq);
//   "Bn" rows of a tile as the B operand of X Y^T (Q, dO in dkdv; K, V in dq);
//   "Bt" a tile transposed by ldmatrix.trans as the B operand of X Y (dO, Q in dkdv; K in dq).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mqa_params.cuh"
#include "mma.cuh"        // PTX wrappers shared with 06_flash_mma.cu: cp.async, ldmatrix, ex2, Mma<T>
#include "flash_bwd.cuh"  // the kernels, their launch and the algorithm

namespace {

// Byte offset of 16-byte chunk ch of row r in a swizzled tile of D 16-bit columns (06's layout).
template <int D>
__device__ __forceinline__ uint32_t swz(int r, int ch) { return (uint32_t)(r * D * 2 + ((ch ^ (r & 7)) << 4)); }

// Per-lane ldmatrix offsets of the three operand patterns (see 06_flash_mma.cu): step s of a k (or
// d) loop is off[s & 3] + 128 (s >> 2), plus rows (a multiple of 8) * row bytes.
struct Lanes {
  uint32_t a[4], bn[4], bt[4];
  template <int D>
  __device__ __forceinline__ void init(int lane) {
    const int x = lane & 7;
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_ch = lane >> 4;
    const int n_row = (lane & 7) + (lane >> 4) * 8, n_ch = (lane >> 3) & 1;
    const int t_row = (lane & 7) + ((lane >> 3) & 1) * 8, t_ch = lane >> 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      a[j] = a_row * D * 2 + (((2 * j + a_ch) ^ x) << 4);
      bn[j] = n_row * D * 2 + (((2 * j + n_ch) ^ x) << 4);
      bt[j] = t_row * D * 2 + (((2 * j + t_ch) ^ x) << 4);
    }
  }
};
#define LDSM_OFF(off, s, rows) ((off)[(s) & 3] + ((s) >> 2) * 128 + (rows) * D * 2)

// acc (16 x 64) = X (16 rows at `xrow` of tile x, D wide) * Y^T (64 rows of tile y): the warp's
// S = Q K^T (or S^T = K Q^T, dP = dO V^T, dP^T = V dO^T).
template <typename T, int D>
__device__ __forceinline__ void gemm_xyt(float (&acc)[8][4], uint32_t x, int xrow, uint32_t y, const Lanes& L) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    ldsm_x4(a, x + LDSM_OFF(L.a, ks, xrow));
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_x4(b, y + LDSM_OFF(L.bn, ks, np * 16));
      Mma<T>::run(acc[2 * np], a, b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x D) += A (16 x 64, the fp32 accumulators p, rounded to 16 bits) * Y (64 rows of tile y).
template <typename T, int D>
__device__ __forceinline__ void gemm_acc_y(float (&acc)[D / 8][4], const float (&p)[8][4], uint32_t y, const Lanes& L) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];  // accumulator (row g / g+8, cols 2tq, 2tq+1) of n-tiles 2kk, 2kk+1 = A of k-step kk
    a[0] = Mma<T>::pack(p[2 * kk][0], p[2 * kk][1]);
    a[1] = Mma<T>::pack(p[2 * kk][2], p[2 * kk][3]);
    a[2] = Mma<T>::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = Mma<T>::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldsm_x4_trans(b, y + LDSM_OFF(L.bt, dp, kk * 16));
      Mma<T>::run(acc[2 * dp], a, b[0], b[1]);
      Mma<T>::run(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

#undef LDSM_OFF

// The products of flash_bwd.cuh's kernels on mma.sync (see its header for the interface).
template <typename T, int Dim>
struct MmaSync {
  static constexpr int D = Dim, ALIGN = 0, MINB = 2;
  static constexpr bool PIPE_KV = false, PIPE_Q = false;  // mma.sync is synchronous: nothing to overlap
  static __device__ __forceinline__ int pad(const unsigned char*) { return 0; }
  static __device__ __forceinline__ uint32_t off(int r, int ch) { return swz<D>(r, ch); }
  struct Ctx {
    Lanes L;
    __device__ __forceinline__ explicit Ctx(int lane) { L.init<D>(lane); }
  };
  struct Frag {};  // mma.sync packs its A operands as it goes
  static __device__ __forceinline__ void landed() {}
  template <int N>
  static __device__ __forceinline__ void wait() {}
  static __device__ __forceinline__ void xyt(float (&acc)[8][4], uint32_t x, int xrow, uint32_t y, const Ctx& c) {
    gemm_xyt<T, D>(acc, x, xrow, y, c.L);
  }
  static __device__ __forceinline__ void acc_y(float (&acc)[D / 8][4], const float (&p)[8][4], uint32_t y, const Ctx& c,
                                               Frag&) {
    gemm_acc_y<T, D>(acc, p, y, c.L);
  }
};

}  // namespace

int fastmqa_k07_flash_bwd(const MQAParams& p) { return flash_bwd<MmaSync>(p); }
