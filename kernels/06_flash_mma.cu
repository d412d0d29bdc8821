// 06_flash_mma.cu — fused MQA attention on tensor cores: bf16/fp16 in, fp32 accumulation.
//
// The algorithm of 05_flash_fp32.cu (online softmax, MQA rows packed (i, h) i-major so one
// K/V tile serves every head of a few query positions), with the two tile products on
// tensor cores through `mma.sync.aligned.m16n8k16` (inline PTX):
//   * a block of 4 warps owns BM = 128 packed rows; each warp owns 32 of them (two m16 tiles)
//     and computes its (32, BN) score tile S = Q K^T and its (32, D) output O alone;
//   * shared-memory tiles are stored in 16-byte chunks XOR-swizzled by row (chunk ^ row % 8),
//     so the eight 16-byte rows that one `ldmatrix` phase reads sit in eight different bank
//     groups: no bank conflicts, without padding;
//   * K and V tiles are double-buffered: cp.async fills tile t+1 while tile t is computed;
//   * the softmax runs on the mma accumulators in registers (each row lives in the 4 lanes of
//     a quad: two xor-shuffles give its max), with ex2.approx and a log2(e)-prescaled scale, so
//     each exponent is one FFMA + one MUFU.EX2, and O is rescaled only when a row max moved;
//   * P never touches shared memory: the accumulator layout of S (m16n8, fp32) is, pair by
//     pair, the A-operand layout of the next m16n8k16 once converted to 16 bits, so the
//     registers of P feed the P V product directly (FlashAttention-2's register trick);
//   * causal: tiles past the block's last visible key are never loaded, only the tiles that
//     cross a row's diagonal (or Skv) are masked, and blocks with the most keys start first.
// q and o are read and written through their strides: a layer's (B, S, H, D) projection viewed as
// (B, H, S, D) is already the packed (i, h) row order, so the layer needs no transposing copy.
// Tried and dropped (scripts/dev_flash.py, H100): runs of P > 1 queries per head in a block (no
// measurable change); a persistent grid prefetching the next block's Q and first K/V tile
// (the loop state cost registers: 34% more instructions per tile, 25% slower).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "mqa_params.cuh"
#include "flash_block.cuh"  // the block's sequence, rows and key tiles; the launch
#include "mma.cuh"  // PTX wrappers: cp.async, ldmatrix, ex2, mma.sync (Mma<T>)

