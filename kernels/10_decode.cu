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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#ifndef FASTMQA_DECODE_STAGES
#define FASTMQA_DECODE_STAGES 4  // scripts/dev_decode.py builds other depths with -D to compare
#endif

namespace {

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
constexpr int kMaxSplits = 128;

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
// 16-byte async copy; valid = false writes zeros (keys past the chunk: the cache there may hold NaN).
// K/V are read exactly once: evict_first keeps them from pushing Q and the partials out of L2.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n"
               ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0), "l"(policy) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}
__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = 0
  float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}

template <typename T> struct Elem;
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y); return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    __half2 h = __floats2half2_rn(x, y); return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

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

struct Args {
  const void *q, *k, *v; void* o; float* lse; const int* seqlens;
  float *ws_o, *ws_lse;        // partials (splits, B, M, D) and (splits, B, M) when splits > 1
  int B, M, Sq, Skv, causal, splits, RB, kv_same;
  float scale_log2;            // softmax scale · log2(e): scores live in log2 units
};

template <typename T, class C>
__global__ void __launch_bounds__(C::THREADS) decode_kernel(const Args a) {
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel may get scheduled now
  constexpr int D = C::D, N = C::N, LD = C::LD, MB = C::MB, NT = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int rb = blockIdx.x % a.RB, split = blockIdx.x / a.RB, b = blockIdx.y;
  const int row0 = rb * MB, rows = min(MB, a.M - row0), mt_n = (rows + 15) / 16;
  const int len = a.seqlens ? a.seqlens[b] : a.Skv;
  // This CTA's keys [k0, k1): the sequence's own length cut into `splits` chunks of whole tiles.
  const int chunk = ((len + a.splits - 1) / a.splits + N - 1) / N * N;
  const int k0 = min(len, split * chunk), k1 = min(len, k0 + chunk), ntiles = (k1 - k0 + N - 1) / N;

  const size_t stage = size_t(N) * LD * (a.kv_same ? 1 : 2);           // elements per pipeline stage
  T* Ks = reinterpret_cast<T*>(smem);                                   // STAGES of K (and V) tiles
  float* Obuf = reinterpret_cast<float*>(smem);                         // (W, MB, LDO), after the loop
  T* Qs = reinterpret_cast<T*>(smem + C::pipe(a.kv_same));              // (MB, LD)
  float *stat_m = reinterpret_cast<float*>(Qs + MB * LD), *stat_l = stat_m + C::W * MB;

  uint64_t evict_first, evict_last;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(evict_first));
  asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(evict_last));
  const T* qg = static_cast<const T*>(a.q) + (size_t(b) * a.M + row0) * D;
  const T* kg = static_cast<const T*>(a.k) + size_t(b) * a.Skv * D;
  const T* vg = static_cast<const T*>(a.v) + size_t(b) * a.Skv * D;
  auto load_tile = [&](int t) {  // a tile is N consecutive rows of the cache: one contiguous block
    T* ks = Ks + (t % C::STAGES) * stage;
    const int j0 = k0 + t * N;
#pragma unroll
    for (int it = 0; it < N * C::CH / C::THREADS; ++it) {
      const int c = tid + it * C::THREADS, r = c / C::CH, ch = c % C::CH;
      const bool ok = j0 + r < k1;
      const size_t off = ok ? size_t(j0 + r) * D + ch * 8 : 0;
      cp_async16(ks + r * LD + ch * 8, kg + off, ok, evict_first);
      if (!a.kv_same) cp_async16(ks + N * LD + r * LD + ch * 8, vg + off, ok, evict_first);
    }
  };
  if (ntiles > 0) {
#pragma unroll
    for (int it = 0; it < MB * C::CH / C::THREADS; ++it) {
      const int c = tid + it * C::THREADS, r = c / C::CH, ch = c % C::CH;
      cp_async16(Qs + r * LD + ch * 8, qg + (r < rows ? size_t(r) * D + ch * 8 : 0), r < rows, evict_last);
    }
  }
#pragma unroll
  for (int t = 0; t < C::STAGES - 1; ++t) {  // group t holds tile t (group 0 also Q)
    if (t < ntiles) load_tile(t);
    cp_async_commit();
  }

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
    if (t + C::STAGES - 1 < ntiles) load_tile(t + C::STAGES - 1);  // so t-1's stage takes a new tile
    cp_async_commit();
    const T* ks = Ks + (t % C::STAGES) * stage;
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
  const int row = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float mx = -INFINITY, sum = 0.f;
  for (int s = tid; s < splits; s += 256) mx = fmaxf(mx, ws_lse[size_t(s) * rows + row]);
