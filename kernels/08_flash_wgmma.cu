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
// Below it, FlashAttention-3's structure (mqa_flash_ws_kernel): a producer warpgroup, setmaxnreg,
// ping-pong consumers, persistent blocks; by_dim sends D = 128 there, and D = 64 rows of at most
// 512 keys on average.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mqa_params.cuh"
#include "flash_block.cuh"  // the block's sequence, rows and key tiles; the launch; the softmax
#include "mma.cuh"    // cp.async, ex2, Mma<T>::pack
#include "wgmma.cuh"  // descriptors, fences, Wgmma<T, N>

// The first key tile of a block (or item) finds O all zeros: its rescale (64 FMULs a thread at
// D = 128, taken since every row's max moves from -inf) is skipped. FASTMQA_RESCALE_FIRST=1 keeps
// it (the comparison build of session 11; the outputs are the same bits).
#ifndef FASTMQA_RESCALE_FIRST
#define FASTMQA_RESCALE_FIRST 0
#endif
// The epilogue stages O with stmatrix (8 instructions a thread at D = 128 instead of 32 stores);
// FASTMQA_STMATRIX=0 keeps the stores (the comparison build of session 11).
#ifndef FASTMQA_STMATRIX
#define FASTMQA_STMATRIX 1
#endif
// With Q and O by TMA (cfgs 15, 16) a consumer warpgroup starts an item without a barrier: its
// rows' positions are computed from the h-major map, not read from a table the warpgroup wrote.
// FASTMQA_ITEM_SYNC=1 keeps the table and its two barriers (the comparison build; same bits).
#ifndef FASTMQA_ITEM_SYNC
#define FASTMQA_ITEM_SYNC 0
#endif

namespace {

constexpr int NWG = 2, NT = NWG * 128, BM = NWG * 64;  // 2 warpgroups x 64 packed rows

template <int N>
struct Width { static constexpr int value = N; };  // a compile-time tile width, as a lambda's argument

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

// Both kernels' epilogue for one warp: its 16 rows of O from row w16 of the block's tile on (l
// summed over the quad, normalised; a row that saw no key gives zeros and lse = -inf), staged in
// the same rows of the swizzled tile at `tile` (the block's Q tile, no longer read), then written
// by 16-byte coalesced stores of whole rows; the lse of each row. hp: 0 if the block's rows are
// packed i-major (row m0 + r is head (m0 + r) % H), else the positions a block holds, its rows
// h-major (row r is position i0 + r % hp of head r / hp; hp a power of two), as Q's TMA box lays
// them out. STAGE: O is left staged (the
// caller stores the tile by TMA).
template <typename T, int D, bool STAGE = false>
__device__ __forceinline__ void store_rows(const float (&acc_o)[D / 2], const float (&m_run)[2], const float (&l_run)[2],
                                           uint32_t tile, int w16, int lane, const long long* row_o, const int* row_i,
                                           T* __restrict__ o, float* __restrict__ lse, int b, int m0, int H, int Sq,
                                           float scale, int hp = 0, int i0 = 0) {
  const int g = lane >> 2, tq = lane & 3;
  float lsum[2], inv[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    lsum[hf] = quad_sum(l_run[hf]);
    inv[hf] = lsum[hf] != 0.f ? 1.f / lsum[hf] : 0.f;
  }
  if (FASTMQA_STMATRIX) {  // column chunks 2j, 2j + 1 of the warp's 16 rows: one stmatrix.x4
    const int rr = w16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int j = 0; j < D / 16; ++j)
      stmatrix_x4(tile + sw128<BM>(rr, 2 * j + (lane >> 4)),
                  Mma<T>::pack(acc_o[8 * j + 0] * inv[0], acc_o[8 * j + 1] * inv[0]),
                  Mma<T>::pack(acc_o[8 * j + 2] * inv[1], acc_o[8 * j + 3] * inv[1]),
                  Mma<T>::pack(acc_o[8 * j + 4] * inv[0], acc_o[8 * j + 5] * inv[0]),
                  Mma<T>::pack(acc_o[8 * j + 6] * inv[1], acc_o[8 * j + 7] * inv[1]));
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = lsum[hf];
    const int r = w16 + g + 8 * hf;
    if (!FASTMQA_STMATRIX) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const uint32_t val = Mma<T>::pack(acc_o[4 * n + 2 * hf] * inv[hf], acc_o[4 * n + 2 * hf + 1] * inv[hf]);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(tile + sw128<BM>(r, n) + tq * 4), "r"(val));
      }
    }
    const int m = m0 + r, i = hp ? i0 + (r & (hp - 1)) : row_i[r], h = hp ? r >> (__ffs(hp) - 1) : m - i * H;
    if (lse && tq == 0 && (hp ? i < Sq : m < H * Sq))
      lse[((size_t)b * H + h) * Sq + i] = l != 0.f ? m_run[hf] * scale + logf(l) : -INFINITY;
  }
  if (STAGE) return;
  __syncwarp();
  constexpr int CH = D / 8;
