// Vector operations of the lane layout (na_cpu_lanes.h): kLanes queries per vector. A "lane
// matrix" is [rows][kLanes] floats, 64-byte aligned.
#pragma once

#include "cpu/na_cpu_vec.h"

namespace jnat::cpu::JNAT_ISA_NS {

// dst[i * dst_stride + j] = scale * src[j * src_stride + i] for i < D and j < width, rows j >= n
// (n <= width <= kLanes) reading as zeros; other lanes of the width-wide stores untouched.
inline void StoreTransposed(const float* src, int64_t src_stride, int64_t n, int64_t D,
                            float scale, float* dst, int64_t dst_stride, int64_t width) {
  const Vf sv = Set1(scale);
  for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
    const int64_t nd = std::min<int64_t>(kLanes, D - d0);
    Vf r[kLanes];
    if (n == kLanes && nd == kLanes) {  // straight-line code: r stays in registers
      for (int j = 0; j < kLanes; ++j) r[j] = LoadU(src + j * src_stride + d0);
    } else {
      for (int j = 0; j < kLanes; ++j) {
        const float* row = src + j * src_stride + d0;
        r[j] = j >= n ? Vf{} : nd == kLanes ? LoadU(row) : LoadFirst(row, nd);
      }
    }
    Transpose(r);
    if (nd == kLanes && width == kLanes) {  // a loop of known length: r is not spilled
      for (int i = 0; i < kLanes; ++i) StoreU(dst + (d0 + i) * dst_stride, sv * r[i]);
      continue;
    }
    for (int64_t i = 0; i < nd; ++i) {
      float* out = dst + (d0 + i) * dst_stride;
      if (width == kLanes) {
        StoreU(out, sv * r[i]);
      } else {
        StoreFirst(out, sv * r[i], width);
      }
    }
  }
}

// dst[j * dst_stride + d] = xt[d][j] for j < n, d < D: a lane matrix back to n rows.
inline void StoreLanesToRows(const float* xt, int64_t n, int64_t D, float* dst,
                             int64_t dst_stride) {
  for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
    const int64_t nd = std::min<int64_t>(kLanes, D - d0);
    StoreTransposed(xt + kLanes * d0, kLanes, nd, n, 1.0f, dst + d0, dst_stride, nd);
  }
}

// Calls f(std::integral_constant<int, n>) for a run-time n in [1, N].
template <int N, typename F>
JNAT_ALWAYS_INLINE inline void WithCount(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return WithCount<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>());
}

// Query rows whose dot products and column sums run together (one tile of each): a key row
// that several of them see is loaded (and shifted or permuted) once for all of them, which
// halves the shuffles per multiply-add that bound these loops.
inline constexpr int kRowBlock = 2;

// One key row read by a block of query rows.
struct KeyRowOf {
  int32_t mask = 0;           // bit i: query row i of the block sees it
  int32_t at[kRowBlock] = {};  // its index among the key rows of query row i
};

// Vector registers of the instruction set: how many accumulators a block can keep.
inline constexpr int kRegisters = kLanes == 16 ? 32 : 16;

// The most slots of one block of LaneDots: for kShiftInRegisters no more than one aligned
// vector's worth from the block start (8: the block bases WithBlockBase knows).
inline constexpr int kBlock = kLanes < 8 ? kLanes : 8;

// The slots of a block of LaneDots for M query rows: their accumulators, the M query vectors
// and the key vector in registers. With more, GCC folds the key vector's load into each of
// the M multiply-adds, one load per use (2D 56² K7 backward 0.92-0.98x with 4 + 3 slots
// instead of 7, avx2).
template <int M>
inline constexpr int kSlotsInRegisters = std::min(kBlock, (kRegisters - M - 1) / M);

