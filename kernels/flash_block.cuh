// flash_block.cuh — what the fused prefill kernels (06_flash_mma.cu, 08_flash_wgmma.cu,
// 09_flash_3xtf32.cu) share: the block geometry (which sequence and packed rows a block owns,
// which key tiles it visits, from which tile on it must mask), the launch, and (08, 09) the
// online softmax on mma accumulators. Rows are packed (i, h) i-major: row m of a
// sequence is query i = m / H of head m % H, so a block of BM rows holds every head of a few
// query positions, and one K/V tile serves them all.
#pragma once
#include "mqa_params.cuh"

namespace {

struct Strides { long long b, h, s; };  // element strides of the (B, H, Sq) dims of q or o

template <int BM, int BN>
struct FlashBlock {
  int b;          // the sequence
  int m0;         // its first packed row
  int i_first;    // the first query position among its rows
  int off;        // Skv - Sq: causal is bottom-right aligned (query i sees keys j <= i + off)
  int kv_end;     // keys [0, kv_end) are the ones some row of the block may see
  int n_tiles;    // key tiles [0, n_tiles) hold a key some row of the block may see
  int mask_from;  // tiles from here on cross Skv or some row's diagonal: they need the mask
  // Grid: B x (row blocks); the blocks with the most keys (the last rows, under a causal mask)
  // are scheduled first, so the longest ones do not start last.
  // w: the work item (a persistent kernel's loop index; else the block's index).
  __device__ __forceinline__ FlashBlock(int B, int H, int Sq, int Skv, int causal, int w = blockIdx.x) {
    const int nmb = (H * Sq + BM - 1) / BM;
    const int mb = nmb - 1 - w / B;
    b = w % B;
    m0 = mb * BM;
    init(m0 / H, min(Sq - 1, (m0 + BM - 1) / H), Sq, Skv, causal);
  }
  // Row block mb of sequence b_ where H divides BM (08's Q by TMA: P = BM / H positions, every
  // head of each): the same fields without a division.
  struct EveryHead { int P; };
  __device__ __forceinline__ FlashBlock(int Sq, int Skv, int causal, int b_, int mb, EveryHead e) {
    b = b_;
    m0 = mb * BM;
    init(mb * e.P, min(Sq - 1, mb * e.P + e.P - 1), Sq, Skv, causal);
  }

