// decode_common.cuh — what the two split-KV decode kernels, 10_decode.cu and 11_decode_mla.cu, share:
// the PTX wrappers (cp.async, ldmatrix, mma.sync, ex2), the kernel arguments, a CTA's chunk of the
// cache streamed through a cp.async pipeline, the combine's split weights, the split-count rule and
// the launcher (decode kernel, then the combine by programmatic dependent launch).
// Everything sits in an anonymous namespace, as the rest of each kernel file: internal to its file.
#pragma once
#include "mqa_params.cuh"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <mutex>

#include "mbarrier.cuh"  // mbarrier wrappers (bulk copies)

#ifndef FASTMQA_DECODE_KV_EVICT
#define FASTMQA_DECODE_KV_EVICT -1  // K/V tiles' L2 policy: -1 by size (kv_policy_normal); 0 evict_first, 1 evict_normal (dev variants)
#endif

namespace {

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
// 16-byte async copy; valid = false writes zeros (keys past the chunk: the cache there may hold NaN).
// K/V are read exactly once: evict_first keeps them from pushing Q and the partials out of L2
// (evict_normal for caches many times L2's size: kv_policy_normal).
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
// The bulk copy engine (sm_90): a bulk copy of `bytes` (a multiple of 16, both addresses 16-byte
// aligned) from global to shared memory, counted against an mbarrier (mbarrier.cuh).
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, uint32_t bytes, uint32_t bar, uint64_t policy) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n"
               ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(bar), "l"(policy) : "memory");
}
__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = 0
  float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}

// The 16-bit element type: pack two floats into one register (the lower column in the low half),
// and c += a (16x16, row) b (16x8, col) on tensor cores with fp32 accumulators.
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

struct Args {
  const void *q, *k, *v; void* o; float* lse; const int* seqlens;
  float *ws_o, *ws_lse;        // partials (splits, B, M, D) and (splits, B, M) when splits > 1
  int B, M, Sq, Skv, causal, splits, RB, kv_same;
  float scale_log2;            // softmax scale · log2(e): scores live in log2 units
  const int* block_table;      // paged cache (MQAParams): (B, max_pages) pages; k, v are page pools
  int max_pages, page_size;
  int* counters;               // fused combine: (B, RB) arrival counters, zero between launches; else null
  int kv_normal;               // K/V tiles with L2::evict_normal instead of evict_first (see kv_policy_normal)
};

// A CTA's keys [k0, k1) of sequence b, streamed through a STAGES-deep pipeline. The chunk is the
// sequence's own length (seqlens[b]) cut into `splits` chunks of whole N-key tiles. Tile t is N
// consecutive rows of the cache (one contiguous block) of K, and of V unless k and v are one tensor,
// in stage t % STAGES of Ks. C gives D, N, MB, LD (Q's row pitch), CH (16-byte chunks a row), STAGES,
// THREADS, and the tiles' layout: 16-byte chunk ch of key r of a tile at element C::at(r, ch), the V
// tile (unless kv_same) C::tile_elems after the K tile.
// Two ways to move a tile:
//   * BULK = false: every thread issues 16-byte cp.async (N·CH of them per tile, per tensor), in
//     commit groups; rows past the chunk are zero-filled by the copy itself;
//   * BULK = true: the bulk copy engine, one copy per block of C::BR consecutive keys (the layout
//     must keep such blocks contiguous, unswizzled: at(r, ch) = row(r) + 8·ch and
//     row(r) = row(r - r % BR) + (r % BR)·D), issued by warp 0
//     and completing on the stage's mbarrier (`bars`, STAGES of them in shared memory). Rows past
//     the chunk are zeroed by ordinary stores (V there multiplies P = 0; the cache may hold NaN).
// PAGED = true: k and v are page pools and tile t starts at row block_table[b][j0 / P]·P + j0 % P
// of them (a page holds whole tiles: P is a multiple of N); one table read a tile.
// Use: the constructor, start(), then per tile t: wait(t), __syncthreads(), next(t), compute.
template <typename T, class C, bool BULK = false, bool PAGED = false>
struct KVChunk {
  int len, k0, k1, ntiles;
  size_t stage;  // elements per pipeline stage
  T* Ks;
  const T *kg, *vg;
  int kv_same;  // k and v are one tensor: one tile a stage
  uint64_t kv_policy;  // the K/V tiles' L2 policy: evict_first, or evict_normal where Args::kv_normal
  uint32_t bars;  // BULK: shared-memory address of the first of STAGES mbarriers
  const int* bt;  // PAGED: sequence b's row of the block table
  int P;          // PAGED: tokens a page

