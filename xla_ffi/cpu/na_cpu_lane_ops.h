// Vector operations of the lane layout (na_cpu_lanes.h): kLanes queries per vector. A "lane
// matrix" is [rows][kLanes] floats, 64-byte aligned.
#pragma once

#include "cpu/na_cpu_vec.h"

namespace jnat::cpu::JNAT_ISA_NS {

// dst[i * dst_stride + j] = scale * rows[j][i] for i < D and j < n (n <= kLanes rows of
// length D; a null row reads as zeros), other lanes of the n-wide stores untouched.
inline void StoreTransposed(const float* const* rows, int64_t n, int64_t D, float scale,
                            float* dst, int64_t dst_stride) {
  const Vf sv = Set1(scale);
  for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
    const int64_t nd = std::min<int64_t>(kLanes, D - d0);
    Vf r[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      if (j >= n || rows[j] == nullptr) {
        r[j] = Vf{};
      } else {
        r[j] = nd == kLanes ? LoadU(rows[j] + d0) : LoadFirst(rows[j] + d0, nd);
      }
    }
    Transpose(r);
    for (int64_t i = 0; i < nd; ++i) {
      float* out = dst + (d0 + i) * dst_stride;
      if (n == kLanes) {
        StoreU(out, sv * r[i]);
      } else {
        StoreFirst(out, sv * r[i], n);
      }
    }
  }
}

// dst[j * dst_stride + d] = xt[d][j] for j < n, d < D: a lane matrix back to n rows.
inline void StoreLanesToRows(const float* xt, int64_t n, int64_t D, float* dst,
                             int64_t dst_stride) {
  for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
    const float* rows[kLanes];
    const int64_t nd = std::min<int64_t>(kLanes, D - d0);
    for (int64_t i = 0; i < nd; ++i) rows[i] = xt + kLanes * (d0 + i);
    StoreTransposed(rows, nd, n, 1.0f, dst + d0, dst_stride);
  }
}

// Calls f(std::integral_constant<int, n>) for a run-time n in [1, N].
template <int N, typename F>
inline void WithCount(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return WithCount<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>());
}

// The slots of one block of the lane kernels below: at most 8 (accumulators in registers),
// and for kShiftInRegisters no more than one aligned vector's worth from the block start.
inline constexpr int kBlock = kLanes < 8 ? kLanes : 8;

// NB slots of LaneDots, accumulated in registers over d.
template <int NB, bool kPermute>
inline void LaneDotsBlock(const float* xt, const float* row, int64_t W, int64_t D, Vi rel,
                          float* out) {
  Vf acc[NB];
  for (int n = 0; n < NB; ++n) acc[n] = Vf{};
  for (int64_t d = 0; d < D; ++d) {
    const Vf x = Load(xt + kLanes * d);
    const float* r = row + d * W;
    for (int n = 0; n < NB; ++n) {
      Vf k = LoadU(r + n);
      if (kPermute) k = Permute(k, rel);
      acc[n] = Fma(x, k, acc[n]);
    }
  }
  for (int n = 0; n < NB; ++n) Store(out + kLanes * n, acc[n]);
}

// NB slots from slot kBase of an aligned vector group (kBase + NB <= kLanes), from the two
// aligned vectors at `row`: acc[i] += x * lanes kBase + i .. of the pair, for every d.
template <int kBase, int... I>
inline void AlignedDotsBlock(const float* xt, const float* row, int64_t W, int64_t D,
                             float* out, std::integer_sequence<int, I...>) {
  Vf acc[sizeof...(I)];
  for (auto& a : acc) a = Vf{};
  for (int64_t d = 0; d < D; ++d) {
    const Vf x = Load(xt + kLanes * d);
    const Vf lo = Load(row + d * W), hi = Load(row + d * W + kLanes);
    ((acc[I] = Fma(x, Shift<kBase + I>(lo, hi), acc[I])), ...);
  }
  for (int n = 0; n < static_cast<int>(sizeof...(I)); ++n) Store(out + kLanes * n, acc[n]);
}

// Calls f(std::integral_constant<int, base>) for base = n % kLanes, a multiple of kBlock.
template <typename F>
inline void WithBlockBase(int64_t n, F&& f) {
  if constexpr (kLanes > kBlock) {
    if (n % kLanes != 0) return f(std::integral_constant<int, kBlock>());
  }
  f(std::integral_constant<int, 0>());
}

// out[n][j] = sum_d xt[d][j] * row[d * W + n + rel[j]] for n < slots: lane j's dot products
// with the columns of a transposed [D][W] matrix, slot n of lane j at column n + rel[j].
// rel == nullptr means rel[j] = j: one unaligned load per slot, or with `aligned` (row 64-byte
// aligned) two aligned loads per kLanes slots and a shift in registers. Otherwise
// rel[j] < kLanes and a permute picks each lane's column. xt and out are aligned lane
// matrices.
inline void LaneDots(const float* xt, const float* row, int64_t W, int64_t D, int64_t slots,
                     const int32_t* rel, bool aligned, float* out) {
  for (int64_t n = 0; n < slots; n += kBlock) {
    const int64_t nb = std::min<int64_t>(kBlock, slots - n);
    WithCount<kBlock>(nb, [&](auto count) {
      constexpr int NB = decltype(count)::value;
      if constexpr (kShiftInRegisters) {
        if (aligned) {
          return WithBlockBase(n, [&](auto base) {
            AlignedDotsBlock<decltype(base)::value>(xt, row + (n / kLanes) * kLanes, W, D,
                                                    out + kLanes * n,
                                                    std::make_integer_sequence<int, NB>());
          });
        }
      }
      if (rel == nullptr) {
        LaneDotsBlock<NB, false>(xt, row + n, W, D, Vi{}, out + kLanes * n);
      } else {
        LaneDotsBlock<NB, true>(xt, row + n, W, D, LoadI(rel), out + kLanes * n);
      }
    });
  }
}