#pragma unroll
  for (int it = 0; it < 16 * CH / 32; ++it) {
    const int r = w16 + lane / CH + it * (32 / CH), c = lane % CH;
    const long long base = row_o[r];
    if (base >= 0) {
      uint4 val;
      asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(val.x), "=r"(val.y), "=r"(val.z), "=r"(val.w) : "r"(tile + sw128<BM>(r, c)));
      *reinterpret_cast<uint4*>(o + base + c * 8) = val;
    }
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
    const GmmaBase dq(q_rows, 16, 1024), dk(sK, 16, 1024);
#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) {
      const uint64_t da = dq.at((ks >> 2) * (BM * 128) + (ks & 3) * 32);
      const uint64_t db = dk.at((ks >> 2) * (BN * 128) + (ks & 3) * 32);
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
    quad_softmax<C::NS, true>(s, m_run, l_run, alpha, scale_log2, ex2);  // FAST: +1-2 % (results/fast_dev.json)
    uint32_t pa[C::KP][4];  // columns 16kk .. 16kk+15 of P: the A fragment of k-step kk
#pragma unroll
    for (int kk = 0; kk < C::KP; ++kk) {
      pa[kk][0] = Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
    if ((FASTMQA_RESCALE_FIRST || t > 0) && __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
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
    const GmmaBase dv(sV, BN * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < C::KP; ++kk)
      Wgmma<T, D>::rs(acc_o, pa[kk], dv.at(kk * 16 * 128), 1);
    wgmma_commit();
    wgmma_wait<0>();
  }
  cp_async_wait_all();
  __syncthreads();  // every warpgroup's products are done before Q's tile is reused for staging

  // Epilogue: stage the warp's 16 rows in its own rows of the Q tile, then whole-row stores.
  store_rows<T, D>(acc_o, m_run, l_run, sQ, warp * 16, lane, row_o, row_i, o, lse, b, m0, H, Sq, scale);
}

// ---------------------------------------------------------------------------------------------
// Warp specialisation, FlashAttention-3's structure: a block is 3 warpgroups. Warpgroup 0 is the
// producer: it gives most of its registers back (setmaxnreg.dec) and one of its threads streams
// K and V tiles by TMA into a ring of 2 stages, each stage's K and V on "full" mbarriers, and
// waits on "empty" mbarriers before it refills a stage. Warpgroups 1 and 2 are consumers of 64
// rows each, with 240 registers (setmaxnreg.inc): enough for 128-key tiles and, with OVERLAP,
// FlashAttention-3's intra-warpgroup pipelining: S_t = Q K_t^T and O += P_{t-1} V_{t-1} are issued
// together, the softmax of tile t runs while P_{t-1} V_{t-1} is still on the tensor cores.
// PINGPONG orders the two consumers' products on two named barriers (each issues its products
// in turn), so one warpgroup's softmax falls under the other's products.
constexpr int WS_NT = 3 * 128;

template <typename T, int D, int BN, bool OVERLAP, bool PINGPONG, bool PERSIST, bool FAST, int NSTAGE, bool TMAQ,
          bool TMAO, bool HALF>
