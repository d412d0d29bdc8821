// 04_cublas.cu — hand the two matrix products to cuBLAS: fold the heads into M.
//
// Attention is two matrix products with a softmax between them. For MQA the products are
// unusually large, because every head multiplies against the SAME K and V: viewing q (B, H,
// Sq, D) as (B, H*Sq, D), the scores of all heads of batch b are ONE product
//     S_b = scale * Q_b K_b^T     (H*Sq, D) x (D, Skv) -> (H*Sq, Skv)
// and the output is another,
//     O_b = P_b V_b               (H*Sq, Skv) x (Skv, D) -> (H*Sq, D),
// so the whole batch is two cublasSgemmStridedBatched calls of B products each, with
// M = H*Sq rows: big enough for cuBLAS's tuned fp32 kernels to run near the CUDA cores' peak.
// Between them, a softmax kernel (one warp per score row, chapter 03's shuffles) turns S into
// P in place, applying the causal mask. The price is the score matrix itself: B*H*Sq*Skv
// floats written, read, written and read again through DRAM — the cost only fusion removes.
#include <cublas_v2.h>
#include "mqa_params.cuh"

namespace cublas_attn {

constexpr unsigned FULL = 0xffffffffu;
constexpr int WARPS = 8;  // score rows per 256-thread block

// One warp per row of S (row = (b, h, i) flattened, so i = row % Sq). Pass 1 keeps a running
// (max, sum) pair per lane — the sum is rescaled whenever the max grows — and merges the 32
// pairs with shuffles; pass 2 writes p = exp(s - m) / l, and zeros where the mask hides a key.
// Consecutive lanes touch consecutive floats of the row: every access is coalesced.
__global__ void __launch_bounds__(WARPS * 32)
softmax_rows_kernel(float* __restrict__ S,     // (B*H*Sq, Skv) scores in, probabilities out
                    float* __restrict__ lse,   // (B*H*Sq) or nullptr
                    long long rows, int Sq, int Skv, int causal) {
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp leaves together
  const int i = (int)(row % Sq);
  const int j_end = causal ? min(Skv, max(0, i + Skv - Sq + 1)) : Skv;  // bottom-right aligned
  float* x = S + row * Skv;

  float m = -INFINITY, l = 0.f;
  for (int j = lane; j < j_end; j += 32) {
    const float s = x[j];
    if (s > m) { l = l * expf(m - s) + 1.f; m = s; }  // exp(-inf) = 0 on the first key
    else l += expf(s - m);
  }
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) {
    const float mo = __shfl_xor_sync(FULL, m, off), lo = __shfl_xor_sync(FULL, l, off);
    const float mn = fmaxf(m, mo);
    // A lane that saw no key has m = -inf and l = 0: it must add 0, not 0 * exp(nan).
    l = (l != 0.f ? l * expf(m - mn) : 0.f) + (lo != 0.f ? lo * expf(mo - mn) : 0.f);
    m = mn;
  }
  const float inv = l != 0.f ? 1.f / l : 0.f;  // a row that sees no key: P = 0, so O = 0
  for (int j = lane; j < Skv; j += 32) x[j] = j < j_end ? expf(x[j] - m) * inv : 0.f;
  if (lse && lane == 0) lse[row] = l != 0.f ? m + logf(l) : -INFINITY;
}

}  // namespace cublas_attn

int fastmqa_k04_cublas(const MQAParams& p) {
  using namespace cublas_attn;
  const long long M = (long long)p.H * p.Sq;  // rows of one batch's products
  const size_t need = (size_t)p.B * M * p.Skv * sizeof(float);
  if (p.dtype != FASTMQA_FP32 || !p.blas_handle || !p.workspace || p.workspace_bytes < need ||
      M > 2147483647LL || (p.D != 64 && p.D != 128))
    return FASTMQA_UNSUPPORTED;
  constexpr int CUBLAS_FAILED = 2;  // nonzero: the binding reports it as an error
  cublasHandle_t h = (cublasHandle_t)p.blas_handle;
  const float* q = (const float*)p.q;
  const float* k = (const float*)p.k;
  const float* v = (const float*)p.v;
  float* o = (float*)p.o;
  float* S = (float*)p.workspace;
  const int D = p.D, Skv = p.Skv, m = (int)M;
  const float alpha = p.scale, one = 1.f, zero = 0.f;

  if (cublasSetStream(h, p.stream) != CUBLAS_STATUS_SUCCESS) return CUBLAS_FAILED;
  // torch's handle may be in TF32 mode (torch.backends.cuda.matmul.allow_tf32); this chapter
  // is about fp32, so ask for true fp32 products and put the caller's mode back afterwards.
  cublasMath_t saved;
  cublasGetMathMode(h, &saved);
  cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);

  // cuBLAS is column-major: a row-major (r, c) matrix is a column-major (c, r) one. So the
  // row-major S_b = Q_b K_b^T is computed as the column-major S_b^T = K_b Q_b^T:
  //   C (Skv x M, ldc Skv) = op(A) (Skv x D) * op(B) (D x M),  A = K_b (ld D, transposed), B = Q_b (ld D)
  cublasStatus_t st = cublasSgemmStridedBatched(
      h, CUBLAS_OP_T, CUBLAS_OP_N, Skv, m, D, &alpha,
      k, D, (long long)Skv * D,
      q, D, M * D, &zero,
      S, Skv, M * Skv, p.B);
  if (st == CUBLAS_STATUS_SUCCESS) {
    const long long rows = (long long)p.B * M;
    softmax_rows_kernel<<<(unsigned)((rows + WARPS - 1) / WARPS), WARPS * 32, 0, p.stream>>>(
        S, p.lse, rows, p.Sq, Skv, p.causal);
    // Row-major O_b = P_b V_b as column-major O_b^T = V_b^T P_b^T, and the column-major views
    // of V_b and P_b already are V_b^T and P_b^T: C (D x M) = A (D x Skv) * B (Skv x M),
    // A = V_b (ld D), B = P_b (ld Skv), neither transposed.
    st = cublasSgemmStridedBatched(
        h, CUBLAS_OP_N, CUBLAS_OP_N, D, m, Skv, &one,
        v, D, (long long)Skv * D,
        S, Skv, M * Skv, &zero,
        o, D, M * D, p.B);
  }
  cublasSetMathMode(h, saved);
  return st == CUBLAS_STATUS_SUCCESS ? 0 : CUBLAS_FAILED;
}
