// Decoding and validation of the FFI arguments of the neighbourhood attention handlers.
//
// Every handler goes through here before touching memory: ranks, shapes, dtypes and the
// per-axis attributes are checked and any inconsistency becomes an InvalidArgument error
// naming the problem.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/na_cpu_kernels.h"
#include "cpu/na_cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace jnat::cpu {

namespace ffi = xla::ffi;

using Attr3 = ffi::Span<const int64_t>;

inline std::string DimsString(ffi::AnyBuffer::Dimensions dims) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << "]";
  return os.str();
}

inline std::string DimsString(const std::vector<int64_t>& dims) {
  return DimsString(ffi::AnyBuffer::Dimensions(dims.data(), dims.size()));
}

inline const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S8: return "int8";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::PRED: return "bool";
    default: return "an unsupported dtype";
  }
}

inline bool IsSupportedFloat(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

// Builds "op: message" errors.
class Checker {
 public:
  explicit Checker(const char* op) : op_(op) {}

  ffi::Error Fail(const std::string& msg) const {
    return ffi::Error::InvalidArgument(std::string(op_) + ": " + msg);
  }

  ffi::Error Shape(const char* name, const ffi::AnyBuffer& buf,
                   const std::vector<int64_t>& expected) const {
    const auto dims = buf.dimensions();
    bool ok = dims.size() == expected.size();
    for (size_t i = 0; ok && i < dims.size(); ++i) ok = dims[i] == expected[i];
    if (!ok) {
      return Fail(std::string(name) + " has shape " + DimsString(dims) + ", expected " +
                  DimsString(expected));
    }
    return ffi::Error::Success();
  }

  ffi::Error Rank(const char* name, const ffi::AnyBuffer& buf, size_t rank,
                  const char* layout) const {
    if (buf.dimensions().size() != rank) {
      return Fail(std::string(name) + " must have rank " + std::to_string(rank) + " " + layout +
                  ", got shape " + DimsString(buf.dimensions()));
    }
    return ffi::Error::Success();
  }

  ffi::Error Dtype(const char* name, const ffi::AnyBuffer& buf, ffi::DataType expected) const {
    if (buf.element_type() != expected) {
      return Fail(std::string(name) + " has dtype " + DtypeName(buf.element_type()) +
                  ", expected " + DtypeName(expected));
    }
    return ffi::Error::Success();
  }

  ffi::Error Floating(const char* name, const ffi::AnyBuffer& buf) const {
    if (!IsSupportedFloat(buf.element_type())) {
      return Fail(std::string(name) + " has dtype " + DtypeName(buf.element_type()) +
                  "; supported are float32, bfloat16 and float16");
    }
    return ffi::Error::Success();
  }

 private:
  const char* op_;
};

#define JNAT_RETURN_IF_ERROR(expr)              \
  do {                                          \
    ffi::Error jnat_err_ = (expr);              \
    if (jnat_err_.failure()) return jnat_err_;  \
  } while (0)

// Reads the spatial attributes against the spatial lengths already in `s`.
inline ffi::Error DecodeWindowAttrs(const Checker& c, Attr3 kernel_size, Attr3 stride,
                                    Attr3 dilation, Attr3 is_causal, NaShape* s) {
  const std::pair<const char*, Attr3> attrs[] = {
      {"kernel_size", kernel_size}, {"stride", stride}, {"dilation", dilation},
      {"is_causal", is_causal}};
  for (const auto& [name, span] : attrs) {
    if (span.size() != 3) {
      return c.Fail(std::string("attribute ") + name + " must have 3 entries (one per spatial " +
                    "axis), got " + std::to_string(span.size()));
    }
  }
  for (int a = 0; a < 3; ++a) {
    const std::string axis = " on spatial axis " + std::to_string(a);
    const int64_t K = kernel_size[a], S = stride[a], Dl = dilation[a], C = is_causal[a];
    const int64_t L = s->length[a];
    if (K < 1) return c.Fail("kernel_size " + std::to_string(K) + axis + " must be >= 1");
    if (S < 1 || S > K) {
      return c.Fail("stride " + std::to_string(S) + axis + " must be in [1, kernel_size=" +
                    std::to_string(K) + "]");
    }
    if (Dl < 1) return c.Fail("dilation " + std::to_string(Dl) + axis + " must be >= 1");
    if (K > L / Dl) {  // K * Dl > L, without overflow
      return c.Fail("kernel_size * dilation = " + std::to_string(K) + " * " + std::to_string(Dl) +
                    axis + " exceeds the input length " + std::to_string(L));
    }
    if (C != 0 && C != 1) {
      return c.Fail("is_causal " + std::to_string(C) + axis + " must be 0 or 1");
    }
    s->kernel[a] = K;
    s->stride[a] = S;
    s->dilation[a] = Dl;
    s->causal[a] = C != 0;
  }
  return ffi::Error::Success();
}

// q-like [B, L0, L1, L2, H, D] and kv-like [B, L0, L1, L2, Hkv, D] buffers plus attributes.
inline ffi::Error DecodeShape(const Checker& c, const char* q_name, const ffi::AnyBuffer& q,
                              const char* kv_name, const ffi::AnyBuffer& kv, Attr3 kernel_size,
                              Attr3 stride, Attr3 dilation, Attr3 is_causal, NaShape* s) {
  JNAT_RETURN_IF_ERROR(c.Rank(q_name, q, 6, "[B, X, Y, Z, H, D]"));
  JNAT_RETURN_IF_ERROR(c.Rank(kv_name, kv, 6, "[B, X, Y, Z, Hkv, D]"));
  const auto qd = q.dimensions(), kd = kv.dimensions();
  for (size_t i = 0; i < 6; ++i) {
    if (qd[i] < 0 || kd[i] < 0) return c.Fail("negative dimension");
  }
  s->batch = qd[0];
  for (int a = 0; a < 3; ++a) s->length[a] = qd[1 + a];
  s->heads = qd[4];
  s->dim = qd[5];
  s->kv_heads = kd[4];
  if (kd[0] != qd[0] || kd[1] != qd[1] || kd[2] != qd[2] || kd[3] != qd[3] || kd[5] != qd[5]) {
    return c.Fail(std::string(kv_name) + " shape " + DimsString(kd) + " does not match " +
                  q_name + " shape " + DimsString(qd) + " in batch, spatial or head_dim");
  }
  if (s->kv_heads < 1 || s->heads % s->kv_heads != 0) {
    return c.Fail(std::string(q_name) + " heads (" + std::to_string(s->heads) +
                  ") must be a multiple of " + kv_name + " heads (" +
                  std::to_string(s->kv_heads) + ")");
  }
  return DecodeWindowAttrs(c, kernel_size, stride, dilation, is_causal, s);
}

// rpb: float32 [H, 2K0-1, 2K1-1, 2K2-1], or a float32 array of 0 elements (none).
inline ffi::Error CheckRpb(const Checker& c, const ffi::AnyBuffer& rpb, const NaShape& s,
                           bool* has_rpb) {
  JNAT_RETURN_IF_ERROR(c.Dtype("rpb", rpb, ffi::DataType::F32));
  const auto dims = rpb.dimensions();
  if (dims.size() == 1 && dims[0] == 0) {
    *has_rpb = false;
    return ffi::Error::Success();
  }
  *has_rpb = true;
  if (dims.size() != 4) {
    return c.Fail("rpb must have shape [H, 2*K0-1, 2*K1-1, 2*K2-1] or be empty (shape [0]), "
                  "got " + DimsString(dims));
  }
  return c.Shape("rpb", rpb, {s.heads, s.rpb_extent(0), s.rpb_extent(1), s.rpb_extent(2)});
}

inline std::vector<int64_t> TokenShape(const NaShape& s, int64_t heads, int64_t last) {
  return {s.batch, s.length[0], s.length[1], s.length[2], heads, last};
}

inline std::vector<int64_t> StatShape(const NaShape& s) {
  return {s.batch, s.length[0], s.length[1], s.length[2], s.heads};
}

// ---------------------------------------------------------------------------------------------
// Float32 views of buffers in any supported dtype.

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
      default: {  // F16 (the caller checked the dtype)
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
