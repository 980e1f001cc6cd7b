// Float32 vector primitives of the CPU kernels: dot products of one vector against a list of
// rows, weighted row sums, scattered row updates, exp, and 16-bit float conversions.
//
// AVX-512 versions when the compiler targets it, plain loops otherwise. Rows are length D,
// anywhere in memory (a neighbourhood window is a list of row pointers).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#define JNAT_CPU_AVX512 1
#endif

namespace jnat::cpu {

// ---------------------------------------------------------------------------------------------
// 16-bit floats (round to nearest even on the way down).

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float Bf16ToFloat(uint16_t h) { return BitsToFloat(static_cast<uint32_t>(h) << 16); }

inline uint16_t FloatToBf16(float f) {
  uint32_t x = FloatToBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  const float sub = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
  return sign ? -sub : sub;
}

inline uint16_t FloatToHalf(float f) {
  uint32_t x = FloatToBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // rounds past the largest half (65504)
  if (x < 0x38800000u) {                        // below 2^-14: a subnormal half (or zero)
    const float scaled = BitsToFloat(x) * 16777216.0f;  // exact: a power-of-two scaling
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  x += 0xfffu + ((x >> 13) & 1u);
  x -= 112u << 23;
  return sign | static_cast<uint16_t>(x >> 13);
}

// ---------------------------------------------------------------------------------------------
// out[i] = dot(x, rows[i]) for i < n. `zeros` is a row of at least D zeros (pads a partial
// group of rows).

#if defined(JNAT_CPU_AVX512)

// Lane j of the result is the sum of the 16 lanes of a[j].
inline __m512 HorizontalSums16(const __m512* a) {
  __m512 b[8], c[4], e[2];
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // f lane 4k+m holds the sum of a[4m+k].
  const __m512i order =
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, f);
}

inline __mmask16 TailMask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xffff)
                         : static_cast<__mmask16>((1u << remaining) - 1u);
}

inline void Dot16(const float* x, const float* const* rows, int64_t D, float* out) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 xv = _mm512_loadu_ps(x + d);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(rows[j] + d), acc[j]);
  }
  if (d < D) {
    const __mmask16 m = TailMask(D - d);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + d);
    for (int j = 0; j < 16; ++j) {
      acc[j] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, rows[j] + d), acc[j]);
    }
  }
  _mm512_storeu_ps(out, HorizontalSums16(acc));
}

inline float Dot1(const float* x, const float* row, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = TailMask(D - d);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + d), _mm512_maskz_loadu_ps(m, row + d), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

inline void DotRows(const float* x, const float* const* rows, int64_t n, int64_t D,
                    const float* zeros, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) Dot16(x, rows + i, D, out + i);
  const int64_t rest = n - i;
  if (rest > 4) {
    const float* padded[16];
    float tmp[16];
    for (int j = 0; j < 16; ++j) padded[j] = j < rest ? rows[i + j] : zeros;
    Dot16(x, padded, D, tmp);
    for (int64_t j = 0; j < rest; ++j) out[i + j] = tmp[j];
  } else {
    for (; i < n; ++i) out[i] = Dot1(x, rows[i], D);
  }
}

// out[0:D] = scale * sum_i w[i] * rows[i][0:D]
inline void WeightedSum(const float* w, const float* const* rows, int64_t n, int64_t D,
                        float scale, float* out) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t d = 0; d < D; d += 32) {
    const __mmask16 m0 = TailMask(D - d);
    const __mmask16 m1 = D - d > 16 ? TailMask(D - d - 16) : static_cast<__mmask16>(0);
    __m512 a0[4], a1[4];
    for (int j = 0; j < 4; ++j) a0[j] = a1[j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int j = 0; j < 4; ++j) {
        const __m512 wv = _mm512_set1_ps(w[i + j]);
        const float* r = rows[i + j] + d;
        a0[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m0, r), a0[j]);
        a1[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m1, r + 16), a1[j]);
      }
    }
    for (; i < n; ++i) {
      const __m512 wv = _mm512_set1_ps(w[i]);
      const float* r = rows[i] + d;
      a0[0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m0, r), a0[0]);
      a1[0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m1, r + 16), a1[0]);
    }
    const __m512 s0 =
        _mm512_mul_ps(sv, _mm512_add_ps(_mm512_add_ps(a0[0], a0[1]), _mm512_add_ps(a0[2], a0[3])));
    const __m512 s1 =
        _mm512_mul_ps(sv, _mm512_add_ps(_mm512_add_ps(a1[0], a1[1]), _mm512_add_ps(a1[2], a1[3])));
    _mm512_mask_storeu_ps(out + d, m0, s0);
    if (m1) _mm512_mask_storeu_ps(out + d + 16, m1, s1);
  }
}