 private:
  __device__ __forceinline__ void init(int i0, int i_last, int Sq, int Skv, int causal) {
    i_first = i0;
    off = Skv - Sq;
    kv_end = causal ? min(Skv, max(0, i_last + off + 1)) : Skv;
    n_tiles = (kv_end + BN - 1) / BN;
    mask_from = causal ? min(Skv / BN, max(0, i0 + off + 1) / BN) : Skv / BN;
  }
};

// The online softmax of a score tile held as mma accumulators (08_flash_wgmma.cu,
// 09_flash_3xtf32.cu; 06_flash_mma.cu spells it out for chapter 7). Element 4n + e of a thread's
// NS * 4 scores is row g + 8 (e >> 1), column 8n + 2tq + (e & 1): the 4 lanes of a quad share a
// row. Updates the running max m_run (raw score units) and partial sum l_run of the thread's two
// rows, leaves P = exp(scale (s - m)) in s and the rescale factors exp(scale (m_old - m_new)) in
// alpha. exp2: the 2^x to use (ex2.approx in bf16, exp2f in fp32). The exponents are
// round(s * scale_log2) - m_scaled, unfused (__fmul_rn): <= 0 and exactly 0 for the max at any
// magnitude (a fused fmaf leaves exp2(rounding residual): inf or 0 at inputs ~1e6, see 01_naive.cu).
// FAST (08's warp-specialised kernel): where every row max of the warp is below 2^10 in exponent
// units, the rounding residual of a fused fmaf is under 2^-14 of the exponent:
// p = exp2(fmaf(s, scale_log2, -m_scaled)), one instruction instead of two.
template <int NS>
__device__ __forceinline__ float quad_row_max(const float* s, int hf, float m) {  // row hf's max, and m
#pragma unroll
  for (int n = 0; n < NS; ++n) m = fmaxf(m, fmaxf(s[4 * n + 2 * hf], s[4 * n + 2 * hf + 1]));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  return fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
}
// Row hf to its new max mx (m_scaled = mx * scale_log2, 0 while the row has seen no key: p = 0):
// alpha, m_run; p in place of s (FUSED: one fmaf an exponent); l_run.
template <int NS, bool FUSED, typename Exp2>
__device__ __forceinline__ void row_update(float* s, int hf, float mx, float m_scaled, float (&m_run)[2],
                                           float (&l_run)[2], float (&alpha)[2], float scale_log2, Exp2 exp2) {
  alpha[hf] = exp2(__fmul_rn(m_run[hf], scale_log2) - m_scaled);
  m_run[hf] = mx;
  float ls = 0.f;
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    const float x0 = s[4 * n + 2 * hf], x1 = s[4 * n + 2 * hf + 1];
    const float p0 = exp2(FUSED ? fmaf(x0, scale_log2, -m_scaled) : __fmul_rn(x0, scale_log2) - m_scaled);
    const float p1 = exp2(FUSED ? fmaf(x1, scale_log2, -m_scaled) : __fmul_rn(x1, scale_log2) - m_scaled);
    s[4 * n + 2 * hf] = p0;
    s[4 * n + 2 * hf + 1] = p1;
    ls += p0 + p1;
  }
  l_run[hf] = l_run[hf] * alpha[hf] + ls;
}
template <int NS, bool FAST = false, typename Exp2>
__device__ __forceinline__ void quad_softmax(float* s, float (&m_run)[2], float (&l_run)[2], float (&alpha)[2],
                                             float scale_log2, Exp2 exp2) {
  auto scaled = [&](float mx) { return mx == -INFINITY ? 0.f : __fmul_rn(mx, scale_log2); };
  if constexpr (FAST) {
    const float mx[2] = {quad_row_max<NS>(s, 0, m_run[0]), quad_row_max<NS>(s, 1, m_run[1])};
    const float ms[2] = {scaled(mx[0]), scaled(mx[1])};
    if (__all_sync(0xffffffffu, fabsf(ms[0]) < 1024.f && fabsf(ms[1]) < 1024.f)) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) row_update<NS, true>(s, hf, mx[hf], ms[hf], m_run, l_run, alpha, scale_log2, exp2);
      return;
    }
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float mx = quad_row_max<NS>(s, hf, m_run[hf]);
    row_update<NS, false>(s, hf, mx, scaled(mx), m_run, l_run, alpha, scale_log2, exp2);
  }
}

// The sum of x over the 4 lanes of a quad: a row's total from its lanes' partial sums.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Launch a fused prefill kernel (its signature below, then any kernel-specific arguments `extra`,
// e.g. 08's TMA tensor maps) over B x ceil(H Sq / BM) blocks of NT threads with `smem` bytes of
// dynamic shared memory (the limit raised first); a persistent kernel passes at most `grid` blocks.
template <typename T, int BM, int NT, typename... Extra>
int launch_flash(void (*kern)(const T*, const T*, const T*, T*, float*, int, int, int, int, float, int,
                              const Strides, const Strides, Extra...),
                 int smem, const MQAParams& p, int grid, const Extra&... extra) {
  if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return FASTMQA_UNSUPPORTED;
  const int nmb = (p.H * p.Sq + BM - 1) / BM;
  const int blocks = grid > 0 && grid < nmb * p.B ? grid : nmb * p.B;
  kern<<<blocks, NT, smem, p.stream>>>((const T*)p.q, (const T*)p.k, (const T*)p.v, (T*)p.o, p.lse, p.B, p.H,
                                          p.Sq, p.Skv, p.scale, p.causal, Strides{p.q_sb, p.q_sh, p.q_ss},
                                          Strides{p.o_sb, p.o_sh, p.o_ss}, extra...);
  return 0;
}

}  // namespace
