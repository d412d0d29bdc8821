// 10_decode.cu — MQA decoding over a KV cache, split across CTAs (Flash-Decoding).
//
// q (B, H, Sq <= 8, D); k_cache, v_cache (B, Smax, D); seqlens (B,) int32 (ragged lengths).
// Per generated token a layer reads its whole cache once and does only 4·H·Sq flops per cached
// number, so decoding is memory-bound: the goal is to stream K and V at device bandwidth.
//   * One CTA serves 32 query rows of a sequence: all H·Sq of them for 32 heads and one token
//     (q[b] is one (H·Sq, D) matrix, row = h·Sq + i), so each K/V element is read once, not once
//     per head. More rows take more row blocks, which re-read the tile from L2.
//   * Tiles of 64 keys (32 KB of K and V) arrive by 16-byte cp.async, 3 stages deep: 2 tiles in
//     flight while one is used; 105 KB of shared memory and 8 warps of ~200 registers: one CTA
//     per SM. Measured on the H100 (results/decode_dev.json, decode_cluster_dev.json): 4 stages
//     were no faster; two CTAs per SM (registers capped at 128 by __launch_bounds__, a few spills)
//     5-30% slower; moving the tiles with the bulk copy engine (FASTMQA_DECODE_BULK=1) no faster.
//   * A tile's key r is row r of shared memory, unpadded, with its 16-byte chunks XOR-swizzled
//     (chunk ch at ch ^ (r / 8 % 8), Cfg::at). An ldmatrix reads 8 rows at one chunk, keys 8n + c
//     (n = 0..7): the swizzle puts them in 8 different bank groups. And a cache row's 128-byte
//     segments stay whole in shared memory, which is what lets L2 serve a warp's cp.async as 4
//     whole-line requests: the first layout (8-key blocks padded by 16 bytes) made L2 handle 1.5x
//     the sectors and 2.6x the requests of the bytes read, and held DRAM at ~85 % of its peak
//     where FlashAttention-2's kernel reached 91 % (ncu, results/ncu_decode_dev.json). Swizzled: 90 %.
//   * Within a CTA the keys are split too: the 8 warps form 4 key groups x 2 row halves. Warp w
//     owns keys {8n + 2(w%4), 8n + 2(w%4) + 1 : n = 0..7} of every tile and query rows
//     [16(w/4), 16(w/4)+16), and keeps its own running max m, sum l and output O (16 rows x D,
//     fp32) in registers, with its Q fragments. S = Q K^T and O += P V use mma.sync m16n8k16; the
//     S accumulators are already P's A operand, so a tile costs one barrier and no shared-memory
//     round trip. At the end the 4 key groups' (m, l, O) are merged through shared memory. (The
//     first version had 4 warps, each with all 32 rows: one warp per scheduler, whose dependent
//     mma chains nobody hid; 8 warps measured 3-10% faster. FASTMQA_DECODE_WARPS=4 builds it.)
//   * Split-KV: with B·H·Sq small (B = 1 is one CTA!) the 132 SMs would sit idle, so each sequence
//     is cut into `splits` chunks of whole tiles, one CTA each, which write a normalised partial
//     output and its log-sum-exp to the workspace. Up to 4 splits, the last CTA to finish combines
//     them (arrival counters); more go to a combine kernel (programmatic dependent launch).
// MLA's 576-wide latent does not fit this register budget: see 11_decode_mla.cu.
#include "mqa_params.cuh"
#include "decode_common.cuh"  // PTX wrappers, the KV pipeline, split weights, choose_splits, the launcher

#ifndef FASTMQA_DECODE_STAGES
#define FASTMQA_DECODE_STAGES 3  // scripts/dev_decode.py builds other depths with -D to compare
#endif
#ifndef FASTMQA_DECODE_BULK
#define FASTMQA_DECODE_BULK 0  // 1: K/V tiles by the bulk copy engine (one copy per 8-key block); 0: 16-byte cp.async
#endif
#ifndef FASTMQA_DECODE_FUSE
#define FASTMQA_DECODE_FUSE 4  // the decode kernel combines up to this many splits itself (0: always a combine kernel)
#endif
#ifndef FASTMQA_DECODE_WARPS
#define FASTMQA_DECODE_WARPS 8   // 4: one warp per key group owns all 32 rows (the first version)
#endif

