// 08_flash_wgmma.cu — fused MQA attention on Hopper's warpgroup tensor cores (sm_90a).
//
// 06_flash_mma.cu's algorithm and row packing (MQA rows (i, h) i-major, so one K/V tile serves
// every head of a few query positions; online softmax in registers; causal tiles skipped), with
// the two tile products on `wgmma.mma_async` (kernels/wgmma.cuh) instead of mma.sync:
//   * a block is 2 warpgroups (8 warps) owning BM = 128 packed rows, 64 each; a warpgroup's
//     S = Q K^T (64 x BN) is D/16 wgmma with both operands read from shared memory through
//     descriptors, no ldmatrix: the tensor cores fetch the operands themselves;
//   * O += P V takes P (S after the softmax, packed to 16 bits) from registers as the A operand
//     and V from shared memory as a transposed ("MN-major") B: V needs no separate layout;
//   * Q, K and V tiles are stored in the 128-byte swizzled layout wgmma's descriptors describe
//     (rows of 64 elements, 16-byte chunk c of row r at c ^ r % 8), K and V double-buffered;
//   * K and V tiles come by TMA: thread 0 issues one copy per 64-column atom from a tensor map
//     (the same 128-byte swizzle; rows past Skv read as zeros), completing on the tile's mbarrier,
//     where every thread used to compute addresses and issue cp.async. Q's rows are packed (i, h)
//     through q's strides, a gather: it stays on cp.async, made visible to the tensor cores by
//     `fence.proxy.async`.
// Not (yet) here: warp specialisation (a producer warp and consumers that overlap one
// warpgroup's softmax with the other's products, with setmaxnreg, as FlashAttention-3 does).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mqa_params.cuh"
#include "flash_block.cuh"  // the block's sequence, rows and key tiles; the launch; the softmax
#include "mma.cuh"    // cp.async, ex2, Mma<T>::pack
#include "wgmma.cuh"  // descriptors, fences, Wgmma<T, N>

namespace {

constexpr int NWG = 2, NT = NWG * 128, BM = NWG * 64;  // 2 warpgroups x 64 packed rows

template <int D, int BN>
struct Cfg {
  static constexpr int KS = D / 16;  // k-steps of S = Q K^T
  static constexpr int NS = BN / 8;  // n8 column groups of S
  static constexpr int KP = BN / 16; // k-steps of O += P V
  static constexpr int NO = D / 8;   // n8 column groups of O
  static constexpr int Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
  static constexpr int SMEM = Q_BYTES + 4 * KV_BYTES + 1024;  // Q, K[2], V[2]; 1024-byte alignment
};

// Rows [j0, j0 + R) of a (Skv, D) matrix into a swizzled tile of R rows; rows past Skv are zeros.
template <int R, int D, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* src, int j0, int Skv, int tid) {
  constexpr int CH = D / 8;
  static_assert(R * CH % NT == 0, "the tile splits evenly over the threads");
#pragma unroll
  for (int it = 0; it < R * CH / NT; ++it) {
    const int idx = tid + it * NT, r = idx / CH, c = idx % CH;
    const bool in = j0 + r < Skv;
    cp_async16(dst + sw128<R>(r, c), src + (size_t)(in ? j0 + r : 0) * D + c * 8, in);
  }
}

