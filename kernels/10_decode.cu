// 10_decode.cu — MQA decoding over a KV cache, split across CTAs (Flash-Decoding).
//
// q (B, H, Sq <= 8, D); k_cache, v_cache (B, Smax, D); seqlens (B,) int32 (ragged lengths).
// Per generated token a layer reads its whole cache once and does only 4·H·Sq flops per cached
// number, so decoding is memory-bound: the goal is to stream K and V at device bandwidth.
//   * One CTA serves 32 query rows of a sequence: all H·Sq of them for 32 heads and one token
//     (q[b] is one (H·Sq, D) matrix, row = h·Sq + i), so each K/V element is read once, not once
//     per head. More rows take more row blocks, which re-read the tile from L2.
//   * Tiles of 64 keys (34 KB of K and V) arrive by 16-byte cp.async, 4 stages deep: 3 tiles in
//     flight (bandwidth x latency wants ~100 KB per SM); 149 KB of shared memory, one CTA per SM.
//     On the H100, 3 stages (2 CTAs per SM) measured up to 28% slower, and 3% faster only at
//     B = 1, S = 32k (results/decode_dev.json).
//   * Within a CTA the keys are split too: warp w owns keys [16w, 16w+16) of every tile and keeps
//     its own running max m, sum l and output O (32 rows x D, fp32) in registers. S = Q K^T and
//     O += P V use mma.sync m16n8k16; the S accumulators are already P's A operand, so a tile costs
//     one barrier and no shared-memory round trip. At the end the 4 warps' (m, l, O) are merged
//     through shared memory.
//   * Split-KV: with B·H·Sq small (B = 1 is one CTA!) the 132 SMs would sit idle, so each sequence
//     is cut into `splits` chunks of whole tiles, one CTA each, which write a normalised partial
//     output and its log-sum-exp to the workspace; a second kernel combines them (launched with
//     programmatic dependent launch, so its launch overlaps the first kernel's tail).
// MLA's 576-wide latent does not fit this register budget: see 11_decode_mla.cu.
#include "mqa_params.cuh"
#include "decode_common.cuh"  // PTX wrappers, the KV pipeline, split weights, choose_splits, the launcher

#ifndef FASTMQA_DECODE_STAGES
#define FASTMQA_DECODE_STAGES 4  // scripts/dev_decode.py builds other depths with -D to compare
#endif

namespace {

constexpr int kMaxSplits = 128;  // the combine keeps one weight a split in shared memory

template <int D_, int STAGES_>
struct Cfg {
  static constexpr int D = D_, STAGES = STAGES_, W = 4, THREADS = 32 * W;
  static constexpr int MB = 32, KW = 16, N = W * KW, CH = D / 8;  // rows per CTA, keys per warp / tile
  // Row pitches padded by 16 bytes: the 8 rows one ldmatrix reads start in different bank groups.
  static constexpr int LD = D + 8, LDO = D + 8;
  static_assert((N * CH) % THREADS == 0 && (MB * CH) % THREADS == 0, "loads must divide evenly over threads");
  static constexpr size_t kv_tile = size_t(N) * LD * 2;           // bytes of one K (or V) tile
  static constexpr size_t obuf = size_t(W) * MB * LDO * 4;        // the warps' outputs, merged at the end
  __host__ __device__ static size_t pipe(bool kv_same) { size_t p = STAGES * kv_tile * (kv_same ? 1 : 2); return p > obuf ? p : obuf; }
  static size_t smem(bool kv_same) { return pipe(kv_same) + size_t(MB) * LD * 2 + 2 * W * MB * 4; }
};

template <typename T, class C>
__global__ void __launch_bounds__(C::THREADS) decode_kernel(const Args a) {
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel may get scheduled now
  constexpr int D = C::D, N = C::N, LD = C::LD, MB = C::MB, NT = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int rb = blockIdx.x % a.RB, split = blockIdx.x / a.RB, b = blockIdx.y;
  const int row0 = rb * MB, rows = min(MB, a.M - row0), mt_n = (rows + 15) / 16;
  const KVChunk<T, C> kv(a, b, split, reinterpret_cast<T*>(smem));  // keys [k0, k1); STAGES of K (and V) tiles
  const int len = kv.len, k0 = kv.k0, k1 = kv.k1, ntiles = kv.ntiles;
  float* Obuf = reinterpret_cast<float*>(smem);                         // (W, MB, LDO), after the loop
  T* Qs = reinterpret_cast<T*>(smem + C::pipe(a.kv_same));              // (MB, LD)
  float *stat_m = reinterpret_cast<float*>(Qs + MB * LD), *stat_l = stat_m + C::W * MB;
  kv.start(Qs, static_cast<const T*>(a.q) + (size_t(b) * a.M + row0) * D, rows);  // Q and the first tiles

  // This thread's rows are mt·16 + g + 8·hr; causal: row i sees keys j <= i + len - Sq.
  int jmax[2][2];
  float m[2][2], l[2][2];  // running max (log2 units) and this thread's part of the running sum
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int i = (row0 + mt * 16 + g + 8 * hr) % a.Sq;
      jmax[mt][hr] = a.causal ? min(k1 - 1, i + len - a.Sq) : k1 - 1;
      m[mt][hr] = -INFINITY; l[mt][hr] = 0.f;
    }
  float oacc[2][NT][4] = {};
  const int kw = warp * C::KW;  // this warp's keys within each tile

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<C::STAGES - 2>();          // all but the newest STAGES-2 groups: tile t is here
    __syncthreads();                         // ... for every thread, and every warp is done with t-1,
    if (t + C::STAGES - 1 < ntiles) kv.load(t + C::STAGES - 1);  // so t-1's stage takes a new tile
    cp_async_commit();
    const T* ks = kv.tile(t);
    const T* vs = a.kv_same ? ks : ks + N * LD;
    const int j0 = k0 + t * N + kw;          // this warp's first key
    if (j0 >= k1) continue;                  // (warp-uniform) all its keys lie past the chunk

