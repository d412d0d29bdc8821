// 11_decode_mla.cu — decoding for MLA (DeepSeek): MQA over a (B, Smax, 576) latent cache.
//
// MLA caches one latent per token (512 numbers + a 64-wide RoPE key) shared by all heads; decoding
// is MQA with D = 576 and v = k, the same tensor: pass it as both k and v and the kernel loads each
// tile once; o[..., :512] is MLA's output (the last 64 columns are the attention-weighted RoPE part,
// which MLA discards). Distinct k and v tensors of D = 576 work too (two tiles per stage).
//
// 10_decode keeps each warp's whole (rows x D) output in registers; at D = 576 that is 288 floats
// per thread for 16 rows, which does not fit. So here the output columns are split across warps:
//   * One CTA serves all H·Sq query rows of a sequence (up to 32; more rows -> more row blocks).
//   * Tiles of 32 keys arrive by 16-byte cp.async, STAGES deep.
//   * Per tile, three phases with tensor cores (mma.sync m16n8k16, fp32 accumulation):
//       1. S = Q K^T (rows x N), scaled to log2 units and masked, written to shared memory;
//       2. online softmax, 8 lanes per row: running max m, sum l, P = exp2(S - m) in bf16/fp16;
//       3. O = alpha·O + P V, each of the 8 warps owning 72 of the 576 output columns (registers).
//     The price is two extra barriers and S, P round trips through shared memory per tile.
//   * Split-KV as in 10_decode: chunks of each sequence on separate CTAs, normalised partial
//     outputs and log-sum-exps in the workspace, combined by a second kernel (programmatic
//     dependent launch).
#include "mqa_params.cuh"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace {

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

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
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p)) : "memory");
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

// D head dim, N keys per tile, W warps, MT m-tiles of 16 query rows per CTA, STAGES tiles in the
// pipeline. Streaming at full bandwidth needs ~100 KB in flight per SM (bandwidth x latency):
// STAGES - 1 tiles per CTA times the CTAs that fit on an SM.
template <int D_, int N_, int W_, int MT_, int STAGES_>
struct Cfg {
  static constexpr int D = D_, N = N_, W = W_, MT = MT_, STAGES = STAGES_, THREADS = 32 * W, MB = 16 * MT, CH = D / 8;
  // Shared-memory row pitches padded by 16 bytes: the 8 rows an ldmatrix reads (or the rows of one
  // float2 store of S) then start in different bank groups, with no swizzle arithmetic.
  static constexpr int LD = D + 8, LDS = N + 8, LDP = N + 8;
  // Phase 1: warps tile S (MB x N) as WK columns of N/WK keys times WM rows of m-tiles.
  static constexpr int KG = N / 16, WK = KG < W ? KG : W, WM = W / WK, NG = KG / WK, MTW = (MT + WM - 1) / WM;
  // Phase 3: warp w owns output columns [w·DW, (w+1)·DW) of all rows: NT n8-tiles.
  static constexpr int DW = D / W, NT = DW / 8;
  static_assert(W % WK == 0 && KG % WK == 0 && D % W == 0 && DW % 8 == 0 && (N % 32) == 0, "bad tiling");
  static_assert((N * CH) % THREADS == 0 && (MB * CH) % THREADS == 0, "loads must divide evenly over threads");
  static constexpr size_t kv_tile = size_t(N) * LD * 2;  // bytes of one K (or V) tile
  static constexpr size_t fixed = size_t(MB) * (LD * 2 + LDS * 4 + LDP * 2 + 3 * 4);
  static size_t smem(bool kv_same) { return STAGES * kv_tile * (kv_same ? 1 : 2) + fixed; }
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
  constexpr int D = C::D, N = C::N, LD = C::LD, MB = C::MB;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int rb = blockIdx.x % a.RB, split = blockIdx.x / a.RB, b = blockIdx.y;
  const int row0 = rb * MB, rows = min(MB, a.M - row0), mt_n = (rows + 15) / 16;
  const int len = a.seqlens ? a.seqlens[b] : a.Skv;
  // This CTA's keys [k0, k1): the sequence's own length cut into `splits` chunks of whole tiles.
  const int chunk = ((len + a.splits - 1) / a.splits + N - 1) / N * N;
  const int k0 = min(len, split * chunk), k1 = min(len, k0 + chunk), ntiles = (k1 - k0 + N - 1) / N;