// TMA: K and V tiles come by TMA (thread 0 issues both copies of a tile; they complete on the
// tile's mbarriers) instead of every thread's cp.async; Q stays on cp.async (its rows are packed
// (i, h), a gather through q's strides).
template <typename T, int D, int BN, int MINB, bool TMA>
__global__ void __launch_bounds__(NT, MINB)
mqa_flash_wgmma_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       T* __restrict__ o, float* __restrict__ lse, int B, int H, int Sq, int Skv, float scale,
                       int causal, const Strides qs, const Strides os, const __grid_constant__ CUtensorMap tm_k,
                       const __grid_constant__ CUtensorMap tm_v) {
  using C = Cfg<D, BN>;
  extern __shared__ unsigned char smem_raw[];
  __shared__ long long row_q[BM];  // element offset of tile row r in q, or -1 past H * Sq rows
  __shared__ long long row_o[BM];  // ... in o
  __shared__ int row_i[BM];        // its query position i
  const uint32_t sQ = (smem_u32(smem_raw) + 1023) & ~1023u;  // swizzled tiles start 1024-aligned
  const uint32_t sK0 = sQ + C::Q_BYTES, sV0 = sK0 + 2 * C::KV_BYTES;
  __shared__ __align__(8) uint64_t bars[4];  // TMA: K[0], K[1], V[0], V[1] landed
  const uint32_t barK = smem_u32(&bars[0]), barV = smem_u32(&bars[2]);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
  const int g = lane >> 2, tq = lane & 3;
  const FlashBlock<BM, BN> blk(B, H, Sq, Skv, causal);  // as in 06_flash_mma.cu
  const int b = blk.b, m0 = blk.m0, off = blk.off, n_tiles = blk.n_tiles, mask_from = blk.mask_from;
  const T* kb = k + (size_t)b * Skv * D;
  const T* vb = v + (size_t)b * Skv * D;

  // Tile j's K (and V) in buffer j & 1, by TMA: K and V on their own mbarriers (S needs only K).
  auto tma_kv = [&](int j) {
    const uint32_t buf = (j & 1) * C::KV_BYTES, bk = barK + (j & 1) * 8, bv = barV + (j & 1) * 8;
    mbar_arrive_expect_tx(bk, C::KV_BYTES);
#pragma unroll
    for (int a = 0; a < D / 64; ++a) tma_load_3d(sK0 + buf + a * BN * 128, &tm_k, a * 64, j * BN, b, bk);
    mbar_arrive_expect_tx(bv, C::KV_BYTES);
#pragma unroll
    for (int a = 0; a < D / 64; ++a) tma_load_3d(sV0 + buf + a * BN * 128, &tm_v, a * 64, j * BN, b, bv);
  };
  if constexpr (TMA) {
    if (tid == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) mbar_init(smem_u32(&bars[i]), 1);
      mbar_fence_init();
      if (n_tiles > 0) tma_kv(0);
    }
  } else if (n_tiles > 0) {
    load_tile<BN, D>(sK0, kb, 0, Skv, tid);
  }
  if (tid < BM) {
    const int row = m0 + tid, i = row / H, h = row % H;
    row_q[tid] = row < H * Sq ? b * qs.b + h * qs.h + i * qs.s : -1;
    row_o[tid] = row < H * Sq ? b * os.b + h * os.h + i * os.s : -1;
    row_i[tid] = i;
  }
  __syncthreads();
  {
    constexpr int CH = D / 8;
#pragma unroll
    for (int it = 0; it < BM * CH / NT; ++it) {
      const int idx = tid + it * NT, r = idx / CH, c = idx % CH;
      const long long base = row_q[r];
      cp_async16(sQ + sw128<BM>(r, c), q + (base > 0 ? base : 0) + c * 8, base >= 0);
    }
  }
  cp_async_commit();  // group: K[0] and Q
  if (!TMA && n_tiles > 0) load_tile<BN, D>(sV0, vb, 0, Skv, tid);
  cp_async_commit();  // group: V[0]

  // This thread's 2 rows: wg * 64 + (warp % 4) * 16 + g + 8 * hf = warp * 16 + g + 8 * hf.
  int jlim[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = min(row_i[warp * 16 + g + 8 * hf], Sq - 1);
    jlim[hf] = causal ? min(Skv - 1, i + off) : Skv - 1;
  }
  const float scale_log2 = scale * 1.4426950408889634f;
  float acc_o[D / 2], s[BN / 2];
#pragma unroll
  for (int e = 0; e < D / 2; ++e) acc_o[e] = 0.f;
