// Tensor-core building blocks shared by the forward (na_fwd_mma.cu) and backward
// (na_bwd_mma.cu) kernels: mma.sync m16n8k16 with fp32 accumulation, ldmatrix, and the
// staging of 64-row tiles into padded shared memory. tests/cuda_model/ mirrors the fragment
// layouts and address formulas in NumPy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <climits>

#include "common/na_index.h"
#include "cuda/na_cuda.h"
#include "cuda/tile_config.h"

namespace jnat::cuda {

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void Run(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ uint16_t Bits(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void Run(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ uint16_t Bits(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
};

__device__ __forceinline__ void Ldmatrix4(uint32_t* r, const uint16_t* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void Ldmatrix4Trans(uint32_t* r, const uint16_t* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Copies 64 rows of HD elements (row r from src + row_off[r]; none when row_off[r] < 0) into
// padded shared rows, zero-filling missing rows and dims >= D.
template <int HD>
__device__ __forceinline__ void LoadRows(uint16_t* dst, const uint16_t* src,
                                         const int64_t* row_off, int64_t D, bool vec) {
  constexpr int kChunks = HD / 8, kLd = HD + kSmemPad;
  for (int idx = threadIdx.x; idx < kTileKeys * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks, d = (idx % kChunks) * 8;
    const int64_t off = row_off[r];
    uint16_t* to = dst + r * kLd + d;
    if (vec) {
      uint4 val = make_uint4(0, 0, 0, 0);
      if (off >= 0 && d < D) val = *reinterpret_cast<const uint4*>(src + off + d);
      *reinterpret_cast<uint4*>(to) = val;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) to[e] = (off >= 0 && d + e < D) ? src[off + d + e] : uint16_t{0};
    }
  }
}

// One block's box of rows (queries, or keys in the key-major backward): group grp, first
// group coordinate c0 and n positions per axis, plus the halo of the windows of the box's
// positions taken as queries, [lo, lo + ext) per axis in group coordinates (window starts are
// monotone, so the halo is a box).
struct TileBox {
  int64_t grp[3], c0[3], lo[3], ext[3];
  int n[3];

  __device__ bool empty() const { return n[0] <= 0 || n[1] <= 0 || n[2] <= 0; }

  // Row r (box position (j0, j1, j2), row-major in the tile shape) at positions pos; false
  // for rows past the box.
  __device__ bool Row(const NaDims& s, const QueryTile& tile, int r, int64_t* pos) const {
    const int j2 = r % tile.t[2], j1 = (r / tile.t[2]) % tile.t[1], j0 = r / (tile.t[2] * tile.t[1]);
    const int j[3] = {j0, j1, j2};
    bool valid = r < tile.t[0] * tile.t[1] * tile.t[2];
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      valid = valid && j[ax] < n[ax];
      pos[ax] = grp[ax] + (c0[ax] + j[ax]) * s.dilation[ax];
    }
    return valid;
  }
};

__device__ __forceinline__ TileBox MakeTileBox(const NaDims& s, const QueryTile& tile,
                                               int64_t block) {
  int64_t tc[3];
  tc[2] = block % tile.count[2];
  tc[1] = (block / tile.count[2]) % tile.count[1];
  tc[0] = block / (tile.count[2] * tile.count[1]);
  TileBox bx;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    bx.grp[ax] = tc[ax] / tile.per_group[ax];
    bx.c0[ax] = (tc[ax] % tile.per_group[ax]) * tile.t[ax];
    const int64_t lg = GroupLength(s.length[ax], s.dilation[ax], bx.grp[ax]);
    const int64_t left = lg - bx.c0[ax];
    bx.n[ax] = left < tile.t[ax] ? static_cast<int>(left) : tile.t[ax];
    int64_t first = LLONG_MAX, end = LLONG_MIN;
    for (int j = 0; j < bx.n[ax]; ++j) {
      const int64_t st =
          WindowStart(bx.c0[ax] + j, lg, s.kernel[ax], s.stride[ax], s.causal[ax] != 0);
      first = st < first ? st : first;
      end = st + s.kernel[ax] > end ? st + s.kernel[ax] : end;
    }
    bx.lo[ax] = first;
    bx.ext[ax] = end - first;
  }
  return bx;
}

// acc[nb] (m16 x n8 blocks, head dim HD) += A (16 x 64, from 16-bit-packed fp32 registers
// p[8][4] in the C layout) times the 64 x HD tile at rows, read transposed (ldmatrix.trans).
template <typename T, int HD>
__device__ __forceinline__ void AccumulatePTimesRows(float (*acc)[4], const float (*p)[4],
                                                     const uint16_t* rows, int lane) {
  constexpr int kLd = HD + kSmemPad;
#pragma unroll
  for (int kc = 0; kc < kTileKeys / 16; ++kc) {
    uint32_t pa[4];
    pa[0] = Mma<T>::Pack(p[2 * kc][0], p[2 * kc][1]);
    pa[1] = Mma<T>::Pack(p[2 * kc][2], p[2 * kc][3]);
    pa[2] = Mma<T>::Pack(p[2 * kc + 1][0], p[2 * kc + 1][1]);
    pa[3] = Mma<T>::Pack(p[2 * kc + 1][2], p[2 * kc + 1][3]);
#pragma unroll
    for (int dp = 0; dp < HD / 16; ++dp) {
      uint32_t bf[4];
      Ldmatrix4Trans(bf, rows + (kc * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kLd + dp * 16 +
                             (lane / 16) * 8);
      Mma<T>::Run(acc[2 * dp], pa, bf[0], bf[1]);
      Mma<T>::Run(acc[2 * dp + 1], pa, bf[2], bf[3]);
    }
  }
}

}  // namespace jnat::cuda
