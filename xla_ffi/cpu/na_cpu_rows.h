// Row primitives of the unfused CPU kernels (na_cpu_kernels.h): dot products of one vector
// against a list of rows, weighted row sums and accumulated row updates. Rows are length D,
// anywhere in memory (a neighbourhood window is a list of row pointers); the last D % kLanes
// floats of a row go through scalar loops.
#pragma once

#include "cpu/na_cpu_vec.h"

namespace jnat::cpu::JNAT_ISA_NS {

// out[j] = dot(x, rows[j]) for j < kLanes.
inline void DotLanes(const float* x, const float* const* rows, int64_t D, float* out) {
  Vf acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = Vf{};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const Vf xv = LoadU(x + d);
    for (int j = 0; j < kLanes; ++j) acc[j] = Fma(xv, LoadU(rows[j] + d), acc[j]);
  }
  Transpose(acc);  // lane j of the sum over acc: row j's partial sums
  Vf sum = acc[0];
  for (int j = 1; j < kLanes; ++j) sum += acc[j];
  StoreU(out, sum);
  for (int j = 0; j < kLanes; ++j) {
    for (int64_t e = d; e < D; ++e) out[j] += x[e] * rows[j][e];
  }
}

inline float Dot(const float* x, const float* row, int64_t D) {
  Vf acc = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) acc = Fma(LoadU(x + d), LoadU(row + d), acc);
  float sum = ReduceAdd(acc);
  for (; d < D; ++d) sum += x[d] * row[d];
  return sum;
}

// out[i] = dot(x, rows[i]) for i < n. `zeros` is a row of at least D zeros (pads a partial
// group of rows).
inline void DotRows(const float* x, const float* const* rows, int64_t n, int64_t D,
                    const float* zeros, float* out) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) DotLanes(x, rows + i, D, out + i);
  const int64_t rest = n - i;
  if (rest > kLanes / 4) {
    const float* padded[kLanes];
    float tmp[kLanes];
    for (int j = 0; j < kLanes; ++j) padded[j] = j < rest ? rows[i + j] : zeros;
    DotLanes(x, padded, D, tmp);
    for (int64_t j = 0; j < rest; ++j) out[i + j] = tmp[j];
  } else {
    for (; i < n; ++i) out[i] = Dot(x, rows[i], D);
  }
}

// out[0:D] = scale * sum_i w[i] * rows[i][0:D]
inline void WeightedSum(const float* w, const float* const* rows, int64_t n, int64_t D,
                        float scale, float* out) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    Vf acc[4] = {};  // independent chains
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int j = 0; j < 4; ++j) acc[j] = Fma(Set1(w[i + j]), LoadU(rows[i + j] + d), acc[j]);
    }
    for (; i < n; ++i) acc[0] = Fma(Set1(w[i]), LoadU(rows[i] + d), acc[0]);
    StoreU(out + d, Set1(scale) * ((acc[0] + acc[1]) + (acc[2] + acc[3])));
  }
  for (; d < D; ++d) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) acc += w[i] * rows[i][d];
    out[d] = scale * acc;
  }
}

// row[d0:d0 + NC * kLanes] += sum_e w[e] * x[e][d0:...]
template <int NC>
inline void AccumulateChunk(float* row, int64_t d0, const float* const* x, const float* w,
                            int64_t m) {
  Vf acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = LoadU(row + d0 + kLanes * c);
  for (int64_t e = 0; e < m; ++e) {
    const Vf we = Set1(w[e]);
    for (int c = 0; c < NC; ++c) acc[c] = Fma(we, LoadU(x[e] + d0 + kLanes * c), acc[c]);
  }
  for (int c = 0; c < NC; ++c) StoreU(row + d0 + kLanes * c, acc[c]);
}

// row[0:D] += sum_e w[e] * x[e][0:D]
inline void AccumulateRow(float* row, int64_t D, const float* const* x, const float* w,
                          int64_t m) {
  int64_t d = 0;
  for (; d + 4 * kLanes <= D; d += 4 * kLanes) AccumulateChunk<4>(row, d, x, w, m);
  for (; d + kLanes <= D; d += kLanes) AccumulateChunk<1>(row, d, x, w, m);
  for (; d < D; ++d) {
    float acc = row[d];
    for (int64_t e = 0; e < m; ++e) acc += w[e] * x[e][d];
    row[d] = acc;
  }
}

}  // namespace jnat::cpu::JNAT_ISA_NS
