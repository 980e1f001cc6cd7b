// Float32 views of FFI buffers for the CPU kernels, which compute in float32 only.
//
// A float32 buffer is used in place; a bfloat16 or float16 input is converted into a float32
// copy, and a bfloat16 or float16 output gets a float32 scratch converted back on Commit().
// Validation is not done here: the handlers decode every buffer with common/na_params.h
// first, so only float32, bfloat16 and float16 buffers reach these classes.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/na_cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace jnat::cpu {

namespace ffi = xla::ffi;

// Float32 data of an input buffer: the buffer itself, or a converted copy.
class F32In {
 public:
  explicit F32In(const ffi::AnyBuffer& buf) {
    const int64_t n = static_cast<int64_t>(buf.element_count());
    switch (buf.element_type()) {
      case ffi::DataType::F32:
        ptr_ = static_cast<const float*>(buf.untyped_data());
        return;
      case ffi::DataType::BF16: {
        copy_.resize(static_cast<size_t>(n));
        const uint16_t* src = static_cast<const uint16_t*>(buf.untyped_data());
#pragma omp parallel for schedule(static) if (n > (1 << 16))
        for (int64_t i = 0; i < n; ++i) copy_[i] = Bf16ToFloat(src[i]);
        break;
      }
      default: {  // F16, the only other dtype the decoders accept
        copy_.resize(static_cast<size_t>(n));
        const uint16_t* src = static_cast<const uint16_t*>(buf.untyped_data());
#pragma omp parallel for schedule(static) if (n > (1 << 16))
        for (int64_t i = 0; i < n; ++i) copy_[i] = HalfToFloat(src[i]);
        break;
      }
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
  explicit F32Out(ffi::AnyBuffer buf) : buf_(buf) {
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
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; ++i) dst[i] = FloatToBf16(scratch_[i]);
    } else {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; ++i) dst[i] = FloatToHalf(scratch_[i]);
    }
  }

 private:
  ffi::AnyBuffer buf_;
  std::vector<float> scratch_;
  float* ptr_ = nullptr;
};

}  // namespace jnat::cpu
