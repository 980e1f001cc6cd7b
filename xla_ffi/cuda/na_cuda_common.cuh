// Device helpers shared by the CUDA kernels: element loads in any supported dtype, warp
// reductions, and the window / inverse-window walks built on common/na_index.h (the only
// definition of which keys a query sees).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/na_index.h"
#include "cuda/na_cuda.h"

namespace jnat::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float LoadF(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case 1: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case 2: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void StoreF(void* p, int64_t i, float x, int dtype) {
  switch (dtype) {
    case 1: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x); break;
    case 2: static_cast<__half*>(p)[i] = __float2half_rn(x); break;
    default: static_cast<float*>(p)[i] = x; break;
  }
}

// The sum over the warp, in every lane (a fixed butterfly: deterministic).
__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// Spatial coordinates of a token.
struct Coord3 {
  int64_t i[3];
};

__device__ __forceinline__ Coord3 TokenCoord(const NaDims& s, int64_t token) {
  Coord3 c;
  c.i[2] = token % s.length[2];
  c.i[1] = (token / s.length[2]) % s.length[1];
  c.i[0] = token / (s.length[2] * s.length[1]);
  return c;
}

__device__ __forceinline__ AxisWindow AxisWindowOf(const NaDims& s, int a, int64_t i) {
  return QueryWindow(i, s.length[a], s.kernel[a], s.stride[a], s.dilation[a], s.causal[a] != 0);
}

// Slot of the key at group coordinate kg in the window of the query at group coordinate ig
// of the same dilation group (of length lg) along axis a, or -1 when the key is not in it;
// *rpb0 gets the window's rpb index of slot 0. AxisWindowOf's window, without its 64-bit
// divisions (query and key share the group, so the slot is kg - start).
__device__ __forceinline__ int64_t GroupSlot(const NaDims& s, int a, int64_t ig, int64_t kg,
                                             int64_t lg, int64_t* rpb0) {
  const bool causal = s.causal[a] != 0;
  const int64_t start = WindowStart(ig, lg, s.kernel[a], s.stride[a], causal);
  const int64_t n = kg - start;
  *rpb0 = RpbIndex(start, ig, s.kernel[a]);
  return n >= 0 && n < WindowCount(ig, start, s.kernel[a], causal) ? n : -1;
}

// Along one axis, the group indices [lo, hi] of the queries whose window holds key position
// kp (lo > hi: none). Window starts are monotone in the query, so this set is contiguous; its
// members are within K + S of the key (see na_index.h), which bounds the scan. Callers still
// test membership per query, so only the superset property matters for correctness.
__device__ __forceinline__ void InverseRange(const NaDims& s, int a, int64_t kp, int64_t* lo,
                                             int64_t* hi) {
  const int64_t d = s.dilation[a], g = kp % d, kg = kp / d;
  const int64_t lg = GroupLength(s.length[a], d, g);
  const int64_t reach = s.kernel[a] + s.stride[a];
  const int64_t first = kg - reach > 0 ? kg - reach : 0;
  const int64_t last = kg + reach < lg - 1 ? kg + reach : lg - 1;
  *lo = last + 1;
  *hi = first - 1;
  for (int64_t ig = first; ig <= last; ++ig) {
    int64_t rpb0;
    if (GroupSlot(s, a, ig, kg, lg, &rpb0) >= 0) {
      if (ig < *lo) *lo = ig;
      *hi = ig;
    }
  }
}

}  // namespace jnat::cuda
