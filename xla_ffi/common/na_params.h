// The arguments of every neighbourhood attention handler, decoded and validated once.
//
// Platform-neutral (no kernel includes): a handler calls the Decode* function of its op on
// the FFI buffers and attributes and gets either a filled NaParams or an InvalidArgument
// error naming the problem ("jnat_na_fwd: stride 4 on spatial axis 1 must be in [1,
// kernel_size=3]"). After a successful decode every buffer has exactly the shape and dtype
// the kernels index it with, whatever the attributes said.
//
// Layout: q [B, X, Y, Z, H, D], k and v [B, X, Y, Z, Hkv, D], rpb float32 [H, 2K0-1, 2K1-1,
// 2K2-1] or float32[0] (no rpb), lse and delta float32 [B, X, Y, Z, H], attention weights
// [B, X, Y, Z, H, K0*K1*K2].
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/na_geometry.h"
#include "xla/ffi/api/ffi.h"

namespace jnat {

namespace ffi = xla::ffi;

using Attr3 = ffi::Span<const int64_t>;

// Element types the kernels read and write; the values are what the kernels switch on.
enum class Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct NaParams : NaGeometry {
  bool has_rpb = false;
  float scale = 1.0f;
  Dtype dtype = Dtype::kF32;  // q, k, v, dout, out, dq, dk, dv (v's for the av ops)
  Dtype attn_dtype = Dtype::kF32;   // attn / dattn inputs of the unfused ops