namespace {

constexpr int kMaxSplits = 128;  // the combine keeps one weight a split in shared memory

// KG = 4 key groups of KW = 16 keys make a tile of N = 64 keys; W / KG warps share a key group
// along the rows: with W = 8 warp w owns m-tile w / 4 (16 rows) of key group w % 4. Key group kg
// is keys 8n + 2kg (column n of its S n8-tile 0) and 8n + 2kg + 1 (n8-tile 1), n = 0..7.
template <int D_, int STAGES_, int W_>
struct Cfg {
  static constexpr int D = D_, STAGES = STAGES_, W = W_, THREADS = 32 * W;
  static constexpr int MB = 32, KW = 16, KG = 4, N = KG * KW, CH = D / 8;  // rows per CTA, keys per warp / tile
  static constexpr int WM = W / KG, MTW = MB / 16 / WM;  // warps along the rows; m-tiles per warp
  static_assert(W % KG == 0 && MTW * WM * 16 == MB, "warps must tile 32 rows x 4 key groups");
  // K/V tiles: key r at row r (D elements, unpadded), its 16-byte chunk ch at chunk ch ^ (r / 8 % 8)
  // of the row (an XOR swizzle, at()). The 8 rows 8n + c that one ldmatrix reads at one chunk sit in
  // 8 different bank groups, and every 128-byte segment of a cache row lands in one aligned 128-byte
  // segment of shared memory, so a warp's cp.async of 512 contiguous bytes are 4 whole-line requests.
  // (The first layout padded every block of 8 keys by 16 bytes instead: destinations off the 128-byte
  // grid made L2 see 1.5x the sectors, 2.6x the requests, and DRAM stop at ~85 % of its peak;
  // results/ncu_decode_dev.json.) The bulk copy engine (FASTMQA_DECODE_BULK) copies 8-key blocks
  // linearly, so it keeps the padded layout: BR = 8 keys a block, blocks BS elements apart.
  // Q's and the merge buffer's rows are padded by 16 bytes.
  static constexpr bool PAD = FASTMQA_DECODE_BULK;
  static constexpr int BR = 8, BS = BR * D + 8, tile_elems = PAD ? N / BR * BS : N * D, LD = D + 8, LDO = D + 8;
  __host__ __device__ static constexpr int row(int r) { return PAD ? r / BR * BS + r % BR * D : r * D; }
  __host__ __device__ static constexpr int at(int r, int ch) { return PAD ? row(r) + ch * 8 : r * D + ((ch ^ ((r >> 3) & 7)) << 3); }
  static_assert((N * CH) % THREADS == 0 && (MB * CH) % THREADS == 0, "loads must divide evenly over threads");
  static constexpr size_t kv_tile = size_t(tile_elems) * 2;       // bytes of one K (or V) tile
  static constexpr size_t obuf = size_t(KG) * MB * LDO * 4;       // the key groups' outputs, merged at the end
  __host__ __device__ static size_t pipe(bool kv_same) { size_t p = STAGES * kv_tile * (kv_same ? 1 : 2); return p > obuf ? p : obuf; }
  static size_t smem(bool kv_same) { return pipe(kv_same) + size_t(MB) * LD * 2 + 2 * KG * MB * 4 + STAGES * 8; }
};

template <typename T, class C, bool PAGED>
__global__ void __launch_bounds__(C::THREADS) decode_kernel(const Args a) {
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel may get scheduled now
  constexpr int D = C::D, N = C::N, LD = C::LD, MB = C::MB, NT = D / 8, MTW = C::MTW, KG = C::KG;
  constexpr bool kQReg = MTW == 1;  // one m-tile a warp: Q's fragments stay in registers (32 of them)
  extern __shared__ __align__(128) unsigned char smem[];  // (128: the K/V tiles' swizzle keeps 128-byte segments whole)
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int rb = blockIdx.x % a.RB, split = blockIdx.x / a.RB, b = blockIdx.y;
  const int row0 = rb * MB, rows = min(MB, a.M - row0), mt_n = (rows + 15) / 16;
  const int kg = warp % KG, mt0 = warp / KG * MTW;  // this warp's key group and first m-tile
  float* Obuf = reinterpret_cast<float*>(smem);                         // (KG, MB, LDO), after the loop
  T* Qs = reinterpret_cast<T*>(smem + C::pipe(a.kv_same));              // (MB, LD)
  float *stat_m = reinterpret_cast<float*>(Qs + MB * LD), *stat_l = stat_m + KG * MB;
  uint64_t* bars = reinterpret_cast<uint64_t*>(stat_l + KG * MB);       // (STAGES) mbarriers, BULK
  // Keys [k0, k1) of the sequence, STAGES of K (and V) tiles; the constructor issues Q's loads.
  const KVChunk<T, C, FASTMQA_DECODE_BULK, PAGED> kv(a, b, split, reinterpret_cast<T*>(smem), Qs,
                                              static_cast<const T*>(a.q) + (size_t(b) * a.M + row0) * D, rows, bars);
  const int len = kv.len, k0 = kv.k0, k1 = kv.k1, ntiles = kv.ntiles;
  kv.start();  // the first tiles

  // This thread's rows are (mt0 + i)·16 + g + 8·hr; causal: row r sees keys j <= r % Sq + len - Sq.
  int jmax[MTW][2];
  float m[MTW][2], l[MTW][2];  // running max (log2 units) and this thread's part of the running sum
#pragma unroll
  for (int i = 0; i < MTW; ++i)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = (row0 + (mt0 + i) * 16 + g + 8 * hr) % a.Sq;
      jmax[i][hr] = a.causal ? min(k1 - 1, r + len - a.Sq) : k1 - 1;
      m[i][hr] = -INFINITY; l[i][hr] = 0.f;
    }
  float oacc[MTW][NT][4] = {};
  uint32_t qreg[kQReg ? D / 16 : 1][4];
  const bool active = mt0 < mt_n;    // (warp-uniform) the warp has rows; else it only helps load