// out[i][n] += (NB slots of LaneDots for the M query rows xt[i]), accumulated in registers
// over d; row and out[i] from the block's first slot.
template <int M, int NB, bool kPermute>
inline void LaneDotsBlock(const float* const* xt, const float* row, int64_t W, int64_t D,
                          Vi rel, float* const* out) {
  Vf acc[M][NB];
  for (auto& a : acc) {
    for (auto& v : a) v = Vf{};
  }
  for (int64_t d = 0; d < D; ++d) {
    Vf x[M];
    for (int i = 0; i < M; ++i) x[i] = Load(xt[i] + kLanes * d);
    const float* r = row + d * W;
    for (int n = 0; n < NB; ++n) {
      Vf k = InRegister(LoadU(r + n));
      if (kPermute) k = Permute(k, rel);
      for (int i = 0; i < M; ++i) acc[i][n] = Fma(x[i], k, acc[i][n]);
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int n = 0; n < NB; ++n) Store(out[i] + kLanes * n, acc[i][n]);
  }
}

// NB slots from slot kBase of an aligned vector group (kBase + NB <= kLanes), from the two
// aligned vectors at `row`: acc[i][n] += xt[i] * lanes kBase + n .. of the pair, for every d.
template <int M, int kBase, int... I>
inline void AlignedDotsBlock(const float* const* xt, const float* row, int64_t W, int64_t D,
                             float* const* out, std::integer_sequence<int, I...>) {
  constexpr int NB = sizeof...(I);
  Vf acc[M][NB];
  for (auto& a : acc) {
    for (auto& v : a) v = Vf{};
  }
  for (int64_t d = 0; d < D; ++d) {
    Vf x[M];
    for (int i = 0; i < M; ++i) x[i] = Load(xt[i] + kLanes * d);
    const Vf lo = Load(row + d * W), hi = Load(row + d * W + kLanes);
    const Vf k[NB] = {Shift<kBase + I>(lo, hi)...};
    for (int n = 0; n < NB; ++n) {
      for (int i = 0; i < M; ++i) acc[i][n] = Fma(x[i], k[n], acc[i][n]);
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int n = 0; n < NB; ++n) Store(out[i] + kLanes * n, acc[i][n]);
  }
}

// Calls f(std::integral_constant<int, base>) for base = n % kLanes, a multiple of 8.
template <typename F>
JNAT_ALWAYS_INLINE inline void WithBlockBase(int64_t n, F&& f) {
  if constexpr (kLanes > 8) {
    if (n % kLanes != 0) return f(std::integral_constant<int, 8>());
  }
  f(std::integral_constant<int, 0>());
}

// out[i][n][j] = sum_d xt[i][d][j] * row[d * W + n + rel[j]] for n < slots and each of the
// m <= kRowBlock query rows i: lane j's dot products with the columns of a transposed [D][W]
// matrix, slot n of lane j at column n + rel[j]. rel == nullptr means rel[j] = j: one
// unaligned load per slot, or with `aligned` (row 64-byte aligned) two aligned loads per
// kLanes slots and a shift in registers. Otherwise rel[j] < kLanes and a permute picks each
// lane's column. xt[i] and out[i] are aligned lane matrices.
inline void LaneDots(int64_t m, const float* const* xt, const float* row, int64_t W, int64_t D,
                     int64_t slots, const int32_t* rel, bool aligned, float* const* out) {
  WithCount<kRowBlock>(m, [&](auto rows) {
    constexpr int M = decltype(rows)::value;
    // Blocks of equal size (7 slots: 4 + 3, not 6 + 1); aligned ones start on whole vectors.
    const int64_t blocks = (slots + kSlotsInRegisters<M> - 1) / kSlotsInRegisters<M>;
    const int64_t step = kShiftInRegisters && aligned ? kBlock : (slots + blocks - 1) / blocks;
    for (int64_t n = 0; n < slots; n += step) {
      float* out_n[M];
      for (int i = 0; i < M; ++i) out_n[i] = out[i] + kLanes * n;
      WithCount<kBlock>(std::min<int64_t>(step, slots - n), [&](auto count) {
        constexpr int NB = decltype(count)::value;
        if constexpr (kShiftInRegisters) {
          if (aligned) {
            return WithBlockBase(n, [&](auto base) {
              AlignedDotsBlock<M, decltype(base)::value>(xt, row + (n / kLanes) * kLanes, W, D,
                                                         out_n,
                                                         std::make_integer_sequence<int, NB>());
            });
          }
        }
        if (rel == nullptr) {
          LaneDotsBlock<M, NB, false>(xt, row + n, W, D, Vi{}, out_n);
        } else {
          LaneDotsBlock<M, NB, true>(xt, row + n, W, D, LoadI(rel), out_n);
        }
      });
    }
  });
}

