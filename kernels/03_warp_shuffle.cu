// 03_warp_shuffle.cu — warp primitives: a query row belongs to a warp, not a thread.
//
// Chapter 02 kept one thread per query row, so a thread carried a whole row of D floats
// (168 registers for D = 128), walked a serial chain of D dependent FMAs per score, and read
// its q row from shared memory once per multiply-add. Here the 32 lanes of a warp share a row:
//   * lane l holds F = D/32 contiguous floats of q and of the output (float4 for D = 128,
//     float2 for D = 64), loaded and stored with coalesced vector accesses;
//   * a dot product is 32 partial sums, one per lane, added across the warp with
//     __shfl_xor_sync (registers to registers, no shared memory, no __syncthreads);
//   * the row maximum and the row sum are butterfly shuffles too, and the probability p_j
//     reaches every lane with one __shfl_sync broadcast.
// The K/V tile is still loaded into shared memory once per block and shared by all its heads
// (now with float4 loads). Same two-pass softmax as chapters 01-02.
//
// Two refinements keep the shuffles cheap (a shuffle costs about what a shared-memory load
// does, and a plain butterfly needs 5 of them per dot product):
//   * R query rows per warp: R heads of the same query position (packed i-major, r = i*H + h)
//     use the same k_j and v_j, so one float4 load of k_j from shared memory feeds R dot products.
//   * a reduce-scatter butterfly: C = 16 keys' partial sums are reduced together. At each xor
//     step a lane keeps half of its values and trades the other half with its partner, so
//     16 dot products cost 16 shuffles instead of 80, and afterwards lane l holds key l/2.
//
// Occupancy: 123 registers a thread (allocated as 128) x 256 threads = 32K of the SM's 64K
// registers, so 2 blocks (16 warps, 25% of the 64-warp maximum) share an SM. That is enough
// here: each warp has R rows x 16 keys of independent FMAs and shuffles in flight, so latency
// is hidden by instruction-level parallelism rather than by more warps. ncu's achieved
// occupancy (sm__warps_active) shows the 25%; the instruction counts show where time goes.
#include "mqa_params.cuh"
#include <cstdint>

