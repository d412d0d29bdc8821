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
//   * MQA's one K/V head is split once, not once per warp: a first kernel (split_kv) writes K's two
//     parts (B, Sp, D) and V's three parts transposed to (B, D, Sp), keys permuted as above, into
//     the workspace (Sp = Skv rounded up to the tile, zero-padded), so every B operand reaches the
//     mma through ldmatrix with no arithmetic, and the pad needs no mask on the loads;
//   * the tensor cores sum into an fp32 accumulator by truncating (round toward zero); chained
//     over a whole row of K (or over all of S_kv for O) that bias grows with the chain and fails
//     the tolerance rule (measured: up to 3.4x the tolerance). Each product therefore starts a
//     fresh accumulator every GS k-steps of S (GP of P V) and is added into the running one with
//     a rounded FADD; inside a fresh chain the small products go first, so only the big one
//     truncates at the full magnitude;
//   * fp32 tiles are twice the bytes: 4 warps of 16 rows (BM = 64), 32-key tiles, one buffer per
//     operand loaded in turn (V's parts of tile t during S, K's of tile t + 1 during P V, as 05):
//     112 KB, two CTAs an SM;
//   * exp2f (not ex2.approx) for the exponentials: fp32 accuracy is the point.
#include <stdint.h>

#include "mqa_params.cuh"
#include "flash_block.cuh"  // the block's sequence, rows and key tiles; the launch; the softmax
#include "mma.cuh"          // cp.async, ldmatrix, mma_tf32, tf32_rna

namespace {

constexpr int NWARPS = 4, NT = NWARPS * 32, BM = NWARPS * 16, BN = 32;

// x = big + small in TF32 (both rounded to nearest); x = v1 + v2 + v3 exactly. An infinite x
// goes whole into the part that only meets the other operand's big part (small; v2), with zeros
// elsewhere: the mma's 0 * inf would otherwise give NaN where fp32 gives inf (x * 0 is NaN there
// too). FINITE: the caller knows x is finite (P).
template <bool FINITE = false>
__device__ __forceinline__ void split2(float x, uint32_t& big, uint32_t& small) {
  const uint32_t b = tf32_rna(x);
  const uint32_t s = tf32_rna(x - __uint_as_float(b));
  const bool inf = !FINITE && isinf(x);
  big = inf ? 0u : b;
  small = inf ? __float_as_uint(x) : s;
}
__device__ __forceinline__ void split3(float x, float& v1, float& v2, float& v3) {
  const bool inf = isinf(x);
  const float a = __uint_as_float(tf32_rna(x)), r = x - a;  // r exact: at most 13 significant bits
  const float b = __uint_as_float(tf32_rna(r));
  v1 = inf ? 0.f : a;
  v2 = inf ? x : b;
  v3 = inf ? 0.f : r - b;  // exact, at most 2 significant bits: a TF32 value already
}

// The workspace: K's parts (B, Sp, D) big then small, V's parts (B, D, Sp) v1, v2, v3.
struct Parts {
  float *kbig, *ksmall, *v1, *v2, *v3;
  __host__ __device__ Parts(void* ws, int B, int Sp, int D) {
    const size_t n = (size_t)B * Sp * D;
    kbig = (float*)ws; ksmall = kbig + n; v1 = ksmall + n; v2 = v1 + n; v3 = v2 + n;
  }
};

// Key position p of an 8-key group of V's parts holds key perm(p): 0 2 4 6 1 3 5 7, so that
// positions t and t + 4 (the TF32 fragment's k = t, t + 4) are keys 2t and 2t + 1 (S's accumulator).
__global__ void split_kv_kernel(const float* __restrict__ k, const float* __restrict__ v, Parts w, int Skv, int Sp,
                                int D) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x, j0 = blockIdx.y * 8, b = blockIdx.z;
  if (d >= D) return;
  float part[3][8];  // V's parts v1, v2, v3 of the 8 keys
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int j = j0 + e;
    const size_t src = ((size_t)b * Skv + j) * D + d, dst = ((size_t)b * Sp + j) * D + d;
    const float kx = j < Skv ? k[src] : 0.f, vx = j < Skv ? v[src] : 0.f;
    uint32_t big, small;
    split2(kx, big, small);
    w.kbig[dst] = __uint_as_float(big);
    w.ksmall[dst] = __uint_as_float(small);
    split3(vx, part[0][e], part[1][e], part[2][e]);
  }
  const size_t t = ((size_t)b * D + d) * Sp + j0;
  float* const dst[3] = {w.v1, w.v2, w.v3};
