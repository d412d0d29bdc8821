// 05_flash_fp32.cu — fused MQA attention with an online softmax, fp32 on CUDA cores.
//
// One block owns BM = 128 query rows of one batch b. The rows are (i, h) pairs packed
// i-major, row = i * H + h: with H = 32 a block holds all 32 heads of 4 query positions.
// MQA has one K/V head, so every K/V tile brought into shared memory serves all of them,
// and under a causal mask the rows of a block need almost the same keys (no wasted tiles).
//
// Per K/V tile of BN = 64 keys, 256 (or 512) threads compute the (128, 64) score tile
// S = Q K^T in registers (8 (or 4) rows x 4 keys per thread, an SGEMM-style register tile),
// update the running max m and sum l of each row (the online softmax: what was summed under
// the old max is rescaled by exp(m_old - m_new)), write P = exp(S - m) to shared memory and
// accumulate O += P V (8 (or 4) rows x D/16 columns per thread). The scores never reach
// global memory; the output is normalised by l once at the end.
//
// K and V of one tile are loaded with cp.async at different times (FlashAttention-2's
// interleave): V of tile t lands while S is computed, K of tile t+1 while P V is.
#include "mqa_params.cuh"

namespace {

constexpr int BM = 128, BN = 64, TC = 4;
// TR rows per thread: NT = 16 * BM / TR threads; thread (rg, cg) = (tid / 16, tid % 16) owns
// rows rg + RG r (r < TR, RG = BM / TR row groups) and keys cg + 16 c (c < 4) of the score tile.

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  int n = pred ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Shared-memory row strides in floats. Q and K rows are padded by 4 floats (16 bytes):
// the 16 lanes that read 16 different K rows with float4 loads then hit 8 different bank
// quads per 8 lanes (132 = 4 mod 32), the fewest wavefronts a 256-byte read can take.
template <int D> struct Smem {
  static constexpr int QLD = D + 4, KLD = D + 4, VLD = D, PLD = BN + 4;
  static constexpr int Q = 0, K = Q + BM * QLD, V = K + BN * KLD, P = V + BN * VLD, TOTAL = P + BM * PLD;
  static constexpr size_t BYTES = TOTAL * sizeof(float);
};

// A (rows, D) tile of fp32 rows into shared memory, 16 bytes per cp.async; rows past
// `nrows` are zero-filled (so masked keys multiply zeros, never uninitialised memory).
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_kv_tile(float* dst, int ld, const float* src, int j0, int Skv, int tid) {
  constexpr int CH = D / 4;
  static_assert(ROWS * CH % NT == 0, "the tile splits evenly over the threads");
#pragma unroll
  for (int it = 0; it < ROWS * CH / NT; ++it) {
    int e = tid + it * NT, r = e / CH, c = e % CH;
    bool in = j0 + r < Skv;
    cp_async16(dst + r * ld + c * 4, src + (size_t)(in ? j0 + r : 0) * D + c * 4, in);
  }
}

template <int D, int TR, bool EXP2>
__global__ void __launch_bounds__(16 * BM / TR, D == 64 && TR == 8 ? 2 : 1)
mqa_flash_fp32_kernel(const float* __restrict__ q,   // (B, H, Sq, D)
                      const float* __restrict__ k,   // (B, Skv, D)
                      const float* __restrict__ v,   // (B, Skv, D)
                      float* __restrict__ o,         // (B, H, Sq, D)
                      float* __restrict__ lse,       // (B, H, Sq) or nullptr
                      int B, int H, int Sq, int Skv, float scale, int causal) {
  using L = Smem<D>;
  constexpr int NT = 16 * BM / TR, RG = BM / TR;
  constexpr int U = D / 64;  // output columns per thread: cg * 4 + 64 u + e, u < U, e < 4
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* Qs = smem + L::Q; float* Ks = smem + L::K; float* Vs = smem + L::V; float* Ps = smem + L::P;

  const int tid = threadIdx.x, rg = tid >> 4, cg = tid & 15;
  const int nmb = (H * Sq + BM - 1) / BM;
  const int mb = nmb - 1 - blockIdx.x / B;  // the blocks with the most keys (causal) go first
  const int b = blockIdx.x % B;
  const int m0 = mb * BM, rows = H * Sq, off = Skv - Sq;
  const float* kb = k + (size_t)b * Skv * D;
  const float* vb = v + (size_t)b * Skv * D;

  // Keys the block needs: the last row of the block sees the most (bottom-right causal).
  const int i_first = m0 / H, i_last = min(Sq - 1, (m0 + BM - 1) / H);
  const int kv_end = causal ? min(Skv, max(0, i_last + off + 1)) : Skv;
  const int n_tiles = (kv_end + BN - 1) / BN;
  // Tiles from here on need the mask: past Skv, or crossing some row's causal diagonal.
  const int mask_from = causal ? min(Skv / BN, max(0, i_first + off + 1) / BN) : Skv / BN;

  // Q tile (once): row r of the tile is global row (b, h, i) with m0 + r = i * H + h.
  {
    constexpr int CH = D / 4;
#pragma unroll
    for (int it = 0; it < BM * CH / NT; ++it) {
      int e = tid + it * NT, r = e / CH, c = e % CH, row = m0 + r;
      bool in = row < rows;
      int i = in ? row / H : 0, h = in ? row % H : 0;
      cp_async16(Qs + r * L::QLD + c * 4, q + (((size_t)b * H + h) * Sq + i) * D + c * 4, in);
    }
  }
  if (n_tiles > 0) load_kv_tile<D, BN, NT>(Ks, L::KLD, kb, 0, Skv, tid);
  cp_async_commit();

  float acc[TR][U][4];
  float m[TR], l[TR];
#pragma unroll
  for (int r = 0; r < TR; ++r) {
    m[r] = -INFINITY; l[r] = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][u][e] = 0.f;
  }

  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = t * BN;
    cp_async_wait_all();
    __syncthreads();  // K[t] is in; every thread is done with P V of tile t-1 (Vs, Ps free)
    load_kv_tile<D, BN, NT>(Vs, L::VLD, vb, n0, Skv, tid);
    cp_async_commit();

