// The vector abstraction the CPU kernels are written over: kLanes floats per vector (GCC/Clang
// vector extensions), with the few operations the kernels need.
//
// One source, several instruction sets: na_cpu_isa_kernels.cc compiles the kernel headers
// once per instruction set, each time in its own namespace (JNAT_ISA_NS) and with that
// instruction set enabled for the functions it defines. The width follows the instruction
// set: 16 lanes for AVX-512, 8 for AVX2 + FMA, 4 for the baseline (SSE2 on x86-64, NEON on
// Arm). Plain vector arithmetic compiles to that instruction set's instructions (multiply-
// adds contract into FMA where it has one); only the lane permute has per-ISA intrinsics.
#pragma once

#ifndef JNAT_ISA_NS
#error "the CPU kernels are compiled only through na_cpu_isa_kernels.cc"
#endif

#include <cstdint>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Always inlined, on a function or a lambda: for the dispatch helpers whose callbacks add to
// accumulators that the caller keeps in registers. Where such a call is not inlined, the
// accumulators live in memory, a load and a store per multiply-add: clang left them so, and
// its build took 1.55x GCC's time on the 2D 56² K7 forward (avx2); forced, 1.03x, and GCC's
// own forward took 0.95x its time before.
#define JNAT_ALWAYS_INLINE __attribute__((always_inline))