  const size_t stage = size_t(N) * LD * (a.kv_same ? 1 : 2);  // elements per pipeline stage
  T* Ks = reinterpret_cast<T*>(smem);                            // STAGES of K (and V) tiles
  T* Qs = Ks + C::STAGES * stage;                                // (MB, LD)
  float* Ss = reinterpret_cast<float*>(Qs + MB * LD);            // (MB, LDS) scores, log2 units
  T* Ps = reinterpret_cast<T*>(Ss + MB * C::LDS);                // (MB, LDP) probabilities
  float *row_m = reinterpret_cast<float*>(Ps + MB * C::LDP), *row_l = row_m + MB, *row_a = row_l + MB;

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
  for (int r = tid; r < MB; r += C::THREADS) { row_m[r] = -INFINITY; row_l[r] = 0.f; }

  // Last key each of this thread's phase-1 rows may see (causal: row i sees j <= i + len - Sq).
  const int wk = warp % C::WK, wm = warp / C::WK;
  int jmax[C::MTW][2];
#pragma unroll
  for (int mi = 0; mi < C::MTW; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int i = (row0 + (wm + C::WM * mi) * 16 + g + 8 * hr) % a.Sq;
      jmax[mi][hr] = a.causal ? min(k1 - 1, i + len - a.Sq) : k1 - 1;
    }

  float oacc[C::MT][C::NT][4] = {};
  __syncthreads();
  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<C::STAGES - 2>();          // all but the newest STAGES-2 groups: tile t is here
    __syncthreads();                         // ... for every thread, and every warp is done with t-1,
    if (t + C::STAGES - 1 < ntiles) load_tile(t + C::STAGES - 1);  // so t-1's stage takes a new tile
    cp_async_commit();
    const T* ks = Ks + (t % C::STAGES) * stage;
    const T* vs = a.kv_same ? ks : ks + N * LD;
    const int j0 = k0 + t * N;