  // Issues the cp.async of the CTA's `rows` query rows qg into Qs ((MB, LD), zeros past `rows`;
  // kept in L2, evict_last: every split's CTA reads the same rows) before it reads the sequence's
  // length, so the two memory latencies overlap. start() commits them with the first tile.
  __device__ __forceinline__ KVChunk(const Args& a, int b, int split, T* Ks_, T* Qs, const T* qg, int rows,
                                     uint64_t* bars_ = nullptr)
      : Ks(Ks_), kv_same(a.kv_same), bars(BULK ? smem_u32(bars_) : 0u) {
    constexpr int N = C::N, D = C::D, LD = C::LD;
    {
      uint64_t evict_last;
      asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(evict_last));
      const int tid = threadIdx.x;
#pragma unroll
      for (int it = 0; it < C::MB * C::CH / C::THREADS; ++it) {
        const int c = tid + it * C::THREADS, r = c / C::CH, ch = c % C::CH;
        cp_async16(Qs + r * LD + ch * 8, qg + (r < rows ? size_t(r) * D + ch * 8 : 0), r < rows, evict_last);
      }
    }
    if (BULK && threadIdx.x == 0) {
#pragma unroll
      for (int s = 0; s < C::STAGES; ++s) mbar_init(bars + 8 * s, 1);
      mbar_fence_init();
    }
    len = a.seqlens ? a.seqlens[b] : a.Skv;
    const int chunk = ((len + a.splits - 1) / a.splits + N - 1) / N * N;
    k0 = min(len, split * chunk); k1 = min(len, k0 + chunk); ntiles = (k1 - k0 + N - 1) / N;
    stage = size_t(C::tile_elems) * (kv_same ? 1 : 2);
    if constexpr (PAGED) {  // the pools' first rows; load() adds each tile's page
      kg = static_cast<const T*>(a.k); vg = static_cast<const T*>(a.v);
      bt = a.block_table + size_t(b) * a.max_pages; P = a.page_size;
    } else {
      kg = static_cast<const T*>(a.k) + size_t(b) * a.Skv * C::D;
      vg = static_cast<const T*>(a.v) + size_t(b) * a.Skv * C::D;
    }
    if (a.kv_normal)
      asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(kv_policy));
    else
      asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(kv_policy));
  }
  // PAGED: the first K and V rows of tile t, whose first key is j0 (its page holds the whole tile).
  __device__ __forceinline__ void tile_src(int j0, const T*& kt, const T*& vt) const {
    const size_t row = size_t(bt[j0 / P]) * P + j0 % P;
    kt = kg + row * C::D; vt = vg + row * C::D;
  }
  // Tile t's K; its V follows at + C::tile_elems unless kv_same.
  __device__ __forceinline__ T* tile(int t) const { return Ks + (t % C::STAGES) * stage; }
  __device__ __forceinline__ void load(int t) const {
    constexpr int N = C::N, D = C::D;
    T* ks = tile(t);
    T* vs = ks + C::tile_elems;
    const int j0 = k0 + t * N, tid = threadIdx.x;
    if constexpr (BULK) {
      const int nv = min(N, k1 - j0);  // rows of the chunk in this tile (>= 1: t < ntiles)
      const uint32_t bar = bars + 8 * (t % C::STAGES);
      if (tid == 0) mbar_arrive_expect_tx(bar, uint32_t(nv) * D * sizeof(T) * (kv_same ? 1 : 2));
      static_assert(N % C::BR == 0 && N / C::BR <= 32, "one lane a block");
      if (tid < 32) {
        __syncwarp();  // the expectation is set before any byte can land
        const int r = tid * C::BR, n = min(C::BR, nv - r);
        if (tid < N / C::BR && n > 0) {
          const T *kt = kg + size_t(j0) * D, *vt = vg + size_t(j0) * D;
          if constexpr (PAGED) tile_src(j0, kt, vt);
          bulk_g2s(ks + C::row(r), kt + size_t(r) * D, n * D * sizeof(T), bar, kv_policy);
          if (!kv_same) bulk_g2s(vs + C::row(r), vt + size_t(r) * D, n * D * sizeof(T), bar, kv_policy);
        }
      }
      for (int c = tid; c < (N - nv) * C::CH; c += C::THREADS) {  // rows past the chunk: zeros
        const int r = nv + c / C::CH, ch = c % C::CH;
        *reinterpret_cast<uint4*>(ks + C::at(r, ch)) = make_uint4(0u, 0u, 0u, 0u);
        if (!kv_same) *reinterpret_cast<uint4*>(vs + C::at(r, ch)) = make_uint4(0u, 0u, 0u, 0u);
      }
    } else if constexpr (PAGED) {
      const T *kt, *vt;
      tile_src(j0, kt, vt);
#pragma unroll
      for (int it = 0; it < N * C::CH / C::THREADS; ++it) {
        const int c = tid + it * C::THREADS, r = c / C::CH, ch = c % C::CH;
        const bool ok = j0 + r < k1;
        const size_t off = ok ? size_t(r) * D + ch * 8 : 0;  // rows past the chunk: zero-filled
        cp_async16(ks + C::at(r, ch), kt + off, ok, kv_policy);
        if (!kv_same) cp_async16(vs + C::at(r, ch), vt + off, ok, kv_policy);
      }
    } else {
#pragma unroll
      for (int it = 0; it < N * C::CH / C::THREADS; ++it) {
        const int c = tid + it * C::THREADS, r = c / C::CH, ch = c % C::CH;
        const bool ok = j0 + r < k1;
        const size_t off = ok ? size_t(j0 + r) * D + ch * 8 : 0;
        cp_async16(ks + C::at(r, ch), kg + off, ok, kv_policy);
        if (!kv_same) cp_async16(vs + C::at(r, ch), vg + off, ok, kv_policy);
      }
    }
  }
  // Fill the pipeline: tiles 0 .. STAGES-2 (cp.async: group t holds tile t, group 0 also the query
  // rows the constructor issued).
  __device__ __forceinline__ void start() const {
    if constexpr (BULK) {
      __syncthreads();  // the mbarriers are initialised before warp 0 uses them ... and anyone waits
#pragma unroll
      for (int t = 0; t < C::STAGES - 1; ++t)
        if (t < ntiles) load(t);
      cp_async_commit();  // Q
    } else {
#pragma unroll
      for (int t = 0; t < C::STAGES - 1; ++t) {
        if (t < ntiles) load(t);
        cp_async_commit();
      }
    }
  }
  // Tile t (and at t = 0 the query rows) has landed, for this thread; a __syncthreads() must follow
  // before anyone reads it (other threads' copies, the zeroed rows) or next(t) reuses a stage.
  __device__ __forceinline__ void wait(int t) const {
    if constexpr (BULK) {
      if (t == 0) cp_async_wait<0>();
      mbar_wait(bars + 8 * (t % C::STAGES), (t / C::STAGES) & 1);
    } else {
      cp_async_wait<C::STAGES - 2>();  // all but the newest STAGES-2 groups: tile t is here
    }
  }
  // After the barrier every warp is done with tile t-1, so its stage takes tile t + STAGES - 1.
  __device__ __forceinline__ void next(int t) const {
    if (t + C::STAGES - 1 < ntiles) load(t + C::STAGES - 1);
    if (!BULK) cp_async_commit();
  }
};

