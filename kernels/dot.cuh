// dot.cuh — the fp32 dot product q_i . k_j of the one-thread-per-row kernels (01_naive, 02_smem_tiled).
//
// A plain loop `s += q[d] * k[d]` is one chain of D dependent FMAs, each rounding a sum that
// grows to |q||k|: its error grows with D, and a large softmax scale multiplies it into the
// exponent. A GPU fuzz run (fastmqa.fuzz, seed 0) caught it: at D = 128,
// scale 0.61, 01_naive's error was 2.9x that of PyTorch's fp32 matmul (cuBLAS sums a dot product
// in short pieces). Here 16 independent partial sums of D/16 terms each are added pairwise at
// the end: the rounding error shrinks to that of a chain of D/16 + 4 additions, and the 16 chains
// also no longer wait on each other (instruction-level parallelism). Costs 16 registers; the chunks of 16
// are unrolled two at a time so the loads of all D terms are not hoisted at once.
// Everything sits in an anonymous namespace, like the rest of a kernel file.
#pragma once

namespace {

template <int D>
__device__ __forceinline__ float dot_fp32(const float* __restrict__ a, const float* __restrict__ b) {
  constexpr int P = 16;
  static_assert(D % P == 0, "head dim must be a multiple of 16");
  float s[P];
#pragma unroll
  for (int p = 0; p < P; ++p) s[p] = 0.f;
#pragma unroll 2  // a few chunks in flight, not all D loads at once (the kernels keep acc[D] in registers)
  for (int d0 = 0; d0 < D; d0 += P)
#pragma unroll
    for (int p = 0; p < P; ++p) s[p] = fmaf(a[d0 + p], b[d0 + p], s[p]);
#pragma unroll
  for (int p = 0; p < 8; ++p) s[p] += s[p + 8];  // pairwise: 16 -> 8 -> 4 -> 2 -> 1
#pragma unroll
  for (int p = 0; p < 4; ++p) s[p] += s[p + 4];
  return ((s[0] + s[2]) + (s[1] + s[3]));
}

}  // namespace