#pragma unroll
  for (int x = 0; x < 3; ++x) {
    const float* a = part[x];
    *reinterpret_cast<float4*>(dst[x] + t) = make_float4(a[0], a[2], a[4], a[6]);
    *reinterpret_cast<float4*>(dst[x] + t + 4) = make_float4(a[1], a[3], a[5], a[7]);
  }
}

// Byte offset of 16-byte chunk `ch` of row `r` of a tile with rows of RB bytes, swizzled.
template <int RB>
__device__ __forceinline__ uint32_t swz(int r, int ch) { return (uint32_t)(r * RB + ((ch ^ (r & 7)) << 4)); }

// ROWS rows of COLS floats from src (row stride ld floats) into a swizzled tile.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_tile(uint32_t dst, const float* src, size_t ld, int tid) {
  constexpr int CH = COLS / 4;
  static_assert(ROWS * CH % NT == 0 && NT % CH == 0, "the tile splits evenly over the threads");
  const int r0 = tid / CH, c = tid % CH;
#pragma unroll
  for (int it = 0; it < ROWS * CH / NT; ++it) {
    const int r = r0 + it * (NT / CH);
    cp_async16(dst + swz<COLS * 4>(r, c), src + r * ld + c * 4, true);
  }
}

template <int D>
struct Cfg {
  static constexpr int KS = D / 8;   // k-steps of S = Q K^T (8 head-dim columns each)
  static constexpr int NS = BN / 8;  // n8 tiles of S; also the k-steps of O += P V (8 keys each)
  static constexpr int NO = D / 8;   // n8 tiles of O
  static constexpr int Q = BM * D * 4, T = BN * D * 4;  // Q; one part of K or V
  static constexpr int SMEM = Q + 5 * T;  // Q, K big and small, V's three parts
};

__device__ __forceinline__ void zero(float (&c)[4]) { c[0] = c[1] = c[2] = c[3] = 0.f; }
__device__ __forceinline__ void add(float (&acc)[4], float (&c)[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) acc[e] += c[e];
  zero(c);
}