__global__ void __launch_bounds__(WS_NT, 1)
mqa_flash_ws_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    T* __restrict__ o, float* __restrict__ lse, int B, int H, int Sq, int Skv, float scale,
                    int causal, const Strides qs, const Strides os, const __grid_constant__ CUtensorMap tm_k,
                    const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_q,
                    const __grid_constant__ CUtensorMap tm_o) {
  using C = Cfg<D, BN>;
  extern __shared__ unsigned char smem_raw[];
  __shared__ long long row_o[BM];
  __shared__ int row_i[BM];
  // full K, full V, empty K, empty V: NSTAGE each; TMAQ: full Q, empty Q: one per Q tile
  __shared__ __align__(8) uint64_t bars[4 * NSTAGE + (TMAQ ? 4 : 0)];
  // PERSIST: two Q tiles, the next item's rows load while this one's are in use.
  const uint32_t sQ = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sK0 = sQ + (PERSIST ? 2 : 1) * C::Q_BYTES, sV0 = sK0 + NSTAGE * C::KV_BYTES;
  const uint32_t fullK = smem_u32(&bars[0]), fullV = fullK + 8 * NSTAGE, emptyK = fullV + 8 * NSTAGE,
                 emptyV = emptyK + 8 * NSTAGE, fullQ = emptyV + 8 * NSTAGE, emptyQ = fullQ + 16;
  // TMAQ: Q comes by TMA, one box per 64-column atom holding every head of P = BM / H query
  // positions (H divides BM), rows h-major; the producer loads item n's Q into tile n % 2 once the
  // consumers are done with item n - 2 (its epilogue staged O there), on Q's own mbarriers.
  // TMAO (with TMAQ, H >= 2): each consumer warpgroup stores its 64 staged rows of O (P positions
  // of 64 / P heads) by TMA; one thread issues the store and hands the tile back (empty Q, one
  // arrival a warpgroup) once the store has read it, after it issued the next item's first product.
  constexpr bool REG_ROWS = TMAQ && TMAO && !PINGPONG && !FASTMQA_ITEM_SYNC;
  // The u-th tile a block streams (over all its items) sits in stage u % NSTAGE, that stage's
  // (u / NSTAGE)-th use: its barriers' phase parity.
  auto stage = [](int u) { return u % NSTAGE; };
  auto parity = [](int u) { return (uint32_t)(u / NSTAGE) & 1; };
  const int tid = threadIdx.x;
  // Work items: a (sequence, row block) each, as the non-persistent grid's blocks; PERSIST: one
  // block an SM walks items blockIdx.x, + gridDim.x, ... and its stages' phases run on across them.
  const int nmb = (H * Sq + BM - 1) / BM, n_items = B * nmb;
  const int w0 = blockIdx.x, dw = PERSIST ? (int)gridDim.x : n_items;
  // Item w is row block nmb - 1 - w / B of sequence w % B (FlashBlock). TMAQ (H divides BM, P a
  // power of two): a thread walks its items with (w % B, w / B) carried along, no division an item.
  const int P = TMAQ ? BM / H : 1, lgP = __ffs(P) - 1;
  const int walk_q = dw / B, walk_r = dw % B;
  auto item_block = [&](int w, int wb, int wj) {
    using FB = FlashBlock<BM, BN>;
    return TMAQ ? FB(Sq, Skv, causal, wb, nmb - 1 - wj, typename FB::EveryHead{P}) : FB(B, H, Sq, Skv, causal, w);
  };
  auto walk = [&](int& wb, int& wj) {  // (w % B, w / B) -> ((w + dw) % B, (w + dw) / B)
    wb += walk_r;
    wj += walk_q;
    if (wb >= B) {
      wb -= B;
      ++wj;
    }
  };
  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < 2 * NSTAGE; ++i) mbar_init(fullK + 8 * i, 1);  // the producer's arrive + bytes
