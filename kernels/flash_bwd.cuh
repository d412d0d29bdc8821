// flash_bwd.cuh — the backward pass of the fused prefill kernels (FlashAttention-2's algorithm, with
// the MQA reduction of dK and dV over the heads done inside the kernel), written once for two sets
// of tile products: mma.sync (07_flash_bwd.cu, the backward of 06_flash_mma) and Hopper's wgmma
// (12_flash_bwd_wgmma.cu, the backward of 08_flash_wgmma).
//
// Given q, k, v, the forward's output o and log-sum-exp lse, and the upstream gradient dO:
//   P  = exp(S * scale - lse)           recomputed tile by tile, never stored (S = Q K^T)
//   dV = sum_h P^T dO                   one K/V head serves all H heads: sum their contributions
//   dP = dO V^T,  delta = rowsum(dO * O) - dlse
//   dS = P * (dP - delta)
//   dQ = scale * dS K,   dK = scale * sum_h dS^T Q
// Three kernels, in stream order, no atomics (so the result is deterministic):
//   * prep: delta and lse in log2 units per query row, padded to whole row blocks (+inf for
//     padding and for rows that saw no key, so their P is exactly 0);
//   * dkdv: one CTA per (64-key tile, head group, batch), 4 warps of 16 keys each. K and V stay in
//     shared memory while the CTA sweeps every (head of its group, 64-row query block) that sees its
//     keys; Q and dO blocks are double-buffered by cp.async. With one group (all H heads) it writes
//     dK and dV; with several (small B * Skv, or a causal mask: see head_groups) fp32 partials that
//     a small kernel sums in a fixed order. Per block the CTA computes S^T = K Q^T and
//     dP^T = V dO^T (64 x 64, 16 keys a warp, registers), then dV += P^T dO and dK += dS^T Q with
//     the P^T / dS^T accumulators fed straight back as A operands (06's register trick), so dK and
//     dV (16 x D a warp, fp32) never leave registers until the end;
//   * dq: one CTA per (64-row query block, head, batch), 4 warps of 16 rows; the K/V sweep of
//     06_flash_mma, computing S and dP and accumulating dQ += dS K.
// q, and o, dout and dq (which share one layout), are read and written through their strides, like
// 06's q and o: a layer's (B, S, H, D) projections need no transposing copies. k, v, dk, dv are
// contiguous.
// Exponents follow the course convention (round(s * scale_log2) - lse2, unfused), clamped at 0:
// P <= 1 always, so a gradient stays finite even where lse has lost its precision.
//
// The tile products come from a class Gm = Products<T, D> that the kernel file defines:
//   D, ALIGN         the head dim; extra bytes of dynamic shared memory to align the tiles;
//   PIPE_KV, PIPE_Q  whether a block's last products may run on under the next block's first ones
//                    (dK/dV kernel, dQ kernel);
//   MINB             CTAs an SM should hold (__launch_bounds__: registers a thread <= 64K / (128 MINB));
//   pad(smem)        bytes from the dynamic shared memory's start to the first tile;
//   off(r, ch)       byte offset of 16-byte chunk ch of row r in a 64-row tile (its swizzle);
//   Ctx(lane)        per-thread state of the products (07: ldmatrix lane offsets);
//   Frag             acc_y's packed A operand, kept alive by the caller until its product is done;
//   landed()         after cp.async has landed a tile, before the block's barrier;
//   xyt(acc, x, xrow, y, ctx)    acc (this warp's 16 rows x 64) = rows of tile x * (tile y)^T;
//   acc_y(acc, p, y, ctx, frag)  acc (16 x D) += p (16 x 64, 16-bit-rounded, packed into frag) * tile y;
//   wait<N>()        until at most N of the products issued are still running (07's run at once:
//                    a no-op; wgmma's are asynchronous: their registers are not touched before).
// Both follow mma.sync's m16n8 accumulator layout: acc[n][e] is row 16 warp + lane/4 + 8 (e/2),
// column 8n + 2 (lane%4) + e%2, so everything between the products is shared.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mqa_params.cuh"
#include "mma.cuh"  // cp.async, ex2, Mma<T>::pack / unpack