#pragma unroll
  for (int e = 0; e < BN / 2; ++e) s[e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const uint32_t q_rows = sQ + wg * 64 * 128;  // this warpgroup's 64 rows of Q (within each atom)

  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = t * BN;
    const uint32_t sK = sK0 + (t & 1) * C::KV_BYTES, sV = sV0 + (t & 1) * C::KV_BYTES;
    if constexpr (TMA) {
      if (t == 0) {  // Q (cp.async) made visible to the tensor cores
        cp_async_wait_all();
        fence_async_shared();
      }
      mbar_wait(barK + (t & 1) * 8, (t >> 1) & 1);  // K[t] landed
      __syncthreads();  // every warpgroup is done with tile t-1's buffers (and Q is in)
      if (tid == 0 && t + 1 < n_tiles) tma_kv(t + 1);
    } else {
      if (t == 0) cp_async_wait_1();  // Q and K[0]
      else cp_async_wait_all();
      fence_async_shared();
      __syncthreads();  // tile t landed for everyone; every warpgroup is done with tile t-1's buffers
      if (t + 1 < n_tiles) {
        const uint32_t nb = ((t + 1) & 1) * C::KV_BYTES;
        load_tile<BN, D>(sK0 + nb, kb, n0 + BN, Skv, tid);
        load_tile<BN, D>(sV0 + nb, vb, n0 + BN, Skv, tid);
      }
      cp_async_commit();
    }

    // S = Q K^T: (64, BN) per warpgroup; k-step ks reads 16 columns (32 bytes) of a 64-column atom.
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) {
      const uint64_t da = gmma_desc(q_rows + (ks >> 2) * (BM * 128) + (ks & 3) * 32, 16, 1024);
      const uint64_t db = gmma_desc(sK + (ks >> 2) * (BN * 128) + (ks & 3) * 32, 16, 1024);
      Wgmma<T, BN>::ss(s, da, db, ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();

    if (t >= mask_from) {  // only tiles that cross Skv or a causal diagonal
#pragma unroll
      for (int n = 0; n < C::NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n0 + n * 8 + 2 * tq + (e & 1) > jlim[e >> 1]) s[4 * n + e] = -INFINITY;
    }
    float alpha[2];
    quad_softmax<C::NS>(s, m_run, l_run, alpha, scale_log2, ex2);
    uint32_t pa[C::KP][4];  // columns 16kk .. 16kk+15 of P: the A fragment of k-step kk
#pragma unroll
    for (int kk = 0; kk < C::KP; ++kk) {
      pa[kk][0] = Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int n = 0; n < C::NO; ++n) {
        acc_o[4 * n + 0] *= alpha[0];
        acc_o[4 * n + 1] *= alpha[0];
        acc_o[4 * n + 2] *= alpha[1];
        acc_o[4 * n + 3] *= alpha[1];
      }
    }
    if constexpr (TMA) {
      mbar_wait(barV + (t & 1) * 8, (t >> 1) & 1);  // V[t] landed
    } else if (t == 0) {  // V[0]: the group before the one just committed
      cp_async_wait_1();
      fence_async_shared();
      __syncthreads();
    }
    // O += P V: k-step kk is keys 16kk .. 16kk+15 (16 rows of 128 bytes in every atom of V).
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < C::KP; ++kk)
      Wgmma<T, D>::rs(acc_o, pa[kk], gmma_desc(sV + kk * 16 * 128, BN * 128, 1024), 1);
    wgmma_commit();
    wgmma_wait<0>();
  }
  cp_async_wait_all();
  __syncthreads();  // every warpgroup's products are done before Q's tile is reused for staging

  // Epilogue: l over the quad, normalise, stage the warp's 16 rows in its own rows of the Q tile,
  // then 16-byte coalesced stores of whole rows.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = quad_sum(l_run[hf]);
    const float inv = l != 0.f ? 1.f / l : 0.f;  // a row that saw no key: zeros, lse = -inf
    const int r = warp * 16 + g + 8 * hf;