namespace jnat::cpu::JNAT_ISA_NS {

#if JNAT_ISA_AVX512
inline constexpr int kLanes = 16;
#elif JNAT_ISA_AVX2
inline constexpr int kLanes = 8;
#else
inline constexpr int kLanes = 4;
#endif

typedef float Vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t Vi __attribute__((vector_size(4 * kLanes)));

// Interior windows read two aligned vectors and shift them in registers instead of issuing
// one unaligned load per window slot: a gain where a full-width load usually splits a cache
// line (64-byte vectors).
inline constexpr bool kShiftInRegisters = kLanes == 16;

inline Vf Load(const float* p) { return *reinterpret_cast<const Vf*>(p); }  // aligned
inline void Store(float* p, Vf v) { *reinterpret_cast<Vf*>(p) = v; }      // aligned
inline Vf LoadU(const float* p) {
  Vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void StoreU(float* p, Vf v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline Vi LoadI(const int32_t* p) { return *reinterpret_cast<const Vi*>(p); }  // aligned

// The first n (< kLanes) floats of p, zeros after; and the first n lanes of v stored to p.
inline Vf LoadFirst(const float* p, int64_t n) {
  Vf v = {};
  __builtin_memcpy(&v, p, sizeof(float) * n);
  return v;
}
inline void StoreFirst(float* p, Vf v, int64_t n) { __builtin_memcpy(p, &v, sizeof(float) * n); }

// v, held in a register from here on: an empty asm that the compiler cannot see through. Where
// a loaded vector feeds several multiply-adds, GCC otherwise folds the load into each of them
// as a memory operand, one load per use, and the loads bound the loop.
inline Vf InRegister(Vf v) {
#if JNAT_ISA_AVX512_ON_AVX2
  // A 16-float vector is two AVX2 registers, which no asm operand names: no hint.
#elif defined(__x86_64__)
  __asm__("" : "+x"(v));
#elif defined(__aarch64__)
  __asm__("" : "+w"(v));
#endif
  return v;
}

// dst[0 .. n) = src[0 .. n), inline: the backward copies rows of D floats per token and per
// lane, where a library call for each (32 floats) took 4% of it (3D 16³ K5, avx2). InRegister
// keeps the compiler from turning the loop back into that call.
inline void CopyFloats(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) StoreU(dst + i, InRegister(LoadU(src + i)));
  for (; i < n; ++i) dst[i] = src[i];
}

// x in every lane. (Not Vf{} + x: as 0 + -0 is +0, that is a real addition before the
// broadcast, and keeps the broadcast from reading x straight from memory.)
inline Vf Set1(float x) { return x - Vf{}; }
inline Vi Set1I(int32_t x) { return Vi{} + x; }
inline Vf Fma(Vf a, Vf b, Vf c) { return a * b + c; }
inline Vf Max(Vf a, Vf b) { return a > b ? a : b; }
inline Vf Select(Vi mask, Vf a, Vf b) { return mask ? a : b; }

// Sum of the lanes, in a fixed order.
inline float ReduceAdd(Vf v) {
  float s = v[0];
  for (int j = 1; j < kLanes; ++j) s += v[j];
  return s;
}

// Lane j of the result is v[idx[j]] (0 <= idx[j] < kLanes).
inline Vf Permute(Vf v, Vi idx) {
#if JNAT_ISA_AVX512 && !JNAT_ISA_AVX512_ON_AVX2
  return _mm512_permutexvar_ps(reinterpret_cast<__m512i>(idx), v);
#elif JNAT_ISA_AVX2
  return _mm256_permutevar8x32_ps(v, reinterpret_cast<__m256i>(idx));
#elif defined(__aarch64__)
  // One table lookup over the vector's bytes: lane j takes bytes 4 idx[j] .. 4 idx[j] + 3.
  // (The loop below compiles to a store and a load per lane.)
  const Vi bytes = idx * 0x04040404 + 0x03020100;
  return reinterpret_cast<Vf>(
      vqtbl1q_u8(reinterpret_cast<uint8x16_t>(v), reinterpret_cast<uint8x16_t>(bytes)));
#else
  Vf r;
  for (int j = 0; j < kLanes; ++j) r[j] = v[idx[j]];
  return r;
#endif
}

template <int... I>
inline Vf ShiftImpl(Vf lo, Vf hi, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(lo, hi, I...);
}

template <int kShift, int... I>
inline constexpr auto ShiftIndices(std::integer_sequence<int, I...>) {
  return std::integer_sequence<int, (kShift + I)...>();
}

// Lanes kShift .. kShift + kLanes - 1 of the 2 * kLanes in (lo, hi).
template <int kShift>
inline Vf Shift(Vf lo, Vf hi) {
  return ShiftImpl(lo, hi, ShiftIndices<kShift>(std::make_integer_sequence<int, kLanes>()));
}

// Lane p of the result is lane Index(p) of the 2 * kLanes in (a, b): shuffles within the 4-float
// blocks that every instruction set's vectors are made of (cheap single instructions), or of
// whole blocks.
template <typename Index, int... P>
inline Vf ShuffleBy(Vf a, Vf b, std::integer_sequence<int, P...>) {
  return __builtin_shufflevector(a, b, Index::at(P)...);
}
template <typename Index>
inline Vf Shuffle(Vf a, Vf b) {
  return ShuffleBy<Index>(a, b, std::make_integer_sequence<int, kLanes>());
}
// Per block: a0 b0 a1 b1 (kHigh: a2 b2 a3 b3).
template <int kHigh>
struct Unpack {
  static constexpr int at(int p) { return p / 4 * 4 + 2 * kHigh + p % 4 / 2 + p % 2 * kLanes; }
};
// Per block: a0 a1 b0 b1 (kHigh: a2 a3 b2 b3).
template <int kHigh>
struct Pairs {
  static constexpr int at(int p) { return p / 4 * 4 + 2 * kHigh + p % 2 + p % 4 / 2 * kLanes; }
};
// Whole blocks: the even (kOdd: odd) blocks of a, then those of b.
template <int kOdd>
struct Blocks {
  static constexpr int half = kLanes >= 8 ? kLanes / 8 : 1;  // blocks taken from each of a and b
  static constexpr int at(int p) {
    return p / 4 / half * kLanes + (p / 4 % half * 2 + kOdd) * 4 + p % 4;
  }
};

// In-register transpose of kLanes vectors: r[i] lane j becomes r[j] lane i. Two rounds within
// 4-float blocks transpose each 4 x 4 block; then rounds of whole blocks (none with 4 lanes)
// move the blocks to their places.
inline void Transpose(Vf* r) {
  Vf t[kLanes];
  for (int i = 0; i < kLanes / 2; ++i) {
    t[2 * i] = Shuffle<Unpack<0>>(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = Shuffle<Unpack<1>>(r[2 * i], r[2 * i + 1]);
  }
  // r[4g + c], block k: rows 4g .. 4g + 3 of column 4k + c.
  for (int g = 0; g < kLanes / 4; ++g) {
    r[4 * g] = Shuffle<Pairs<0>>(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = Shuffle<Pairs<1>>(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = Shuffle<Pairs<0>>(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = Shuffle<Pairs<1>>(t[4 * g + 1], t[4 * g + 3]);
  }
  if constexpr (kLanes == 8) {
    for (int c = 0; c < 4; ++c) {
      const Vf lo = Shuffle<Blocks<0>>(r[c], r[4 + c]), hi = Shuffle<Blocks<1>>(r[c], r[4 + c]);
      r[c] = lo;
      r[4 + c] = hi;
    }
  } else if constexpr (kLanes == 16) {
    for (int c = 0; c < 4; ++c) {
      // Blocks 0 and 2, 1 and 3 of the four vectors' columns 4k + c; then each column whole.
      const Vf v0 = Shuffle<Blocks<0>>(r[c], r[4 + c]), v1 = Shuffle<Blocks<1>>(r[c], r[4 + c]);
      const Vf v2 = Shuffle<Blocks<0>>(r[8 + c], r[12 + c]);
      const Vf v3 = Shuffle<Blocks<1>>(r[8 + c], r[12 + c]);
      r[c] = Shuffle<Blocks<0>>(v0, v2);
      r[8 + c] = Shuffle<Blocks<1>>(v0, v2);
      r[4 + c] = Shuffle<Blocks<0>>(v1, v3);
      r[12 + c] = Shuffle<Blocks<1>>(v1, v3);
    }
  }
}

// ln 2 as a short head (exact when multiplied by small integers) and the remainder: n * ln 2
// to float precision for the exponent n of Exp and LogAtLeastOne.
inline constexpr float kLn2Head = 0.693359375f, kLn2Tail = -2.12194440e-4f;

// exp of every lane (x <= 88); relative error ~2 ulp where exp(x) is a normal float. Below
// that (x < -87.3) it is exp(x) or 0, and exactly 0 from x = -88 down (-inf and NaN
// included): the kernels take it of softmax arguments, where such a weight is negligible
// beside the window's largest (>= 1). That range lets 2^n be one factor made from the rounding's
// own bits (no conversion, one multiply), where denormal results took two.
inline Vf Exp(Vf x) {
  x = Max(x, Set1(-88.0f));
  x = x < Set1(88.0f) ? x : Set1(88.0f);
  // n = round(x / ln 2), in [-127, 127]: adding 1.5 * 2^23 leaves it in the low mantissa bits.
  const Vf shifter = Set1(12582912.0f);
  const Vf t = x * Set1(1.44269504088896341f) + shifter;
  const Vf n = t - shifter;
  Vf r = Fma(n, Set1(-kLn2Head), x);
  r = Fma(n, Set1(-kLn2Tail), r);
  Vf p = Set1(1.9875691500e-4f);
  p = Fma(p, r, Set1(1.3981999507e-3f));
  p = Fma(p, r, Set1(8.3334519073e-3f));
  p = Fma(p, r, Set1(4.1665795894e-2f));
  p = Fma(p, r, Set1(1.6666665459e-1f));
  p = Fma(p, r, Set1(5.0000001201e-1f));
  p = Fma(p, r * r, r + Set1(1.0f));
  // 2^n from t's bits (those of 1.5 * 2^23, plus n): shifted into the exponent field, the
  // shifter's own bits leave it, and n = -127 gives +0.
  typedef uint32_t Vu __attribute__((vector_size(4 * kLanes)));  // shifts that wrap
  const Vu bits = reinterpret_cast<Vu>(t);
  return p * reinterpret_cast<Vf>((bits + 127u) << 23);
}

// log of every lane, for x >= 1 (finite); relative error ~2 ulp. The forward takes it of the
// softmax sums, at least 1 as the window's largest weight is exp(0), where a library call
// per lane cost 2% of its time (2D 56² K7). x = 2^e * m with m in [sqrt(1/2), sqrt(2)), and
// log m = 2 atanh(s) for s = (m - 1) / (m + 1), |s| < 0.172, as an odd series to s^9.
inline Vf LogAtLeastOne(Vf x) {
  const Vi bits = reinterpret_cast<Vi>(x);
  const Vi e = (bits - 0x3f3504f3) >> 23;  // 0x3f3504f3: the bits of sqrt(1/2)
  const Vf m = reinterpret_cast<Vf>(bits - (e << 23));
  const Vf s = (m - Set1(1.0f)) / (m + Set1(1.0f));
  const Vf s2 = s * s;
  Vf p = Set1(1.0f / 9);
  p = Fma(p, s2, Set1(1.0f / 7));
  p = Fma(p, s2, Set1(1.0f / 5));
  p = Fma(p, s2, Set1(1.0f / 3));
  const Vf two_s = s + s;
  const Vf log_m = Fma(two_s, p * s2, two_s);
  const Vf ef = __builtin_convertvector(e, Vf);
  return Fma(ef, Set1(kLn2Head), Fma(ef, Set1(kLn2Tail), log_m));
}

}  // namespace jnat::cpu::JNAT_ISA_NS