    // S = Q K^T for the warp's 16 keys: ldmatrix of K rows gives the mma's "col" B operand directly.
    float s[2][2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kb[4];
      ldsm_x4(kb, ks + (kw + (lane % 8) + 8 * (lane / 16)) * LD + kk * 16 + 8 * ((lane / 8) % 2));
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        if (mt >= mt_n) continue;
        uint32_t qa[4];
        ldsm_x4(qa, Qs + (mt * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16));
        Elem<T>::mma(s[mt][0], qa, kb[0], kb[1]);
        Elem<T>::mma(s[mt][1], qa, kb[2], kb[3]);
      }
    }
    // Online softmax in registers: a row's 16 scores sit in the 4 lanes of a quad, 4 each.
    uint32_t pa[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      if (mt >= mt_n) continue;
      float alpha[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float x[4], mx = -INFINITY;
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // key j0 + 8·(e/2) + 2·t4 + e%2
          const int j = j0 + 8 * (e / 2) + 2 * t4 + (e % 2);
          x[e] = j <= jmax[mt][hr] ? s[mt][e / 2][2 * hr + e % 2] * a.scale_log2 : -INFINITY;
          mx = fmaxf(mx, x[e]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[mt][hr], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet keeps l = 0
        alpha[hr] = fast_exp2(m[mt][hr] - m_use);
        m[mt][hr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) { x[e] = fast_exp2(x[e] - m_use); sum += x[e]; }
        l[mt][hr] = l[mt][hr] * alpha[hr] + sum;
        pa[mt][hr] = Elem<T>::pack(x[0], x[1]);      // A operand: row g (+8), keys 2·t4, +1
        pa[mt][2 + hr] = Elem<T>::pack(x[2], x[3]);  // keys 8 + 2·t4, +1
      }
      // Once the running max settles, alpha = 1 for every row of the warp: skip the rescale.
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          oacc[mt][n][0] *= alpha[0]; oacc[mt][n][1] *= alpha[0]; oacc[mt][n][2] *= alpha[1]; oacc[mt][n][3] *= alpha[1];
        }
      }
    }
    // O += P V: ldmatrix.trans of the warp's 16 V rows gives the "col" B operand.
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t vb[4];
      ldsm_x4_t(vb, vs + (kw + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + np * 16 + 8 * (lane / 16));
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        if (mt < mt_n) { Elem<T>::mma(oacc[mt][2 * np], pa[mt], vb[0], vb[1]); Elem<T>::mma(oacc[mt][2 * np + 1], pa[mt], vb[2], vb[3]); }
    }
  }
  cp_async_wait<0>();

  // Merge the 4 warps: m = max_w m_w, l = sum_w 2^(m_w - m) l_w, O = sum_w 2^(m_w - m) O_w / l.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      l[mt][hr] += __shfl_xor_sync(0xffffffffu, l[mt][hr], 1);
      l[mt][hr] += __shfl_xor_sync(0xffffffffu, l[mt][hr], 2);
    }
  __syncthreads();  // every warp is done with the pipeline's shared memory, which Obuf reuses
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    if (mt >= mt_n) continue;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = mt * 16 + g + 8 * hr;
      if (t4 == 0) { stat_m[warp * MB + r] = m[mt][hr]; stat_l[warp * MB + r] = l[mt][hr]; }
#pragma unroll
      for (int n = 0; n < NT; ++n)
        *reinterpret_cast<float2*>(Obuf + (warp * MB + r) * C::LDO + n * 8 + 2 * t4) = make_float2(oacc[mt][n][2 * hr], oacc[mt][n][2 * hr + 1]);
    }
  }
  __syncthreads();
  const int r = tid / 4, q4 = tid % 4;  // thread (r, q4) finishes columns [q4·D/4, (q4+1)·D/4) of row r
  if (r >= rows) return;
  float wt[C::W], mx = -INFINITY, L = 0.f;
