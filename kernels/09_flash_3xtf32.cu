// 09_flash_3xtf32.cu — fused MQA attention in fp32 on tensor cores: 3xTF32.
//
// 05_flash_fp32.cu does fp32 attention on CUDA cores (FFMA) and stops near their ceiling;
// PyTorch's fastest fp32 path (memory-efficient SDPA) runs CUTLASS's 3xTF32 on tensor cores
// instead. This kernel does the same inside our fused MQA kernel. A TF32 mma
// (`mma.sync.aligned.m16n8k8...tf32`) multiplies numbers with 11 significant bits; fp32 has 24.
// Split each fp32 operand x into x = big + small, big = tf32(x), small = tf32(x - big) (x - big
// is exact in fp32), and a product keeps fp32 accuracy from three TF32 products:
//     a b ~= a_small b_big + a_big b_small + a_big b_big       (a_small b_small ~ 2^-22 a b dropped)
// The two tile products are split differently:
//   * S = Q K^T: the three products above (STERMS = 4 adds a_small b_small).
//   * O += P V: V is split into three parts v1 + v2 + v3 that sum to v exactly (v - v1 has at most
//     13 significant bits, tf32 holds 11: v3 takes the last 2), and
//         P V ~= p2 v1 + p1 v3 + p1 v2 + p1 v1.
//     A one-hot softmax row (p = 1 for one key, 0 elsewhere: inputs x1e6) then returns v exactly,
//     as fp32 does; with two parts of v it would be off by up to 2^-23 |v|.
// Structure: 06_flash_mma.cu's (packed (i, h) rows, one K/V tile serves all heads of the block,
// softmax on the accumulators in registers, swizzled tiles, ldmatrix), with what fp32 changes:
//   * ldmatrix moves 16-bit pairs; a pair is one fp32, so an 8 x 8 "b16" matrix is an 8 x 4 fp32
//     one and thread (g, t) receives element (g, t): exactly the TF32 A and B fragment layouts;
//   * the accumulator layout of S (thread keys 2t, 2t + 1) is not the A layout of TF32 (keys t,
//     t + 4), so P V sums over the keys of each 8 in a permuted order (k = t <-> key 2t, k = t + 4 <->
//     key 2t + 1): P needs no shuffle, and V's B fragment reads rows 2t and 2t + 1 (scalar loads:
//     ldmatrix.trans only transposes 16-bit elements);
//   * fp32 tiles are twice the bytes: 4 warps of 16 rows (BM = 64), one K and one V buffer loaded
//     in turn (V of tile t during S, K of tile t + 1 during P V, as 05), 96 KB: two CTAs an SM;
//   * exp2f (not ex2.approx) for the exponentials: fp32 accuracy is the point.
#include <stdint.h>

#include "mqa_params.cuh"
#include "flash_block.cuh"  // the block's sequence, rows and key tiles; the launch
#include "mma.cuh"          // cp.async, ldmatrix, mma_tf32, tf32_rna

namespace {

constexpr int NWARPS = 4, NT = NWARPS * 32, BM = NWARPS * 16, BN = 64;

// Byte offset of 16-byte chunk `ch` (four floats) of row `r` of a (rows, D) fp32 tile, swizzled.
template <int D>
__device__ __forceinline__ uint32_t swz(int r, int ch) { return (uint32_t)(r * D * 4 + ((ch ^ (r & 7)) << 4)); }

// K or V rows [j0, j0 + BN) of (Skv, D) into a swizzled tile; rows past Skv are zero-filled.
template <int D>
__device__ __forceinline__ void load_kv(uint32_t dst, const float* src, int j0, int Skv, int tid) {
  constexpr int CH = D / 4;
  static_assert(BN * CH % NT == 0 && NT % CH == 0, "the tile splits evenly over the threads");
  const int r0 = tid / CH, c = tid % CH;
#pragma unroll
  for (int it = 0; it < BN * CH / NT; ++it) {
    const int r = r0 + it * (NT / CH);
    const bool in = j0 + r < Skv;
    cp_async16(dst + swz<D>(r, c), src + (size_t)(in ? j0 + r : 0) * D + c * 4, in);
  }
}

// x = big + small in TF32 (both rounded to nearest).
__device__ __forceinline__ void split2(float x, uint32_t& big, uint32_t& small) {
  big = tf32_rna(x);
  small = tf32_rna(x - __uint_as_float(big));
}
template <int N>
__device__ __forceinline__ void split2(const uint32_t (&x)[N], uint32_t (&big)[N], uint32_t (&small)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) split2(__uint_as_float(x[e]), big[e], small[e]);
}

