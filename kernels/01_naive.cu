// 01_naive.cu — the first MQA kernel: one thread per query row (b, h, i).
//
// Each thread walks the whole shared K/V head twice:
//   pass 1: m = max_j  s_ij,            s_ij = scale * q_i . k_j
//   pass 2: o_i = sum_j exp(s_ij - m) v_j / sum_j exp(s_ij - m)
// Nothing is shared between threads: the 32 threads of a warp read 32 different q rows
// (strided by D floats, so uncoalesced), and every one of the B*H*Sq threads re-reads all
// of K twice and V once from global memory. That is why it is slow; every later chapter
// removes one of these costs.
#include "mqa_params.cuh"
#include "dot.cuh"  // dot_fp32: q . k with 16 partial sums (accurate to the fp32 tolerance at any scale)

template <int D>
__global__ void mqa_naive_kernel(const float* __restrict__ q,   // (B, H, Sq, D)
                                 const float* __restrict__ k,   // (B, Skv, D)
                                 const float* __restrict__ v,   // (B, Skv, D)
                                 float* __restrict__ o,         // (B, H, Sq, D)
                                 float* __restrict__ lse,       // (B, H, Sq) or nullptr
                                 int B, int H, int Sq, int Skv, float scale, int causal) {
  int row = blockIdx.x * blockDim.x + threadIdx.x;  // flat (b, h, i)
  if (row >= B * H * Sq) return;
  int i = row % Sq;
  int b = row / (H * Sq);
  const float* qi = q + (size_t)row * D;
  const float* kb = k + (size_t)b * Skv * D;
  const float* vb = v + (size_t)b * Skv * D;
  // Bottom-right aligned causal mask: query i sees keys j <= i + (Skv - Sq).
  int j_end = causal ? min(Skv, max(0, i + (Skv - Sq) + 1)) : Skv;

  float m = -INFINITY;  // the row's largest raw score q_i . k_j
  for (int j = 0; j < j_end; ++j) m = fmaxf(m, dot_fp32<D>(qi, kb + (size_t)j * D));
  // The exponent is round(s * scale) - m with m = round(max * scale): __fmul_rn keeps nvcc from
  // fusing it into one FMA (exact product, one rounding). Fused, the row's own max gives
  // exp(residual of m's rounding) instead of exp(0): harmless at ordinary scores, but at
  // inputs ~1e6 (scores ~1e13) the residual is ~1e5 and p is inf or 0. Unfused, p <= 1 and the
  // max gets exactly 1 at any magnitude.
  m = __fmul_rn(m, scale);
  float acc[D];  // indexed only by unrolled constants, so it stays in registers
#pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = 0.f;
  float l = 0.f;
  for (int j = 0; j < j_end; ++j) {
    const float s = dot_fp32<D>(qi, kb + (size_t)j * D);
    float p = expf(__fmul_rn(s, scale) - m);
    l += p;
#pragma unroll
    for (int d = 0; d < D; ++d) acc[d] += p * vb[(size_t)j * D + d];
  }
  // A row that sees no key (causal with Sq > Skv) is defined as zeros, lse = -inf.
  float inv = l != 0.f ? 1.f / l : 0.f;
  float* oi = o + (size_t)row * D;
#pragma unroll
  for (int d = 0; d < D; ++d) oi[d] = acc[d] * inv;
  if (lse) lse[row] = l != 0.f ? m + logf(l) : -INFINITY;
}

int fastmqa_k01_naive(const MQAParams& p) {
  if (p.dtype != FASTMQA_FP32) return FASTMQA_UNSUPPORTED;
  int rows = p.B * p.H * p.Sq;
  int threads = 128;
  int blocks = (rows + threads - 1) / threads;
  auto q = (const float*)p.q; auto k = (const float*)p.k; auto v = (const float*)p.v;
  auto o = (float*)p.o;
  if (p.D == 64)
    mqa_naive_kernel<64><<<blocks, threads, 0, p.stream>>>(q, k, v, o, p.lse, p.B, p.H, p.Sq, p.Skv, p.scale, p.causal);
  else if (p.D == 128)
    mqa_naive_kernel<128><<<blocks, threads, 0, p.stream>>>(q, k, v, o, p.lse, p.B, p.H, p.Sq, p.Skv, p.scale, p.causal);
  else
    return FASTMQA_UNSUPPORTED;
  return 0;
}