template <int D, int MINB, int GS, int GP>
__global__ void __launch_bounds__(NT, MINB)
mqa_flash_3xtf32_kernel(const float* __restrict__ q,  // (B, H, Sq, D), strides qs
                        const Parts w,                // split_kv's parts of K and V
                        float* __restrict__ o,        // (B, H, Sq, D), strides os
                        float* __restrict__ lse,      // (B, H, Sq) or nullptr
                        int B, int H, int Sq, int Skv, int Sp, float scale, int causal, const Strides qs,
                        const Strides os) {
  using C = Cfg<D>;
  static_assert(C::KS % GS == 0 && C::NS % GP == 0, "groups divide the k-steps");
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem), sKb = sQ + C::Q, sKs = sKb + C::T, sV1 = sKs + C::T;  // sV2, sV3 follow

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;
  const FlashBlock<BM, BN> blk(B, H, Sq, Skv, causal);
  const int b = blk.b, m0 = blk.m0, off = blk.off, n_tiles = blk.n_tiles, mask_from = blk.mask_from;
  const float* kb_big = w.kbig + (size_t)b * Sp * D;
  const float* kb_small = w.ksmall + (size_t)b * Sp * D;
  const size_t vb = (size_t)b * D * Sp;

  auto load_k = [&](int j0) {
    load_tile<BN, D>(sKb, kb_big + (size_t)j0 * D, D, tid);
    load_tile<BN, D>(sKs, kb_small + (size_t)j0 * D, D, tid);
  };
  auto load_v = [&](int j0) {
    load_tile<D, BN>(sV1, w.v1 + vb + j0, Sp, tid);
    load_tile<D, BN>(sV1 + C::T, w.v2 + vb + j0, Sp, tid);
    load_tile<D, BN>(sV1 + 2 * C::T, w.v3 + vb + j0, Sp, tid);
  };
  if (n_tiles > 0) load_k(0);
  {  // Q rows: packed row m0 + r is query i = row / H of head row % H; rows past H * Sq are zeros
    constexpr int CH = D / 4;
    const int c = tid % CH;
#pragma unroll
    for (int it = 0; it < BM * CH / NT; ++it) {
      const int r = tid / CH + it * (NT / CH), row = m0 + r, i = row / H, h = row - i * H;
      const bool in = row < H * Sq;
      cp_async16(sQ + swz<D * 4>(r, c), q + (in ? b * qs.b + h * qs.h + i * qs.s : 0) + c * 4, in);
    }
  }
  cp_async_commit();  // group: K[0] and Q
  if (n_tiles > 0) load_v(0);
  cp_async_commit();  // group: V[0]

  int jlim[2];  // the last key rows g and g + 8 of this warp may see
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = min((m0 + warp * 16 + g + 8 * hf) / H, Sq - 1);
    jlim[hf] = causal ? min(Skv - 1, i + off) : Skv - 1;
  }
  const float scale_log2 = scale * 1.4426950408889634f;
  float acc_o[C::NO][4];
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
#pragma unroll
  for (int n = 0; n < C::NO; ++n) zero(acc_o[n]);

  // ldmatrix lane offsets (06_flash_mma.cu's). A fp32 is a "b16" pair, so an 8 x 8 ldmatrix matrix
  // is 8 rows x 4 floats and lane (g, t) gets element (g, t). Step s reads chunks 2s and 2s + 1.
  //   Q (A of S):           rows +0/+8 by m & 1, chunk +0/+1 by m >> 1 -> a0 a1 a2 a3
  //   K (B of S, rows keys): chunk +0/+1 by m & 1, rows +0/+8 by m >> 1 -> b0 b1 of two n8 tiles
  //   V (B of P V, rows d):  the same as K, in V's (D, BN) transposed tiles
  uint32_t qo[4], ko[4], vo[4];
  {
    const int x = lane & 7;
    const int a_row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, a_ch = lane >> 4;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_ch = (lane >> 3) & 1;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      qo[j] = a_row * D * 4 + (((2 * j + a_ch) ^ x) << 4);
      ko[j] = b_row * D * 4 + (((2 * j + b_ch) ^ x) << 4);
      vo[j] = b_row * BN * 4 + (((2 * j + b_ch) ^ x) << 4);
    }
  }
#define LDSM_OFF(off, s, rows, RB) ((off)[(s) & 3] + ((s) >> 2) * 128 + (rows) * (RB))

  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = t * BN;
    cp_async_wait_1();  // K[t] (and Q); V[t] may still be in flight
    __syncthreads();

    // S = Q K^T in 3xTF32: (16, BN) per warp; a fresh accumulator c every GS k-steps.
    float s[C::NS][4], c[C::NS][4];
#pragma unroll
    for (int n = 0; n < C::NS; ++n) {
      zero(s[n]);
      zero(c[n]);
    }
#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) {
      uint32_t a[4], a_big[4], a_small[4];
      ldsm_x4(a, sQ + LDSM_OFF(qo, ks, 0, D * 4));
#pragma unroll
      for (int e = 0; e < 4; ++e) split2(__uint_as_float(a[e]), a_big[e], a_small[e]);
