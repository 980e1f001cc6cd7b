// The problem's geometry: sizes and per-axis window attributes of one call, rank-3 spatial.
//
// Plain data with no XLA includes, so kernels can take it directly; `NaParams`
// (na_params.h) extends it with what the handlers decode besides (dtypes, scale, rpb).
#pragma once

#include <cstdint>

namespace jnat {

struct NaGeometry {
  int64_t batch = 0, heads = 0, kv_heads = 1, dim = 0;
  int64_t length[3] = {1, 1, 1};
  int64_t kernel[3] = {1, 1, 1};
  int64_t stride[3] = {1, 1, 1};
  int64_t dilation[3] = {1, 1, 1};
  bool causal[3] = {false, false, false};

  int64_t tokens() const { return length[0] * length[1] * length[2]; }
  int64_t window() const { return kernel[0] * kernel[1] * kernel[2]; }
  int64_t rpb_extent(int a) const { return 2 * kernel[a] - 1; }
  int64_t rpb_size() const { return rpb_extent(0) * rpb_extent(1) * rpb_extent(2); }
  int64_t group() const { return heads / kv_heads; }
};

}  // namespace jnat