    {  // Phase 1: S = Q K^T. ldmatrix of K rows (keys) gives the mma's "col" B operand directly.
      float sacc[C::MTW][2 * C::NG][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t kb[C::NG][4];
#pragma unroll
        for (int gi = 0; gi < C::NG; ++gi)
          ldsm_x4(kb[gi], ks + ((wk * C::NG + gi) * 16 + (lane % 8) + 8 * (lane / 16)) * LD + kk * 16 + 8 * ((lane / 8) % 2));
#pragma unroll
        for (int mi = 0; mi < C::MTW; ++mi) {
          const int mt = wm + C::WM * mi;
          if (mt < mt_n) {
            uint32_t qa[4];
            ldsm_x4(qa, Qs + (mt * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16));
#pragma unroll
            for (int gi = 0; gi < C::NG; ++gi) {
              Elem<T>::mma(sacc[mi][2 * gi], qa, kb[gi][0], kb[gi][1]);
              Elem<T>::mma(sacc[mi][2 * gi + 1], qa, kb[gi][2], kb[gi][3]);
            }
          }
        }
      }
#pragma unroll
      for (int mi = 0; mi < C::MTW; ++mi) {
        const int mt = wm + C::WM * mi;
        if (mt >= mt_n) continue;
#pragma unroll
        for (int n = 0; n < 2 * C::NG; ++n) {
          const int col = (wk * C::NG) * 16 + n * 8 + 2 * t4, j = j0 + col;
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            float2 s;
            s.x = j <= jmax[mi][hr] ? sacc[mi][n][2 * hr] * a.scale_log2 : -INFINITY;
            s.y = j + 1 <= jmax[mi][hr] ? sacc[mi][n][2 * hr + 1] * a.scale_log2 : -INFINITY;
            *reinterpret_cast<float2*>(Ss + (mt * 16 + g + 8 * hr) * C::LDS + col) = s;
          }
        }
      }
    }
    __syncthreads();
    // Phase 2: online softmax, 8 lanes per row, N/8 scores per lane (float4 reads, conflict-free).
    for (int r = tid / 8; r < mt_n * 16; r += C::THREADS / 8) {  // a warp's 4 rows exit together
      const int j8 = tid % 8;
      const float m_old = row_m[r];
      float s[N / 8];
#pragma unroll
      for (int c = 0; c < N / 32; ++c) {
        const float4 v4 = *reinterpret_cast<const float4*>(Ss + r * C::LDS + 32 * c + 4 * j8);
        s[4 * c] = v4.x; s[4 * c + 1] = v4.y; s[4 * c + 2] = v4.z; s[4 * c + 3] = v4.w;
      }
      float mx = s[0];
#pragma unroll
      for (int e = 1; e < N / 8; ++e) mx = fmaxf(mx, s[e]);
#pragma unroll
      for (int o = 4; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet keeps l = 0
      float sum = 0.f;
#pragma unroll
      for (int e = 0; e < N / 8; ++e) { s[e] = fast_exp2(s[e] - m_use); sum += s[e]; }
#pragma unroll
      for (int o = 4; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
      for (int c = 0; c < N / 32; ++c)
        *reinterpret_cast<uint2*>(Ps + r * C::LDP + 32 * c + 4 * j8) =
            make_uint2(Elem<T>::pack(s[4 * c], s[4 * c + 1]), Elem<T>::pack(s[4 * c + 2], s[4 * c + 3]));
      __syncwarp();  // every lane has read row_m[r] before lane 0 updates it
      if (j8 == 0) {
        const float alpha = fast_exp2(m_old - m_use);
        row_a[r] = alpha; row_l[r] = row_l[r] * alpha + sum; row_m[r] = m_new;
      }
    }
    __syncthreads();
    // Phase 3: O = alpha·O + P V. ldmatrix.trans of V rows gives the "col" B operand.
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt) {
      if (mt >= mt_n) continue;
      const float a0 = row_a[mt * 16 + g], a1 = row_a[mt * 16 + g + 8];
#pragma unroll
      for (int n = 0; n < C::NT; ++n) { oacc[mt][n][0] *= a0; oacc[mt][n][1] *= a0; oacc[mt][n][2] *= a1; oacc[mt][n][3] *= a1; }
    }
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
      uint32_t pa[C::MT][4];
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt)
        if (mt < mt_n) ldsm_x4(pa[mt], Ps + (mt * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * C::LDP + kk * 16 + 8 * (lane / 16));
      const T* vrow = vs + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + warp * C::DW;
#pragma unroll
      for (int np = 0; np < C::NT / 2; ++np) {
        uint32_t vb[4];
        ldsm_x4_t(vb, vrow + np * 16 + 8 * (lane / 16));
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt)
          if (mt < mt_n) { Elem<T>::mma(oacc[mt][2 * np], pa[mt], vb[0], vb[1]); Elem<T>::mma(oacc[mt][2 * np + 1], pa[mt], vb[2], vb[3]); }
      }
      if (C::NT % 2) {  // an odd number of n8-tiles (D = 576: 72 columns per warp)
        uint32_t vb[2];
        ldsm_x2_t(vb, vrow + (C::NT - 1) * 8);
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt)
          if (mt < mt_n) Elem<T>::mma(oacc[mt][C::NT - 1], pa[mt], vb[0], vb[1]);
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: O / l. One split writes o and lse; several write fp32 partials for the combine.
  const bool direct = a.splits == 1;
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = mt * 16 + g + 8 * hr;
      if (mt >= mt_n || r >= rows) continue;
      const float l = row_l[r], inv = l != 0.f ? 1.f / l : 0.f;  // a row that saw no key: zeros
      const size_t R = size_t(b) * a.M + row0 + r;
#pragma unroll
      for (int n = 0; n < C::NT; ++n) {
        const int col = warp * C::DW + n * 8 + 2 * t4;
        const float x = oacc[mt][n][2 * hr] * inv, y = oacc[mt][n][2 * hr + 1] * inv;
        if (direct) *reinterpret_cast<uint32_t*>(static_cast<T*>(a.o) + R * D + col) = Elem<T>::pack(x, y);
        else *reinterpret_cast<float2*>(a.ws_o + (size_t(split) * a.B * a.M + R) * D + col) = make_float2(x, y);
      }
    }
  for (int r = tid; r < rows; r += C::THREADS) {
    const float l = row_l[r], lse2 = l != 0.f ? row_m[r] + log2f(l) : -INFINITY;
    const size_t R = size_t(b) * a.M + row0 + r;
    if (!direct) a.ws_lse[size_t(split) * a.B * a.M + R] = lse2;
    else if (a.lse) a.lse[R] = lse2 * kLn2;
  }
}

constexpr int kMaxSplits = 256;