#pragma unroll
      for (int np = 0; np < C::NS / 2; ++np) {
        uint32_t bb[4], bs[4];
        ldsm_x4(bb, sKb + LDSM_OFF(ko, ks, np * 16, D * 4));
        ldsm_x4(bs, sKs + LDSM_OFF(ko, ks, np * 16, D * 4));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mma_tf32(c[2 * np + h], a_small, bb[2 * h], bb[2 * h + 1]);
          mma_tf32(c[2 * np + h], a_big, bs[2 * h], bs[2 * h + 1]);
          mma_tf32(c[2 * np + h], a_big, bb[2 * h], bb[2 * h + 1]);
        }
      }
      if ((ks + 1) % GS == 0) {
#pragma unroll
        for (int n = 0; n < C::NS; ++n) add(s[n], c[n]);
      }
    }

    // Mask (only tiles that cross Skv or a causal diagonal), then the online softmax
    // (flash_block.cuh's, with exp2f: 05's numerics).
    if (t >= mask_from) {
#pragma unroll
      for (int n = 0; n < C::NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n0 + n * 8 + 2 * tq + (e & 1) > jlim[e >> 1]) s[n][e] = -INFINITY;
    }
    float alpha[2];
    quad_softmax<C::NS>(&s[0][0], m_run, l_run, alpha, scale_log2, [](float x) { return exp2f(x); });
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int n = 0; n < C::NO; ++n) {
        acc_o[n][0] *= alpha[0];
        acc_o[n][1] *= alpha[0];
        acc_o[n][2] *= alpha[1];
        acc_o[n][3] *= alpha[1];
      }
    }
    // P's A fragments: k-step kk sums keys 8kk..8kk+7 in the order (2t, 2t+1) -> (k = t, k = t + 4),
    // so (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4) are S's accumulator elements 0, 2, 1, 3.
    uint32_t p_big[C::NS][4], p_small[C::NS][4];
#pragma unroll
    for (int kk = 0; kk < C::NS; ++kk) {
      split2<true>(s[kk][0], p_big[kk][0], p_small[kk][0]);
      split2<true>(s[kk][2], p_big[kk][1], p_small[kk][1]);
      split2<true>(s[kk][1], p_big[kk][2], p_small[kk][2]);
      split2<true>(s[kk][3], p_big[kk][3], p_small[kk][3]);
    }

    cp_async_wait_all();  // V[t]
    __syncthreads();      // ... visible to all; every warp is done with K[t]
    if (t + 1 < n_tiles) load_k(n0 + BN);
    cp_async_commit();

    // O += P V = p2 v1 + p1 v3 + p1 v2 + p1 v1, a fresh accumulator every GP k-steps.
#pragma unroll
    for (int dp = 0; dp < C::NO / 2; ++dp) {
      float u[2][4];
      zero(u[0]);
      zero(u[1]);
#pragma unroll
      for (int kk = 0; kk < C::NS; ++kk) {
        uint32_t v1[4], v2[4], v3[4];  // b0 b1 of d-tile 2dp, then of 2dp + 1
        ldsm_x4(v1, sV1 + LDSM_OFF(vo, kk, dp * 16, BN * 4));
        ldsm_x4(v2, sV1 + C::T + LDSM_OFF(vo, kk, dp * 16, BN * 4));
        ldsm_x4(v3, sV1 + 2 * C::T + LDSM_OFF(vo, kk, dp * 16, BN * 4));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mma_tf32(u[h], p_small[kk], v1[2 * h], v1[2 * h + 1]);
          mma_tf32(u[h], p_big[kk], v3[2 * h], v3[2 * h + 1]);
          mma_tf32(u[h], p_big[kk], v2[2 * h], v2[2 * h + 1]);
          mma_tf32(u[h], p_big[kk], v1[2 * h], v1[2 * h + 1]);
        }
        if ((kk + 1) % GP == 0) {
          add(acc_o[2 * dp], u[0]);
          add(acc_o[2 * dp + 1], u[1]);
        }
      }
    }
    __syncthreads();  // every warp is done with V[t]
    if (t + 1 < n_tiles) load_v(n0 + BN);
    cp_async_commit();
  }