namespace {

constexpr int NW = 4, NT = NW * 32;  // 4 warps (one warpgroup)
constexpr int BM = 64, BN = 64;      // query rows / keys per tile
constexpr float kLog2e = 1.4426950408889634f;

// Rows [r0, r0 + 64) of a (rows, D) matrix at src with row stride ld (elements) into a tile in
// Gm's layout; rows >= n are zeros.
template <class Gm, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* src, int r0, int n, long long ld, int tid) {
  constexpr int CH = Gm::D / 8;
  static_assert(64 * CH % NT == 0, "the tile splits evenly over the threads");
  const int c = tid % CH;
#pragma unroll
  for (int it = 0; it < 64 * CH / NT; ++it) {
    const int r = tid / CH + it * (NT / CH);
    const bool in = r0 + r < n;
    cp_async16(dst + Gm::off(r, c), src + (in ? r0 + r : 0) * ld + c * 8, in);
  }
}

struct BwdArgs {
  const void *q, *k, *v, *o, *dout;
  const float *lse, *dlse;
  void *dq, *dk, *dv;
  float *lse2, *delta;  // workspace: (B, H, SqP) each, SqP = Sq rounded up to BM
  int B, H, Sq, Skv, SqP, causal;
  float scale;
  long long sb, sh, ss;     // element strides of the (B, H, Sq) dims of o, dout and dq (alike)
  long long qsb, qsh, qss;  // ... and of q
  int G, HG;                // head groups of the dK/dV kernel (HG heads each); G > 1: fp32 partials
  float *part_k, *part_v;   // workspace: (G, B, Skv, D) each when G > 1
};

// delta = rowsum(dO * O) - dlse and lse2 = lse * log2(e) per row; padding rows and rows that saw
// no key (lse = -inf) get lse2 = +inf (P = 0) and delta = 0. One warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(256) bwd_prep_kernel(const BwdArgs a) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;  // row of (B*H, SqP)
  if (row >= a.B * a.H * a.SqP) return;
  const int bh = row / a.SqP, i = row % a.SqP;
  float dot = 0.f;
  const bool in = i < a.Sq;
  const size_t r = (size_t)bh * a.Sq + i;  // lse, dlse: contiguous (B, H, Sq)
  if (in) {
    constexpr int PER = D / 32;  // 2 or 4 elements a lane
    const long long at = (bh / a.H) * a.sb + (bh % a.H) * a.sh + i * a.ss + lane * PER;
    const T* dop = static_cast<const T*>(a.dout) + at;
    const T* op = static_cast<const T*>(a.o) + at;
#pragma unroll
    for (int e = 0; e < PER; e += 2) {
      const float2 x = Mma<T>::unpack(*reinterpret_cast<const uint32_t*>(dop + e));
      const float2 y = Mma<T>::unpack(*reinterpret_cast<const uint32_t*>(op + e));
      dot += x.x * y.x + x.y * y.y;
    }
  }
#pragma unroll
  for (int o2 = 16; o2 > 0; o2 /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o2);
  if (lane == 0) {
    const float l = in ? a.lse[r] : -INFINITY;
    a.lse2[row] = l == -INFINITY ? INFINITY : l * kLog2e;
    a.delta[row] = in ? dot - (a.dlse ? a.dlse[r] : 0.f) : 0.f;
  }
}

// P (fp32, in place of the scores) = 2^min(0, round(s * scale_log2) - lse2) with the masked elements 0;
// lse2_of(n, e) is the row's lse2, masked(n, e) says which elements the mask removes.
template <class LseFn, class MaskFn>
__device__ __forceinline__ void softmax_p(float (&s)[8][4], float scale_log2, LseFn lse2_of, bool need_mask,
                                          MaskFn masked) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float x = fminf(__fmul_rn(s[n][e], scale_log2) - lse2_of(n, e), 0.f);
      s[n][e] = (need_mask && masked(n, e)) ? 0.f : ex2(x);
    }
}