    // S = Q K^T: 8 x 4 scores per thread, D-long dot products from float4 reads.
    float s[TR][TC];
#pragma unroll
    for (int r = 0; r < TR; ++r)
#pragma unroll
      for (int c = 0; c < TC; ++c) s[r][c] = 0.f;
#pragma unroll
    for (int d = 0; d < D; d += 4) {
      float4 qf[TR], kf[TC];
#pragma unroll
      for (int r = 0; r < TR; ++r) qf[r] = *reinterpret_cast<const float4*>(Qs + (rg + RG * r) * L::QLD + d);
#pragma unroll
      for (int c = 0; c < TC; ++c) kf[c] = *reinterpret_cast<const float4*>(Ks + (cg + 16 * c) * L::KLD + d);
#pragma unroll
      for (int r = 0; r < TR; ++r)
#pragma unroll
        for (int c = 0; c < TC; ++c) {
          s[r][c] = fmaf(qf[r].x, kf[c].x, s[r][c]);
          s[r][c] = fmaf(qf[r].y, kf[c].y, s[r][c]);
          s[r][c] = fmaf(qf[r].z, kf[c].z, s[r][c]);
          s[r][c] = fmaf(qf[r].w, kf[c].w, s[r][c]);
        }
    }

    // Online softmax. The 16 lanes with the same rg share rows: a half-warp, so xor-shuffles
    // over 8, 4, 2, 1 give every one of them the row max. The row sum l stays per thread
    // (a partial over its own keys) and is reduced once, after the last tile.
    const bool need_mask = t >= mask_from;
    // EXP2: scores stay raw and exp(scale (s - m)) = exp2(s * scale_log2 - m * scale_log2), one
    // FFMA and one MUFU.EX2; else s is scaled first and expf (a few more instructions) is used.
    const float scale_log2 = scale * 1.4426950408889634f;
#pragma unroll
    for (int r = 0; r < TR; ++r) {
      float mt = -INFINITY;
      // The last key row r may see (recomputed here, on masked tiles only, to save registers).
      const int jlim = need_mask ? (causal ? min(m0 + rg + RG * r, rows - 1) / H + off : Skv - 1) : 0;
#pragma unroll
      for (int c = 0; c < TC; ++c) {
        float x = EXP2 ? s[r][c] : s[r][c] * scale;
        if (need_mask && (n0 + cg + 16 * c > jlim || n0 + cg + 16 * c >= Skv)) x = -INFINITY;
        s[r][c] = x;
        mt = fmaxf(mt, x);
      }
#pragma unroll
      for (int w = 8; w >= 1; w >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, w));
      const float m_new = fmaxf(m[r], mt);
      // Exponents round(s * scale_log2) - m_use, unfused (__fmul_rn): <= 0, and exactly 0 for the max,
      // at any magnitude; a fused fmaf leaves exp2(rounding residual), inf or 0 at scores ~1e13 (see 01).
      const float m_use = m_new == -INFINITY ? 0.f : (EXP2 ? __fmul_rn(m_new, scale_log2) : m_new);  // no key yet: p = 0
      const float alpha = EXP2 ? exp2f(__fmul_rn(m[r], scale_log2) - m_use) : expf(m[r] - m_use);
      float ls = 0.f;
#pragma unroll
      for (int c = 0; c < TC; ++c) {
        float p = EXP2 ? exp2f(__fmul_rn(s[r][c], scale_log2) - m_use) : expf(s[r][c] - m_use);
        Ps[(rg + RG * r) * L::PLD + cg + 16 * c] = p;
        ls += p;
      }
      l[r] = l[r] * alpha + ls;
      m[r] = m_new;
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][u][e] *= alpha;
    }

    cp_async_wait_all();
    __syncthreads();  // V[t] is in, P is complete, and every thread is done reading Ks
    if (t + 1 < n_tiles) load_kv_tile<D, BN, NT>(Ks, L::KLD, kb, n0 + BN, Skv, tid);
    cp_async_commit();

    // O += P V: per 4 keys, 8 float4 of P (this thread's rows) and U float4 of V per key.
