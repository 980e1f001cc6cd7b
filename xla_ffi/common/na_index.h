// Neighbourhood index math of NATTEN's neighborhood attention, per spatial axis.
//
// The one place that defines which keys a query sees; shared by the CPU and CUDA kernels
// (host and device code, no XLA includes) and mirrored by jnat/reference.py, which the
// tests check against NATTEN's own outputs.
//
// Along one axis of length L, dilation d splits positions into d interleaved groups
// (g = i % d). All window math happens in group coordinates (ig = i / d) on a group of
// length Lg = ceil((L - g) / d); a window slot n maps back to position g + (start + n) * d.
//  - stride s: queries are taken in blocks of s; the block's "leader" places the window
//    (centre of the block, or its last query when causal), clipped to the group.
//  - non-causal: start = leader - K/2 shifted inward so the window never leaves the group,
//    every slot valid. Even K: K/2 slots before the leader, K/2 - 1 after.
//  - causal: the window ends at the leader, start = max(leader - K + 1, 0) (so slots stay
//    in range); slot n is valid only while start + n <= ig (NATTEN 0.17's slot layout).
//  - relative positional bias index: (kg - ig) + K - 1, always in [0, 2K - 2].
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JNAT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define JNAT_HOST_DEVICE inline
#endif

namespace jnat {

JNAT_HOST_DEVICE int64_t GroupLength(int64_t length, int64_t dilation, int64_t group) {
  return (length - group + dilation - 1) / dilation;
}

// First window slot, in group coordinates, of the query at group coordinate `ig`.
JNAT_HOST_DEVICE int64_t WindowStart(int64_t ig, int64_t group_length, int64_t kernel,
                                     int64_t stride, bool causal) {
  const int64_t block = (ig / stride) * stride;
  if (causal) {
    int64_t leader = block + stride - 1;
    if (leader > group_length - 1) leader = group_length - 1;
    const int64_t start = leader - kernel + 1;
    return start > 0 ? start : 0;
  }
  int64_t leader = block + stride / 2;
  if (leader > group_length - 1) leader = group_length - 1;
  int64_t start = leader - kernel / 2;
  if (start > group_length - kernel) start = group_length - kernel;
  return start > 0 ? start : 0;
}

// Number of valid slots (a prefix of the window): K, or fewer for causal queries.
JNAT_HOST_DEVICE int64_t WindowCount(int64_t ig, int64_t start, int64_t kernel, bool causal) {
  if (!causal) return kernel;
  const int64_t count = ig - start + 1;
  return count < kernel ? count : kernel;
}

JNAT_HOST_DEVICE int64_t RpbIndex(int64_t key_g, int64_t query_g, int64_t kernel) {
  return key_g - query_g + kernel - 1;
}

// The window of one query along one axis, in positions of the axis.
struct AxisWindow {
  int64_t first;  // position of slot 0
  int64_t step;   // distance between slots (the dilation)
  int64_t count;  // valid slots; slots >= count are masked (causal only)
  int64_t rpb0;   // RpbIndex of slot 0; slot n has rpb0 + n
};

JNAT_HOST_DEVICE AxisWindow QueryWindow(int64_t i, int64_t length, int64_t kernel,
                                        int64_t stride, int64_t dilation, bool causal) {
  const int64_t group = i % dilation;
  const int64_t ig = i / dilation;
  const int64_t start =
      WindowStart(ig, GroupLength(length, dilation, group), kernel, stride, causal);
  return AxisWindow{group + start * dilation, dilation,
                    WindowCount(ig, start, kernel, causal), RpbIndex(start, ig, kernel)};
}

}  // namespace jnat