template <int D>
struct Cfg {
  static constexpr int KS = D / 8;   // k-steps of S = Q K^T (8 head-dim columns each)
  static constexpr int NS = BN / 8;  // n8 tiles of S; also the k-steps of O += P V (8 keys each)
  static constexpr int NO = D / 8;   // n8 tiles of O
  static constexpr int TILE = BM * D * 4, KV = BN * D * 4;
  static constexpr int SMEM = TILE + 2 * KV;  // Q, K, V
};

template <int D, int MINB, int STERMS>
__global__ void __launch_bounds__(NT, MINB)
mqa_flash_3xtf32_kernel(const float* __restrict__ q,  // (B, H, Sq, D), strides qs
                        const float* __restrict__ k,  // (B, Skv, D)
                        const float* __restrict__ v,  // (B, Skv, D)
                        float* __restrict__ o,        // (B, H, Sq, D), strides os
                        float* __restrict__ lse,      // (B, H, Sq) or nullptr
                        int B, int H, int Sq, int Skv, float scale, int causal, const Strides qs,
                        const Strides os) {
  using C = Cfg<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ long long row_q[BM], row_o[BM];  // element offsets of tile row r in q and o, -1 past H * Sq
  __shared__ int row_i[BM];                   // its query position i
  const uint32_t sQ = smem_u32(smem), sK = sQ + C::TILE, sV = sK + C::KV;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;
  const FlashBlock<BM, BN> blk(B, H, Sq, Skv, causal);
  const int b = blk.b, m0 = blk.m0, off = blk.off, n_tiles = blk.n_tiles, mask_from = blk.mask_from;
  const float* kb = k + (size_t)b * Skv * D;
  const float* vb = v + (size_t)b * Skv * D;

  if (tid < BM) {
    const int row = m0 + tid, i = row / H, h = row % H;
    row_q[tid] = row < H * Sq ? b * qs.b + h * qs.h + i * qs.s : -1;
    row_o[tid] = row < H * Sq ? b * os.b + h * os.h + i * os.s : -1;
    row_i[tid] = i;
  }
  if (n_tiles > 0) load_kv<D>(sK, kb, 0, Skv, tid);
  __syncthreads();
  {
    constexpr int CH = D / 4;
    const int c = tid % CH;
#pragma unroll
    for (int it = 0; it < BM * CH / NT; ++it) {
      const int r = tid / CH + it * (NT / CH);
      const long long base = row_q[r];
      cp_async16(sQ + swz<D>(r, c), q + (base > 0 ? base : 0) + c * 4, base >= 0);
    }
  }
  cp_async_commit();  // group: K[0] and Q
  if (n_tiles > 0) load_kv<D>(sV, vb, 0, Skv, tid);
  cp_async_commit();  // group: V[0]

  int jlim[2];  // the last key rows g and g + 8 of this warp may see
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = min(row_i[warp * 16 + g + 8 * hf], Sq - 1);
    jlim[hf] = causal ? min(Skv - 1, i + off) : Skv - 1;
  }
  const float scale_log2 = scale * 1.4426950408889634f;
  float acc_o[C::NO][4];
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
#pragma unroll
  for (int n = 0; n < C::NO; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[n][e] = 0.f;

  // ldmatrix lane offsets (06_flash_mma.cu's, with rows of D * 4 bytes): step s of the head dim
  // reads chunks 2s and 2s + 1, i.e. columns 8s..8s+3 and 8s+4..8s+7 = the k = t and k = t + 4 halves.
  //   Q (A of S): rows +0/+8 by m & 1, chunk +0/+1 by m >> 1 -> a0 a1 a2 a3
  //   K (B of S): chunk +0/+1 by m & 1, keys +0/+8 by m >> 1 -> b0 b1 of two n8 tiles
  // V (B of P V, scalar loads): b0 = V[8kk + 2t][8dt + g], b1 = V[8kk + 2t + 1][8dt + g].
  uint32_t qo[4], ko[4], vo0[4], vo1[4];
  {
    const int x = lane & 7;
    const int a_row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, a_ch = lane >> 4;
    const int k_row = (lane & 7) + (lane >> 4) * 8, k_ch = (lane >> 3) & 1;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      qo[j] = a_row * D * 4 + (((2 * j + a_ch) ^ x) << 4);
      ko[j] = k_row * D * 4 + (((2 * j + k_ch) ^ x) << 4);
      // d-tile dt = 4 (dt >> 2) + j holds columns 8dt + g: chunk 2dt + g / 4, word g % 4
      vo0[j] = (2 * tq) * D * 4 + (((2 * j + (g >> 2)) ^ (2 * tq)) << 4) + (g & 3) * 4;
      vo1[j] = (2 * tq + 1) * D * 4 + (((2 * j + (g >> 2)) ^ (2 * tq + 1)) << 4) + (g & 3) * 4;
    }
  }