  for (int t = 0; t < ntiles; ++t) {
    kv.wait(t);                              // tile t is here for this thread,
    __syncthreads();                         // ... for every thread, and every warp is done with t-1,
    kv.next(t);                              // so t-1's stage takes tile t + STAGES - 1
    const T* ks = kv.tile(t);
    const T* vs = a.kv_same ? ks : ks + C::tile_elems;
    const int tb = k0 + t * N;               // the tile's first key; the warp's keys are tb + 8n + 2kg (+1)
    if (tb + 2 * kg >= k1 || !active) continue;  // (warp-uniform) all its keys lie past the chunk
    if (kQReg && t == 0) {                   // Q arrived with tile 0
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldsm_x4(qreg[kk], Qs + (mt0 * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16));
    }

    // S = Q K^T for the warp's 16 keys: ldmatrix of K rows gives the mma's "col" B operand directly.
    // Column n of n8-tile nt is key 8n + 2kg + nt of the tile (strided: one key from each block).
    // Even and odd k-steps accumulate apart: two dependent chains of D/32 mma instead of one of D/16.
    float s[MTW][2][4] = {}, s2[MTW][2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kb[4];
      ldsm_x4(kb, ks + C::at(8 * (lane % 8) + 2 * kg + lane / 16, 2 * kk + (lane / 8) % 2));
#pragma unroll
      for (int i = 0; i < MTW; ++i) {
        if (mt0 + i >= mt_n) continue;
        uint32_t qa[4];
        if (kQReg) { qa[0] = qreg[kk][0]; qa[1] = qreg[kk][1]; qa[2] = qreg[kk][2]; qa[3] = qreg[kk][3]; }
        else ldsm_x4(qa, Qs + ((mt0 + i) * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16));
        if (kk % 2 == 0) { Elem<T>::mma(s[i][0], qa, kb[0], kb[1]); Elem<T>::mma(s[i][1], qa, kb[2], kb[3]); }
        else { Elem<T>::mma(s2[i][0], qa, kb[0], kb[1]); Elem<T>::mma(s2[i][1], qa, kb[2], kb[3]); }
      }
    }
    // Online softmax in registers: a row's 16 scores sit in the 4 lanes of a quad, 4 each.
    uint32_t pa[MTW][4];
#pragma unroll
    for (int i = 0; i < MTW; ++i) {
      if (mt0 + i >= mt_n) continue;
      float alpha[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float x[4], mx = -INFINITY;
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // n8-tile e/2, column 2·t4 + e%2
          const int j = tb + 8 * (2 * t4 + e % 2) + 2 * kg + e / 2;
          const float sc = s[i][e / 2][2 * hr + e % 2] + s2[i][e / 2][2 * hr + e % 2];
          x[e] = j <= jmax[i][hr] ? sc * a.scale_log2 : -INFINITY;
          mx = fmaxf(mx, x[e]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[i][hr], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet keeps l = 0
        alpha[hr] = fast_exp2(m[i][hr] - m_use);
        m[i][hr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) { x[e] = fast_exp2(x[e] - m_use); sum += x[e]; }
        l[i][hr] = l[i][hr] * alpha[hr] + sum;
        pa[i][hr] = Elem<T>::pack(x[0], x[1]);      // A operand: row g (+8), keys 2·t4, +1
        pa[i][2 + hr] = Elem<T>::pack(x[2], x[3]);  // keys 8 + 2·t4, +1
      }
      // Once the running max settles, alpha = 1 for every row of the warp: skip the rescale.
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          oacc[i][n][0] *= alpha[0]; oacc[i][n][1] *= alpha[0]; oacc[i][n][2] *= alpha[1]; oacc[i][n][3] *= alpha[1];
        }
      }
    }
    // O += P V: ldmatrix.trans of the warp's 16 V rows gives the "col" B operand; P's k index c
    // (c + 8) is column c of S's n8-tile 0 (1): key 8c + 2kg (+1).
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t vb[4];
      ldsm_x4_t(vb, vs + C::at(8 * (lane % 8) + 2 * kg + (lane / 8) % 2, 2 * np + lane / 16));
#pragma unroll
      for (int i = 0; i < MTW; ++i)
        if (mt0 + i < mt_n) { Elem<T>::mma(oacc[i][2 * np], pa[i], vb[0], vb[1]); Elem<T>::mma(oacc[i][2 * np + 1], pa[i], vb[2], vb[3]); }
    }
  }
  cp_async_wait<0>();

  // Merge the KG key groups: m = max_k m_k, l = sum_k 2^(m_k - m) l_k, O = sum_k 2^(m_k - m) O_k / l.
