// wgmma.cuh — Hopper's warpgroup matrix multiply (sm_90a) for 08_flash_wgmma.cu: shared-memory
// matrix descriptors for the 128-byte swizzled layout, the fences, and
// wgmma.mma_async m64nNk16 (N = 64, 128) for bf16 and fp16 with fp32 accumulators:
//   ss: D (+)= A B^T with A (64 x 16) and B (N x 16) both K-major in shared memory;
//   rs: D (+)= A B   with A (64 x 16) in registers and B (16 x N) MN-major in shared memory.
// A warpgroup (4 consecutive warps, the first one's index a multiple of 4) issues it together.
// Warp w of the warpgroup holds rows 16w .. 16w+15 of D, in mma.sync's m16n8 accumulator layout
// repeated for every 8 columns: d[4j + e] is row 16w + lane/4 + 8(e/2), column 8j + 2(lane%4) + e%2.
// A register A fragment is mma.sync m16n8k16's: so an accumulator, packed to 16 bits two
// columns at a time, is the A operand of the next product (the FlashAttention-2 trick again).
#pragma once
#include <cuda.h>  // CUtensorMap (TMA), types only: the encoder comes from cudaGetDriverEntryPointByVersion
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "mbarrier.cuh"

// Built for another GPU (fastmqa.build targets the device it runs on), the instructions are
// replaced by a trap: the launcher refuses devices other than compute capability 9.0 first.
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTMQA_SM90A_ASM(...) __trap()
#else
#define FASTMQA_SM90A_ASM(...) asm volatile(__VA_ARGS__)
#endif