// rows[i][0:D] += w[i] * x[0:D]
inline void ScatterAxpy(const float* w, float* const* rows, int64_t n, int64_t D,
                        const float* x) {
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + d), x1 = _mm512_loadu_ps(x + d + 16);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 wv = _mm512_set1_ps(w[i]);
      float* r = rows[i] + d;
      _mm512_storeu_ps(r, _mm512_fmadd_ps(wv, x0, _mm512_loadu_ps(r)));
      _mm512_storeu_ps(r + 16, _mm512_fmadd_ps(wv, x1, _mm512_loadu_ps(r + 16)));
    }
  }
  for (; d < D; d += 16) {
    const __mmask16 m = TailMask(D - d);
    const __m512 x0 = _mm512_maskz_loadu_ps(m, x + d);
    for (int64_t i = 0; i < n; ++i) {
      float* r = rows[i] + d;
      _mm512_mask_storeu_ps(
          r, m, _mm512_fmadd_ps(_mm512_set1_ps(w[i]), x0, _mm512_maskz_loadu_ps(m, r)));
    }
  }
}

// row[d0:d0+16*NC] += sum_e w[e] * x[e][d0:...], the last of the NC vectors masked to D.
template <int NC>
inline void AccumulateChunk(float* row, int64_t D, int64_t d0, const float* const* x,
                            const float* w, int64_t m) {
  __mmask16 mk[NC];
  __m512 acc[NC];
  for (int c = 0; c < NC; ++c) {
    mk[c] = TailMask(D - d0 - 16 * c);
    acc[c] = _mm512_maskz_loadu_ps(mk[c], row + d0 + 16 * c);
  }
  for (int64_t e = 0; e < m; ++e) {
    const __m512 we = _mm512_set1_ps(w[e]);
    const float* xe = x[e] + d0;
    for (int c = 0; c < NC; ++c) {
      acc[c] = _mm512_fmadd_ps(we, _mm512_maskz_loadu_ps(mk[c], xe + 16 * c), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(row + d0 + 16 * c, mk[c], acc[c]);
}

// row[0:D] += sum_e w[e] * x[e][0:D]
inline void AccumulateRow(float* row, int64_t D, const float* const* x, const float* w,
                          int64_t m) {
  for (int64_t d = 0; d < D; d += 64) {
    switch ((std::min<int64_t>(D - d, 64) + 15) / 16) {
      case 1: AccumulateChunk<1>(row, D, d, x, w, m); break;
      case 2: AccumulateChunk<2>(row, D, d, x, w, m); break;
      case 3: AccumulateChunk<3>(row, D, d, x, w, m); break;
      default: AccumulateChunk<4>(row, D, d, x, w, m); break;
    }
  }
}

// exp of 16 lanes; relative error ~2 ulp, exact 0 far below the float range.
inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Largest of x[0:n], n >= 1.
inline float MaxOf(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    m = _mm512_mask_max_ps(m, TailMask(n - i), m, _mm512_maskz_loadu_ps(TailMask(n - i), x + i));
  }
  return _mm512_reduce_max_ps(m);
}

// x[i] = exp(x[i] - shift) for i < n; returns their sum. x has room for n rounded up to a
// multiple of 16 (whole vectors are stored: a masked store would stall the reloads).
inline float ExpShiftedSum(float* x, int64_t n, float shift) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    const __m512 e = _mm512_maskz_mov_ps(m, Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), s)));
    sum = _mm512_add_ps(sum, e);
    _mm512_storeu_ps(x + i, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// ---------------------------------------------------------------------------------------------
// Lane layout: 16 queries per vector (na_cpu_lanes.h). A "lane matrix" is [rows][16] floats.

// In-register transpose: r[i] lane j becomes r[j] lane i.
inline void Transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // 2x2 blocks of single floats
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // 4x4 blocks within each 128-bit lane
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  // u[4i + m] lane block k holds column 4k + m of rows 4i .. 4i + 3: gather the blocks.
  for (int m = 0; m < 4; ++m) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
    r[m] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[m + 8] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[m + 4] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[m + 12] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

// dst[i * dst_stride + j] = scale * rows[j][i] for i < D and j < n (n <= 16 rows of length
// D; a null row reads as zeros), other lanes of the n-wide stores untouched.
inline void StoreTransposed(const float* const* rows, int64_t n, int64_t D, float scale,
                            float* dst, int64_t dst_stride) {
  const __m512 sv = _mm512_set1_ps(scale);
  const __mmask16 lanes = TailMask(n);
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const __mmask16 m = TailMask(D - d0);
    __m512 r[16];
    for (int j = 0; j < 16; ++j) {
      r[j] = j < n && rows[j] ? _mm512_maskz_loadu_ps(m, rows[j] + d0) : _mm512_setzero_ps();
    }
    Transpose16(r);
    for (int64_t i = 0; i < std::min<int64_t>(16, D - d0); ++i) {
      _mm512_mask_storeu_ps(dst + (d0 + i) * dst_stride, lanes, _mm512_mul_ps(sv, r[i]));
    }
  }
}