#pragma unroll
    for (int i = 2 * NSTAGE; i < 4 * NSTAGE; ++i) mbar_init(fullK + 8 * i, 8);  // one arrival per consumer warp
    if (TMAQ) {
      mbar_init(fullQ, 1);
      mbar_init(fullQ + 8, 1);
      mbar_init(emptyQ, TMAO ? 2 : 8);
      mbar_init(emptyQ + 8, TMAO ? 2 : 8);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (tid < 128) {  // the producer warpgroup
    setmaxnreg_dec<24>();
    if (tid == 0) {
      int u = 0;  // tiles loaded so far
      for (int w = w0, item = 0, wb = w0 % B, wj = w0 / B; w < n_items; w += dw, ++item, walk(wb, wj)) {
        const FlashBlock<BM, BN> blk = item_block(w, wb, wj);
        if (TMAQ) {  // the item's Q into tile item % 2, after item - 2's epilogue
          const int qt = item & 1;
          if (item >= 2) mbar_wait(emptyQ + 8 * qt, ((item >> 1) - 1) & 1);
          mbar_arrive_expect_tx(fullQ + 8 * qt, C::Q_BYTES);
#pragma unroll
          for (int a = 0; a < D / 64; ++a)
            tma_load_4d(sQ + qt * C::Q_BYTES + a * BM * 128, &tm_q, a * 64, blk.i_first, 0, blk.b, fullQ + 8 * qt);
        }
        for (int t = 0; t < blk.n_tiles; ++t, ++u) {
          const int st = stage(u);
          const uint32_t buf = st * C::KV_BYTES, ph = parity(u) ^ 1;  // tile u - NSTAGE's release
          if (u >= NSTAGE) mbar_wait(emptyK + 8 * st, ph);
          mbar_arrive_expect_tx(fullK + 8 * st, C::KV_BYTES);
#pragma unroll
          for (int a = 0; a < D / 64; ++a)
            tma_load_3d(sK0 + buf + a * BN * 128, &tm_k, a * 64, t * BN, blk.b, fullK + 8 * st);
          if (u >= NSTAGE) mbar_wait(emptyV + 8 * st, ph);
          mbar_arrive_expect_tx(fullV + 8 * st, C::KV_BYTES);
#pragma unroll
          for (int a = 0; a < D / 64; ++a)
            tma_load_3d(sV0 + buf + a * BN * 128, &tm_v, a * 64, t * BN, blk.b, fullV + 8 * st);
        }
      }
    }
    return;
  }
  setmaxnreg_inc<240>();

  // A consumer: warp cw (0..7) of the two consumer warpgroups, warpgroup c owns rows 64c .. 64c+63.
  const int ctid = tid - 128, cw = ctid >> 5, lane = tid & 31, c = cw >> 2, lt = ctid & 127;
  const int g = lane >> 2, tq = lane & 3;
  const float scale_log2 = scale * 1.4426950408889634f;
  uint32_t q_rows = sQ + c * 64 * 128;  // this warpgroup's rows of the item's Q tile
  float acc_o[D / 2], s[BN / 2], alpha[2], m_run[2], l_run[2];
  uint32_t pa[C::KP][4];
  int jlim[2], mask_from = 0;

  // Ping-pong: consumer c issues its products between turn_begin and turn_end; consumer 1 lets
  // consumer 0 go first. Both visit the same items and tiles, so the turns pair up.
  auto turn_begin = [&] { if (PINGPONG) named_sync(1 + c, 256); };
  auto turn_end = [&] { if (PINGPONG) named_arrive(2 - c, 256); };
  // A tile's products, softmax and packing at width NW: BN keys, or (HALF) BN / 2 for an item's
  // last tile when no row sees a key past its first half; w is Width<NW>.
  auto issue_s = [&](int u, auto w) {
    constexpr int NW = decltype(w)::value;
    const uint32_t sK = sK0 + stage(u) * C::KV_BYTES;
    const GmmaBase dq(q_rows, 16, 1024), dk(sK, 16, 1024);
#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) {
      const uint64_t da = dq.at((ks >> 2) * (BM * 128) + (ks & 3) * 32);
      const uint64_t db = dk.at((ks >> 2) * (BN * 128) + (ks & 3) * 32);
      Wgmma<T, NW>::ss(*reinterpret_cast<float(*)[NW / 2]>(s), da, db, ks > 0);
    }
    wgmma_commit();
  };
  auto issue_pv = [&](int u, auto w) {
    constexpr int NW = decltype(w)::value;
    const uint32_t sV = sV0 + stage(u) * C::KV_BYTES;
    const GmmaBase dv(sV, BN * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < NW / 16; ++kk)
      Wgmma<T, D>::rs(acc_o, pa[kk], dv.at(kk * 16 * 128), 1);
    wgmma_commit();
  };
  auto release = [&](uint32_t bar) {  // this warp is done reading the stage's buffer
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  auto softmax = [&](int t, auto w) {  // S_t -> P_t (fp32, in s), alpha, m_run, l_run
    constexpr int NW = decltype(w)::value;
    if (t >= mask_from) {
      const int n0 = t * BN;
#pragma unroll
      for (int n = 0; n < NW / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n0 + n * 8 + 2 * tq + (e & 1) > jlim[e >> 1]) s[4 * n + e] = -INFINITY;
    }
    quad_softmax<NW / 8, FAST>(s, m_run, l_run, alpha, scale_log2, ex2);
  };
  auto rescale_pack = [&](bool first, auto w) {  // first: the item's first tile, O still zero
    constexpr int NW = decltype(w)::value;
    if ((FASTMQA_RESCALE_FIRST || !first) && __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int n = 0; n < C::NO; ++n) {
        acc_o[4 * n + 0] *= alpha[0];
        acc_o[4 * n + 1] *= alpha[0];
        acc_o[4 * n + 2] *= alpha[1];
        acc_o[4 * n + 3] *= alpha[1];
      }
    }
#pragma unroll
    for (int kk = 0; kk < NW / 16; ++kk) {
      pa[kk][0] = Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  constexpr Width<BN> w_full{};
  constexpr Width<BN / 2> w_half{};

  // An item's 64 rows of this warpgroup into the Q tile at dst, by cp.async (one commit group).
  auto load_q = [&](const FlashBlock<BM, BN>& blk, uint32_t dst) {
    constexpr int CH = D / 8;
#pragma unroll
    for (int it = 0; it < 64 * CH / 128; ++it) {
      const int idx = lt + it * 128, r = c * 64 + idx / CH, ch = idx % CH;
      const int row = blk.m0 + r, i = row / H, h = row % H;
      const bool in = row < H * Sq;
      cp_async16(dst + sw128<BM>(r, ch), q + (in ? blk.b * qs.b + h * qs.h + i * qs.s : 0) + ch * 8, in);
    }
    cp_async_commit();
  };

  if (PINGPONG && c == 1) named_arrive(1, 256);
  int u0 = 0;  // tiles consumed before this item (the producer's count)
  int staged = -1;  // TMAO: the Q tile whose O store thread lt == 0 has yet to see read
  auto release_staged = [&] {
    if (TMAO && lt == 0 && staged >= 0) {
      bulk_wait_read<0>();
      mbar_arrive(emptyQ + 8 * staged);
    }
    staged = -1;
  };
  if (PERSIST && !TMAQ && w0 < n_items) load_q(FlashBlock<BM, BN>(B, H, Sq, Skv, causal, w0), sQ);
  for (int w = w0, item = 0, wb = w0 % B, wj = w0 / B; w < n_items; w += dw, ++item, walk(wb, wj)) {
    const FlashBlock<BM, BN> blk = item_block(w, wb, wj);
    const int b = blk.b, m0 = blk.m0, off = blk.off, n_tiles = blk.n_tiles;
    const uint32_t sQn = sQ + (PERSIST ? (item & 1) * C::Q_BYTES : 0);  // this item's Q tile
    q_rows = sQn + c * 64 * 128;
    mask_from = blk.mask_from;
    // REG_ROWS: a thread's rows' positions come from the h-major map in registers, so no table
    // and no warpgroup barrier at the item's start (Q arrives on its mbarrier, O leaves by TMA).
    // Otherwise the warpgroup rewrites the table once it is done with the last item (its
    // epilogue, its rows: the first barrier), and the second barrier publishes the table (and,
    // without TMA, the item's Q).
    if (!REG_ROWS) named_sync(3 + c, 128);
    if (!REG_ROWS && TMAQ && lt < 64) {  // rows h-major: row r is position i_first + r % P of head r / P
      const int r = c * 64 + lt, i = blk.i_first + (r & (P - 1)), h = r >> lgP;
      row_o[r] = i < Sq ? b * os.b + h * os.h + i * os.s : -1;
      row_i[r] = i;
    } else if (!REG_ROWS && lt < 64) {
      const int r = c * 64 + lt, row = m0 + r, i = row / H, h = row % H;
      row_o[r] = row < H * Sq ? b * os.b + h * os.h + i * os.s : -1;
      row_i[r] = i;
    }
    if (TMAQ) {
      mbar_wait(fullQ + 8 * (item & 1), (item >> 1) & 1);  // this item's Q landed (TMA)
    } else if (!PERSIST) {
      load_q(blk, sQn);
      cp_async_wait_all();
    } else if (w + dw < n_items) {  // the next item's Q into the other tile, under this item
      load_q(FlashBlock<BM, BN>(B, H, Sq, Skv, causal, w + dw), sQ + ((item + 1) & 1) * C::Q_BYTES);
      cp_async_wait_1();
    } else {
      cp_async_wait_all();
    }
    if (!TMAQ) fence_async_shared();  // this item's Q (cp.async), visible to the tensor cores
    if (!REG_ROWS) named_sync(3 + c, 128);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = cw * 16 + g + 8 * hf;
      const int i = min(REG_ROWS ? blk.i_first + (r & (P - 1)) : row_i[r], Sq - 1);
      jlim[hf] = causal ? min(Skv - 1, i + off) : Skv - 1;
      m_run[hf] = -INFINITY;
      l_run[hf] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < D / 2; ++e) acc_o[e] = 0.f;

    if (OVERLAP) {
      if (n_tiles > 0) {
        // HALF: the item's last tile at half width where no row sees a key in its second half.
        // Not with the ping-pong, nor at D = 64 (the two-CTA kernel's): there the second width
        // costs ptxas the registers of the wgmma pipeline (C7511) and serialises it.
        constexpr bool HALF_ = HALF && !PINGPONG && D == 128;
        const bool half = HALF_ && blk.kv_end - (n_tiles - 1) * BN <= BN / 2;
        auto first = [&](auto w) {  // tile 0: S, its softmax
          mbar_wait(fullK + 8 * stage(u0), parity(u0));
          turn_begin();
          wgmma_fence();
          issue_s(u0, w);
          turn_end();
          release_staged();  // (TMAO) under the product
          wgmma_wait<0>();
          release(emptyK + 8 * stage(u0));
          softmax(0, w);
          rescale_pack(true, w);
        };
        auto step = [&](int t, auto w) {  // tile t >= 1 at width w; tile t - 1 is full
          const int u = u0 + t, st = stage(u), sp = stage(u - 1);
          mbar_wait(fullK + 8 * st, parity(u));
          turn_begin();
          wgmma_fence();
          issue_s(u, w);                                     // S_t = Q K_t^T ...
          mbar_wait(fullV + 8 * sp, parity(u - 1));
          issue_pv(u - 1, w_full);                           // ... and O += P_{t-1} V_{t-1}
          turn_end();
          wgmma_wait<1>();                                   // S_t is done
          release(emptyK + 8 * st);
          softmax(t, w);                                     // under P_{t-1} V_{t-1}
          wgmma_wait<0>();
          release(emptyV + 8 * sp);
          rescale_pack(false, w);
        };
        auto last_pv = [&](auto w) {
          const int ul = u0 + n_tiles - 1;
          mbar_wait(fullV + 8 * stage(ul), parity(ul));
          turn_begin();
          wgmma_fence();
          issue_pv(ul, w);
          turn_end();
          wgmma_wait<0>();
          release(emptyV + 8 * stage(ul));
        };
        if constexpr (HALF_) {
          if (n_tiles == 1 && half) first(w_half);
          else first(w_full);
          for (int t = 1; t < n_tiles; ++t) {
            if (t == n_tiles - 1 && half) step(t, w_half);
            else step(t, w_full);
          }
          if (half) last_pv(w_half);
          else last_pv(w_full);
        } else {
          first(w_full);
          for (int t = 1; t < n_tiles; ++t) step(t, w_full);
          last_pv(w_full);
        }
      }
    } else {
      for (int t = 0; t < n_tiles; ++t) {
        const int u = u0 + t, st = stage(u);
        mbar_wait(fullK + 8 * st, parity(u));
        turn_begin();
        wgmma_fence();
        issue_s(u, w_full);
        turn_end();
        wgmma_wait<0>();
        release(emptyK + 8 * st);
        softmax(t, w_full);
        rescale_pack(t == 0, w_full);
        mbar_wait(fullV + 8 * st, parity(u));
        turn_begin();
        wgmma_fence();
        issue_pv(u, w_full);
        turn_end();
        wgmma_wait<0>();
        release(emptyV + 8 * st);
      }
    }
    u0 += n_tiles;

    // Epilogue: each warp stages its own 16 rows in this item's Q tile, then whole-row stores.
    release_staged();  // (TMAO: no product issued this item)
    store_rows<T, D, TMAO>(acc_o, m_run, l_run, sQn, cw * 16, lane, row_o, row_i, o, lse, b, m0, H, Sq, scale,
                           TMAQ ? P : 0, blk.i_first);
    if (TMAO) {  // the warpgroup's rows staged (visible to TMA), then one thread stores them
      fence_async_shared();
      named_sync(3 + c, 128);
      if (lt == 0) {
#pragma unroll
        for (int a = 0; a < D / 64; ++a) tma_store_4d(&tm_o, sQn + a * BM * 128 + c * 64 * 128, a * 64, blk.i_first, (c * 64) >> lgP, b);
        bulk_commit();
      }
      staged = item & 1;
    } else if (TMAQ) {  // the tile may take item + 2's Q (TMA writes: order this warp's accesses first)
      fence_async_shared();
      release(emptyQ + 8 * (item & 1));
    }
  }
  if (TMAO && lt == 0) bulk_wait<0>();  // the last stores complete
  if (PINGPONG && c == 0) named_sync(1, 256);  // consumer 1's first arrival
}