namespace warp_shuffle {

constexpr unsigned FULL = 0xffffffffu;
constexpr int NW = 8;    // warps per block
constexpr int R = 4;     // query rows per warp: NW * R = 32 rows per block (all heads of one i at H = 32)
constexpr int TJ = 32;   // keys per shared-memory K/V tile
constexpr int C = 16;    // keys per reduce-scatter chunk

template <int F> __device__ __forceinline__ void load_frag(float (&x)[F], const float* p) {
  if constexpr (F == 4) { float4 t = *reinterpret_cast<const float4*>(p); x[0] = t.x; x[1] = t.y; x[2] = t.z; x[3] = t.w; }
  else { float2 t = *reinterpret_cast<const float2*>(p); x[0] = t.x; x[1] = t.y; }
}
template <int F> __device__ __forceinline__ void store_frag(float* p, const float (&x)[F]) {
  if constexpr (F == 4) *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  else *reinterpret_cast<float2*>(p) = make_float2(x[0], x[1]);
}

// In: x[r][c] = this lane's partial dot product of row r with key c of the chunk (c < NC).
// Out: s[r] = the full dot product (summed over all 32 lanes) of row r with key lane / (32 / NC).
// Step with xor offset `off`: lanes whose `off` bit is set keep the upper half of their n
// values and send the lower half to the partner (which does the opposite), so after the step
// each lane holds half as many values, each summed over twice as many lanes.
template <int NC>
__device__ __forceinline__ void reduce_scatter(float (&x)[R][NC], float (&s)[R], int lane) {
  constexpr int STEPS = NC == 32 ? 5 : NC == 16 ? 4 : NC == 8 ? 3 : NC == 4 ? 2 : 1;
#pragma unroll
  for (int step = 0; step < STEPS; ++step) {
    const int n = NC >> (step + 1), off = 16 >> step;  // constants once unrolled
    const bool upper = lane & off;
#pragma unroll
    for (int c = 0; c < NC / 2; ++c) {  // (a constant trip count, so nvcc unrolls it)
      if (c >= n) break;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float lo = x[r][c], hi = x[r][c + n];
        x[r][c] = (upper ? hi : lo) + __shfl_xor_sync(FULL, upper ? lo : hi, off);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    s[r] = x[r][0];  // lanes that differ only in the low bits still hold separate partials
#pragma unroll
    for (int off = 16 / NC; off >= 1; off /= 2) s[r] += __shfl_xor_sync(FULL, s[r], off);
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) x = fmaxf(x, __shfl_xor_sync(FULL, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) x += __shfl_xor_sync(FULL, x, off);
  return x;
}

template <int D>
__device__ __forceinline__ void load_tile(float* s, const float* g, int j0, int Skv) {
  // float4 per thread, consecutive threads on consecutive 16 bytes: fully coalesced.
  for (int e = threadIdx.x; e < TJ * D / 4; e += NW * 32) {
    int j = j0 + e / (D / 4);
    float4 x = j < Skv ? reinterpret_cast<const float4*>(g + (size_t)j * D)[e % (D / 4)] : make_float4(0.f, 0.f, 0.f, 0.f);
    reinterpret_cast<float4*>(s)[e] = x;
  }
}

// part[r][c] = this lane's share of q_r . k_{c0+c}: F multiply-adds per row and key. Lanes read
// consecutive float4s of one k row: conflict-free, and each load serves R rows.
template <int D>
__device__ __forceinline__ void partial_scores(float (&part)[R][C], const float (&qf)[R][D / 32],
                                               const float* sK, int lane) {
  constexpr int F = D / 32;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    float kf[F];
    load_frag<F>(kf, sK + c * D + lane * F);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
#pragma unroll
      for (int f = 0; f < F; ++f) s += qf[r][f] * kf[f];
      part[r][c] = s;
    }
  }
}

template <int D>
__global__ void __launch_bounds__(NW * 32)
mqa_warp_kernel(const float* __restrict__ q,   // (B, H, Sq, D)
                const float* __restrict__ k,   // (B, Skv, D)
                const float* __restrict__ v,   // (B, Skv, D)
                float* __restrict__ o,         // (B, H, Sq, D)
                float* __restrict__ lse,       // (B, H, Sq) or nullptr
                int H, int Sq, int Skv, float scale, int causal) {
  constexpr int F = D / 32;
  __shared__ __align__(16) float sK[TJ * D];
  __shared__ __align__(16) float sV[TJ * D];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.y;
  const int rows = H * Sq;
  const int r0 = (blockIdx.x * NW + warp) * R;   // this warp's first packed row (i = r / H, h = r % H)
  const float* kb = k + (size_t)b * Skv * D;
  const float* vb = v + (size_t)b * Skv * D;

  float qf[R][F], acc[R][F], m[R], l[R];
  int j_end[R];
  size_t qoff[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int rr = r0 + r, i = rr / H, h = rr % H;
    const bool valid = rr < rows;
    j_end[r] = !valid ? 0 : causal ? min(Skv, max(0, i + Skv - Sq + 1)) : Skv;
    qoff[r] = (((size_t)b * H + h) * Sq + i) * D + lane * F;
    if (valid) load_frag<F>(qf[r], q + qoff[r]);
    else for (int f = 0; f < F; ++f) qf[r][f] = 0.f;
    m[r] = -INFINITY;
    l[r] = 0.f;
    for (int f = 0; f < F; ++f) acc[r][f] = 0.f;
  }
  // Keys the block needs: its last row has the largest i. Uniform over the block, so every
  // lane of every warp runs the same loop trips and all shuffles see a full warp.
  const int i_last = (min(rows, (blockIdx.x + 1) * NW * R) - 1) / H;
  const int jmax = causal ? min(Skv, max(0, i_last + Skv - Sq + 1)) : Skv;
  constexpr int SPREAD = 32 / C;  // lanes that end up holding the same key

  // Pass 1: row maxima. After the reduce-scatter lane l holds the score of key j0 + c0 + l/2.
  for (int j0 = 0; j0 < jmax; j0 += TJ) {
    __syncthreads();
    load_tile<D>(sK, kb, j0, Skv);
    __syncthreads();
    for (int c0 = 0; c0 < TJ && j0 + c0 < jmax; c0 += C) {
      float part[R][C];
      partial_scores<D>(part, qf, sK + c0 * D, lane);
      float s[R];
      reduce_scatter<C>(part, s, lane);
      const int j = j0 + c0 + lane / SPREAD;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (j < j_end[r]) m[r] = fmaxf(m[r], s[r]);  // raw scores
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) m[r] = __fmul_rn(warp_max(m[r]), scale);  // exponents round(s * scale) - m, unfused (see 01)

  // Pass 2: p = exp(s - m) where the key's score lives, then broadcast p to all lanes for PV.
  for (int j0 = 0; j0 < jmax; j0 += TJ) {
    __syncthreads();
    load_tile<D>(sK, kb, j0, Skv);
    load_tile<D>(sV, vb, j0, Skv);
    __syncthreads();
    for (int c0 = 0; c0 < TJ && j0 + c0 < jmax; c0 += C) {
      float part[R][C], s[R], p[R];
      partial_scores<D>(part, qf, sK + c0 * D, lane);
      reduce_scatter<C>(part, s, lane);
      const int j = j0 + c0 + lane / SPREAD;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        p[r] = j < j_end[r] ? expf(__fmul_rn(s[r], scale) - m[r]) : 0.f;
        l[r] += p[r];  // each key is counted by SPREAD lanes; divided out below
      }
#pragma unroll
      for (int c = 0; c < C; ++c) {
        float vf[F];
        load_frag<F>(vf, sV + (c0 + c) * D + lane * F);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float pc = __shfl_sync(FULL, p[r], c * SPREAD);  // the lane holding key c
#pragma unroll
          for (int f = 0; f < F; ++f) acc[r][f] += pc * vf[f];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float lr = warp_sum(l[r]) * (1.f / SPREAD);  // exact: SPREAD is a power of two
    if (r0 + r >= rows) continue;
    // A row that sees no key (causal with Sq > Skv) is defined as zeros, lse = -inf.
    const float inv = lr != 0.f ? 1.f / lr : 0.f;
    float out[F];
    for (int f = 0; f < F; ++f) out[f] = acc[r][f] * inv;
    store_frag<F>(o + qoff[r], out);
    if (lse && lane == 0) lse[(qoff[r] - lane * F) / D] = lr != 0.f ? m[r] + logf(lr) : -INFINITY;
  }
}

template <int D>
int launch(const MQAParams& p) {
  dim3 grid((p.H * p.Sq + NW * R - 1) / (NW * R), p.B);
  mqa_warp_kernel<D><<<grid, NW * 32, 0, p.stream>>>(
      (const float*)p.q, (const float*)p.k, (const float*)p.v, (float*)p.o, p.lse,
      p.H, p.Sq, p.Skv, p.scale, p.causal);
  return 0;
}

}  // namespace warp_shuffle

int fastmqa_k03_warp_shuffle(const MQAParams& p) {
  // float4/float2 accesses need 16-byte aligned rows: true for tensors torch allocates (the
  // registry passes contiguous tensors); a view starting mid-allocation could break it.
  const uintptr_t a = (uintptr_t)p.q | (uintptr_t)p.k | (uintptr_t)p.v | (uintptr_t)p.o;
  if (p.dtype != FASTMQA_FP32 || p.B > 65535 || (a & 15)) return FASTMQA_UNSUPPORTED;
  if (p.D == 64) return warp_shuffle::launch<64>(p);
  if (p.D == 128) return warp_shuffle::launch<128>(p);
  return FASTMQA_UNSUPPORTED;
}
