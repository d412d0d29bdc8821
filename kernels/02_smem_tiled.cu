// 02_smem_tiled.cu — shared memory: in MQA one K/V tile serves every head.
//
// The naive kernel (01) gives every one of the B*H*Sq query rows its own walk over the K/V
// head, so the same k_j is fetched from L1/L2 H*Sq times per batch. But MQA has ONE K/V head
// for all H query heads: a block that holds query rows of several heads of the same batch b
// can copy a tile of K (and V) into shared memory once and let every row of the block use it.
//
// What changes (and only this): where the data lives.
//   * A block owns ROWS query rows of one batch b, packed i-major (r = i*H + h), so it holds
//     all H heads of ROWS/H neighbouring query positions (or, when H > ROWS, ROWS heads of one
//     position). Neighbouring positions also have almost the same causal limit.
//   * The block's q rows are staged in shared memory (a thread's row is read once per key).
//   * K and V stream through shared memory TJ keys at a time, loaded cooperatively with
//     coalesced reads, bracketed by __syncthreads.
// What stays: one thread per query row and the naive two-pass softmax (max, then exp/sum/PV).
#include "mqa_params.cuh"
#include "dot.cuh"  // dot_fp32, as in 01

namespace smem_tiled {

constexpr int ROWS = 64;  // query rows (= threads) per block: 2 warps
constexpr int TJ = 16;    // keys per K/V tile

// Shared memory of a block (floats):
//   sQ [ROWS][D + 1]  the block's query rows. Thread t reads sQ[t][d] while its 31 warp
//                     neighbours read sQ[t'][d] at the same d. With a row stride of D words
//                     (a multiple of 32), all 32 addresses fall in the same bank: a 32-way
//                     bank conflict, one load becomes 32 serial ones. One word of padding
//                     makes the stride D + 1, so row t starts t banks further on and the
//                     warp touches 32 different banks: conflict-free.
//   sK [TJ][D], sV [TJ][D]  every thread reads the SAME k_j[d] at the same time: a broadcast,
//                     one transaction for the whole warp, so these need no padding.
// For D = 128: 64*129*4 + 2*16*128*4 = 49,408 bytes, just over the 48 KB a kernel gets
// without asking, so the launcher opts in to dynamic shared memory.
template <int D>
constexpr int smem_bytes() { return (ROWS * (D + 1) + 2 * TJ * D) * (int)sizeof(float); }

template <int D>
__device__ __forceinline__ void load_tile(float* s, const float* g, int j0, int Skv) {
  // Consecutive threads read consecutive floats of the tile: coalesced. Keys past Skv are
  // zeros, so a partly filled last tile never feeds garbage (or NaN) into a product.
  for (int e = threadIdx.x; e < TJ * D; e += ROWS) {
    int j = j0 + e / D;
    s[e] = j < Skv ? g[(size_t)j * D + e % D] : 0.f;
  }
}

template <int D>
__global__ void __launch_bounds__(ROWS)
mqa_smem_tiled_kernel(const float* __restrict__ q,   // (B, H, Sq, D)
                      const float* __restrict__ k,   // (B, Skv, D)
                      const float* __restrict__ v,   // (B, Skv, D)
                      float* __restrict__ o,         // (B, H, Sq, D)
                      float* __restrict__ lse,       // (B, H, Sq) or nullptr
                      int H, int Sq, int Skv, float scale, int causal) {
  extern __shared__ float smem[];
  float* sQ = smem;                     // [ROWS][D + 1]
  float* sK = sQ + ROWS * (D + 1);      // [TJ][D]
  float* sV = sK + TJ * D;              // [TJ][D]
  constexpr int LDQ = D + 1;            // padded row stride (see above)

  const int t = threadIdx.x;
  const int b = blockIdx.y;
  const int rows = H * Sq;                  // query rows of batch b
  const int r0 = blockIdx.x * ROWS;         // first packed row of this block
  const int r = r0 + t;                     // my row: i = r / H, h = r % H
  const bool valid = r < rows;
  const int i = valid ? r / H : 0, h = valid ? r % H : 0;
  const float* kb = k + (size_t)b * Skv * D;
  const float* vb = v + (size_t)b * Skv * D;
  // Bottom-right aligned causal limit of my row, and of the block (its last row has the
  // largest i, so it sees the most keys): the block loads tiles up to jmax.
  const int j_end = !valid ? 0 : causal ? min(Skv, max(0, i + Skv - Sq + 1)) : Skv;
  const int i_last = (min(rows, r0 + ROWS) - 1) / H;
  const int jmax = causal ? min(Skv, max(0, i_last + Skv - Sq + 1)) : Skv;

  // Stage the block's q rows: a row of D floats is contiguous in q, so walking e over
  // (row, d) with d fastest is coalesced (heads of one position lie Sq*D floats apart).
  for (int e = t; e < ROWS * D; e += ROWS) {
    int rr = r0 + e / D, d = e % D;
    float x = 0.f;
    if (rr < rows) x = q[(((size_t)b * H + rr % H) * Sq + rr / H) * D + d];
    sQ[(e / D) * LDQ + d] = x;
  }
  const float* qi = sQ + t * LDQ;

  // Pass 1: the row maximum m of s_ij = scale * q_i . k_j (the max of q_i . k_j, then scaled).
  float m = -INFINITY;
  for (int j0 = 0; j0 < jmax; j0 += TJ) {
    __syncthreads();                    // everyone is done with the previous tile (and sQ is full)
    load_tile<D>(sK, kb, j0, Skv);
    __syncthreads();                    // the tile is complete before anyone reads it
    const int nj = min(TJ, j_end - j0); // my row's keys in this tile (<= 0: none)
    for (int jj = 0; jj < nj; ++jj) {
      m = fmaxf(m, dot_fp32<D>(qi, sK + jj * D));  // raw scores
    }
  }
  m = __fmul_rn(m, scale);  // exponents round(s * scale) - m, unfused: <= 0 at any magnitude (see 01_naive.cu)

  // Pass 2: o_i = sum_j exp(s_ij - m) v_j / sum_j exp(s_ij - m).
  float acc[D];  // indexed only by unrolled constants, so it stays in registers
#pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = 0.f;
  float l = 0.f;
  for (int j0 = 0; j0 < jmax; j0 += TJ) {
    __syncthreads();
    load_tile<D>(sK, kb, j0, Skv);
    load_tile<D>(sV, vb, j0, Skv);
    __syncthreads();
    const int nj = min(TJ, j_end - j0);
    for (int jj = 0; jj < nj; ++jj) {
      const float s = dot_fp32<D>(qi, sK + jj * D);
      float p = expf(__fmul_rn(s, scale) - m);
      l += p;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] += p * sV[jj * D + d];
    }
  }