template <typename T, int D, int BN, bool OVERLAP, bool PINGPONG, bool PERSIST = false, bool FAST = false, int NSTAGE = 2,
          bool TMAQ = false, bool TMAO = false, bool HALF = false>
int launch_ws(const MQAParams& p) {
  CUtensorMap tm_k{}, tm_v{}, tm_q{}, tm_o{};
  if (!(make_tmap_bsd(&tm_k, p.k, p.B, p.Skv, D, BN) && make_tmap_bsd(&tm_v, p.v, p.B, p.Skv, D, BN)))
    return FASTMQA_UNSUPPORTED;
  if constexpr (TMAQ) {  // Q by TMA where H divides the block's rows and q's strides suit TMA; else by cp.async
    if (BM % p.H != 0 || !make_tmap_bhsd(&tm_q, p.q, p.B, p.H, p.Sq, D, p.q_sb, p.q_sh, p.q_ss, BM / p.H, p.H))
      return launch_ws<T, D, BN, OVERLAP, PINGPONG, PERSIST, FAST, NSTAGE, false, false, false>(p);
  }
  if constexpr (TMAO) {  // O by TMA where a warpgroup's 64 rows are whole heads (H >= 2); else stores
    if (p.H < 2 || !make_tmap_bhsd(&tm_o, p.o, p.B, p.H, p.Sq, D, p.o_sb, p.o_sh, p.o_ss, BM / p.H, 64 / (BM / p.H)))
      return launch_ws<T, D, BN, OVERLAP, PINGPONG, PERSIST, FAST, NSTAGE, TMAQ, false, false>(p);
  }
  auto kern = mqa_flash_ws_kernel<T, D, BN, OVERLAP, PINGPONG, PERSIST, FAST, NSTAGE, TMAQ, TMAO, HALF>;
  int grid = 0;
  if (PERSIST) {
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return FASTMQA_UNSUPPORTED;
    grid = sms;
  }
  using C = Cfg<D, BN>;  // Cfg::SMEM counts one Q tile and 2 stages
  return launch_flash<T, BM, WS_NT>(kern, C::SMEM + (PERSIST ? C::Q_BYTES : 0) + (NSTAGE - 2) * 2 * C::KV_BYTES, p, grid,
                                    tm_k, tm_v, tm_q, tm_o);
}

