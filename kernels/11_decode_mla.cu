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
#include "decode_common.cuh"  // PTX wrappers, the KV pipeline, split weights, choose_splits, the launcher

namespace {

constexpr int kMaxSplits = 256;  // the combine keeps one weight a split in shared memory

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
  static constexpr int tile_elems = N * LD;               // KVChunk's layout: key r of a tile at row(r)
  __host__ __device__ static constexpr int row(int r) { return r * LD; }
  __host__ __device__ static constexpr int at(int r, int ch) { return r * LD + ch * 8; }  // 16-byte chunk ch of key r
  static constexpr size_t fixed = size_t(MB) * (LD * 2 + LDS * 4 + LDP * 2 + 3 * 4);
  static size_t smem(bool kv_same) { return STAGES * kv_tile * (kv_same ? 1 : 2) + fixed; }
};

template <typename T, class C>
__global__ void __launch_bounds__(C::THREADS) decode_kernel(const Args a) {
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel may get scheduled now
  constexpr int D = C::D, N = C::N, LD = C::LD, MB = C::MB;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int rb = blockIdx.x % a.RB, split = blockIdx.x / a.RB, b = blockIdx.y;
  const int row0 = rb * MB, rows = min(MB, a.M - row0), mt_n = (rows + 15) / 16;
  T* Qs = reinterpret_cast<T*>(smem) + C::STAGES * size_t(N) * LD * (a.kv_same ? 1 : 2);  // (MB, LD), after the pipeline
  float* Ss = reinterpret_cast<float*>(Qs + MB * LD);            // (MB, LDS) scores, log2 units
  T* Ps = reinterpret_cast<T*>(Ss + MB * C::LDS);                // (MB, LDP) probabilities
  float *row_m = reinterpret_cast<float*>(Ps + MB * C::LDP), *row_l = row_m + MB, *row_a = row_l + MB;
  // Keys [k0, k1) of the sequence, STAGES of K (and V) tiles; the constructor issues Q's loads.
  const KVChunk<T, C> kv(a, b, split, reinterpret_cast<T*>(smem), Qs, static_cast<const T*>(a.q) + (size_t(b) * a.M + row0) * D, rows);
  const int len = kv.len, k0 = kv.k0, k1 = kv.k1, ntiles = kv.ntiles;
  kv.start();  // the first tiles
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
    if (t + C::STAGES - 1 < ntiles) kv.load(t + C::STAGES - 1);  // so t-1's stage takes a new tile
    cp_async_commit();
    const T* ks = kv.tile(t);
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
  float mx, sum;
  split_weights<128>(ws_lse, rows, row, splits, w_s, stat, mx, sum);
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

template <typename T, class C>
int launch(const MQAParams& p) {
  return launch_split_kv<T, C, kMaxSplits, 128>(p, decode_kernel<T, C>, combine_kernel<T, C::D>);
}

// 32 rows per CTA, 8 warps of 72 output columns, 32-key tiles: 37 KB per K tile. One shared K = V
// tile per stage leaves room for 4 stages in 227 KB; distinct K and V tiles for 2.
template <typename T>
int by_kv(const MQAParams& p) {
  return p.k == p.v ? launch<T, Cfg<576, 32, 8, 2, 4>>(p) : launch<T, Cfg<576, 32, 8, 2, 2>>(p);
}

}  // namespace

int fastmqa_k11_decode_mla(const MQAParams& p) {
  if (p.B < 1 || p.H * p.Sq < 1 || p.Skv < 1 || p.D != 576 || p.block_table) return FASTMQA_UNSUPPORTED;  // no paged cache
  if (p.dtype == FASTMQA_BF16) return by_kv<__nv_bfloat16>(p);
  if (p.dtype == FASTMQA_FP16) return by_kv<__half>(p);
  return FASTMQA_UNSUPPORTED;
}