#pragma unroll 4
    for (int jj = 0; jj < BN; jj += 4) {
      float4 pf[TR];
#pragma unroll
      for (int r = 0; r < TR; ++r) pf[r] = *reinterpret_cast<const float4*>(Ps + (rg + RG * r) * L::PLD + jj);
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        float4 vf[U];
#pragma unroll
        for (int u = 0; u < U; ++u) vf[u] = *reinterpret_cast<const float4*>(Vs + (jj + x) * L::VLD + cg * 4 + 64 * u);
#pragma unroll
        for (int r = 0; r < TR; ++r) {
          const float p = x == 0 ? pf[r].x : x == 1 ? pf[r].y : x == 2 ? pf[r].z : pf[r].w;
#pragma unroll
          for (int u = 0; u < U; ++u) {
            acc[r][u][0] = fmaf(p, vf[u].x, acc[r][u][0]);
            acc[r][u][1] = fmaf(p, vf[u].y, acc[r][u][1]);
            acc[r][u][2] = fmaf(p, vf[u].z, acc[r][u][2]);
            acc[r][u][3] = fmaf(p, vf[u].w, acc[r][u][3]);
          }
        }
      }
    }
  }
  cp_async_wait_all();

  // Epilogue: finish l over the half-warp, normalise, write O and the log-sum-exp.
#pragma unroll
  for (int r = 0; r < TR; ++r) {
    float lr = l[r];
#pragma unroll
    for (int w = 8; w >= 1; w >>= 1) lr += __shfl_xor_sync(0xffffffffu, lr, w);
    const int row = m0 + rg + RG * r;
    if (row >= rows) continue;
    const int i = row / H, h = row % H;
    const size_t base = (((size_t)b * H + h) * Sq + i);
    float* orow = o + base * D;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float4 val;  // a row that saw no key (lr = 0) is zeros, by definition; a NaN lr propagates
      val.x = lr != 0.f ? acc[r][u][0] / lr : 0.f;
      val.y = lr != 0.f ? acc[r][u][1] / lr : 0.f;
      val.z = lr != 0.f ? acc[r][u][2] / lr : 0.f;
      val.w = lr != 0.f ? acc[r][u][3] / lr : 0.f;
      *reinterpret_cast<float4*>(orow + cg * 4 + 64 * u) = val;
    }
    if (lse && cg == 0) lse[base] = lr != 0.f ? ((EXP2 ? m[r] * scale : m[r]) + logf(lr)) : -INFINITY;
  }
}

template <int D, int TR, bool EXP2>
int launch(const MQAParams& p) {
  constexpr size_t bytes = Smem<D>::BYTES;
  constexpr int NT = 16 * BM / TR;
  auto kern = mqa_flash_fp32_kernel<D, TR, EXP2>;
  if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) != cudaSuccess)
    return FASTMQA_UNSUPPORTED;
  const int nmb = (p.H * p.Sq + BM - 1) / BM;
  kern<<<nmb * p.B, NT, bytes, p.stream>>>((const float*)p.q, (const float*)p.k, (const float*)p.v, (float*)p.o,
                                           p.lse, p.B, p.H, p.Sq, p.Skv, p.scale, p.causal);
  return 0;
}

template <int D>
int dispatch(const MQAParams& p) {
  // p.num_splits is unused by a prefill kernel; 1..4 pick one variant (rows per thread 8 or 4,
  // expf or exp2f; scripts/dev_flash.py times them). 0, the default: exp2f, and 4 rows per
  // thread (512 threads, more warps to hide latency) when each block has few K/V tiles.
  int v = p.num_splits;
  if (v < 1 || v > 4) v = p.Skv <= (p.causal ? 2048 : 1024) ? 4 : 3;
  switch (v) {
    case 1: return launch<D, 8, false>(p);
    case 2: return launch<D, 4, false>(p);
    case 3: return launch<D, 8, true>(p);
    default: return launch<D, 4, true>(p);
  }
}

}  // namespace

int fastmqa_k05_flash_fp32(const MQAParams& p) {
  if (p.dtype != FASTMQA_FP32) return FASTMQA_UNSUPPORTED;
  if (p.D == 64) return dispatch<64>(p);
  if (p.D == 128) return dispatch<128>(p);
  return FASTMQA_UNSUPPORTED;
}
