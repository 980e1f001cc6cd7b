// Float32 views of FFI buffers for the CPU kernels, which compute in float32 only.
//
// A float32 buffer is used in place; a bfloat16 or float16 input is converted into a float32
// copy, and a bfloat16 or float16 output gets a float32 scratch converted back on Commit().
// Validation is not done here: the handlers decode every buffer with common/na_params.h
// first, so only float32, bfloat16 and float16 buffers reach these classes.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/na_cpu_half.h"
#include "cpu/na_cpu_workers.h"
#include "xla/ffi/api/ffi.h"

namespace jnat::cpu {

namespace ffi = xla::ffi;

// Conversions of more elements than this are split over the workers.
inline constexpr int64_t kConvertGrain = int64_t{1} << 16;

// dst[i] = convert(src[i]) for i < n.
template <typename To, typename From, typename Convert>
void ConvertAll(const Workers& workers, const From* src, int64_t n, To* dst, Convert&& convert) {
  ForEachRange(workers, n, kConvertGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = convert(src[i]);
  });
}

// Float32 data of an input buffer: the buffer itself, or a converted copy.
class F32In {
 public:
  F32In(const Workers& workers, const ffi::AnyBuffer& buf) {
    const int64_t n = static_cast<int64_t>(buf.element_count());
    switch (buf.element_type()) {
      case ffi::DataType::F32:
        ptr_ = static_cast<const float*>(buf.untyped_data());
        return;
      case ffi::DataType::BF16:
        copy_.resize(static_cast<size_t>(n));
        ConvertAll(workers, static_cast<const uint16_t*>(buf.untyped_data()), n, copy_.data(),
                   Bf16ToFloat);
        break;
      default:  // F16, the only other dtype the decoders accept
        copy_.resize(static_cast<size_t>(n));
        ConvertAll(workers, static_cast<const uint16_t*>(buf.untyped_data()), n, copy_.data(),
                   HalfToFloat);
        break;
    }
    ptr_ = copy_.data();
  }
  const float* get() const { return ptr_; }

 private:
  std::vector<float> copy_;
  const float* ptr_ = nullptr;
};

// Float32 storage for an output buffer: the buffer itself, or a scratch converted on Commit().
class F32Out {
 public:
  F32Out(const Workers& workers, ffi::AnyBuffer buf) : workers_(workers), buf_(buf) {
    if (buf.element_type() == ffi::DataType::F32) {
      ptr_ = static_cast<float*>(buf.untyped_data());
    } else {
      scratch_.resize(buf.element_count());
      ptr_ = scratch_.data();
    }
  }
  float* get() const { return ptr_; }

  void Commit() {
    const ffi::DataType t = buf_.element_type();
    if (t == ffi::DataType::F32) return;
    const int64_t n = static_cast<int64_t>(scratch_.size());
    uint16_t* dst = static_cast<uint16_t*>(buf_.untyped_data());
    if (t == ffi::DataType::BF16) {
      ConvertAll(workers_, scratch_.data(), n, dst, FloatToBf16);
    } else {
      ConvertAll(workers_, scratch_.data(), n, dst, FloatToHalf);
    }
  }

 private:
  const Workers& workers_;
  ffi::AnyBuffer buf_;
  std::vector<float> scratch_;
  float* ptr_ = nullptr;
};

}  // namespace jnat::cpu