  // A row that sees no key (causal with Sq > Skv) is defined as zeros, lse = -inf.
  const float inv = l != 0.f ? 1.f / l : 0.f;
  if (valid && lse) lse[((size_t)b * H + h) * Sq + i] = l != 0.f ? m + logf(l) : -INFINITY;
  // Write o through shared memory: each thread puts its row back into sQ (conflict-free
  // thanks to the padding), then the block stores rows with consecutive threads on
  // consecutive d, coalesced, instead of 32 threads each writing its own distant row.
  __syncthreads();                      // all reads of sQ as q are over
#pragma unroll
  for (int d = 0; d < D; ++d) sQ[t * LDQ + d] = acc[d] * inv;
  __syncthreads();
  for (int e = t; e < ROWS * D; e += ROWS) {
    int rr = r0 + e / D, d = e % D;
    if (rr < rows) o[(((size_t)b * H + rr % H) * Sq + rr / H) * D + d] = sQ[(e / D) * LDQ + d];
  }
}

template <int D>
int launch(const MQAParams& p) {
  const int bytes = smem_bytes<D>();
  // Above 48 KB of dynamic shared memory a kernel must opt in (once per kernel is enough,
  // but the call is cheap and keeps the launcher stateless).
  if (cudaFuncSetAttribute(mqa_smem_tiled_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
    return FASTMQA_UNSUPPORTED;
  dim3 grid((p.H * p.Sq + ROWS - 1) / ROWS, p.B);
  mqa_smem_tiled_kernel<D><<<grid, ROWS, bytes, p.stream>>>(
      (const float*)p.q, (const float*)p.k, (const float*)p.v, (float*)p.o, p.lse,
      p.H, p.Sq, p.Skv, p.scale, p.causal);
  return 0;
}

}  // namespace smem_tiled

int fastmqa_k02_smem_tiled(const MQAParams& p) {
  if (p.dtype != FASTMQA_FP32 || p.B > 65535) return FASTMQA_UNSUPPORTED;
  if (p.D == 64) return smem_tiled::launch<64>(p);
  if (p.D == 128) return smem_tiled::launch<128>(p);
  return FASTMQA_UNSUPPORTED;
}
