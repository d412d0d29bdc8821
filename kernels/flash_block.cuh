// flash_block.cuh — the block geometry the fused prefill kernels (06_flash_mma.cu,
// 08_flash_wgmma.cu) share: which sequence and packed rows a block owns, which key tiles it
// visits, and from which tile on it must mask. Rows are packed (i, h) i-major: row m of a
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
  int off;        // Skv - Sq: causal is bottom-right aligned (query i sees keys j <= i + off)
  int n_tiles;    // key tiles [0, n_tiles) hold a key some row of the block may see
  int mask_from;  // tiles from here on cross Skv or some row's diagonal: they need the mask
  // Grid: B x (row blocks); the blocks with the most keys (the last rows, under a causal mask)
  // are scheduled first, so the longest ones do not start last.
  __device__ __forceinline__ FlashBlock(int B, int H, int Sq, int Skv, int causal) {
    const int nmb = (H * Sq + BM - 1) / BM;
    const int mb = nmb - 1 - (int)(blockIdx.x / B);
    b = blockIdx.x % B;
    m0 = mb * BM;
    off = Skv - Sq;
    const int i_first = m0 / H, i_last = min(Sq - 1, (m0 + BM - 1) / H);
    const int kv_end = causal ? min(Skv, max(0, i_last + off + 1)) : Skv;
    n_tiles = (kv_end + BN - 1) / BN;
    mask_from = causal ? min(Skv / BN, max(0, i_first + off + 1) / BN) : Skv / BN;
  }
};

// Launch a fused prefill kernel (its signature below) over B x ceil(H Sq / BM) blocks of NT
// threads with `smem` bytes of dynamic shared memory (the limit raised first).
template <typename T, int BM, int NT>
int launch_flash(void (*kern)(const T*, const T*, const T*, T*, float*, int, int, int, int, float, int,
                              const Strides, const Strides),
                 int smem, const MQAParams& p) {
  if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return FASTMQA_UNSUPPORTED;
  const int nmb = (p.H * p.Sq + BM - 1) / BM;
  kern<<<nmb * p.B, NT, smem, p.stream>>>((const T*)p.q, (const T*)p.k, (const T*)p.v, (T*)p.o, p.lse, p.B, p.H,
                                          p.Sq, p.Skv, p.scale, p.causal, Strides{p.q_sb, p.q_sh, p.q_ss},
                                          Strides{p.o_sb, p.o_sh, p.o_ss});
  return 0;
}

}  // namespace