// dst[j * dst_stride + d] = xt[d][j] for j < n, d < D: a lane matrix back to n rows.
inline void StoreLanesToRows(const float* xt, int64_t n, int64_t D, float* dst,
                             int64_t dst_stride) {
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const float* rows[16];
    const int64_t nd = std::min<int64_t>(16, D - d0);
    for (int64_t i = 0; i < nd; ++i) rows[i] = xt + 16 * (d0 + i);
    StoreTransposed(rows, nd, n, 1.0f, dst + d0, dst_stride);
  }
}

// NB slots of LaneDots, accumulated in registers over d.
template <int NB, bool kPermute>
inline void LaneDotsBlock(const float* xt, const float* row, int64_t W, int64_t D, __m512i rel,
                          float* out) {
  __m512 acc[NB];
  for (int n = 0; n < NB; ++n) acc[n] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 x = _mm512_load_ps(xt + 16 * d);
    const float* r = row + d * W;
    for (int n = 0; n < NB; ++n) {
      __m512 k = _mm512_loadu_ps(r + n);
      if (kPermute) k = _mm512_permutexvar_ps(rel, k);
      acc[n] = _mm512_fmadd_ps(x, k, acc[n]);
    }
  }
  for (int n = 0; n < NB; ++n) _mm512_store_ps(out + 16 * n, acc[n]);
}

template <bool kPermute>
inline void LaneDotsImpl(const float* xt, const float* row, int64_t W, int64_t D, int64_t slots,
                         __m512i rel, float* out) {
  int64_t n = 0;
  for (; n + 8 <= slots; n += 8) LaneDotsBlock<8, kPermute>(xt, row + n, W, D, rel, out + 16 * n);
  switch (slots - n) {
    case 1: LaneDotsBlock<1, kPermute>(xt, row + n, W, D, rel, out + 16 * n); break;
    case 2: LaneDotsBlock<2, kPermute>(xt, row + n, W, D, rel, out + 16 * n); break;
    case 3: LaneDotsBlock<3, kPermute>(xt, row + n, W, D, rel, out + 16 * n); break;
    case 4: LaneDotsBlock<4, kPermute>(xt, row + n, W, D, rel, out + 16 * n); break;
    case 5: LaneDotsBlock<5, kPermute>(xt, row + n, W, D, rel, out + 16 * n); break;
    case 6: LaneDotsBlock<6, kPermute>(xt, row + n, W, D, rel, out + 16 * n); break;
    case 7: LaneDotsBlock<7, kPermute>(xt, row + n, W, D, rel, out + 16 * n); break;
    default: break;
  }
}