// dK, dV: CTA (key tile, batch); warp w owns keys j0 + 16w .. +15.
template <typename T, int D, class Gm>
__global__ void __launch_bounds__(NT, Gm::MINB) bwd_dkdv_kernel(const BwdArgs a) {
  constexpr int TILE = BM * D * 2;  // bytes of one 64-row tile (BM == BN)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + Gm::pad(smem_raw);  // the tiles' start (wgmma: 1024-aligned)
  const uint32_t sK = smem_u32(smem), sV = sK + TILE, sQ0 = sV + TILE, sO0 = sQ0 + 2 * TILE;  // sO: dO
  float* s_l2 = reinterpret_cast<float*>(smem + 6 * TILE);  // [2][BM]
  float* s_dl = s_l2 + 2 * BM;                               // [2][BM]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  // CTA (key tile, head group, batch), low key tiles (most rows under a causal mask) first.
  const int b = blockIdx.x % a.B, grp = (blockIdx.x / a.B) % a.G, j0 = (blockIdx.x / (a.B * a.G)) * BN;
  const int h0 = grp * a.HG, nh = max(0, min(a.H, h0 + a.HG) - h0);
  const int off = a.Skv - a.Sq, nblk = a.SqP / BM;
  // Query blocks that see any key of this tile: i + off >= j0.
  const int ib0 = a.causal ? max(0, j0 - off) / BM : 0;
  const int per_h = max(0, nblk - ib0), n_it = nh * per_h;
  const T* kb = static_cast<const T*>(a.k) + (size_t)b * a.Skv * D;
  const T* vb = static_cast<const T*>(a.v) + (size_t)b * a.Skv * D;
  const T* qb = static_cast<const T*>(a.q) + b * a.qsb;
  const T* ob = static_cast<const T*>(a.dout) + b * a.sb;
  const float* l2b = a.lse2 + (size_t)b * a.H * a.SqP;
  const float* dlb = a.delta + (size_t)b * a.H * a.SqP;

  auto load_block = [&](int it, int buf) {  // iteration it = (head, query block)
    const int h = h0 + it / per_h, i0 = (ib0 + it % per_h) * BM;
    load_tile<Gm>(sQ0 + buf * TILE, qb + h * a.qsh, i0, a.Sq, a.qss, tid);
    load_tile<Gm>(sO0 + buf * TILE, ob + h * a.sh, i0, a.Sq, a.ss, tid);
    if (tid < 2 * BM / 4) {  // 16 chunks of lse2, then 16 of delta (SqP is a multiple of BM: aligned)
      const int c = tid % 16;
      const float* src = (tid < 16 ? l2b : dlb) + (size_t)h * a.SqP + i0 + 4 * c;
      cp_async16(smem_u32((tid < 16 ? s_l2 : s_dl) + buf * BM + 4 * c), src, true);
    }
  };

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  if (n_it > 0) {
    load_tile<Gm>(sK, kb, j0, a.Skv, D, tid);
    load_tile<Gm>(sV, vb, j0, a.Skv, D, tid);
    load_block(0, 0);
  }
  cp_async_commit();
  const typename Gm::Ctx L(lane);
  const float scale_log2 = a.scale * kLog2e;
  const int kw = 16 * warp;  // the warp's keys within the tile
  const int jk[2] = {j0 + kw + g, j0 + kw + g + 8};  // the keys of this thread's accumulator rows

  // PIPE (Gm::PIPE_KV): block it-1's dV and dK products run on under block it's first two; its
  // buffers are refilled once they are done (a second barrier).
  constexpr bool PIPE = Gm::PIPE_KV;
  typename Gm::Frag fp, fds;  // the A operands, alive until their products are done
  for (int it = 0; it < n_it; ++it) {
    const int buf = it & 1;
    cp_async_wait_all();
    Gm::landed();
    __syncthreads();  // block it landed; every warp is done with block it-1's buffers (PIPE: but its products)
    if (!PIPE) {
      if (it + 1 < n_it) load_block(it + 1, buf ^ 1);
      cp_async_commit();
    }
    const uint32_t sQ = sQ0 + buf * TILE, sO = sO0 + buf * TILE;
    const int i0 = (ib0 + it % per_h) * BM;
    const float* l2s = s_l2 + buf * BM;
    const float* dls = s_dl + buf * BM;

    // S^T = K Q^T: (16 keys, 64 rows); element (n, e) is key jk[e >> 1], row i0 + 8n + 2tq + (e & 1).
    // Then dP^T = V dO^T. Asynchronous products (wgmma) run on while the code after them waits
    // only for what it reads: P^T's exponentials while dP^T is computed, dS^T while dV is.
    float s[8][4], dp[8][4];
    Gm::xyt(s, sK, kw, sQ, L);
    Gm::xyt(dp, sV, kw, sO, L);
    if (PIPE) {
      Gm::template wait<2>();  // block it-1's dV, dK are done in this warp
      __syncthreads();         // ... and in every warp: its buffers take block it+1
      if (it + 1 < n_it) load_block(it + 1, buf ^ 1);
      cp_async_commit();
    }
    Gm::template wait<1>();  // S^T is in
    const bool need_mask = j0 + BN > a.Skv || (a.causal && j0 + BN - 1 > i0 + off);
    const int col = 2 * tq;  // row index within the block of element (n, e): 8n + col + (e & 1)
    softmax_p(s, scale_log2, [&](int n, int e) { return l2s[8 * n + col + (e & 1)]; }, need_mask, [&](int n, int e) {
      const int j = jk[e >> 1], i = i0 + 8 * n + 2 * tq + (e & 1);
      return j >= a.Skv || (a.causal && j > i + off);
    });
    Gm::acc_y(dv, s, sO, L, fp);  // dV += P^T dO
    Gm::template wait<1>();       // dP^T is in
    // dS^T = P^T (dP^T - delta) in place.
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[n][e] = s[n][e] * (dp[n][e] - dls[8 * n + col + (e & 1)]);
    Gm::acc_y(dk, dp, sQ, L, fds);  // dK += dS^T Q
    if (!PIPE) Gm::template wait<0>();  // every product of this block is done before its buffers are refilled
  }
  if (PIPE) Gm::template wait<0>();
  cp_async_wait_all();

  // Epilogue: rows jk[0], jk[1]; columns 8n + 2tq, +1. dK gets the softmax scale here. One head
  // group writes dK, dV; several write fp32 partials that bwd_reduce_kernel sums in group order.
  T* dkb = static_cast<T*>(a.dk) + (size_t)b * a.Skv * D;
  T* dvb = static_cast<T*>(a.dv) + (size_t)b * a.Skv * D;
  float* pkb = a.part_k + ((size_t)grp * a.B + b) * a.Skv * D;
  float* pvb = a.part_v + ((size_t)grp * a.B + b) * a.Skv * D;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int j = jk[hf];
    if (j >= a.Skv) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const size_t at = (size_t)j * D + 8 * n + 2 * tq;
      if (a.G == 1) {
        *reinterpret_cast<uint32_t*>(dkb + at) = Mma<T>::pack(dk[n][2 * hf] * a.scale, dk[n][2 * hf + 1] * a.scale);
        *reinterpret_cast<uint32_t*>(dvb + at) = Mma<T>::pack(dv[n][2 * hf], dv[n][2 * hf + 1]);
      } else {
        *reinterpret_cast<float2*>(pkb + at) = make_float2(dk[n][2 * hf] * a.scale, dk[n][2 * hf + 1] * a.scale);
        *reinterpret_cast<float2*>(pvb + at) = make_float2(dv[n][2 * hf], dv[n][2 * hf + 1]);
      }
    }
  }
}