namespace {

// The tile layout every operand uses: R rows of 64-element (128-byte) rows per "atom" of 64
// columns, atoms one after the other; the 16-byte chunk c of row r sits at chunk c ^ (r % 8)
// (the 128-byte swizzle; a tile starts 1024-byte aligned). Byte offset of chunk c (of D / 8) of
// row r in a tile of R rows:
template <int R>
__device__ __forceinline__ uint32_t sw128(int r, int c) {
  return (uint32_t)((c >> 3) * (R * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// A shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading and stride byte offsets (all in 16-byte units), 128-byte swizzle (mode 1, bits 62-63).
//   K-major operand (rows x 16 k of a tile above): start = the rows' first 16 k, SBO = 1024 (the
//   next 8 rows), LBO unused (1);
//   MN-major operand (16 k-rows x N of a tile above): start = the first k-row, SBO = 1024 (the
//   next 8 k-rows), LBO = bytes from one 64-column atom to the next.
__device__ __forceinline__ uint64_t gmma_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
         ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}
// A tile's descriptors differ only in the start address: GmmaBase builds the fields once, and
// at(bytes) is the descriptor of saddr + bytes with one 32-bit add to the address field, where
// gmma_desc would mask, shift and or again for every k-step (shared addresses stay below 2^18,
// so the 14-bit field cannot carry into the next one). FASTMQA_GMMA_ADD=0 keeps gmma_desc
// (the comparison build of session 11).
#ifndef FASTMQA_GMMA_ADD
#define FASTMQA_GMMA_ADD 1
#endif
struct GmmaBase {
  uint32_t saddr, lo, hi;
  __device__ __forceinline__ GmmaBase(uint32_t a, uint32_t lbo, uint32_t sbo)
      : saddr(a), lo(((a & 0x3FFFF) >> 4) | (((lbo & 0x3FFFF) >> 4) << 16)), hi(((sbo & 0x3FFFF) >> 4) | (1u << 30)) {}
  __device__ __forceinline__ uint64_t at(uint32_t bytes) const {
    if (!FASTMQA_GMMA_ADD) return gmma_desc(saddr + bytes, (lo >> 16) << 4, (hi & 0x3FFF) << 4);
    return ((uint64_t)hi << 32) | (uint32_t)(lo + (bytes >> 4));
  }
};
// stmatrix (sm_90): a warp stores four 8 x 8 matrices of 16-bit elements, each lane's register i
// holding the two elements of matrix i an mma accumulator fragment holds (row lane / 4, columns
// 2 (lane % 4) ..), lanes 8i .. 8i + 7 giving the shared addresses of matrix i's 8 rows (16 bytes each).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t x0, uint32_t x1, uint32_t x2, uint32_t x3) {
  FASTMQA_SM90A_ASM("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
                    ::"r"(addr), "r"(x0), "r"(x1), "r"(x2), "r"(x3) : "memory");
}
// Before the first wgmma, and whenever its accumulator or A registers were written by other code.
__device__ __forceinline__ void wgmma_fence() { FASTMQA_SM90A_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { FASTMQA_SM90A_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { FASTMQA_SM90A_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Shared memory written by ordinary stores or cp.async becomes visible to wgmma (the async proxy).
__device__ __forceinline__ void fence_async_shared() { FASTMQA_SM90A_ASM("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// TMA (the tensor memory accelerator): one thread copies a box of a tensor described by a tensor
// map into shared memory, in the 128-byte swizzled layout above when the map says so, completing
// on an mbarrier with its byte count. Coordinates innermost first (column, row, batch); rows
// outside the tensor read as zeros.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* tm, int c0, int c1, int c2, uint32_t bar) {
  FASTMQA_SM90A_ASM(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(dst), "l"(tm), "r"(c0), "r"(c1), "r"(c2), "r"(bar) : "memory");
}

// The same for a 4-D box (q's (D, S, H, B) dims: 08's warp-specialised kernel reads a block's Q
// rows, every head of a few query positions, as one box per 64-column atom).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* tm, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
  FASTMQA_SM90A_ASM(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
      ::"r"(dst), "l"(tm), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar) : "memory");
}

// TMA store: the box at coordinates {c0, .., c3} of the tensor map's tensor from shared memory at
// src (the same 128-byte swizzle), in a bulk group of the issuing thread; commit closes the group,
// wait_read<N> waits until at most N of its groups still read shared memory (the source may then be
// reused), wait<N> until at most N are incomplete. Boxes past the tensor's edge are clipped.
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* tm, uint32_t src, int c0, int c1, int c2, int c3) {
  FASTMQA_SM90A_ASM("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n"
                    ::"l"(tm), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(src) : "memory");
}
__device__ __forceinline__ void bulk_commit() { FASTMQA_SM90A_ASM("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() { FASTMQA_SM90A_ASM("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait() { FASTMQA_SM90A_ASM("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory"); }

// Host: cuTensorMapEncodeTiled for a tensor of 16-bit elements: `rank` dims (innermost first), the
// byte strides of dims 1.., a box of `box` elements per dim, 128-byte swizzle, elements outside the
// tensor read as zeros. False if the driver cannot make one (the caller falls back to cp.async).
inline bool make_tmap_u16(CUtensorMap* tm, const void* base, int rank, const cuuint64_t* dims,
                          const cuuint64_t* strides, const cuuint32_t* box) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = nullptr;
  if (encode == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult got;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &got) != cudaSuccess ||
        got != cudaDriverEntryPointSuccess || fn == nullptr)
      return false;
    encode = reinterpret_cast<Encode>(fn);
  }
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  return encode(tm, CU_TENSOR_MAP_DATA_TYPE_UINT16, rank, const_cast<void*>(base), dims, strides, box, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Host: the tensor map of a (B, S, D) tensor of 16-bit elements read in boxes of R rows x 64
// columns (one 64-column atom of sw128<R>), rows past S zero-filled.
inline bool make_tmap_bsd(CUtensorMap* tm, const void* base, int B, int S, int D, int R) {
  const cuuint64_t dims[3] = {(cuuint64_t)D, (cuuint64_t)S, (cuuint64_t)B};
  const cuuint64_t strides[2] = {(cuuint64_t)D * 2, (cuuint64_t)S * D * 2};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {64, (cuuint32_t)R, 1};
  return make_tmap_u16(tm, base, 3, dims, strides, box);
}

// Host: the tensor map of a (B, H, S, D) tensor (q or o) through its element strides (sb, sh, ss, 1), in
// boxes of 64 columns x P positions x NH heads: a block's rows h-major (row h P + p is position
// i0 + p of head h), positions past S zero-filled (a store clips them). False if the strides do not suit TMA (16-byte
// multiples) or the driver cannot make one.
inline bool make_tmap_bhsd(CUtensorMap* tm, const void* base, int B, int H, int S, int D, long long sb, long long sh,
                        long long ss, int P, int NH) {
  if ((sb * 2) % 16 || (sh * 2) % 16 || (ss * 2) % 16 || reinterpret_cast<uintptr_t>(base) % 16) return false;
  const cuuint64_t dims[4] = {(cuuint64_t)D, (cuuint64_t)S, (cuuint64_t)H, (cuuint64_t)B};
  const cuuint64_t strides[3] = {(cuuint64_t)ss * 2, (cuuint64_t)sh * 2, (cuuint64_t)sb * 2};
  const cuuint32_t box[4] = {64, (cuuint32_t)P, (cuuint32_t)NH, 1};
  return make_tmap_u16(tm, base, 4, dims, strides, box);
}

template <typename T, int N> struct Wgmma;
// The four specialisations differ in N (N/2 accumulator registers a thread, so the numbers of the
// operands after them) and the element type ("bf16" / "f16" in the instruction): one macro, with
// the accumulators' register lists and constraints spelled out once per N.
#define FASTMQA_REGS32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"  \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FASTMQA_REGS64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"  \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"  \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"  \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define FASTMQA_OUTS32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define FASTMQA_OUTS64 FASTMQA_OUTS32, \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// ss operands after the accumulators: descriptor A, descriptor B, scale-d (SA, SA + 1, SA + 2);
// rs operands: the 4 A registers, descriptor B, scale-d (SA .. SA + 5). Operand numbers as strings.
#define FASTMQA_WGMMA(T, TY, N, REGS, OUTS, A0, A1, A2, A3, A4, A5)                                      \
  template <> struct Wgmma<T, N> {                                                                        \
    static __device__ __forceinline__ void ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) { \
      FASTMQA_SM90A_ASM("{\n .reg .pred p;\n setp.ne.b32 p, %" A2 ", 0;\n"                               \
                        "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " REGS ", "          \
                        "%" A0 ", %" A1 ", p, 1, 1, 0, 0;\n}\n"                                             \
                        : OUTS : "l"(da), "l"(db), "r"(scale_d));                                         \
    }                                                                                                     \
    static __device__ __forceinline__ void rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db,     \
                                              int scale_d) {                                              \
      FASTMQA_SM90A_ASM("{\n .reg .pred p;\n setp.ne.b32 p, %" A5 ", 0;\n"                               \
                        "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " REGS ", "          \
                        "{%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" A4 ", p, 1, 1, 1;\n}\n"                     \
                        : OUTS : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));      \
    }                                                                                                     \
  };

FASTMQA_WGMMA(__nv_bfloat16, "bf16", 64, FASTMQA_REGS32, FASTMQA_OUTS32, "32", "33", "34", "35", "36", "37")
FASTMQA_WGMMA(__half, "f16", 64, FASTMQA_REGS32, FASTMQA_OUTS32, "32", "33", "34", "35", "36", "37")
FASTMQA_WGMMA(__nv_bfloat16, "bf16", 128, FASTMQA_REGS64, FASTMQA_OUTS64, "64", "65", "66", "67", "68", "69")
FASTMQA_WGMMA(__half, "f16", 128, FASTMQA_REGS64, FASTMQA_OUTS64, "64", "65", "66", "67", "68", "69")
#undef FASTMQA_WGMMA
#undef FASTMQA_REGS32
#undef FASTMQA_REGS64
#undef FASTMQA_OUTS32
#undef FASTMQA_OUTS64

// Warp specialisation (08's FlashAttention-3 structure): a warpgroup gives registers back to the
// pool (dec) or takes them (inc) while the kernel runs; all of its threads execute it together.
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() { FASTMQA_SM90A_ASM("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R)); }
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() { FASTMQA_SM90A_ASM("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R)); }
// Named barriers (ids 1..15; 0 is __syncthreads): n threads, a multiple of 32, take part; sync
// waits for all n, arrive counts this warp without waiting.
__device__ __forceinline__ void named_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void named_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }

// Host: whether the current device has compute capability 9.x; the launchers of sm_90a code
// (08_flash_wgmma, 12_flash_bwd_wgmma) refuse other GPUs with FASTMQA_UNSUPPORTED.
inline bool device_is_sm90() {
  int dev = 0, major = 0;
  return cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major == 9;
}

}  // namespace