// Rows d0 .. d0 + ND - 1 of LaneColumnSums, accumulated in registers over every slot.
template <int ND, bool kPermute>
inline void LaneColumnSumsBlock(const float* w, const float* const* rows, int64_t n_rows,
                                int64_t slots, int64_t W, int64_t d0, Vi rel, float* out) {
  Vf acc[ND];
  for (int d = 0; d < ND; ++d) acc[d] = Vf{};
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* row = rows[r] + d0 * W;
    const float* wr = w + r * slots * kLanes;
    for (int64_t n = 0; n < slots; ++n) {
      const Vf wv = Load(wr + kLanes * n);
      for (int d = 0; d < ND; ++d) {
        Vf x = LoadU(row + d * W + n);
        if (kPermute) x = Permute(x, rel);
        acc[d] = Fma(wv, x, acc[d]);
      }
    }
  }
  for (int d = 0; d < ND; ++d) Store(out + kLanes * (d0 + d), acc[d]);
}

// acc[d] += sum over slots kBase + I of w[slot] * lanes (kBase + I ..) of the two aligned
// vectors of row d, for the ND rows from `row`.
template <int ND, int kBase, int... I>
inline void AlignedColumnSumsStep(const float* w, const float* row, int64_t W, Vf* acc,
                                  std::integer_sequence<int, I...>) {
  Vf lo[ND], hi[ND];
  for (int d = 0; d < ND; ++d) {
    lo[d] = Load(row + d * W);
    hi[d] = Load(row + d * W + kLanes);
  }
  auto slot = [&](auto shift, const float* ws) {
    const Vf wv = Load(ws);
    for (int d = 0; d < ND; ++d) {
      acc[d] = Fma(wv, Shift<decltype(shift)::value>(lo[d], hi[d]), acc[d]);
    }
  };
  (slot(std::integral_constant<int, kBase + I>(), w + kLanes * I), ...);
}

// Rows d0 .. d0 + ND - 1 of LaneColumnSums for a tile whose slot 0 is 64-byte aligned.
template <int ND>
inline void AlignedColumnSumsBlock(const float* w, const float* const* rows, int64_t n_rows,
                                   int64_t slots, int64_t W, int64_t d0, float* out) {
  Vf acc[ND];
  for (int d = 0; d < ND; ++d) acc[d] = Vf{};
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* row = rows[r] + d0 * W;
    for (int64_t n = 0; n < slots; n += kBlock) {
      const float* ws = w + (r * slots + n) * kLanes;
      const float* group = row + (n / kLanes) * kLanes;
      WithCount<kBlock>(std::min<int64_t>(kBlock, slots - n), [&](auto count) {
        WithBlockBase(n, [&](auto base) {
          AlignedColumnSumsStep<ND, decltype(base)::value>(
              ws, group, W, acc, std::make_integer_sequence<int, decltype(count)::value>());
        });
      });
    }
  }
  for (int d = 0; d < ND; ++d) Store(out + kLanes * (d0 + d), acc[d]);
}

// out[d][j] = sum over key rows r and slots n of w[r * slots + n][j] * rows[r][d * W + n +
// rel[j]], d < D: lane j's weighted sum of the columns its dot products came from (LaneDots
// layout and cases; rel == nullptr: rel[j] = j). w and out are aligned lane matrices.
inline void LaneColumnSums(const float* w, const float* const* rows, int64_t n_rows,
                           int64_t slots, int64_t W, int64_t D, const int32_t* rel, bool aligned,
                           float* out) {
  int64_t d = 0;
  if constexpr (kShiftInRegisters) {
    if (aligned) {
      for (; d + 8 <= D; d += 8) AlignedColumnSumsBlock<8>(w, rows, n_rows, slots, W, d, out);
      for (; d + 4 <= D; d += 4) AlignedColumnSumsBlock<4>(w, rows, n_rows, slots, W, d, out);
      for (; d < D; ++d) AlignedColumnSumsBlock<1>(w, rows, n_rows, slots, W, d, out);
      return;
    }
  }
  auto blocks = [&](auto permute, Vi idx) {
    constexpr bool kPermute = decltype(permute)::value;
    // Accumulators in registers: 16 of them with 32 vector registers, 8 with 16.
    constexpr int kRows = kLanes == 16 ? 16 : 8;
    for (; d + kRows <= D; d += kRows) {
      LaneColumnSumsBlock<kRows, kPermute>(w, rows, n_rows, slots, W, d, idx, out);
    }
    for (; d + 4 <= D; d += 4) LaneColumnSumsBlock<4, kPermute>(w, rows, n_rows, slots, W, d, idx, out);
    for (; d < D; ++d) LaneColumnSumsBlock<1, kPermute>(w, rows, n_rows, slots, W, d, idx, out);
  };
  if (rel == nullptr) {
    blocks(std::false_type(), Vi{});
  } else {
    blocks(std::true_type(), LoadI(rel));
  }
}

}  // namespace jnat::cpu::JNAT_ISA_NS