template <int N>
using Seq = std::make_integer_sequence<int, N>;

// Columns shift .. shift + 15 of the 32 in (lo, hi): one in-register shift.
template <int kShift>
inline __m512 Columns(__m512 lo, __m512 hi) {
  return _mm512_castsi512_ps(
      _mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), kShift));
}

// NB slots kBase .. kBase + NB - 1 of an aligned 16-column group (kBase + NB <= 16) from the
// two aligned vectors at `row`: acc[i] += x * columns (kBase + i ..) for every d.
template <int kBase, int... I>
inline void AlignedDotsStep(const float* xt, const float* row, int64_t W, int64_t D,
                            __m512* acc, std::integer_sequence<int, I...>) {
  for (int64_t d = 0; d < D; ++d) {
    const __m512 x = _mm512_load_ps(xt + 16 * d);
    const __m512 lo = _mm512_load_ps(row + d * W), hi = _mm512_load_ps(row + d * W + 16);
    ((acc[I] = _mm512_fmadd_ps(x, Columns<kBase + I>(lo, hi), acc[I])), ...);
  }
}

template <int NB, int kBase>
inline void AlignedDotsBlock(const float* xt, const float* row, int64_t W, int64_t D,
                             float* out) {
  __m512 acc[NB];
  for (int n = 0; n < NB; ++n) acc[n] = _mm512_setzero_ps();
  AlignedDotsStep<kBase>(xt, row, W, D, acc, Seq<NB>());
  for (int n = 0; n < NB; ++n) _mm512_store_ps(out + 16 * n, acc[n]);
}

// Up to 8 slots from slot n0 (a multiple of 8) of a tile whose slot 0 is 64-byte aligned.
template <int kBase>
inline void AlignedDotsAt(const float* xt, const float* row, int64_t W, int64_t D, int64_t nb,
                          float* out) {
  switch (nb) {
    case 1: AlignedDotsBlock<1, kBase>(xt, row, W, D, out); break;
    case 2: AlignedDotsBlock<2, kBase>(xt, row, W, D, out); break;
    case 3: AlignedDotsBlock<3, kBase>(xt, row, W, D, out); break;
    case 4: AlignedDotsBlock<4, kBase>(xt, row, W, D, out); break;
    case 5: AlignedDotsBlock<5, kBase>(xt, row, W, D, out); break;
    case 6: AlignedDotsBlock<6, kBase>(xt, row, W, D, out); break;
    case 7: AlignedDotsBlock<7, kBase>(xt, row, W, D, out); break;
    default: AlignedDotsBlock<8, kBase>(xt, row, W, D, out); break;
  }
}

// out[n][j] = sum_d xt[d][j] * row[d * W + n + rel[j]] for n < slots: lane j's dot products
// with the columns of a transposed [D][W] matrix, slot n of lane j at column n + rel[j].
// rel == nullptr means rel[j] = j: one unaligned load per slot, or with `aligned` (row 64-byte
// aligned) two aligned loads per 16 slots and a shift in registers. Otherwise rel[j] < 16 and
// a permute picks each lane's column. xt and out are 64-byte aligned lane matrices.
inline void LaneDots(const float* xt, const float* row, int64_t W, int64_t D, int64_t slots,
                     const int32_t* rel, bool aligned, float* out) {
  if (aligned) {
    for (int64_t n = 0; n < slots; n += 8) {
      const int64_t nb = std::min<int64_t>(8, slots - n);
      const float* group = row + (n / 16) * 16;
      if (n % 16 == 0) {
        AlignedDotsAt<0>(xt, group, W, D, nb, out + 16 * n);
      } else {
        AlignedDotsAt<8>(xt, group, W, D, nb, out + 16 * n);
      }
    }
  } else if (rel == nullptr) {
    LaneDotsImpl<false>(xt, row, W, D, slots, _mm512_setzero_si512(), out);
  } else {
    LaneDotsImpl<true>(xt, row, W, D, slots, _mm512_loadu_si512(rel), out);
  }
}