namespace {

constexpr int NWARPS = 4, NT = NWARPS * 32, WM = 2;  // WM m16 tiles per warp
constexpr int BM = NWARPS * WM * 16;                // 128 packed rows per block

// Byte offset of 16-byte chunk `ch` of row `r` in a tile of D 16-bit columns, swizzled.
template <int D>
__device__ __forceinline__ uint32_t swz(int r, int ch) { return (uint32_t)(r * D * 2 + ((ch ^ (r & 7)) << 4)); }

// K or V rows [j0, j0 + BN) of (Skv, D) into a swizzled tile; rows past Skv are zero-filled.
template <int D, int BN, typename T>
__device__ __forceinline__ void load_kv(uint32_t dst, const T* src, int j0, int Skv, int tid) {
  constexpr int CH = D / 8;
  static_assert(BN * CH % NT == 0, "the tile splits evenly over the threads");
  const int r0 = tid / CH, c = tid % CH;  // the chunk column is fixed per thread: addresses are base + constant
#pragma unroll
  for (int it = 0; it < BN * CH / NT; ++it) {
    int r = r0 + it * (NT / CH);
    bool in = j0 + r < Skv;
    cp_async16(dst + swz<D>(r, c), src + (size_t)(in ? j0 + r : 0) * D + c * 8, in);
  }
}

template <typename T, int D, int BN, bool Q_IN_REGS>
struct Cfg {
  static constexpr int KS = D / 16;     // k-steps of S = Q K^T
  static constexpr int NS = BN / 8;     // n8 tiles of S
  static constexpr int KP = BN / 16;    // k-steps of O += P V
  static constexpr int NO = D / 8;      // n8 tiles of O
  static constexpr int Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
  static constexpr int SMEM = Q_BYTES + 4 * KV_BYTES;  // Q, K[2], V[2]
};

// FAST: ex2.approx.ftz for the exponentials, and O is rescaled only when some row's max moved
// (a warp vote); without it, exp2f and an unconditional rescale (the first measured version).
template <typename T, int D, int BN, bool Q_IN_REGS, int MINB, bool FAST>
__global__ void __launch_bounds__(NT, MINB)
mqa_flash_mma_kernel(const T* __restrict__ q,   // (B, H, Sq, D), strides qs
                     const T* __restrict__ k,   // (B, Skv, D)
                     const T* __restrict__ v,   // (B, Skv, D)
                     T* __restrict__ o,         // (B, H, Sq, D), strides os
                     float* __restrict__ lse,   // (B, H, Sq) or nullptr
                     int B, int H, int Sq, int Skv, float scale, int causal, const Strides qs, const Strides os) {
  using C = Cfg<T, D, BN, Q_IN_REGS>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ long long row_q[BM];  // element offset of tile row r in q, or -1 past H * Sq rows
  __shared__ long long row_o[BM];  // ... in o
  __shared__ int row_i[BM];  // its query position i
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK0 = sQ + C::Q_BYTES, sV0 = sK0 + 2 * C::KV_BYTES;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;  // mma fragment coordinates: row group, thread in quad
  // Packed rows (i, h): row m0 + r of the block is query i = (m0 + r) / H of head (m0 + r) % H.
  const FlashBlock<BM, BN> blk(B, H, Sq, Skv, causal);
  const int b = blk.b, m0 = blk.m0, off = blk.off, n_tiles = blk.n_tiles, mask_from = blk.mask_from;
  const T* kb = k + (size_t)b * Skv * D;
  const T* vb = v + (size_t)b * Skv * D;

  // K and V of the first tile start loading at once; Q after its row table is built.
  if (n_tiles > 0) load_kv<D, BN>(sK0, kb, 0, Skv, tid);
  {
    const int row = m0 + tid, i = row / H, h = row % H;  // NT == BM: one row per thread
    row_q[tid] = row < H * Sq ? b * qs.b + h * qs.h + i * qs.s : -1;
    row_o[tid] = row < H * Sq ? b * os.b + h * os.h + i * os.s : -1;
    row_i[tid] = i;
  }
  __syncthreads();
  {
    constexpr int CH = D / 8;
    const int c = tid % CH;
#pragma unroll
    for (int it = 0; it < BM * CH / NT; ++it) {
      const int r = tid / CH + it * (NT / CH);
      const long long base = row_q[r];
      cp_async16(sQ + swz<D>(r, c), q + (base > 0 ? base : 0) + c * 8, base >= 0);
    }
  }
  cp_async_commit();  // group: K[0] and Q
  if (n_tiles > 0) load_kv<D, BN>(sV0, vb, 0, Skv, tid);
  cp_async_commit();  // group: V[0], waited for only before the first P V

  // This thread's 4 rows: warp * 32 + mt * 16 + g + 8 * hf; the last key each may see.
  int jlim[WM][2];
#pragma unroll
  for (int mt = 0; mt < WM; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = min(row_i[warp * 32 + mt * 16 + g + 8 * hf], Sq - 1);
      jlim[mt][hf] = causal ? min(Skv - 1, i + off) : Skv - 1;
    }

  const float scale_log2 = scale * 1.4426950408889634f;  // exp(x * scale) = exp2(x * scale_log2)
  float acc_o[WM][C::NO][4];
  float m_run[WM][2], l_run[WM][2];  // running max (raw score units) and partial row sum
#pragma unroll
  for (int mt = 0; mt < WM; ++mt) {
#pragma unroll
    for (int n = 0; n < C::NO; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][n][e] = 0.f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  // ldmatrix lane offsets. Lanes 8m..8m+7 give the 8 row addresses of matrix m of an x4:
  //   Q (A of S):  rows +0/+8 by m & 1, chunk +0/+1 by m >> 1  -> a0 a1 a2 a3
  //   K (B of S):  chunk +0/+1 by m & 1, keys +0/+8 by m >> 1  -> b0 b1 of two n8 tiles
  //   V (B of PV, .trans): keys +0/+8 by m & 1, chunk +0/+1 by m >> 1 -> b0 b1 of two n8 tiles
  // Every row a lane addresses is = lane (mod 8), so its swizzle is x = lane & 7. Step s of a
  // k (or d) loop reads chunk 2s + c, swizzled 8 (s >> 2) + ((2 (s & 3) + c) ^ x): four
  // offsets per operand (s & 3) plus a constant, which keeps the addresses out of registers.
  uint32_t qo[4], ko[4], vo[4];
  {
    const int x = lane & 7;
    const int a_row = warp * 32 + (lane & 7) + ((lane >> 3) & 1) * 8, a_ch = lane >> 4;
    const int k_row = (lane & 7) + (lane >> 4) * 8, k_ch = (lane >> 3) & 1;
    const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8, v_ch = lane >> 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      qo[j] = a_row * D * 2 + (((2 * j + a_ch) ^ x) << 4);
      ko[j] = k_row * D * 2 + (((2 * j + k_ch) ^ x) << 4);
      vo[j] = v_row * D * 2 + (((2 * j + v_ch) ^ x) << 4);
    }
  }
  // tile base + lane offset of step s, + rows (a multiple of 8) * row bytes
#define LDSM_OFF(off, s, rows) ((off)[(s) & 3] + ((s) >> 2) * 128 + (rows) * D * 2)

  uint32_t qf[Q_IN_REGS ? WM : 1][Q_IN_REGS ? C::KS : 1][4];

  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = t * BN;
    const uint32_t sK = sK0 + (t & 1) * C::KV_BYTES, sV = sV0 + (t & 1) * C::KV_BYTES;
    if (t == 0) cp_async_wait_1();  // Q and K[0] (V[0] may still be in flight)
    else cp_async_wait_all();
    __syncthreads();  // K and V of tile t landed; every warp is done with tile t-1's buffers
    if (t + 1 < n_tiles) {
      const uint32_t nb = ((t + 1) & 1) * C::KV_BYTES;
      load_kv<D, BN>(sK0 + nb, kb, n0 + BN, Skv, tid);
      load_kv<D, BN>(sV0 + nb, vb, n0 + BN, Skv, tid);
    }
    cp_async_commit();
    if constexpr (Q_IN_REGS) {
      if (t == 0) {  // Q's A fragments stay in registers for the whole K/V sweep
#pragma unroll
        for (int mt = 0; mt < WM; ++mt)
#pragma unroll
          for (int ks = 0; ks < C::KS; ++ks) ldsm_x4(qf[mt][ks], sQ + LDSM_OFF(qo, ks, mt * 16));
      }
    }

    // S = Q K^T on tensor cores: (32, BN) per warp.
    float s[WM][C::NS][4];
#pragma unroll
    for (int mt = 0; mt < WM; ++mt)
#pragma unroll
      for (int n = 0; n < C::NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][n][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) {
      uint32_t a[WM][4];
#pragma unroll
      for (int mt = 0; mt < WM; ++mt) {
        if constexpr (Q_IN_REGS) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][ks][e];
        } else {
          ldsm_x4(a[mt], sQ + LDSM_OFF(qo, ks, mt * 16));
        }
      }
#pragma unroll
      for (int np = 0; np < C::NS / 2; ++np) {
        uint32_t bk[4];  // b0, b1 of keys np*16..+7, then b0, b1 of keys np*16+8..+15
        ldsm_x4(bk, sK + LDSM_OFF(ko, ks, np * 16));
#pragma unroll
        for (int mt = 0; mt < WM; ++mt) {
          Mma<T>::run(s[mt][2 * np], a[mt], bk[0], bk[1]);
          Mma<T>::run(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Mask (only tiles that cross Skv or a causal diagonal), then the online softmax.
    if (t >= mask_from) {
#pragma unroll
      for (int mt = 0; mt < WM; ++mt)
#pragma unroll
        for (int n = 0; n < C::NS; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            int j = n0 + n * 8 + 2 * tq + (e & 1);
            if (j > jlim[mt][e >> 1]) s[mt][n][e] = -INFINITY;
          }
    }
    uint32_t pa[WM][C::KP][4];  // P as bf16/fp16 A fragments of the P V product
    float alpha[WM][2];         // rescale factors exp(m_old - m_new) of this thread's rows
#pragma unroll
    for (int mt = 0; mt < WM; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = m_run[mt][hf];
#pragma unroll
        for (int n = 0; n < C::NS; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * hf], s[mt][n][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a quad share the row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Exponents round(s * scale_log2) - m_scaled, unfused (__fmul_rn): <= 0, exactly 0 for the max, at
        // any magnitude. One fused fmaf would save an instruction per score but leaves exp2(rounding
        // residual of m_scaled): inf or 0 at inputs ~1e6 (see 01_naive.cu).
        const float m_scaled = mx == -INFINITY ? 0.f : __fmul_rn(mx, scale_log2);  // no key yet: p = 0
        const float a = __fmul_rn(m_run[mt][hf], scale_log2) - m_scaled;
        alpha[mt][hf] = FAST ? ex2(a) : exp2f(a);
        m_run[mt][hf] = mx;
        float ls = 0.f;
#pragma unroll
        for (int n = 0; n < C::NS; ++n) {
          const float a0 = __fmul_rn(s[mt][n][2 * hf], scale_log2) - m_scaled;
          const float a1 = __fmul_rn(s[mt][n][2 * hf + 1], scale_log2) - m_scaled;
          const float p0 = FAST ? ex2(a0) : exp2f(a0), p1 = FAST ? ex2(a1) : exp2f(a1);
          s[mt][n][2 * hf] = p0;
          s[mt][n][2 * hf + 1] = p1;
          ls += p0 + p1;
        }
        l_run[mt][hf] = l_run[mt][hf] * alpha[mt][hf] + ls;
      }
      // Accumulator (row g / g+8, cols 2tq, 2tq+1) of n-tiles 2kk, 2kk+1 = A fragment of k-step kk.
#pragma unroll
      for (int kk = 0; kk < C::KP; ++kk) {
        pa[mt][kk][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][kk][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][kk][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][kk][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
    }
    // Rescale O by alpha. Once the running maxima settle (most tiles of a long row), every
    // alpha is exactly 1 and the warp skips the D / 2 multiplications per row.
    bool moved = !FAST;
#pragma unroll
    for (int mt = 0; mt < WM; ++mt) moved = moved || alpha[mt][0] != 1.f || alpha[mt][1] != 1.f;
    if (!FAST || __any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int mt = 0; mt < WM; ++mt)
#pragma unroll
        for (int n = 0; n < C::NO; ++n) {
          acc_o[mt][n][0] *= alpha[mt][0];
          acc_o[mt][n][1] *= alpha[mt][0];
          acc_o[mt][n][2] *= alpha[mt][1];
          acc_o[mt][n][3] *= alpha[mt][1];
        }
    }

    if (t == 0) {  // V[0]: the group before the one just committed
      cp_async_wait_1();
      __syncthreads();
    }
    // O += P V on tensor cores; V's B fragments come from ldmatrix.trans of the row-major tile.
#pragma unroll
    for (int kk = 0; kk < C::KP; ++kk) {
#pragma unroll
      for (int dp = 0; dp < C::NO / 2; ++dp) {
        uint32_t bv[4];  // b0, b1 of d-tile 2dp, then b0, b1 of d-tile 2dp+1
        ldsm_x4_trans(bv, sV + LDSM_OFF(vo, dp, kk * 16));
#pragma unroll
        for (int mt = 0; mt < WM; ++mt) {
          Mma<T>::run(acc_o[mt][2 * dp], pa[mt][kk], bv[0], bv[1]);
          Mma<T>::run(acc_o[mt][2 * dp + 1], pa[mt][kk], bv[2], bv[3]);
        }
      }
    }
  }
#undef LDSM_OFF
  cp_async_wait_all();
  if (n_tiles == 0) __syncthreads();  // other warps' cp.async of this warp's Q rows must land first

  // Epilogue: l over the quad, normalise, stage the warp's 32 rows in its own rows of the Q
  // tile (no other warp reads them), then 16-byte coalesced stores of whole rows.
#pragma unroll
  for (int mt = 0; mt < WM; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float l = l_run[mt][hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l != 0.f ? 1.f / l : 0.f;  // a row that saw no key: zeros, lse = -inf
      const int r = warp * 32 + mt * 16 + g + 8 * hf;
#pragma unroll
      for (int n = 0; n < C::NO; ++n) {
        uint32_t val = Mma<T>::pack(acc_o[mt][n][2 * hf] * inv, acc_o[mt][n][2 * hf + 1] * inv);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sQ + swz<D>(r, n) + tq * 4), "r"(val));
      }
      const int m = m0 + r, i = row_i[r];  // packed row (i, h): lse (B, H, Sq) is contiguous
      if (lse && tq == 0 && m < H * Sq)
        lse[((size_t)b * H + (m - i * H)) * Sq + i] = l != 0.f ? m_run[mt][hf] * scale + logf(l) : -INFINITY;
    }
  __syncwarp();
  {
    constexpr int CH = D / 8;
    const int c = lane % CH;
#pragma unroll
    for (int it = 0; it < CH; ++it) {
      const int r = warp * 32 + lane / CH + it * (32 / CH);
      const long long base = row_o[r];
      if (base >= 0) {
        uint4 val;
        asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(val.x), "=r"(val.y), "=r"(val.z), "=r"(val.w) : "r"(sQ + swz<D>(r, c)));
        *reinterpret_cast<uint4*>(o + base + c * 8) = val;
      }
    }
  }
}

template <typename T, int D, int BN, bool QR, int MINB, bool FAST>
int launch(const MQAParams& p) {
  return launch_flash<T, BM, NT>(mqa_flash_mma_kernel<T, D, BN, QR, MINB, FAST>, Cfg<T, D, BN, QR>::SMEM, p, 0);
}

template <typename T, bool FAST>
int dispatch(const MQAParams& p, int cfg) {
  if (p.D == 128) return launch<T, 128, 64, false, 2, FAST>(p);
  if (p.D == 64) {
    // Measured on the H100 (scripts/dev_flash.py): 128-key tiles (half the softmax and barrier
    // work per key) win on long rows; on short ones (few tiles per block, so the start and end
    // of each block weigh more, and with a causal mask the diagonal's masked keys) the lighter
    // 64-key kernel that fits 3 CTAs per SM wins. Q-in-registers (cfg 1) was never the fastest.
    if (cfg < 1 || cfg > 3) cfg = p.Skv <= (p.causal ? 4096 : 1024) ? 3 : 2;
    if (cfg == 2) return launch<T, 64, 128, false, 2, FAST>(p);
    if (cfg == 3) return launch<T, 64, 64, false, 3, FAST>(p);
    return launch<T, 64, 64, true, 2, FAST>(p);
  }
  return FASTMQA_UNSUPPORTED;
}

// p.num_splits is unused by a prefill kernel; scripts/dev_flash.py passes 10 * slow + cfg to
// time the variants (slow: exp2f and unconditional rescale; cfg 1..3: the D = 64 tile shapes,
// bf16 only). 0 is the default, chosen from those timings.
template <typename T>
int dispatch(const MQAParams& p) {
  const int cfg = p.num_splits % 10;
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    if (p.num_splits / 10 == 1) return dispatch<T, false>(p, cfg);
  return dispatch<T, true>(p, cfg);
}

}  // namespace

int fastmqa_k06_flash_mma(const MQAParams& p) {
  if (p.dtype == FASTMQA_BF16) return dispatch<__nv_bfloat16>(p);
  if (p.dtype == FASTMQA_FP16) return dispatch<__half>(p);
  return FASTMQA_UNSUPPORTED;
}