// Calls f(w) with w[i] the weights (slot 0) of key row `of` for query row i, for the rows
// in kMask (others nullptr): mask dispatched to a constant, so that accumulators of the rows
// not seeing the key row are left alone at no cost.
template <int M, typename F>
JNAT_ALWAYS_INLINE inline void WithKeyRowWeights(const float* const* w, const KeyRowOf& of,
                                                 int64_t slots, F&& f) {
  WithCount<(1 << M) - 1>(of.mask, [&](auto mask) JNAT_ALWAYS_INLINE {
    const float* wr[M];
    for (int i = 0; i < M; ++i) {
      wr[i] = (decltype(mask)::value >> i & 1) ? w[i] + of.at[i] * slots * kLanes : nullptr;
    }
    f(mask, wr);
  });
}

// Rows d0 .. d0 + ND - 1 of LaneColumnSums for M query rows, accumulated in registers over
// every key row and slot.
template <int M, int ND, bool kPermute>
inline void LaneColumnSumsBlock(const float* const* w, const float* const* rows,
                                const KeyRowOf* of, int64_t n_rows, int64_t slots, int64_t W,
                                int64_t d0, Vi rel, float* const* out) {
  Vf acc[M][ND];
  for (auto& a : acc) {
    for (auto& v : a) v = Vf{};
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* row = rows[r] + d0 * W;
    WithKeyRowWeights<M>(w, of[r], slots,
                         [&](auto mask, const float* const* wr) JNAT_ALWAYS_INLINE {
      constexpr int kMask = decltype(mask)::value;
      for (int64_t n = 0; n < slots; ++n) {
        Vf wv[M];
        for (int i = 0; i < M; ++i) {
          if (kMask >> i & 1) wv[i] = Load(wr[i] + kLanes * n);
        }
        for (int d = 0; d < ND; ++d) {
          // One load for the M multiply-adds (InRegister: 0.90x the 2D 56² K7 forward's time).
          Vf x = InRegister(LoadU(row + d * W + n));
          if (kPermute) x = Permute(x, rel);
          for (int i = 0; i < M; ++i) {
            if (kMask >> i & 1) acc[i][d] = Fma(wv[i], x, acc[i][d]);
          }
        }
      }
    });
  }
  for (int i = 0; i < M; ++i) {
    for (int d = 0; d < ND; ++d) Store(out[i] + kLanes * (d0 + d), acc[i][d]);
  }
}

// acc[i][d] += sum over slots kBase + I of wr[i][slot] * lanes (kBase + I ..) of the two
// aligned vectors of row d, for the ND rows from `row` and the query rows i in kMask.
template <int M, int ND, int kMask, int kBase, int... I>
JNAT_ALWAYS_INLINE inline void AlignedColumnSumsStep(const float* const* wr, const float* row,
                                                     int64_t W, Vf (*acc)[ND],
                                                     std::integer_sequence<int, I...>) {
  Vf lo[ND], hi[ND];
  for (int d = 0; d < ND; ++d) {
    lo[d] = Load(row + d * W);
    hi[d] = Load(row + d * W + kLanes);
  }
  auto slot = [&](auto shift, int64_t n) JNAT_ALWAYS_INLINE {
    Vf wv[M];
    for (int i = 0; i < M; ++i) {
      if (kMask >> i & 1) wv[i] = Load(wr[i] + kLanes * n);
    }
    for (int d = 0; d < ND; ++d) {
      const Vf x = Shift<decltype(shift)::value>(lo[d], hi[d]);
      for (int i = 0; i < M; ++i) {
        if (kMask >> i & 1) acc[i][d] = Fma(wv[i], x, acc[i][d]);
      }
    }
  };
  (slot(std::integral_constant<int, kBase + I>(), I), ...);
}