// The combine's first half, one CTA of THREADS per query row `row`: the weight w_s = 2^(lse_s - mx)
// of every split s into w_s[], with mx = max_s lse_s; returns mx and sum = sum_s w_s. Empty splits
// (lse = -inf) weigh 0 (their o_s is 0). stat: shared scratch of 2 x THREADS/32 floats.
template <int THREADS>
__device__ __forceinline__ void split_weights(const float* __restrict__ ws_lse, int rows, int row, int splits,
                                              float* w_s, float (*stat)[THREADS / 32], float& mx, float& sum) {
  constexpr int WARPS = THREADS / 32;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  mx = -INFINITY; sum = 0.f;
  for (int s = tid; s < splits; s += THREADS) mx = fmaxf(mx, ws_lse[size_t(s) * rows + row]);
#pragma unroll
  for (int o2 = 16; o2 > 0; o2 /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2));
  if (lane == 0) stat[0][warp] = mx;
  __syncthreads();
  mx = stat[0][0];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) mx = fmaxf(mx, stat[0][w]);
  for (int s = tid; s < splits; s += THREADS) {
    const float w = mx == -INFINITY ? 0.f : fast_exp2(ws_lse[size_t(s) * rows + row] - mx);
    w_s[s] = w; sum += w;
  }
#pragma unroll
  for (int o2 = 16; o2 > 0; o2 /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o2);
  if (lane == 0) stat[1][warp] = sum;
  __syncthreads();
  sum = stat[1][0];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) sum += stat[1][w];
}