#pragma unroll
  for (int w = 0; w < C::W; ++w) mx = fmaxf(mx, stat_m[w * MB + r]);
  const float m_use = mx == -INFINITY ? 0.f : mx;
#pragma unroll
  for (int w = 0; w < C::W; ++w) { wt[w] = fast_exp2(stat_m[w * MB + r] - m_use); L += wt[w] * stat_l[w * MB + r]; }
  const float inv = L != 0.f ? 1.f / L : 0.f;  // a row that saw no key: zeros, lse = -inf
  const size_t R = size_t(b) * a.M + row0 + r;
  const bool direct = a.splits == 1;  // one split writes o and lse; several write fp32 partials
#pragma unroll 4
  for (int c = q4 * (D / 4); c < (q4 + 1) * (D / 4); c += 2) {
    float x = 0.f, y = 0.f;
#pragma unroll
    for (int w = 0; w < C::W; ++w) {
      const float2 o2 = *reinterpret_cast<const float2*>(Obuf + (w * MB + r) * C::LDO + c);
      x += wt[w] * o2.x; y += wt[w] * o2.y;
    }
    if (direct) *reinterpret_cast<uint32_t*>(static_cast<T*>(a.o) + R * D + c) = Elem<T>::pack(x * inv, y * inv);
    else *reinterpret_cast<float2*>(a.ws_o + (size_t(split) * a.B * a.M + R) * D + c) = make_float2(x * inv, y * inv);
  }
  if (q4 == 0) {
    const float lse2 = L != 0.f ? mx + log2f(L) : -INFINITY;
    if (!direct) a.ws_lse[size_t(split) * a.B * a.M + R] = lse2;
    else if (a.lse) a.lse[R] = lse2 * kLn2;
  }
}

// One CTA per query row: o = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max_s lse_s).
// The weights go to shared memory first; then thread (c, grp) sums float4 column c over the splits
// grp, grp + G, ...: its loads carry no dependence, so 8 stay in flight (unrolled).
template <typename T, int D>
__global__ void __launch_bounds__(256) combine_kernel(const float* __restrict__ ws_o, const float* __restrict__ ws_lse,
                                                      T* __restrict__ o, float* __restrict__ lse, int rows, int splits) {
  constexpr int C4 = D / 4, G = 256 / C4;  // float4 columns; split groups
  __shared__ float w_s[kMaxSplits], stat[2][8];
  __shared__ float4 red[G][C4];
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the partials are complete and visible
  const int row = blockIdx.x, tid = threadIdx.x;
  float mx, sum;
  split_weights<256>(ws_lse, rows, row, splits, w_s, stat, mx, sum);
  const int c = tid % C4, grp = tid / C4;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
  for (int s = grp; s < splits; s += G) {
    const float w = w_s[s];
    const float4 x = reinterpret_cast<const float4*>(ws_o + (size_t(s) * rows + row) * D)[c];
    acc.x += w * x.x; acc.y += w * x.y; acc.z += w * x.z; acc.w += w * x.w;
  }
  red[grp][c] = acc;
  __syncthreads();
  if (tid >= C4) return;
  float4 t = red[0][tid];
#pragma unroll
  for (int gg = 1; gg < G; ++gg) { const float4 u = red[gg][tid]; t.x += u.x; t.y += u.y; t.z += u.z; t.w += u.w; }
  const float inv = sum != 0.f ? 1.f / sum : 0.f;  // a row that saw no key: zeros, lse = -inf
  *reinterpret_cast<uint2*>(o + size_t(row) * D + 4 * tid) =
      make_uint2(Elem<T>::pack(t.x * inv, t.y * inv), Elem<T>::pack(t.z * inv, t.w * inv));
  if (lse && tid == 0) lse[row] = sum != 0.f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
}

template <typename T, class C>
int launch(const MQAParams& p) {
  return launch_split_kv<T, C, kMaxSplits, 256>(p, decode_kernel<T, C>, combine_kernel<T, C::D>);
}

template <typename T>
int by_dim(const MQAParams& p) {
  switch (p.D) {
    case 64: return launch<T, Cfg<64, FASTMQA_DECODE_STAGES>>(p);
    case 128: return launch<T, Cfg<128, FASTMQA_DECODE_STAGES>>(p);
    default: return FASTMQA_UNSUPPORTED;
  }
}

}  // namespace

int fastmqa_k10_decode(const MQAParams& p) {
  if (p.B < 1 || p.H * p.Sq < 1 || p.Skv < 1) return FASTMQA_UNSUPPORTED;
  if (p.dtype == FASTMQA_BF16) return by_dim<__nv_bfloat16>(p);
  if (p.dtype == FASTMQA_FP16) return by_dim<__half>(p);
  return FASTMQA_UNSUPPORTED;
}
