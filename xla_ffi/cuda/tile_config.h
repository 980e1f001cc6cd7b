// Tile choices of the tensor-core forward (na_fwd_mma.cu), each with its reason.
#pragma once

#include <cstdint>

#include "cuda/na_cuda.h"

namespace jnat::cuda {

// 64 queries per block: 4 warps of one m16 MMA row block each. More rows per warp would
// raise register use past the point where the 128-wide head dim still fits without spills.
constexpr int kTileQueries = 64;
constexpr int kTileWarps = kTileQueries / 16;
// 64 keys per step: the S tile is 16 x 64 per warp (32 fp32 registers), and K and V tiles of
// 64 x 128 half words (Q is staged in K's buffer) fit in 36 KiB of shared memory, under the
// 48 KiB a block gets without an opt-in.
constexpr int kTileKeys = 64;
// Each shared-memory row is padded by 16 bytes so that the 8 rows one ldmatrix reads fall
// in different banks.
constexpr int kSmemPad = 8;

// Resident blocks per SM the tensor-core forward is compiled for, i.e. its register cap of
// 65536 / (128 n). Stated because ptxas otherwise picks its own occupancy target and spills
// to reach it (head dim 64 did, at 168 registers). Head dim 32 fits three blocks' 170
// registers; 64 and 128 need two blocks' 255.
constexpr int FwdMinBlocks(int head_dim) { return head_dim <= 32 ? 3 : 2; }

// Head-dim buckets with a compiled kernel; others go to the general kernel.
constexpr int HeadDimBucket(int64_t dim) {
  return dim <= 0 ? 0 : dim <= 32 ? 32 : dim <= 64 ? 64 : dim <= 128 ? 128 : 0;
}

// Head-dim buckets of the tensor-core backward: beyond 64, its two kernels' fragments and
// accumulators (q, dout and dq; k, v, dk and dv) no longer fit the registers of two blocks.
constexpr int BwdHeadDimBucket(int64_t dim) {
  return dim <= 0 ? 0 : dim <= 32 ? 32 : dim <= 64 ? 64 : 0;
}

constexpr int SmemBytes(int head_dim) {
  return 2 * kTileKeys * (head_dim + kSmemPad) * 2 + kTileKeys * 4 * 4 + kTileKeys * 8;
}

// The spatial box of a block's queries: T[a] consecutive positions of one dilation group
// along each axis, T0 * T1 * T2 <= kTileQueries.
struct QueryTile {
  int t[3];
  int64_t per_group[3];  // tiles per dilation group along each axis
  int64_t count[3];      // tiles along each axis (all groups)
  int64_t total;
};

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Picks the box with the least MMA work: tiles x key blocks per tile, where a tile's keys
// are the halo box of its queries (T + K + S - 2 per axis, at most the group length).
// Ties go to the box with more queries per tile (fewer, fuller blocks).
inline QueryTile ChooseQueryTile(const NaDims& s) {
  QueryTile best{};
  double best_cost = -1.0;
  for (int t0 = 1; t0 <= kTileQueries; t0 *= 2) {
    for (int t1 = 1; t0 * t1 <= kTileQueries; t1 *= 2) {
      for (int t2 = 1; t0 * t1 * t2 <= kTileQueries; t2 *= 2) {
        const int t[3] = {t0, t1, t2};
        QueryTile tile{};
        double halo = 1.0, tiles = 1.0;
        bool useful = true;
        for (int a = 0; a < 3; ++a) {
          const int64_t group_len = CeilDiv(s.length[a], s.dilation[a]);
          // A box twice the axis adds no queries.
          if (t[a] > 1 && t[a] / 2 >= group_len) useful = false;
          tile.t[a] = t[a];
          tile.per_group[a] = CeilDiv(group_len, t[a]);
          tile.count[a] = tile.per_group[a] * s.dilation[a];
          int64_t extent = t[a] + s.kernel[a] + s.stride[a] - 2;
          if (extent > group_len) extent = group_len;
          halo *= static_cast<double>(extent);
          tiles *= static_cast<double>(tile.count[a]);
        }
        if (!useful) continue;
        tile.total = tile.count[0] * tile.count[1] * tile.count[2];
        const double cost = tiles * static_cast<double>(CeilDiv(static_cast<int64_t>(halo),
                                                                 kTileKeys));
        const int q = t0 * t1 * t2;
        const int best_q = best.t[0] * best.t[1] * best.t[2];
        if (best_cost < 0 || cost < best_cost || (cost == best_cost && q > best_q)) {
          best = tile;
          best_cost = cost;
        }
      }
    }
  }
  return best;
}

}  // namespace jnat::cuda