#undef LDSM_OFF
  cp_async_wait_all();

  // Epilogue: l over the quad, normalise, store (each quad writes 32 contiguous bytes of a row).
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = quad_sum(l_run[hf]);
    const float inv = l != 0.f ? 1.f / l : 0.f;  // a row that saw no key: zeros, lse = -inf
    const int row = m0 + warp * 16 + g + 8 * hf, i = row / H, h = row - i * H;
    if (row < H * Sq) {
      float* orow = o + b * os.b + h * os.h + i * os.s;
#pragma unroll
      for (int n = 0; n < C::NO; ++n)
        *reinterpret_cast<float2*>(orow + n * 8 + 2 * tq) = make_float2(acc_o[n][2 * hf] * inv, acc_o[n][2 * hf + 1] * inv);
      if (lse && tq == 0)
        lse[((size_t)b * H + h) * Sq + i] = l != 0.f ? m_run[hf] * scale + logf(l) : -INFINITY;
    }
  }
}

template <int D, int MINB, int GS, int GP>
int launch(const MQAParams& p) {
  auto kern = mqa_flash_3xtf32_kernel<D, MINB, GS, GP>;
  constexpr int smem = Cfg<D>::SMEM;
  if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return FASTMQA_UNSUPPORTED;
  const int Sp = (p.Skv + BN - 1) / BN * BN;
  const Parts w(p.workspace, p.B, Sp, D);
  if (p.B > 0 && Sp > 0)
    split_kv_kernel<<<dim3((D + 63) / 64, Sp / 8, p.B), 64, 0, p.stream>>>((const float*)p.k, (const float*)p.v, w,
                                                                          p.Skv, Sp, D);
  const int nmb = (p.H * p.Sq + BM - 1) / BM;
  kern<<<nmb * p.B, NT, smem, p.stream>>>((const float*)p.q, w, (float*)p.o, p.lse, p.B, p.H, p.Sq, p.Skv, Sp,
                                          p.scale, p.causal, Strides{p.q_sb, p.q_sh, p.q_ss},
                                          Strides{p.o_sb, p.o_sh, p.o_ss});
  return 0;
}

template <int D, int MINB>
int dispatch(int cfg, const MQAParams& p) {
  // (GS, GP): k-steps per fresh accumulator of S and of P V. Measured on the H100
  // (scripts/dev_3xtf32.py, results/tf32_dev.json): every fresh accumulator costs 4 FADDs per
  // n8 tile; (4, 4) (S every 32 head-dim columns, P V once per 32-key tile) is the fastest that
  // passes (worst 0.40x the tolerance); S chained over the whole head dim (cfg 4) fails it.
  switch (cfg) {
    case 1: return launch<D, MINB, 1, 1>(p);
    case 2: return launch<D, MINB, 2, 2>(p);
    case 4: return launch<D, MINB, D / 8, 4>(p);
    default: return launch<D, MINB, 4, 4>(p);  // cfg 0 and 3
  }
}

}  // namespace

// Workspace bytes (fastmqa/kernels.py computes the same): 5 B Sp D floats, Sp = Skv rounded up to 32.
// p.num_splits is unused by a prefill kernel; scripts/dev_3xtf32.py passes 1..4 to time the
// accumulator groupings of `dispatch` (0 = the default).
int fastmqa_k09_flash_3xtf32(const MQAParams& p) {
  if (p.dtype != FASTMQA_FP32 || p.workspace == nullptr) return FASTMQA_UNSUPPORTED;
  const size_t need = (size_t)5 * p.B * ((p.Skv + BN - 1) / BN * BN) * p.D * 4;
  if (p.workspace_bytes < need) return FASTMQA_UNSUPPORTED;
  if (p.D == 128) return dispatch<128, 2>(p.num_splits, p);
  if (p.D == 64) return dispatch<64, 2>(p.num_splits, p);
  return FASTMQA_UNSUPPORTED;
}
