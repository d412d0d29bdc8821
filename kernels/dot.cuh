// dot.cuh — the fp32 dot product q_i . k_j of the one-thread-per-row kernels (01_naive, 02_smem_tiled).
//
// A plain loop `s += q[d] * k[d]` is one chain of D dependent FMAs, each rounding a sum that
// grows to |q||k|: its error grows with D, and a large softmax scale multiplies it into the
// exponent. A GPU fuzz run (fastmqa.fuzz, seed 0) caught it: at D = 128,
// scale 0.61, 01_naive's error was 2.9x that of PyTorch's fp32 matmul (cuBLAS sums a dot product
// in short pieces). Here 16 independent partial sums of D/16 terms each are added pairwise at
// the end: the rounding error shrinks to that of a chain of D/16 + 4 additions, and the 16 chains
// no longer wait on each other (instruction-level parallelism). Measured on the H100 at the
// original project's shape (fp32, B=4, H=32, S=512, D=128; results/fp32dot_dev.json, made by
// scripts/dev_fp32dot.py with the FASTMQA_DOT_MODE / FASTMQA_DOT_P variants below):
//   01_naive       serial chain 8.52 ms (fuzz 30/31) -> 16 partial sums 4.61 ms (31/31)
//   02_smem_tiled  serial chain 2.87 ms              -> 16 partial sums 2.48 ms
// The loop is unrolled over all of D: that is what lets 01 keep its q row in registers across
// keys. Unrolled only two chunks of 16 at a time, 01 re-reads q for every key: 37 ms.
// Everything sits in an anonymous namespace, like the rest of a kernel file.
#pragma once
#ifndef FASTMQA_DOT_MODE
#define FASTMQA_DOT_MODE 0
#endif
#ifndef FASTMQA_DOT_P
#define FASTMQA_DOT_P 16
#endif

namespace {

template <int D>
__device__ __forceinline__ float dot_fp32(const float* __restrict__ a, const float* __restrict__ b) {
  constexpr int P = FASTMQA_DOT_P;
  static_assert(D % P == 0 && (P == 4 || P == 8 || P == 16), "P partial sums: 4, 8 or 16, dividing D");
  float s[P];
#pragma unroll
  for (int p = 0; p < P; ++p) s[p] = 0.f;
#if FASTMQA_DOT_MODE == 1  // dev variant: chunks of P, two at a time (scripts/dev_fp32dot.py compares)
#pragma unroll 2
  for (int d0 = 0; d0 < D; d0 += P)
#pragma unroll
    for (int p = 0; p < P; ++p) s[p] = fmaf(a[d0 + p], b[d0 + p], s[p]);
#elif FASTMQA_DOT_MODE == 2  // dev variant: the plain serial chain (what 01/02 did before)
  float x = 0.f;
#pragma unroll
  for (int d = 0; d < D; ++d) x = fmaf(a[d], b[d], x);
  return x;
#else
#pragma unroll
  for (int d = 0; d < D; ++d) s[d % P] = fmaf(a[d], b[d], s[d % P]);
#endif
  // pairwise: P -> P/2 -> ... -> 1 (written out: a `w /= 2` loop is not unrolled, and s[] would go to local memory)
  if (P >= 16) {
#pragma unroll
    for (int p = 0; p < 8; ++p) s[p] += s[p + 8];
  }
  if (P >= 8) {
#pragma unroll
    for (int p = 0; p < 4; ++p) s[p] += s[p + 4];
  }
  return ((s[0] + s[2]) + (s[1] + s[3]));
}

}  // namespace