#pragma unroll
    for (int n = 0; n < C::NO; ++n) {
      const uint32_t val = Mma<T>::pack(acc_o[4 * n + 2 * hf] * inv, acc_o[4 * n + 2 * hf + 1] * inv);
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sQ + sw128<BM>(r, n) + tq * 4), "r"(val));
    }
    const int m = m0 + r, i = row_i[r];
    if (lse && tq == 0 && m < H * Sq)
      lse[((size_t)b * H + (m - i * H)) * Sq + i] = l != 0.f ? m_run[hf] * scale + logf(l) : -INFINITY;
  }
  __syncwarp();
  {
    constexpr int CH = D / 8;
#pragma unroll
    for (int it = 0; it < 16 * CH / 32; ++it) {
      const int r = warp * 16 + lane / CH + it * (32 / CH), c = lane % CH;
      const long long base = row_o[r];
      if (base >= 0) {
        uint4 val;
        asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(val.x), "=r"(val.y), "=r"(val.z), "=r"(val.w) : "r"(sQ + sw128<BM>(r, c)));
        *reinterpret_cast<uint4*>(o + base + c * 8) = val;
      }
    }
  }
}

template <typename T, int D, int BN, int MINB, bool TMA = false>
int launch(const MQAParams& p) {
  CUtensorMap tm_k{}, tm_v{};  // unused without TMA
  if (TMA && !(make_tmap_bsd(&tm_k, p.k, p.B, p.Skv, D, BN) && make_tmap_bsd(&tm_v, p.v, p.B, p.Skv, D, BN)))
    return launch<T, D, BN, MINB, false>(p);
  return launch_flash<T, BM, NT>(mqa_flash_wgmma_kernel<T, D, BN, MINB, TMA>, Cfg<D, BN>::SMEM, p, tm_k, tm_v);
}

// Measured on the H100 (scripts/dev_wgmma.py, results/wgmma_dev.json): two CTAs an SM (registers
// capped at 128) beat one CTA with 128-key tiles everywhere: while one CTA waits on its softmax or
// a barrier, the other's products keep the tensor cores busy. D = 128 then takes 64-key tiles;
// D = 64 takes 128-key tiles (with cp.async loads: on rows past 1k keys only, a few spilled registers).
// p.num_splits is unused by a prefill kernel; the dev script passes cfg 1..4 to time the shapes
// (1: the first version, 128-key tiles at one CTA an SM; 2, 3: D = 64 with 128 / 64-key tiles;
// 4: the default shapes with K and V by cp.async instead of TMA).
// K and V come by TMA (results/tma_dev.json: 1.05-1.18x the cp.async loads at every point but the
// shortest D = 64 rows, where the two are within noise); cfg 4 keeps the cp.async version.
template <typename T, bool TMA>
int by_dim(const MQAParams& p, int cfg) {
  if (p.D == 128) return cfg == 1 ? launch<T, 128, 128, 1, TMA>(p) : launch<T, 128, 64, 2, TMA>(p);
  if (p.D == 64) {
    if (cfg == 1) return launch<T, 64, 128, 1, TMA>(p);
    // With cp.async loads (cfg 4) 64-key tiles won up to 1k keys; with TMA 128-key tiles match or
    // beat them at every length (results/tma_shapes_dev.json): cfg 3 keeps 64-key tiles.
    if (cfg == 3 || (!TMA && p.Skv <= 1024)) return launch<T, 64, 64, 2, TMA>(p);
    return launch<T, 64, 128, 2, TMA>(p);
  }
  return FASTMQA_UNSUPPORTED;
}
template <typename T>
int by_dim(const MQAParams& p) {
  return p.num_splits == 4 ? by_dim<T, false>(p, 0) : by_dim<T, true>(p, p.num_splits);
}

}  // namespace

int fastmqa_k08_flash_wgmma(const MQAParams& p) {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major != 9)
    return FASTMQA_UNSUPPORTED;  // wgmma is sm_90a only
  if (p.dtype == FASTMQA_BF16) return by_dim<__nv_bfloat16>(p);
  if (p.dtype == FASTMQA_FP16) return by_dim<__half>(p);
  return FASTMQA_UNSUPPORTED;
}