#pragma unroll
  for (int i = 0; i < MTW; ++i)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      l[i][hr] += __shfl_xor_sync(0xffffffffu, l[i][hr], 1);
      l[i][hr] += __shfl_xor_sync(0xffffffffu, l[i][hr], 2);
    }
  __syncthreads();  // every warp is done with the pipeline's shared memory, which Obuf reuses
#pragma unroll
  for (int i = 0; i < MTW; ++i) {
    if (mt0 + i >= mt_n) continue;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = (mt0 + i) * 16 + g + 8 * hr;
      if (t4 == 0) { stat_m[kg * MB + r] = m[i][hr]; stat_l[kg * MB + r] = l[i][hr]; }
#pragma unroll
      for (int n = 0; n < NT; ++n)
        *reinterpret_cast<float2*>(Obuf + (kg * MB + r) * C::LDO + n * 8 + 2 * t4) = make_float2(oacc[i][n][2 * hr], oacc[i][n][2 * hr + 1]);
    }
  }
  __syncthreads();
  constexpr int TPR = C::THREADS / MB, DT = D / TPR;  // threads per row; columns per thread
  const int r = tid / TPR, q = tid % TPR;  // thread (r, q) finishes columns [q·DT, (q+1)·DT) of row r
  const size_t R = size_t(b) * a.M + row0 + r, BM = size_t(a.B) * a.M;
  const bool direct = a.splits == 1;  // one split writes o and lse; several write fp32 partials
  if (r < rows) {
    float wt[KG], mx = -INFINITY, L = 0.f;
#pragma unroll
    for (int k = 0; k < KG; ++k) mx = fmaxf(mx, stat_m[k * MB + r]);
    const float m_use = mx == -INFINITY ? 0.f : mx;
#pragma unroll
    for (int k = 0; k < KG; ++k) { wt[k] = fast_exp2(stat_m[k * MB + r] - m_use); L += wt[k] * stat_l[k * MB + r]; }
    const float inv = L != 0.f ? 1.f / L : 0.f;  // a row that saw no key: zeros, lse = -inf
#pragma unroll
    for (int c = q * DT; c < (q + 1) * DT; c += 2) {
      float x = 0.f, y = 0.f;
#pragma unroll
      for (int k = 0; k < KG; ++k) {
        const float2 o2 = *reinterpret_cast<const float2*>(Obuf + (k * MB + r) * C::LDO + c);
        x += wt[k] * o2.x; y += wt[k] * o2.y;
      }
      if (direct) *reinterpret_cast<uint32_t*>(static_cast<T*>(a.o) + R * D + c) = Elem<T>::pack(x * inv, y * inv);
      else *reinterpret_cast<float2*>(a.ws_o + (size_t(split) * BM + R) * D + c) = make_float2(x * inv, y * inv);
    }
    if (q == 0) {
      const float lse2 = L != 0.f ? mx + log2f(L) : -INFINITY;
      if (!direct) a.ws_lse[size_t(split) * BM + R] = lse2;
      else if (a.lse) a.lse[R] = lse2 * kLn2;
    }
  }
  if (direct || a.counters == nullptr) return;  // (a combine kernel follows)

  // Fused combine: the last of the row block's `splits` CTAs to get here merges their partials
  // (the threadfence-reduction pattern: publish, count, and the last one reads everyone's).
  __threadfence();  // this thread's partials are visible device-wide before the count says so
  __syncthreads();
  int* last = reinterpret_cast<int*>(stat_m);  // (the merge statistics are read: reuse them)
  if (tid == 0) {
    int* cnt = a.counters + size_t(b) * a.RB + rb;
    const bool is_last = atomicAdd(cnt, 1) == a.splits - 1;
    if (is_last) *cnt = 0;  // every CTA has counted: zero for the next launch
    *last = is_last;
  }
  __syncthreads();
  if (!*last || r >= rows) return;
  __threadfence();
  float mx = -INFINITY, sum = 0.f, acc[DT] = {};
  for (int s2 = 0; s2 < a.splits; ++s2) mx = fmaxf(mx, __ldcg(a.ws_lse + size_t(s2) * BM + R));
  for (int s2 = 0; s2 < a.splits; ++s2) {
    const float w = mx == -INFINITY ? 0.f : fast_exp2(__ldcg(a.ws_lse + size_t(s2) * BM + R) - mx);
    sum += w;
    const float4* src = reinterpret_cast<const float4*>(a.ws_o + (size_t(s2) * BM + R) * D + q * DT);
#pragma unroll
    for (int c = 0; c < DT / 4; ++c) {
      const float4 x = __ldcg(src + c);
      acc[4 * c] += w * x.x; acc[4 * c + 1] += w * x.y; acc[4 * c + 2] += w * x.z; acc[4 * c + 3] += w * x.w;
    }
  }
  const float inv = sum != 0.f ? 1.f / sum : 0.f;  // a row that saw no key: zeros, lse = -inf