// Rows d0 .. d0 + ND - 1 of LaneColumnSums, accumulated in registers over every slot.
template <int ND, bool kPermute>
inline void LaneColumnSumsBlock(const float* w, const float* const* rows, int64_t n_rows,
                                int64_t slots, int64_t W, int64_t d0, __m512i rel, float* out) {
  __m512 acc[ND];
  for (int d = 0; d < ND; ++d) acc[d] = _mm512_setzero_ps();
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* row = rows[r] + d0 * W;
    const float* wr = w + r * slots * 16;
    for (int64_t n = 0; n < slots; ++n) {
      const __m512 wv = _mm512_load_ps(wr + 16 * n);
      for (int d = 0; d < ND; ++d) {
        __m512 x = _mm512_loadu_ps(row + d * W + n);
        if (kPermute) x = _mm512_permutexvar_ps(rel, x);
        acc[d] = _mm512_fmadd_ps(wv, x, acc[d]);
      }
    }
  }
  for (int d = 0; d < ND; ++d) _mm512_store_ps(out + 16 * (d0 + d), acc[d]);
}

template <bool kPermute>
inline void LaneColumnSumsImpl(const float* w, const float* const* rows, int64_t n_rows,
                               int64_t slots, int64_t W, int64_t D, __m512i rel, float* out) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    LaneColumnSumsBlock<16, kPermute>(w, rows, n_rows, slots, W, d, rel, out);
  }
  for (; d + 4 <= D; d += 4) {
    LaneColumnSumsBlock<4, kPermute>(w, rows, n_rows, slots, W, d, rel, out);
  }
  for (; d < D; ++d) LaneColumnSumsBlock<1, kPermute>(w, rows, n_rows, slots, W, d, rel, out);
}

// acc[d] += sum over slots kBase + I of w[slot] * columns (kBase + I ..) of the two aligned
// vectors of row d, for the ND rows from `row`.
template <int ND, int kBase, int... I>
inline void AlignedColumnSumsStep(const float* w, const float* row, int64_t W, __m512* acc,
                                  std::integer_sequence<int, I...>) {
  __m512 lo[ND], hi[ND];
  for (int d = 0; d < ND; ++d) {
    lo[d] = _mm512_load_ps(row + d * W);
    hi[d] = _mm512_load_ps(row + d * W + 16);
  }
  auto slot = [&](auto shift, const float* ws) {
    const __m512 wv = _mm512_load_ps(ws);
    for (int d = 0; d < ND; ++d) {
      acc[d] = _mm512_fmadd_ps(wv, Columns<decltype(shift)::value>(lo[d], hi[d]), acc[d]);
    }
  };
  (slot(std::integral_constant<int, kBase + I>(), w + 16 * I), ...);
}

template <int ND, int kBase>
inline void AlignedColumnSumsAt(const float* w, const float* row, int64_t W, int64_t nb,
                                __m512* acc) {
  switch (nb) {
    case 1: AlignedColumnSumsStep<ND, kBase>(w, row, W, acc, Seq<1>()); break;
    case 2: AlignedColumnSumsStep<ND, kBase>(w, row, W, acc, Seq<2>()); break;
    case 3: AlignedColumnSumsStep<ND, kBase>(w, row, W, acc, Seq<3>()); break;
    case 4: AlignedColumnSumsStep<ND, kBase>(w, row, W, acc, Seq<4>()); break;
    case 5: AlignedColumnSumsStep<ND, kBase>(w, row, W, acc, Seq<5>()); break;
    case 6: AlignedColumnSumsStep<ND, kBase>(w, row, W, acc, Seq<6>()); break;
    case 7: AlignedColumnSumsStep<ND, kBase>(w, row, W, acc, Seq<7>()); break;
    default: AlignedColumnSumsStep<ND, kBase>(w, row, W, acc, Seq<8>()); break;
  }
}