// dK, dV = the sum of the G head groups' fp32 partials, in group order (deterministic); 4 columns a thread.
template <typename T>
__global__ void __launch_bounds__(256) bwd_reduce_kernel(const BwdArgs a, int D) {
  const size_t n4 = (size_t)a.B * a.Skv * D / 4, idx = (size_t)blockIdx.x * 256 + threadIdx.x;
  if (idx >= 2 * n4) return;
  const bool is_v = idx >= n4;
  const size_t e = (is_v ? idx - n4 : idx) * 4;
  const float* part = is_v ? a.part_v : a.part_k;
  float4 acc = reinterpret_cast<const float4*>(part + e)[0];
  for (int g = 1; g < a.G; ++g) {
    const float4 x = reinterpret_cast<const float4*>(part + (size_t)g * a.B * a.Skv * D + e)[0];
    acc.x += x.x; acc.y += x.y; acc.z += x.z; acc.w += x.w;
  }
  T* dst = static_cast<T*>(is_v ? a.dv : a.dk) + e;
  *reinterpret_cast<uint2*>(dst) = make_uint2(Mma<T>::pack(acc.x, acc.y), Mma<T>::pack(acc.z, acc.w));
}

// dQ: CTA (query block, head, batch); warp w owns rows i0 + 16w .. +15.
template <typename T, int D, class Gm>
__global__ void __launch_bounds__(NT, Gm::MINB) bwd_dq_kernel(const BwdArgs a) {
  constexpr int TILE = BM * D * 2;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t sQ = smem_u32(smem_raw + Gm::pad(smem_raw)), sO = sQ + TILE, sK0 = sO + TILE, sV0 = sK0 + 2 * TILE;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int nblk = a.SqP / BM, per_b = a.H * nblk;
  const int b = blockIdx.x % a.B, rest = blockIdx.x / a.B;
  const int h = rest % a.H, ib = nblk - 1 - rest / a.H;  // the blocks with the most keys first
  const int i0 = ib * BM, off = a.Skv - a.Sq;
  (void)per_b;
  const int i_last = min(a.Sq - 1, i0 + BM - 1);
  const int kv_end = a.causal ? min(a.Skv, max(0, i_last + off + 1)) : a.Skv;
  const int n_tiles = (kv_end + BN - 1) / BN;
  const size_t bh = (size_t)b * a.H + h;
  const long long ooff = b * a.sb + h * a.sh;  // dout and dq of (b, h)
  const T* qh = static_cast<const T*>(a.q) + b * a.qsb + h * a.qsh;
  const T* oh = static_cast<const T*>(a.dout) + ooff;
  const T* kb = static_cast<const T*>(a.k) + (size_t)b * a.Skv * D;
  const T* vb = static_cast<const T*>(a.v) + (size_t)b * a.Skv * D;

  load_tile<Gm>(sQ, qh, i0, a.Sq, a.qss, tid);
  load_tile<Gm>(sO, oh, i0, a.Sq, a.ss, tid);
  if (n_tiles > 0) {
    load_tile<Gm>(sK0, kb, 0, a.Skv, D, tid);
    load_tile<Gm>(sV0, vb, 0, a.Skv, D, tid);
  }
  cp_async_commit();
  const typename Gm::Ctx L(lane);
  const float scale_log2 = a.scale * kLog2e;
  const int rw = 16 * warp;
  const int ir[2] = {i0 + rw + g, i0 + rw + g + 8};  // this thread's accumulator rows
  float l2r[2], dlr[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    l2r[hf] = a.lse2[bh * a.SqP + ir[hf]];  // padding rows: +inf, P = 0
    dlr[hf] = a.delta[bh * a.SqP + ir[hf]];
  }
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;

  constexpr bool PIPE = Gm::PIPE_Q;  // as in the dK/dV kernel: tile t-1's dQ product runs on under tile t's first two
  auto load_next = [&](int t, int buf) {
    if (t + 1 < n_tiles) {
      load_tile<Gm>(sK0 + (buf ^ 1) * TILE, kb, (t + 1) * BN, a.Skv, D, tid);
      load_tile<Gm>(sV0 + (buf ^ 1) * TILE, vb, (t + 1) * BN, a.Skv, D, tid);
    }
    cp_async_commit();
  };
  typename Gm::Frag fds;
  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = t * BN, buf = t & 1;
    cp_async_wait_all();
    Gm::landed();
    __syncthreads();
    if (!PIPE) load_next(t, buf);
    const uint32_t sK = sK0 + buf * TILE, sV = sV0 + buf * TILE;
    // S = Q K^T: (16 rows, 64 keys); element (n, e) is row ir[e >> 1], key n0 + 8n + 2tq + (e & 1).
    float s[8][4], dp[8][4];
    Gm::xyt(s, sQ, rw, sK, L);
    Gm::xyt(dp, sO, rw, sV, L);  // dP = dO V^T, on while P's exponentials are computed (wgmma)
    if (PIPE) {
      Gm::template wait<2>();  // tile t-1's dQ product is done in this warp
      __syncthreads();         // ... and in every warp: its buffers take tile t+1
      load_next(t, buf);
    }
    Gm::template wait<1>();      // S is in
    const bool need_mask = n0 + BN > a.Skv || (a.causal && n0 + BN - 1 > i0 + off);
    softmax_p(s, scale_log2, [&](int, int e) { return l2r[e >> 1]; }, need_mask, [&](int n, int e) {
      const int j = n0 + 8 * n + 2 * tq + (e & 1), i = ir[e >> 1];
      return j >= a.Skv || (a.causal && j > i + off);
    });
    Gm::template wait<0>();      // dP is in
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[n][e] = s[n][e] * (dp[n][e] - dlr[e >> 1]);
    Gm::acc_y(dq, dp, sK, L, fds);  // dQ += dS K
    if (!PIPE) Gm::template wait<0>();
  }
  if (PIPE) Gm::template wait<0>();
  cp_async_wait_all();

  T* dqh = static_cast<T*>(a.dq) + ooff;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = ir[hf];
    if (i >= a.Sq) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t*>(dqh + i * a.ss + 8 * n + 2 * tq) =
          Mma<T>::pack(dq[n][2 * hf] * a.scale, dq[n][2 * hf + 1] * a.scale);
  }
}
// Head groups of the dK/dV kernel. It has one CTA per 64-key tile and batch, too few to fill the
// GPU when B * Skv is small, and under a causal mask its CTAs are unequal (the first key tile is seen
// by every query block, the last by one), so the longest CTA sets the time. G groups of HG heads
// multiply the CTAs by G: up to 2 per SM without a mask, 8 per SM with one (the longest CTAs start
// first). fastmqa/kernels.py (_bwd_head_groups) computes the same G for the workspace size.
void head_groups(int B, int H, int Skv, int causal, int num_sms, int& G, int& HG) {
  const int ctas = B * ((Skv + BN - 1) / BN);
  G = max(1, min(H, (causal ? 8 : 2) * num_sms / max(1, ctas)));
  HG = (H + G - 1) / G;
  G = (H + HG - 1) / HG;
}