#pragma unroll
  for (int o2 = 16; o2 > 0; o2 /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2));
  if (lane == 0) stat[0][warp] = mx;
  __syncthreads();
  mx = stat[0][0];
#pragma unroll
  for (int w = 1; w < 8; ++w) mx = fmaxf(mx, stat[0][w]);
  for (int s = tid; s < splits; s += 256) {  // empty splits (lse = -inf) weigh 0; their o_s is 0
    const float w = mx == -INFINITY ? 0.f : fast_exp2(ws_lse[size_t(s) * rows + row] - mx);
    w_s[s] = w; sum += w;
  }
#pragma unroll
  for (int o2 = 16; o2 > 0; o2 /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o2);
  if (lane == 0) stat[1][warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < 8; ++w) sum += stat[1][w];
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

// Split count: enough CTAs to fill the resident slots (SMs x CTAs per SM) in whole waves, each split
// at least one tile; among counts that reach 95% of the best wave efficiency, the smallest (fewest
// partials to write and combine). Only counts that are not a smaller count in disguise: splits of
// ceil(tiles / s) tiles each must number s.
int choose_splits(int base, int tiles, int slots) {
  if (10 * base >= 8 * slots || tiles <= 1) return 1;
  const int max_s = min(min(tiles, kMaxSplits), (2 * slots + base - 1) / base);
  auto eff = [&](int s) { float w = float(base) * s / slots; return w / ceilf(w); };
  auto eligible = [&](int s) { const int c = (tiles + s - 1) / s; return (tiles + c - 1) / c == s; };
  float best = 0.f;
  for (int s = 1; s <= max_s; ++s) if (eligible(s)) best = fmaxf(best, eff(s));
  for (int s = 1; s <= max_s; ++s) if (eligible(s) && eff(s) >= 0.95f * best) return s;
  return 1;
}

template <typename T, class C>
int launch(const MQAParams& p) {
  const int M = p.H * p.Sq, RB = (M + C::MB - 1) / C::MB;
  const bool kv_same = p.k == p.v;
  const size_t smem = C::smem(kv_same);
  static size_t smem_set = 0;  // the kernel's dynamic shared-memory limit, raised once
  static int occ[2] = {0, 0};  // resident CTAs per SM, for distinct / shared K and V
  if (smem > smem_set) {
    if (cudaFuncSetAttribute(decode_kernel<T, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess)
      return FASTMQA_UNSUPPORTED;
    smem_set = smem;
  }
  if (occ[kv_same] == 0) {
    int n = 1;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_kernel<T, C>, C::THREADS, smem);
    occ[kv_same] = max(1, min(n, 4));  // fastmqa/kernels.py bounds the workspace assuming <= 4
  }
  const int tiles = max(1, (p.Skv + C::N - 1) / C::N);
  const int splits = p.num_splits > 0 ? min(min(p.num_splits, tiles), kMaxSplits)
                                      : choose_splits(p.B * RB, tiles, p.num_sms * occ[kv_same]);
  const size_t ws_need = size_t(splits) * p.B * M * (C::D + 1) * sizeof(float);
  if (splits > 1 && (p.workspace == nullptr || p.workspace_bytes < ws_need)) return FASTMQA_UNSUPPORTED;
  Args a{p.q, p.k, p.v, p.o, p.lse, p.seqlens, static_cast<float*>(p.workspace), nullptr,
         p.B, M, p.Sq, p.Skv, p.causal, splits, RB, kv_same, p.scale * kLog2e};
  if (splits > 1) a.ws_lse = a.ws_o + size_t(splits) * p.B * M * C::D;
  decode_kernel<T, C><<<dim3(RB * splits, p.B), C::THREADS, smem, p.stream>>>(a);
  if (splits == 1) return 0;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.B * M); cfg.blockDim = dim3(256); cfg.stream = p.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr; cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, combine_kernel<T, C::D>, (const float*)a.ws_o, (const float*)a.ws_lse,
                     static_cast<T*>(p.o), p.lse, p.B * M, splits);
  return 0;
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