// Rows d0 .. d0 + ND - 1 of LaneColumnSums for a tile whose slot 0 is 64-byte aligned.
template <int M, int ND>
inline void AlignedColumnSumsBlock(const float* const* w, const float* const* rows,
                                   const KeyRowOf* of, int64_t n_rows, int64_t slots, int64_t W,
                                   int64_t d0, float* const* out) {
  Vf acc[M][ND];
  for (auto& a : acc) {
    for (auto& v : a) v = Vf{};
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* row = rows[r] + d0 * W;
    WithKeyRowWeights<M>(w, of[r], slots,
                         [&](auto mask, const float* const* wr) JNAT_ALWAYS_INLINE {
      for (int64_t n = 0; n < slots; n += 8) {
        const float* ws[M];
        for (int i = 0; i < M; ++i) ws[i] = wr[i] + kLanes * n;
        const float* group = row + (n / kLanes) * kLanes;
        WithCount<8>(std::min<int64_t>(8, slots - n), [&](auto count) JNAT_ALWAYS_INLINE {
          WithBlockBase(n, [&](auto base) JNAT_ALWAYS_INLINE {
            AlignedColumnSumsStep<M, ND, decltype(mask)::value, decltype(base)::value>(
                ws, group, W, acc, std::make_integer_sequence<int, decltype(count)::value>());
          });
        });
      }
    });
  }
  for (int i = 0; i < M; ++i) {
    for (int d = 0; d < ND; ++d) Store(out[i] + kLanes * (d0 + d), acc[i][d]);
  }
}

// out[i][d][j] = sum over key rows r that query row i sees (of[r]) and slots n of
// w[i][of[r].at[i] * slots + n][j] * rows[r][d * W + n + rel[j]], d < D, for the m <=
// kRowBlock query rows i: lane j's weighted sum of the columns its dot products came from
// (LaneDots layout and cases; rel == nullptr: rel[j] = j). w[i] and out[i] are aligned lane
// matrices.
inline void LaneColumnSums(int64_t m, const float* const* w, const float* const* rows,
                           const KeyRowOf* of, int64_t n_rows, int64_t slots, int64_t W,
                           int64_t D, const int32_t* rel, bool aligned, float* const* out) {
  WithCount<kRowBlock>(m, [&](auto query_rows) {
    constexpr int M = decltype(query_rows)::value;
    int64_t d = 0;
    if constexpr (kShiftInRegisters) {
      if (aligned) {
        // Per d row two aligned vectors and M accumulators in registers.
        constexpr int kRows = M == 1 ? 8 : 4;
        for (; d + kRows <= D; d += kRows) {
          AlignedColumnSumsBlock<M, kRows>(w, rows, of, n_rows, slots, W, d, out);
        }
        for (; d + 4 <= D; d += 4) {
          AlignedColumnSumsBlock<M, 4>(w, rows, of, n_rows, slots, W, d, out);
        }
        for (; d < D; ++d) AlignedColumnSumsBlock<M, 1>(w, rows, of, n_rows, slots, W, d, out);
        return;
      }
    }
    auto blocks = [&](auto permute, Vi idx) {
      constexpr bool kPermute = decltype(permute)::value;
      // Accumulators in registers: 16 of them with 32 vector registers, 8 with 16.
      constexpr int kRows = (kRegisters / 2) / M;
      for (; d + kRows <= D; d += kRows) {
        LaneColumnSumsBlock<M, kRows, kPermute>(w, rows, of, n_rows, slots, W, d, idx, out);
      }
      for (; d + 4 <= D; d += 4) {
        LaneColumnSumsBlock<M, 4, kPermute>(w, rows, of, n_rows, slots, W, d, idx, out);
      }
      for (; d < D; ++d) {
        LaneColumnSumsBlock<M, 1, kPermute>(w, rows, of, n_rows, slots, W, d, idx, out);
      }
    };
    if (rel == nullptr) {
      blocks(std::false_type(), Vi{});
    } else {
      blocks(std::true_type(), LoadI(rel));
    }
  });
}

}  // namespace jnat::cpu::JNAT_ISA_NS