template <typename T, int D, template <typename, int> class Gm>
int launch(const MQAParams& p) {
  using Pr = Gm<T, D>;  // the tile products
  constexpr int TILE = BM * D * 2;
  constexpr int SMEM_KV = 6 * TILE + 4 * BM * 4 + Pr::ALIGN, SMEM_Q = 6 * TILE + Pr::ALIGN;
  static bool attr = false;
  if (!attr) {
    if (cudaFuncSetAttribute(bwd_dkdv_kernel<T, D, Pr>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_KV) != cudaSuccess ||
        cudaFuncSetAttribute(bwd_dq_kernel<T, D, Pr>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_Q) != cudaSuccess)
      return FASTMQA_UNSUPPORTED;
    attr = true;
  }
  const int SqP = (p.Sq + BM - 1) / BM * BM, ntiles = (p.Skv + BN - 1) / BN;
  int G, HG;
  head_groups(p.B, p.H, p.Skv, p.causal, p.num_sms, G, HG);
  const size_t rows_bytes = 2 * sizeof(float) * (size_t)p.B * p.H * SqP;
  const size_t part_bytes = G > 1 ? 2 * sizeof(float) * (size_t)G * p.B * p.Skv * D : 0;
  if (p.workspace == nullptr || p.workspace_bytes < rows_bytes + part_bytes) return FASTMQA_UNSUPPORTED;
  BwdArgs a{p.q, p.k, p.v, p.o, p.dout, p.lse, p.dlse, p.dq, p.dk, p.dv,
            static_cast<float*>(p.workspace), nullptr, p.B, p.H, p.Sq, p.Skv, SqP, p.causal, p.scale,
            p.o_sb, p.o_sh, p.o_ss, p.q_sb, p.q_sh, p.q_ss, G, HG, nullptr, nullptr};
  a.delta = a.lse2 + (size_t)p.B * p.H * SqP;
  a.part_k = a.delta + (size_t)p.B * p.H * SqP;
  a.part_v = a.part_k + (size_t)G * p.B * p.Skv * D;
  const int rows = p.B * p.H * SqP;
  bwd_prep_kernel<T, D><<<(rows + 7) / 8, 256, 0, p.stream>>>(a);
  bwd_dkdv_kernel<T, D, Pr><<<ntiles * G * p.B, NT, SMEM_KV, p.stream>>>(a);
  if (G > 1) {
    const size_t n = 2 * (size_t)p.B * p.Skv * D / 4;
    bwd_reduce_kernel<T><<<(unsigned)((n + 255) / 256), 256, 0, p.stream>>>(a, D);
  }
  bwd_dq_kernel<T, D, Pr><<<(SqP / BM) * p.H * p.B, NT, SMEM_Q, p.stream>>>(a);
  return 0;
}

template <typename T, template <typename, int> class Gm>
int by_dim(const MQAParams& p) {
  if (p.D == 128) return launch<T, 128, Gm>(p);
  if (p.D == 64) return launch<T, 64, Gm>(p);
  return FASTMQA_UNSUPPORTED;
}

// A backward kernel file's entry point: fastmqa_kNN(p) { return flash_bwd<ItsProducts>(p); }.
// Workspace: 2 * B * H * ceil(Sq / 64) * 64 floats, plus 2 * G * B * Skv * D floats when the dK/dV
// kernel splits the heads into G > 1 groups (fastmqa/kernels.py: _bwd_workspace).
template <template <typename, int> class Gm>
int flash_bwd(const MQAParams& p) {
  if (p.B < 1 || p.H < 1 || p.Sq < 1 || p.Skv < 1 || !p.dout || !p.dq || !p.dk || !p.dv) return FASTMQA_UNSUPPORTED;
  if (p.dtype == FASTMQA_BF16) return by_dim<__nv_bfloat16, Gm>(p);
  if (p.dtype == FASTMQA_FP16) return by_dim<__half, Gm>(p);
  return FASTMQA_UNSUPPORTED;
}


}  // namespace