  // The rpb operand's (or the rpb gradient's) data; nullptr when the op has no rpb (the
  // buffer is then f32[0]).
  const float* rpb_or_null(const ffi::AnyBuffer& rpb) const {
    return has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr;
  }
  float* drpb_or_null(ffi::AnyBuffer& drpb) const {
    return has_rpb ? static_cast<float*>(drpb.untyped_data()) : nullptr;
  }
};

// The four per-axis attributes every handler takes.
struct WindowAttrs {
  Attr3 kernel_size, stride, dilation, is_causal;
};

namespace params_internal {

inline std::string Dims(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline std::string Dims(const std::vector<int64_t>& dims) {
  return Dims(ffi::AnyBuffer::Dimensions(dims.data(), dims.size()));
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

// "op: message" errors and the checks every op shares.
class Checker {
 public:
  explicit Checker(const char* op) : op_(op) {}

  ffi::Error Fail(const std::string& msg) const {
    return ffi::Error::InvalidArgument(std::string(op_) + ": " + msg);
  }

  ffi::Error Rank(const char* name, const ffi::AnyBuffer& buf, const char* layout) const {
    const auto dims = buf.dimensions();
    if (dims.size() != 6) {
      return Fail(std::string(name) + " must have rank 6 " + layout + ", got shape " +
                  Dims(dims));
    }
    for (size_t i = 0; i < dims.size(); ++i) {
      if (dims[i] < 0) return Fail(std::string(name) + " has a negative dimension " + Dims(dims));
    }
    return ffi::Error::Success();
  }

  ffi::Error Shape(const char* name, const ffi::AnyBuffer& buf,
                   const std::vector<int64_t>& expected) const {
    const auto dims = buf.dimensions();
    bool ok = dims.size() == expected.size();
    for (size_t i = 0; ok && i < dims.size(); ++i) ok = dims[i] == expected[i];
    if (!ok) {
      return Fail(std::string(name) + " has shape " + Dims(dims) + ", expected " +
                  Dims(expected));
    }
    return ffi::Error::Success();
  }

  ffi::Error Floating(const char* name, const ffi::AnyBuffer& buf, Dtype* out) const {
    switch (buf.element_type()) {
      case ffi::DataType::F32: *out = Dtype::kF32; return ffi::Error::Success();
      case ffi::DataType::BF16: *out = Dtype::kBF16; return ffi::Error::Success();
      case ffi::DataType::F16: *out = Dtype::kF16; return ffi::Error::Success();
      default:
        return Fail(std::string(name) + " has dtype " + DtypeName(buf.element_type()) +
                    "; supported are float32, bfloat16 and float16");
    }
  }

  ffi::Error Same(const char* name, const ffi::AnyBuffer& buf, const char* ref_name,
                  const ffi::AnyBuffer& ref) const {
    if (buf.element_type() != ref.element_type()) {
      return Fail(std::string(name) + " has dtype " + DtypeName(buf.element_type()) +
                  ", expected " + ref_name + "'s " + DtypeName(ref.element_type()));
    }
    return ffi::Error::Success();
  }

  ffi::Error F32(const char* name, const ffi::AnyBuffer& buf) const {
    if (buf.element_type() != ffi::DataType::F32) {
      return Fail(std::string(name) + " has dtype " + DtypeName(buf.element_type()) +
                  ", expected float32");
    }
    return ffi::Error::Success();
  }

 private:
  const char* op_;
};

#define JNAT_PARAMS_CHECK(expr)                \
  do {                                         \
    ::xla::ffi::Error jnat_e_ = (expr);        \
    if (jnat_e_.failure()) return jnat_e_;     \
  } while (0)

// Kernel, stride, dilation and causality per axis, against the lengths already in `p`.
inline ffi::Error DecodeWindow(const Checker& c, const WindowAttrs& w, NaParams* p) {
  const std::pair<const char*, Attr3> attrs[] = {{"kernel_size", w.kernel_size},
                                                 {"stride", w.stride},
                                                 {"dilation", w.dilation},
                                                 {"is_causal", w.is_causal}};
  for (const auto& [name, span] : attrs) {
    if (span.size() != 3) {
      return c.Fail(std::string("attribute ") + name + " must have 3 entries (one per spatial "
                    "axis), got " + std::to_string(span.size()));
    }
  }
  for (int a = 0; a < 3; ++a) {
    const std::string axis = " on spatial axis " + std::to_string(a);
    const int64_t K = w.kernel_size[a], S = w.stride[a], Dl = w.dilation[a], C = w.is_causal[a];
    const int64_t L = p->length[a];
    // The rule of the Python API, kernel_size >= 2, with one exception: 1D and 2D ops run as
    // 3D ops whose added leading axes have length 1 and kernel_size 1.
    if (K < 2 && !(K == 1 && L == 1)) {
      return c.Fail("kernel_size " + std::to_string(K) + axis +
                    " must be >= 2 (or 1 on an axis of length 1)");
    }
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
    p->kernel[a] = K;
    p->stride[a] = S;
    p->dilation[a] = Dl;
    p->causal[a] = C != 0;
  }
  return ffi::Error::Success();
}

// A q-like [B, X, Y, Z, H, D] and a kv-like [B, X, Y, Z, Hkv, D] buffer fix every size.
inline ffi::Error DecodeTokens(const Checker& c, const char* q_name, const ffi::AnyBuffer& q,
                               const char* kv_name, const ffi::AnyBuffer& kv, NaParams* p) {
  JNAT_PARAMS_CHECK(c.Rank(q_name, q, "[B, X, Y, Z, H, D]"));
  JNAT_PARAMS_CHECK(c.Rank(kv_name, kv, "[B, X, Y, Z, Hkv, D]"));
  const auto qd = q.dimensions(), kd = kv.dimensions();
  if (kd[0] != qd[0] || kd[1] != qd[1] || kd[2] != qd[2] || kd[3] != qd[3] || kd[5] != qd[5]) {
    return c.Fail(std::string(kv_name) + " shape " + Dims(kd) + " does not match " + q_name +
                  " shape " + Dims(qd) + " in batch, spatial or head_dim");
  }
  p->batch = qd[0];
  for (int a = 0; a < 3; ++a) p->length[a] = qd[1 + a];
  p->heads = qd[4];
  p->kv_heads = kd[4];
  p->dim = qd[5];
  if (p->kv_heads < 1 || p->heads % p->kv_heads != 0) {
    return c.Fail(std::string(q_name) + " heads (" + std::to_string(p->heads) +
                  ") must be a multiple of " + kv_name + " heads (" +
                  std::to_string(p->kv_heads) + ")");
  }
  return ffi::Error::Success();
}

inline std::vector<int64_t> TokenShape(const NaParams& p, int64_t heads, int64_t last) {
  return {p.batch, p.length[0], p.length[1], p.length[2], heads, last};
}

inline std::vector<int64_t> StatShape(const NaParams& p) {
  return {p.batch, p.length[0], p.length[1], p.length[2], p.heads};
}

// rpb: float32 [H, 2K0-1, 2K1-1, 2K2-1], or float32 with 0 elements (none).
inline ffi::Error DecodeRpb(const Checker& c, const ffi::AnyBuffer& rpb, NaParams* p) {
  JNAT_PARAMS_CHECK(c.F32("rpb", rpb));
  if (rpb.element_count() == 0) {
    p->has_rpb = false;
    return ffi::Error::Success();
  }
  p->has_rpb = true;
  return c.Shape("rpb", rpb, {p->heads, p->rpb_extent(0), p->rpb_extent(1), p->rpb_extent(2)});
}

// The rpb gradient: float32 shaped exactly like rpb (empty when there is none).
inline ffi::Error CheckDrpb(const Checker& c, const ffi::AnyBuffer& rpb,
                            const ffi::AnyBuffer& drpb) {
  JNAT_PARAMS_CHECK(c.F32("drpb", drpb));
  const auto d = rpb.dimensions();
  return c.Shape("drpb", drpb, std::vector<int64_t>(d.begin(), d.end()));
}

// q, k, v of one floating dtype, plus the window attributes.
inline ffi::Error DecodeQKV(const Checker& c, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& v, const WindowAttrs& w, NaParams* p) {
  JNAT_PARAMS_CHECK(DecodeTokens(c, "q", q, "k", k, p));
  JNAT_PARAMS_CHECK(c.Shape("v", v, TokenShape(*p, p->kv_heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Floating("q", q, &p->dtype));
  JNAT_PARAMS_CHECK(c.Same("k", k, "q", q));
  JNAT_PARAMS_CHECK(c.Same("v", v, "q", q));
  return DecodeWindow(c, w, p);
}

}  // namespace params_internal

// ---------------------------------------------------------------------------------------------
// One decoder per op; the argument order is the handler's.

inline ffi::Error DecodeNaFwd(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                              const ffi::AnyBuffer& v, const ffi::AnyBuffer& rpb,
                              const ffi::AnyBuffer& out, const ffi::AnyBuffer& lse,
                              const WindowAttrs& w, float scale, NaParams* p) {
  using namespace params_internal;
  const Checker c("jnat_na_fwd");
  JNAT_PARAMS_CHECK(DecodeQKV(c, q, k, v, w, p));
  JNAT_PARAMS_CHECK(DecodeRpb(c, rpb, p));
  JNAT_PARAMS_CHECK(c.Shape("out", out, TokenShape(*p, p->heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Same("out", out, "q", q));
  JNAT_PARAMS_CHECK(c.Shape("lse", lse, StatShape(*p)));
  JNAT_PARAMS_CHECK(c.F32("lse", lse));
  p->scale = scale;
  return ffi::Error::Success();
}

inline ffi::Error DecodeNaBwd(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                              const ffi::AnyBuffer& v, const ffi::AnyBuffer& rpb,
                              const ffi::AnyBuffer& dout, const ffi::AnyBuffer& lse,
                              const ffi::AnyBuffer& delta, const ffi::AnyBuffer& dq,
                              const ffi::AnyBuffer& dk, const ffi::AnyBuffer& dv,
                              const ffi::AnyBuffer& drpb, const WindowAttrs& w, float scale,
                              NaParams* p, bool delta_is_dlse = false) {
  // delta_is_dlse: the CPU's jnat_na_bwd_dlse, whose operand in delta's place is dlse.
  using namespace params_internal;
  const Checker c(delta_is_dlse ? "jnat_na_bwd_dlse" : "jnat_na_bwd");
  const char* const delta_name = delta_is_dlse ? "dlse" : "delta";
  JNAT_PARAMS_CHECK(DecodeQKV(c, q, k, v, w, p));
  JNAT_PARAMS_CHECK(DecodeRpb(c, rpb, p));
  JNAT_PARAMS_CHECK(c.Shape("dout", dout, TokenShape(*p, p->heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Same("dout", dout, "q", q));
  JNAT_PARAMS_CHECK(c.Shape("lse", lse, StatShape(*p)));
  JNAT_PARAMS_CHECK(c.F32("lse", lse));
  JNAT_PARAMS_CHECK(c.Shape(delta_name, delta, StatShape(*p)));
  JNAT_PARAMS_CHECK(c.F32(delta_name, delta));
  JNAT_PARAMS_CHECK(c.Shape("dq", dq, TokenShape(*p, p->heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Same("dq", dq, "q", q));
  JNAT_PARAMS_CHECK(c.Shape("dk", dk, TokenShape(*p, p->kv_heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Same("dk", dk, "k", k));
  JNAT_PARAMS_CHECK(c.Shape("dv", dv, TokenShape(*p, p->kv_heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Same("dv", dv, "v", v));
  JNAT_PARAMS_CHECK(CheckDrpb(c, rpb, drpb));
  p->scale = scale;
  return ffi::Error::Success();
}

inline ffi::Error DecodeNaQK(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                             const ffi::AnyBuffer& rpb, const ffi::AnyBuffer& attn,
                             const WindowAttrs& w, NaParams* p) {
  using namespace params_internal;
  const Checker c("jnat_na_qk");
  JNAT_PARAMS_CHECK(DecodeTokens(c, "q", q, "k", k, p));
  JNAT_PARAMS_CHECK(c.Floating("q", q, &p->dtype));
  JNAT_PARAMS_CHECK(c.Same("k", k, "q", q));
  JNAT_PARAMS_CHECK(DecodeWindow(c, w, p));
  JNAT_PARAMS_CHECK(DecodeRpb(c, rpb, p));
  JNAT_PARAMS_CHECK(c.Shape("attn", attn, TokenShape(*p, p->heads, p->window())));
  JNAT_PARAMS_CHECK(c.Same("attn", attn, "q", q));
  p->attn_dtype = p->dtype;
  return ffi::Error::Success();
}

inline ffi::Error DecodeNaQKBwd(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                const ffi::AnyBuffer& rpb, const ffi::AnyBuffer& dattn,
                                const ffi::AnyBuffer& dq, const ffi::AnyBuffer& dk,
                                const ffi::AnyBuffer& drpb, const WindowAttrs& w, NaParams* p) {
  using namespace params_internal;
  const Checker c("jnat_na_qk_bwd");
  JNAT_PARAMS_CHECK(DecodeTokens(c, "q", q, "k", k, p));
  JNAT_PARAMS_CHECK(c.Floating("q", q, &p->dtype));
  JNAT_PARAMS_CHECK(c.Same("k", k, "q", q));
  JNAT_PARAMS_CHECK(DecodeWindow(c, w, p));
  JNAT_PARAMS_CHECK(DecodeRpb(c, rpb, p));
  JNAT_PARAMS_CHECK(c.Shape("dattn", dattn, TokenShape(*p, p->heads, p->window())));
  JNAT_PARAMS_CHECK(c.Floating("dattn", dattn, &p->attn_dtype));
  JNAT_PARAMS_CHECK(c.Shape("dq", dq, TokenShape(*p, p->heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Same("dq", dq, "q", q));
  JNAT_PARAMS_CHECK(c.Shape("dk", dk, TokenShape(*p, p->kv_heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Same("dk", dk, "k", k));
  JNAT_PARAMS_CHECK(CheckDrpb(c, rpb, drpb));
  return ffi::Error::Success();
}

// attn [B, X, Y, Z, H, KK] plays q's part for the token and head axes.
inline ffi::Error DecodeNaAV(const ffi::AnyBuffer& attn, const ffi::AnyBuffer& v,
                             const ffi::AnyBuffer& out, const WindowAttrs& w, NaParams* p) {
  using namespace params_internal;
  const Checker c("jnat_na_av");
  JNAT_PARAMS_CHECK(c.Rank("attn", attn, "[B, X, Y, Z, H, KK]"));
  JNAT_PARAMS_CHECK(c.Rank("v", v, "[B, X, Y, Z, Hkv, D]"));
  const auto ad = attn.dimensions(), vd = v.dimensions();
  for (int i = 0; i < 4; ++i) {
    if (ad[i] != vd[i]) {
      return c.Fail("attn shape " + Dims(ad) + " does not match v shape " + Dims(vd) +
                    " in batch or spatial dimensions");
    }
  }
  p->batch = vd[0];
  for (int a = 0; a < 3; ++a) p->length[a] = vd[1 + a];
  p->heads = ad[4];
  p->kv_heads = vd[4];
  p->dim = vd[5];
  if (p->kv_heads < 1 || p->heads % p->kv_heads != 0) {
    return c.Fail("attn heads (" + std::to_string(p->heads) + ") must be a multiple of v heads (" +
                  std::to_string(p->kv_heads) + ")");
  }
  JNAT_PARAMS_CHECK(DecodeWindow(c, w, p));
  JNAT_PARAMS_CHECK(c.Shape("attn", attn, TokenShape(*p, p->heads, p->window())));
  JNAT_PARAMS_CHECK(c.Floating("attn", attn, &p->attn_dtype));
  JNAT_PARAMS_CHECK(c.Floating("v", v, &p->dtype));
  JNAT_PARAMS_CHECK(c.Shape("out", out, TokenShape(*p, p->heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Same("out", out, "v", v));
  return ffi::Error::Success();
}

// dout [B, X, Y, Z, H, D] has q's layout: the sizes come from it and v.
inline ffi::Error DecodeNaAVBwd(const ffi::AnyBuffer& attn, const ffi::AnyBuffer& v,
                                const ffi::AnyBuffer& dout, const ffi::AnyBuffer& dattn,
                                const ffi::AnyBuffer& dv, const WindowAttrs& w, NaParams* p) {
  using namespace params_internal;
  const Checker c("jnat_na_av_bwd");
  JNAT_PARAMS_CHECK(DecodeTokens(c, "dout", dout, "v", v, p));
  JNAT_PARAMS_CHECK(c.Floating("v", v, &p->dtype));
  JNAT_PARAMS_CHECK(c.Same("dout", dout, "v", v));
  JNAT_PARAMS_CHECK(DecodeWindow(c, w, p));
  JNAT_PARAMS_CHECK(c.Shape("attn", attn, TokenShape(*p, p->heads, p->window())));
  JNAT_PARAMS_CHECK(c.Floating("attn", attn, &p->attn_dtype));
  JNAT_PARAMS_CHECK(c.Shape("dattn", dattn, TokenShape(*p, p->heads, p->window())));
  JNAT_PARAMS_CHECK(c.Same("dattn", dattn, "attn", attn));
  JNAT_PARAMS_CHECK(c.Shape("dv", dv, TokenShape(*p, p->kv_heads, p->dim)));
  JNAT_PARAMS_CHECK(c.Same("dv", dv, "v", v));
  return ffi::Error::Success();
}

}  // namespace jnat