// Rows d0 .. d0 + ND - 1 of LaneColumnSums for a tile whose slot 0 is 64-byte aligned.
template <int ND>
inline void AlignedColumnSumsBlock(const float* w, const float* const* rows, int64_t n_rows,
                                   int64_t slots, int64_t W, int64_t d0, float* out) {
  __m512 acc[ND];
  for (int d = 0; d < ND; ++d) acc[d] = _mm512_setzero_ps();
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* row = rows[r] + d0 * W;
    for (int64_t n = 0; n < slots; n += 8) {
      const int64_t nb = std::min<int64_t>(8, slots - n);
      const float* ws = w + (r * slots + n) * 16;
      if (n % 16 == 0) {
        AlignedColumnSumsAt<ND, 0>(ws, row + (n / 16) * 16, W, nb, acc);
      } else {
        AlignedColumnSumsAt<ND, 8>(ws, row + (n / 16) * 16, W, nb, acc);
      }
    }
  }
  for (int d = 0; d < ND; ++d) _mm512_store_ps(out + 16 * (d0 + d), acc[d]);
}

// out[d][j] = sum over key rows r and slots n of w[r * slots + n][j] * rows[r][d * W + n +
// rel[j]], d < D: lane j's weighted sum of the columns its dot products came from (LaneDots
// layout and cases; rel == nullptr: rel[j] = j). w and out are 64-byte aligned lane matrices.
inline void LaneColumnSums(const float* w, const float* const* rows, int64_t n_rows,
                           int64_t slots, int64_t W, int64_t D, const int32_t* rel, bool aligned,
                           float* out) {
  if (aligned) {
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) AlignedColumnSumsBlock<8>(w, rows, n_rows, slots, W, d, out);
    for (; d + 4 <= D; d += 4) AlignedColumnSumsBlock<4>(w, rows, n_rows, slots, W, d, out);
    for (; d < D; ++d) AlignedColumnSumsBlock<1>(w, rows, n_rows, slots, W, d, out);
  } else if (rel == nullptr) {
    LaneColumnSumsImpl<false>(w, rows, n_rows, slots, W, D, _mm512_setzero_si512(), out);
  } else {
    LaneColumnSumsImpl<true>(w, rows, n_rows, slots, W, D, _mm512_loadu_si512(rel), out);
  }
}

#else  // portable loops

inline void DotRows(const float* x, const float* const* rows, int64_t n, int64_t D,
                    const float* /*zeros*/, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* r = rows[i];
    float acc = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc += x[d] * r[d];
    out[i] = acc;
  }
}

inline void WeightedSum(const float* w, const float* const* rows, int64_t n, int64_t D,
                        float scale, float* out) {
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float wi = w[i];
    const float* r = rows[i];
    for (int64_t d = 0; d < D; ++d) out[d] += wi * r[d];
  }
  for (int64_t d = 0; d < D; ++d) out[d] *= scale;
}

inline void ScatterAxpy(const float* w, float* const* rows, int64_t n, int64_t D,
                        const float* x) {
  for (int64_t i = 0; i < n; ++i) {
    const float wi = w[i];
    float* r = rows[i];
    for (int64_t d = 0; d < D; ++d) r[d] += wi * x[d];
  }
}

inline void AccumulateRow(float* row, int64_t D, const float* const* x, const float* w,
                          int64_t m) {
  for (int64_t e = 0; e < m; ++e) {
    const float we = w[e];
    const float* xe = x[e];
    for (int64_t d = 0; d < D; ++d) row[d] += we * xe[d];
  }
}

inline float MaxOf(const float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline float ExpShiftedSum(float* x, int64_t n, float shift) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

#endif

}  // namespace jnat::cpu