#pragma unroll
  for (int c = 0; c < DT; c += 2)
    *reinterpret_cast<uint32_t*>(static_cast<T*>(a.o) + R * D + q * DT + c) = Elem<T>::pack(acc[c] * inv, acc[c + 1] * inv);
  if (q == 0 && a.lse) a.lse[R] = sum != 0.f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
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
  if (G * C4 == 256 || grp < G) {  // (D = 192: 48 columns, 5 groups; the last 16 threads idle)
#pragma unroll 8
    for (int s = grp; s < splits; s += G) {
      const float w = w_s[s];
      const float4 x = reinterpret_cast<const float4*>(ws_o + (size_t(s) * rows + row) * D)[c];
      acc.x += w * x.x; acc.y += w * x.y; acc.z += w * x.z; acc.w += w * x.w;
    }
    red[grp][c] = acc;
  }
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

// The split count follows decode_common.cuh's split_slots (SIZE_TIERS = true): fewer, longer CTAs
// for small caches at small batch. A paged cache (p.block_table, fastmqa.paged) runs the same
// kernel with KVChunk<..., PAGED>:
// one table read per tile, so a page must hold whole tiles (page_size a multiple of 64 keys).
template <typename T, class C>
int launch(const MQAParams& p) {
  if (p.block_table)
    return p.page_size < 1 || p.page_size % C::N || p.max_pages < 1
               ? FASTMQA_UNSUPPORTED
               : launch_split_kv<T, C, kMaxSplits, 256, true, FASTMQA_DECODE_FUSE, true>(p, decode_kernel<T, C, true>,
                                                                                           combine_kernel<T, C::D>);
  return launch_split_kv<T, C, kMaxSplits, 256, false, FASTMQA_DECODE_FUSE, true>(p, decode_kernel<T, C, false>,
                                                                                   combine_kernel<T, C::D>);
}

template <typename T>
int by_dim(const MQAParams& p) {
  switch (p.D) {
    case 64: return launch<T, Cfg<64, FASTMQA_DECODE_STAGES, FASTMQA_DECODE_WARPS>>(p);
    case 128: return launch<T, Cfg<128, FASTMQA_DECODE_STAGES, FASTMQA_DECODE_WARPS>>(p);
    case 192: return launch<T, Cfg<192, FASTMQA_DECODE_STAGES, FASTMQA_DECODE_WARPS>>(p);  // MLA, latent 128 + RoPE 64
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