// One CTA per query row: o = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max_s lse_s).
// The weights go to shared memory first, so the 4 warps' loads of the partial outputs (each warp
// a quarter of the splits, each lane a float4 column) carry no dependence and stay in flight.
template <typename T, int D>
__global__ void __launch_bounds__(128) combine_kernel(const float* __restrict__ ws_o, const float* __restrict__ ws_lse,
                                                      T* __restrict__ o, float* __restrict__ lse, int rows, int splits) {
  constexpr int NV = (D / 4 + 31) / 32;  // float4 columns per lane
  __shared__ float w_s[kMaxSplits], red[4][D], stat[2][4];
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the partials are complete and visible
  const int row = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float mx = -INFINITY, sum = 0.f;
  for (int s = tid; s < splits; s += 128) mx = fmaxf(mx, ws_lse[size_t(s) * rows + row]);
#pragma unroll
  for (int o2 = 16; o2 > 0; o2 /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2));
  if (lane == 0) stat[0][warp] = mx;
  __syncthreads();
  mx = fmaxf(fmaxf(stat[0][0], stat[0][1]), fmaxf(stat[0][2], stat[0][3]));
  for (int s = tid; s < splits; s += 128) {  // empty splits (lse = -inf) weigh 0; their o_s is 0
    const float w = mx == -INFINITY ? 0.f : fast_exp2(ws_lse[size_t(s) * rows + row] - mx);
    w_s[s] = w; sum += w;
  }
#pragma unroll
  for (int o2 = 16; o2 > 0; o2 /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o2);
  if (lane == 0) stat[1][warp] = sum;
  __syncthreads();
  sum = stat[1][0] + stat[1][1] + stat[1][2] + stat[1][3];
  float4 acc[NV];
#pragma unroll
  for (int u = 0; u < NV; ++u) acc[u] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
  for (int s = warp; s < splits; s += 4) {
    const float w = w_s[s];
    const float4* src = reinterpret_cast<const float4*>(ws_o + (size_t(s) * rows + row) * D);
#pragma unroll
    for (int u = 0; u < NV; ++u) {
      const int c = lane + 32 * u;
      if (c < D / 4) { const float4 x = src[c]; acc[u].x += w * x.x; acc[u].y += w * x.y; acc[u].z += w * x.z; acc[u].w += w * x.w; }
    }
  }
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    const int c = lane + 32 * u;
    if (c < D / 4) { red[warp][4 * c] = acc[u].x; red[warp][4 * c + 1] = acc[u].y; red[warp][4 * c + 2] = acc[u].z; red[warp][4 * c + 3] = acc[u].w; }
  }
  __syncthreads();
  const float inv = sum != 0.f ? 1.f / sum : 0.f;  // a row that saw no key: zeros, lse = -inf
  for (int c = tid; c < D / 2; c += 128) {
    const float x = (red[0][2 * c] + red[1][2 * c] + red[2][2 * c] + red[3][2 * c]) * inv;
    const float y = (red[0][2 * c + 1] + red[1][2 * c + 1] + red[2][2 * c + 1] + red[3][2 * c + 1]) * inv;
    *reinterpret_cast<uint32_t*>(o + size_t(row) * D + 2 * c) = Elem<T>::pack(x, y);
  }
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
  cfg.gridDim = dim3(p.B * M); cfg.blockDim = dim3(128); cfg.stream = p.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr; cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, combine_kernel<T, C::D>, (const float*)a.ws_o, (const float*)a.ws_lse,
                     static_cast<T*>(p.o), p.lse, p.B * M, splits);
  return 0;
}

// 32 rows per CTA, 8 warps of 72 output columns, 32-key tiles: 37 KB per K tile. One shared K = V
// tile per stage leaves room for 4 stages in 227 KB; distinct K and V tiles for 2.
template <typename T>
int by_kv(const MQAParams& p) {
  return p.k == p.v ? launch<T, Cfg<576, 32, 8, 2, 4>>(p) : launch<T, Cfg<576, 32, 8, 2, 2>>(p);
}

}  // namespace

int fastmqa_k11_decode_mla(const MQAParams& p) {
  if (p.B < 1 || p.H * p.Sq < 1 || p.Skv < 1 || p.D != 576) return FASTMQA_UNSUPPORTED;
  if (p.dtype == FASTMQA_BF16) return by_kv<__nv_bfloat16>(p);
  if (p.dtype == FASTMQA_FP16) return by_kv<__half>(p);
  return FASTMQA_UNSUPPORTED;
}