// Split count: enough CTAs to fill the resident slots (SMs x CTAs per SM) in whole waves, each split
// at least one tile; among counts that reach 95% of the best wave efficiency, the smallest (fewest
// partials to write and combine). Only counts that are not a smaller count in disguise: splits of
// ceil(tiles / s) tiles each must number s.
int choose_splits(int base, int tiles, int slots, int max_splits) {
  if (10 * base >= 8 * slots || tiles <= 1) return 1;
  const int max_s = min(min(tiles, max_splits), (2 * slots + base - 1) / base);
  auto eff = [&](int s) { float w = float(base) * s / slots; return w / ceilf(w); };
  auto eligible = [&](int s) { const int c = (tiles + s - 1) / s; return (tiles + c - 1) / c == s; };
  float best = 0.f;
  for (int s = 1; s <= max_s; ++s) if (eligible(s)) best = fmaxf(best, eff(s));
  for (int s = 1; s <= max_s; ++s) if (eligible(s) && eff(s) >= 0.95f * best) return s;
  return 1;
}

// The resident slots choose_splits should aim to fill (10_decode's rule, SIZE_TIERS below). Each
// split costs a partial (written, then read by the combine) and lengthens the combine, whose CTAs
// are one per query row: few when base = B·RB row blocks is small. A small cache is then read
// fastest by fewer, longer CTAs: measured on the H100 (results/decode_sweep_dev.json, 22 shapes,
// B = 1..32, S = 2k..64k), half the SMs below 24 MB of K and V, three quarters below 64 MB, all of
// them above, or from 16 row blocks on, was within 1 % of the best split count at every shape as
// fitted; measured again with the rule in place, within 2.5 % at all 22 shapes and 1 % at 18 (the
// plain rule lost up to 18 % at B <= 4). The sizes are taken relative to L2 (50 MB there).
inline int l2_bytes() {  // the device's L2 size (0 if unknown), asked once
  static int l2 = -1;
  if (l2 < 0) {
    int dev = 0, v = 0;
    l2 = cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetAttribute(&v, cudaDevAttrL2CacheSize, dev) == cudaSuccess
             ? v : 0;
  }
  return l2;
}
inline int split_slots(int slots, int base, size_t kv_bytes) {
  const int l2 = l2_bytes();
  if (base >= 16 || l2 <= 0) return slots;
  if (kv_bytes < size_t(l2) / 2) return max(1, slots / 2);
  if (kv_bytes < size_t(l2) * 5 / 4) return max(1, slots * 3 / 4);
  return slots;
}

// The K/V tiles' L2 policy (10_decode's rule, SIZE_TIERS below): evict_first, so that a stream read
// once leaves Q and the partials in L2, except for caches of at least 4x L2 (200 MB on the H100),
// which are read with evict_normal. Measured on the H100 with the benchmark's write flush (~50 MB of
// dirty lines left in L2; scripts/dev_decode_fill.py, results/decode_policy_dev.json): evict_normal
// is 3-5 % faster at 512 MB and 1 GB of K and V, level at 256 MB, and 6-12 % slower at 32-128 MB;
// after a clean flush the two are within 3 % at every point of the decode grid. Under ncu
// (results/decode_policy_ncu_dev.json) evict_first leaves more of the dirty lines in L2 (64 MB:
// 7 MB written back during the kernel against 22), which is its gain on small caches.
inline bool kv_policy_normal(size_t kv_bytes) {
  if (FASTMQA_DECODE_KV_EVICT >= 0) return FASTMQA_DECODE_KV_EVICT == 1;
  const int l2 = l2_bytes();
  return l2 > 0 && kv_bytes >= size_t(4) * l2;
}

// Arrival counters for the fused combine (the last CTA of a row block to finish combines its
// splits): n ints per (device, stream), zeroed once by a memset ordered before the first launch on
// that stream; the last CTA resets its counter, so they are zero again when the kernel ends. A
// stream gets its own counters (two streams may decode at once). Null where none can be had
// (table full, or growing them while the stream is being captured into a graph): the caller then
// uses the combine kernel.
int* split_counters(cudaStream_t stream, int n) {
  struct Slot { int dev; cudaStream_t s; int* p; int n; };
  static Slot slots[32];
  static int used = 0;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return nullptr;
  Slot* slot = nullptr;
  for (int i = 0; i < used; ++i)
    if (slots[i].dev == dev && slots[i].s == stream) slot = &slots[i];
  if (slot && slot->n >= n) return slot->p;
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone) return nullptr;
  if (!slot) {
    if (used == 32) return nullptr;
    slot = &slots[used++];
    *slot = Slot{dev, stream, nullptr, 0};
  }
  if (slot->p) {  // growing: the kernels that use the old counters finish first (cudaFree waits)
    cudaFree(slot->p);
    slot->p = nullptr; slot->n = 0;
  }
  const int want = n > 4096 ? n : 4096;
  if (cudaMalloc(&slot->p, size_t(want) * sizeof(int)) != cudaSuccess) { slot->p = nullptr; return nullptr; }
  if (cudaMemsetAsync(slot->p, 0, size_t(want) * sizeof(int), stream) != cudaSuccess) return nullptr;
  slot->n = want;
  return slot->p;
}