#define LDSM_OFF(off, s, rows) ((off)[(s) & 3] + ((s) >> 2) * 128 + (rows) * D * 4)

  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = t * BN;
    cp_async_wait_1();  // K[t] (and Q); V[t] may still be in flight
    __syncthreads();

    // S = Q K^T in 3xTF32: (16, BN) per warp.
    float s[C::NS][4];
#pragma unroll
    for (int n = 0; n < C::NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) {
      uint32_t a[4], a_big[4], a_small[4];
      ldsm_x4(a, sQ + LDSM_OFF(qo, ks, 0));
      split2(a, a_big, a_small);
#pragma unroll
      for (int np = 0; np < C::NS / 2; ++np) {
        uint32_t bk[4], b_big[4], b_small[4];
        ldsm_x4(bk, sK + LDSM_OFF(ko, ks, np * 16));
        split2(bk, b_big, b_small);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float(&c)[4] = s[2 * np + h];
          if (STERMS == 4) mma_tf32(c, a_small, b_small[2 * h], b_small[2 * h + 1]);
          mma_tf32(c, a_small, b_big[2 * h], b_big[2 * h + 1]);
          mma_tf32(c, a_big, b_small[2 * h], b_small[2 * h + 1]);
          mma_tf32(c, a_big, b_big[2 * h], b_big[2 * h + 1]);
        }
      }
    }

    // Mask (only tiles that cross Skv or a causal diagonal), then the online softmax (05's
    // numerics: unfused exponents, exp2f).
    if (t >= mask_from) {
#pragma unroll
      for (int n = 0; n < C::NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n0 + n * 8 + 2 * tq + (e & 1) > jlim[e >> 1]) s[n][e] = -INFINITY;
    }
    float alpha[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = m_run[hf];
#pragma unroll
      for (int n = 0; n < C::NS; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * hf], s[n][2 * hf + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_scaled = mx == -INFINITY ? 0.f : __fmul_rn(mx, scale_log2);
      alpha[hf] = exp2f(__fmul_rn(m_run[hf], scale_log2) - m_scaled);
      m_run[hf] = mx;
      float ls = 0.f;
#pragma unroll
      for (int n = 0; n < C::NS; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2f(__fmul_rn(s[n][2 * hf + e], scale_log2) - m_scaled);
          s[n][2 * hf + e] = p;
          ls += p;
        }
      l_run[hf] = l_run[hf] * alpha[hf] + ls;
    }
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int n = 0; n < C::NO; ++n) {
        acc_o[n][0] *= alpha[0];
        acc_o[n][1] *= alpha[0];
        acc_o[n][2] *= alpha[1];
        acc_o[n][3] *= alpha[1];
      }
    }

    cp_async_wait_all();  // V[t]
    __syncthreads();      // ... visible to all; every warp is done with K[t]
    if (t + 1 < n_tiles) load_kv<D>(sK, kb, n0 + BN, Skv, tid);
    cp_async_commit();

    // O += P V. k-step kk sums keys 8kk..8kk+7 in the order (2t, 2t+1) -> (k = t, k = t + 4):
    // the A fragment (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4) is S's accumulator e = 0, 2, 1, 3.