template <typename T, int D, int BN, int MINB, bool TMA = false>
int launch(const MQAParams& p) {
  CUtensorMap tm_k{}, tm_v{};  // unused without TMA
  if (TMA && !(make_tmap_bsd(&tm_k, p.k, p.B, p.Skv, D, BN) && make_tmap_bsd(&tm_v, p.v, p.B, p.Skv, D, BN)))
    return launch<T, D, BN, MINB, false>(p);
  return launch_flash<T, BM, NT>(mqa_flash_wgmma_kernel<T, D, BN, MINB, TMA>, Cfg<D, BN>::SMEM, p, 0, tm_k, tm_v);
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
// The warp-specialised kernel, one idea at a time (scripts/dev_wgmma.py --cfgs, dev_ws_time.py;
// results/ws_dev*.json, ws_time_dev.json): 5 = producer + 2 consumers, 128-key tiles; 6 = + the
// intra-warpgroup overlap; 7 = + ping-pong; 10 = 7 persistent (one block an SM, the next item's Q
// loaded under this one); 11 = 7 with quad_softmax's FAST exponent; 12 = 10 + 11; 13 = 12 with Q by
// TMA (the producer loads each item's rows, h-major, on Q's own mbarriers); 14 = 13 with O stored
// by TMA; 15 = 14 without the ping-pong; 16 = 15 with an item's last key tile at half width where
// no row sees its second half (D = 128). Each falls back to the one before where H does not divide
// the block's 128 rows, H = 1 for O, or q's / o's strides do not suit TMA (16 to 15's fallbacks).
template <typename T, int D>
int ws_cfg(const MQAParams& p, int cfg) {
  switch (cfg) {
    case 5: return launch_ws<T, D, 128, false, false>(p);
    case 6: return launch_ws<T, D, 128, true, false>(p);
    case 7: return launch_ws<T, D, 128, true, true>(p);
    case 10: return launch_ws<T, D, 128, true, true, true>(p);
    case 11: return launch_ws<T, D, 128, true, true, false, true>(p);
    case 12: return launch_ws<T, D, 128, true, true, true, true>(p);
    case 13: return launch_ws<T, D, 128, true, true, true, true, 2, true>(p);
    case 14: return launch_ws<T, D, 128, true, true, true, true, 2, true, true>(p);
    case 15: return launch_ws<T, D, 128, true, false, true, true, 2, true, true>(p);
    case 16: return launch_ws<T, D, 128, true, false, true, true, 2, true, true, true>(p);
    default: return FASTMQA_UNSUPPORTED;
  }
}
// Measured (results/ws_time_dev.json, 3 alternating rounds): at D = 128 cfg 12 is 1.06-1.14x the
// two-CTA kernel once a row sees >= 1024 keys on average (non-causal S >= 1024, causal S >= 4096;
// level at causal 2048), 0.85-0.98x on shorter rows. Session 11 (scripts/dev_short_rows.py,
// paired repetitions; results/short_rows_dev.json): the consumers' Q gather (cp.async, address
// arithmetic a 16-byte chunk) and O stores were the short rows' cost; with both by TMA (cfg 14)
// D = 128 is 1.02-1.20x the two-CTA kernel at every length (0.89-1.05x cuDNN). Without the
// consumers' copies the ping-pong no longer pays (results/pingpong_dev.json): cfg 15 is 1.00-1.03x
// cfg 14 (most from 2048 keys on) and takes every D = 128 call; at D = 64 the two-CTA kernel stays
// ahead (cfg 14 0.74-0.79x cuDNN at S = 512 against its 0.87-0.91x). Session 12: cfg 16 (half last
// tiles) takes causal D = 128 calls: 1.02x cfg 15 at S = 512 (results/narrow_dev.txt); without the
// item barriers (results/itemsync_dev.txt) and the item walk's divisions (results/walk_dev.txt)
// causal D = 128 went from 0.96 to 1.07x cuDNN at S = 512, and at D = 64 the warp-specialised
// kernel now beats the two-CTA one on short rows (results/d64_dev.txt).
template <typename T>
int by_dim(const MQAParams& p) {
  if (p.num_splits >= 5) {
    if (p.D == 128) return ws_cfg<T, 128>(p, p.num_splits);
    if (p.D == 64) return ws_cfg<T, 64>(p, p.num_splits);
    return FASTMQA_UNSUPPORTED;
  }
  if (p.num_splits == 0 && p.D == 128) {
    const int r = ws_cfg<T, 128>(p, p.causal ? 16 : 15);
    if (r != FASTMQA_UNSUPPORTED) return r;  // else (no tensor map for K, V) the two-CTA kernel below
  }
  // D = 64: the warp-specialised kernel where a row sees at most 512 keys on average (causal
  // S <= 1024, else S <= 512), the two-CTA kernel on longer rows (results/d64_dev.json).
  if (p.num_splits == 0 && p.D == 64 && (p.causal ? p.Skv / 2 : p.Skv) <= 512) {
    const int r = ws_cfg<T, 64>(p, 15);
    if (r != FASTMQA_UNSUPPORTED) return r;
  }
  return p.num_splits == 4 ? by_dim<T, false>(p, 0) : by_dim<T, true>(p, p.num_splits);
}

}  // namespace

int fastmqa_k08_flash_wgmma(const MQAParams& p) {
  if (!device_is_sm90()) return FASTMQA_UNSUPPORTED;  // wgmma is sm_90a only
  if (p.dtype == FASTMQA_BF16) return by_dim<__nv_bfloat16>(p);
  if (p.dtype == FASTMQA_FP16) return by_dim<__half>(p);
  return FASTMQA_UNSUPPORTED;
}