// Launch `decode` (C::THREADS a CTA, C::smem bytes, RB row blocks x splits, B) and, when the keys are
// split, `combine`: one CTA of COMBINE_THREADS per query row, with programmatic dependent launch, so
// its CTAs are scheduled while the decode kernel finishes and wait (griddepcontrol.wait) for the
// partials. With at most FUSE_MAX splits (and counters to be had) the decode kernel combines
// them itself instead (Args::counters): one launch, no combine kernel.
// The workspace holds (splits, B, M, D) partial outputs, then (splits, B, M) lse.
template <typename T, class C, int MAX_SPLITS, int COMBINE_THREADS, bool PAGED = false, int FUSE_MAX = 0,
          bool SIZE_TIERS = false>
int launch_split_kv(const MQAParams& p, void (*decode)(Args),
                    void (*combine)(const float*, const float*, T*, float*, int, int)) {
  const int M = p.H * p.Sq, RB = (M + C::MB - 1) / C::MB;
  const bool kv_same = p.k == p.v;
  const size_t smem = C::smem(kv_same);
  static size_t smem_set = 0;  // the kernel's dynamic shared-memory limit, raised once
  static int occ[2] = {0, 0};  // resident CTAs per SM, for distinct / shared K and V
  if (smem > smem_set) {
    if (cudaFuncSetAttribute(decode, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess)
      return FASTMQA_UNSUPPORTED;
    smem_set = smem;
  }
  if (occ[kv_same] == 0) {
    int n = 1;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode, C::THREADS, smem);
    occ[kv_same] = max(1, min(n, 4));  // fastmqa/kernels.py bounds the workspace assuming <= 4
  }
  const int tiles = max(1, (p.Skv + C::N - 1) / C::N);
  const size_t kv_bytes = size_t(p.B) * p.Skv * C::D * sizeof(T) * (kv_same ? 1 : 2);
  const int slots = SIZE_TIERS ? split_slots(p.num_sms * occ[kv_same], p.B * RB, kv_bytes) : p.num_sms * occ[kv_same];
  int splits = p.num_splits > 0 ? min(min(p.num_splits, tiles), MAX_SPLITS)
                                : choose_splits(p.B * RB, tiles, slots, MAX_SPLITS);
  // 10_decode (SIZE_TIERS): where one CTA a row block already fills 40 % of the slots and a
  // sequence is at most 16 tiles, one split: writing and merging partials costs more than the
  // shorter stream saves (H100, B = 64, S = 1k: 23.3 us against 25.8 with 2 splits; level at 2k).
  if (SIZE_TIERS && p.num_splits <= 0 && splits > 1 && tiles <= 16 && 5 * p.B * RB >= 2 * slots) splits = 1;
  const size_t ws_need = size_t(splits) * p.B * M * (C::D + 1) * sizeof(float);
  if (splits > 1 && (p.workspace == nullptr || p.workspace_bytes < ws_need)) return FASTMQA_UNSUPPORTED;
  Args a{p.q, p.k, p.v, p.o, p.lse, p.seqlens, static_cast<float*>(p.workspace), nullptr,
         p.B, M, p.Sq, p.Skv, p.causal, splits, RB, kv_same, p.scale * kLog2e,
         PAGED ? p.block_table : nullptr, p.max_pages, p.page_size};
  a.counters = nullptr;
  a.kv_normal = SIZE_TIERS && kv_policy_normal(kv_bytes);
  if (splits > 1) {
    a.ws_lse = a.ws_o + size_t(splits) * p.B * M * C::D;
    if (splits <= FUSE_MAX) a.counters = split_counters(p.stream, p.B * RB);
  }
  decode<<<dim3(RB * splits, p.B), C::THREADS, smem, p.stream>>>(a);
  if (splits == 1 || a.counters) return 0;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.B * M); cfg.blockDim = dim3(COMBINE_THREADS); cfg.stream = p.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr; cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, combine, (const float*)a.ws_o, (const float*)a.ws_lse,
                     static_cast<T*>(p.o), p.lse, p.B * M, splits);
  return 0;
}

}  // namespace