#pragma unroll
    for (int kk = 0; kk < C::NS; ++kk) {
      uint32_t p_big[4], p_small[4];
      {
        const uint32_t pa[4] = {__float_as_uint(s[kk][0]), __float_as_uint(s[kk][2]), __float_as_uint(s[kk][1]),
                                __float_as_uint(s[kk][3])};
        split2(pa, p_big, p_small);
      }
#pragma unroll
      for (int dt = 0; dt < C::NO; ++dt) {
        const uint32_t rows = sV + kk * 8 * D * 4 + (dt >> 2) * 128;
        float x0, x1;
        asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(x0) : "r"(rows + vo0[dt & 3]));
        asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(x1) : "r"(rows + vo1[dt & 3]));
        uint32_t v1[2], v2[2], v3[2];
        split2(x0, v1[0], v2[0]);
        split2(x1, v1[1], v2[1]);
        v3[0] = __float_as_uint((x0 - __uint_as_float(v1[0])) - __uint_as_float(v2[0]));  // exact, <= 2 bits
        v3[1] = __float_as_uint((x1 - __uint_as_float(v1[1])) - __uint_as_float(v2[1]));
        mma_tf32(acc_o[dt], p_small, v1[0], v1[1]);
        mma_tf32(acc_o[dt], p_big, v3[0], v3[1]);
        mma_tf32(acc_o[dt], p_big, v2[0], v2[1]);
        mma_tf32(acc_o[dt], p_big, v1[0], v1[1]);
      }
    }
    __syncthreads();  // every warp is done with V[t]
    if (t + 1 < n_tiles) load_kv<D>(sV, vb, n0 + BN, Skv, tid);
    cp_async_commit();
  }
#undef LDSM_OFF
  cp_async_wait_all();

  // Epilogue: l over the quad, normalise, store (each quad writes 32 contiguous bytes of a row).
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float l = l_run[hf];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l != 0.f ? 1.f / l : 0.f;  // a row that saw no key: zeros, lse = -inf
    const int r = warp * 16 + g + 8 * hf;
    const long long base = row_o[r];
    if (base >= 0) {
#pragma unroll
      for (int n = 0; n < C::NO; ++n)
        *reinterpret_cast<float2*>(o + base + n * 8 + 2 * tq) =
            make_float2(acc_o[n][2 * hf] * inv, acc_o[n][2 * hf + 1] * inv);
      const int m = m0 + r, i = row_i[r];
      if (lse && tq == 0)
        lse[((size_t)b * H + (m - i * H)) * Sq + i] = l != 0.f ? m_run[hf] * scale + logf(l) : -INFINITY;
    }
  }
}

template <int D, int MINB, int STERMS>
int launch(const MQAParams& p) {
  return launch_flash<float, BM, NT>(mqa_flash_3xtf32_kernel<D, MINB, STERMS>, Cfg<D>::SMEM, p);
}

}  // namespace

// p.num_splits is unused by a prefill kernel; scripts/dev_fp32.py passes 1 to time STERMS = 4
// (a_small b_small kept in S = Q K^T) against the default 3.
int fastmqa_k09_flash_3xtf32(const MQAParams& p) {
  if (p.dtype != FASTMQA_FP32) return FASTMQA_UNSUPPORTED;
  const bool four = p.num_splits == 1;
  if (p.D == 128) return four ? launch<128, 2, 4>(p) : launch<128, 2, 3>(p);
  if (p.D == 64) return four ? launch<64, 2, 4>(p) : launch<64, 3, 3>(p);  // STERMS = 4 spills at 3 CTAs
  return FASTMQA_UNSUPPORTED;
}
