// XLA FFI handlers of the CPU neighbourhood attention kernels.
//
// Each op: a Dispatch that validates every buffer and attribute (na_cpu_params.h), takes
// float32 views of the inputs, runs the float32 kernel (na_cpu_kernels.h) and converts the
// outputs back to their dtypes; then the handler symbol binding buffers and attributes.
#include "cpu/na_cpu.h"

#include "cpu/na_cpu_kernels.h"
#include "cpu/na_cpu_params.h"
#include "xla/ffi/api/ffi.h"

namespace jnat::cpu {
namespace {

// q, k, v of one dtype; the kv-like tensors share q's batch, spatial and head_dim.
ffi::Error DecodeQKV(const Checker& c, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                     const ffi::AnyBuffer& v, Attr3 kernel_size, Attr3 stride, Attr3 dilation,
                     Attr3 is_causal, NaShape* s) {
  JNAT_RETURN_IF_ERROR(
      DecodeShape(c, "q", q, "k", k, kernel_size, stride, dilation, is_causal, s));
  JNAT_RETURN_IF_ERROR(c.Shape("v", v, TokenShape(*s, s->kv_heads, s->dim)));
  JNAT_RETURN_IF_ERROR(c.Floating("q", q));
  JNAT_RETURN_IF_ERROR(c.Dtype("k", k, q.element_type()));
  JNAT_RETURN_IF_ERROR(c.Dtype("v", v, q.element_type()));
  return ffi::Error::Success();
}

// The rpb gradient has rpb's shape (empty when there is no rpb).
ffi::Error CheckDrpb(const Checker& c, const ffi::AnyBuffer& rpb, const ffi::AnyBuffer& drpb) {
  JNAT_RETURN_IF_ERROR(c.Dtype("drpb", drpb, ffi::DataType::F32));
  const auto d = rpb.dimensions();
  return c.Shape("drpb", drpb, std::vector<int64_t>(d.begin(), d.end()));
}

// ---------------------------------------------------------------------------------------------

ffi::Error NaFwdDispatch(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rpb,
                         ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                         Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal,
                         float scale) {
  const Checker c("jnat_na_fwd");
  NaShape s;
  bool has_rpb = false;
  JNAT_RETURN_IF_ERROR(DecodeQKV(c, q, k, v, kernel_size, stride, dilation, is_causal, &s));
  JNAT_RETURN_IF_ERROR(CheckRpb(c, rpb, s, &has_rpb));
  JNAT_RETURN_IF_ERROR(c.Shape("out", *out, TokenShape(s, s.heads, s.dim)));
  JNAT_RETURN_IF_ERROR(c.Dtype("out", *out, q.element_type()));
  JNAT_RETURN_IF_ERROR(c.Shape("lse", *lse, StatShape(s)));
  JNAT_RETURN_IF_ERROR(c.Dtype("lse", *lse, ffi::DataType::F32));

  F32In qf(q), kf(k), vf(v);
  F32Out of(*out);
  NaFusedForward(s, qf.get(), kf.get(), vf.get(),
                 has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr, scale,
                 of.get(), static_cast<float*>(lse->untyped_data()));
  of.Commit();
  return ffi::Error::Success();
}

ffi::Error NaBwdDispatch(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rpb,
                         ffi::AnyBuffer dout, ffi::AnyBuffer lse, ffi::AnyBuffer delta,
                         ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> drpb,
                         Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal,
                         float scale) {
  const Checker c("jnat_na_bwd");
  NaShape s;
  bool has_rpb = false;
  JNAT_RETURN_IF_ERROR(DecodeQKV(c, q, k, v, kernel_size, stride, dilation, is_causal, &s));
  JNAT_RETURN_IF_ERROR(CheckRpb(c, rpb, s, &has_rpb));
  JNAT_RETURN_IF_ERROR(c.Shape("dout", dout, TokenShape(s, s.heads, s.dim)));
  JNAT_RETURN_IF_ERROR(c.Dtype("dout", dout, q.element_type()));
  JNAT_RETURN_IF_ERROR(c.Shape("lse", lse, StatShape(s)));
  JNAT_RETURN_IF_ERROR(c.Dtype("lse", lse, ffi::DataType::F32));
  JNAT_RETURN_IF_ERROR(c.Shape("delta", delta, StatShape(s)));
  JNAT_RETURN_IF_ERROR(c.Dtype("delta", delta, ffi::DataType::F32));
  JNAT_RETURN_IF_ERROR(c.Shape("dq", *dq, TokenShape(s, s.heads, s.dim)));
  JNAT_RETURN_IF_ERROR(c.Dtype("dq", *dq, q.element_type()));
  JNAT_RETURN_IF_ERROR(c.Shape("dk", *dk, TokenShape(s, s.kv_heads, s.dim)));
  JNAT_RETURN_IF_ERROR(c.Dtype("dk", *dk, k.element_type()));
  JNAT_RETURN_IF_ERROR(c.Shape("dv", *dv, TokenShape(s, s.kv_heads, s.dim)));
  JNAT_RETURN_IF_ERROR(c.Dtype("dv", *dv, v.element_type()));
  JNAT_RETURN_IF_ERROR(CheckDrpb(c, rpb, *drpb));

  F32In qf(q), kf(k), vf(v), dof(dout);
  F32Out dqf(*dq), dkf(*dk), dvf(*dv);
  NaFusedBackward(s, qf.get(), kf.get(), vf.get(),
                  has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr, dof.get(),
                  static_cast<const float*>(lse.untyped_data()),
                  static_cast<const float*>(delta.untyped_data()), scale, dqf.get(), dkf.get(),
                  dvf.get(), has_rpb ? static_cast<float*>(drpb->untyped_data()) : nullptr);
  dqf.Commit();
  dkf.Commit();
  dvf.Commit();
  return ffi::Error::Success();
}

ffi::Error NaQKDispatch(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb,
                        ffi::Result<ffi::AnyBuffer> attn, Attr3 kernel_size, Attr3 stride,
                        Attr3 dilation, Attr3 is_causal) {
  const Checker c("jnat_na_qk");
  NaShape s;
  bool has_rpb = false;
  JNAT_RETURN_IF_ERROR(
      DecodeShape(c, "q", q, "k", k, kernel_size, stride, dilation, is_causal, &s));
  JNAT_RETURN_IF_ERROR(c.Floating("q", q));
  JNAT_RETURN_IF_ERROR(c.Dtype("k", k, q.element_type()));
  JNAT_RETURN_IF_ERROR(CheckRpb(c, rpb, s, &has_rpb));
  JNAT_RETURN_IF_ERROR(c.Shape("attn", *attn, TokenShape(s, s.heads, s.window())));
  JNAT_RETURN_IF_ERROR(c.Dtype("attn", *attn, q.element_type()));

  F32In qf(q), kf(k);
  F32Out af(*attn);
  NaQK(s, qf.get(), kf.get(), has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr,
       af.get());
  af.Commit();
  return ffi::Error::Success();
}

ffi::Error NaQKBwdDispatch(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb,
                           ffi::AnyBuffer dattn, ffi::Result<ffi::AnyBuffer> dq,
                           ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> drpb,
                           Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  const Checker c("jnat_na_qk_bwd");
  NaShape s;
  bool has_rpb = false;
  JNAT_RETURN_IF_ERROR(
      DecodeShape(c, "q", q, "k", k, kernel_size, stride, dilation, is_causal, &s));
  JNAT_RETURN_IF_ERROR(c.Floating("q", q));
  JNAT_RETURN_IF_ERROR(c.Dtype("k", k, q.element_type()));
  JNAT_RETURN_IF_ERROR(CheckRpb(c, rpb, s, &has_rpb));
  JNAT_RETURN_IF_ERROR(c.Shape("dattn", dattn, TokenShape(s, s.heads, s.window())));
  JNAT_RETURN_IF_ERROR(c.Floating("dattn", dattn));
  JNAT_RETURN_IF_ERROR(c.Shape("dq", *dq, TokenShape(s, s.heads, s.dim)));
  JNAT_RETURN_IF_ERROR(c.Dtype("dq", *dq, q.element_type()));
  JNAT_RETURN_IF_ERROR(c.Shape("dk", *dk, TokenShape(s, s.kv_heads, s.dim)));
  JNAT_RETURN_IF_ERROR(c.Dtype("dk", *dk, k.element_type()));
  JNAT_RETURN_IF_ERROR(CheckDrpb(c, rpb, *drpb));

  F32In qf(q), kf(k), daf(dattn);
  F32Out dqf(*dq), dkf(*dk);
  NaQKBackward(s, qf.get(), kf.get(), daf.get(), dqf.get(), dkf.get(),
               has_rpb ? static_cast<float*>(drpb->untyped_data()) : nullptr);
  dqf.Commit();
  dkf.Commit();
  return ffi::Error::Success();
}

ffi::Error NaAVDispatch(ffi::AnyBuffer attn, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                        Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  const Checker c("jnat_na_av");
  NaShape s;
  JNAT_RETURN_IF_ERROR(c.Rank("attn", attn, 6, "[B, X, Y, Z, H, KK]"));
  JNAT_RETURN_IF_ERROR(c.Rank("v", v, 6, "[B, X, Y, Z, Hkv, D]"));
  // attn plays q's part for the token and head dimensions; its last dimension is checked
  // against the window below.
  const auto ad = attn.dimensions(), vd = v.dimensions();
  for (int i = 0; i < 4; ++i) {
    if (ad[i] != vd[i]) {
      return c.Fail("attn shape " + DimsString(ad) + " does not match v shape " +
                    DimsString(vd) + " in batch or spatial dimensions");
    }
  }
  for (size_t i = 0; i < 6; ++i) {
    if (ad[i] < 0 || vd[i] < 0) return c.Fail("negative dimension");
  }
  s.batch = vd[0];
  for (int a = 0; a < 3; ++a) s.length[a] = vd[1 + a];
  s.heads = ad[4];
  s.kv_heads = vd[4];
  s.dim = vd[5];
  if (s.kv_heads < 1 || s.heads % s.kv_heads != 0) {
    return c.Fail("attn heads (" + std::to_string(s.heads) + ") must be a multiple of v heads (" +
                  std::to_string(s.kv_heads) + ")");
  }
  JNAT_RETURN_IF_ERROR(DecodeWindowAttrs(c, kernel_size, stride, dilation, is_causal, &s));
  JNAT_RETURN_IF_ERROR(c.Shape("attn", attn, TokenShape(s, s.heads, s.window())));
  JNAT_RETURN_IF_ERROR(c.Floating("attn", attn));
  JNAT_RETURN_IF_ERROR(c.Floating("v", v));
  JNAT_RETURN_IF_ERROR(c.Shape("out", *out, TokenShape(s, s.heads, s.dim)));
  JNAT_RETURN_IF_ERROR(c.Dtype("out", *out, v.element_type()));

  F32In af(attn), vf(v);
  F32Out of(*out);
  NaAV(s, af.get(), vf.get(), of.get());
  of.Commit();
  return ffi::Error::Success();
}

ffi::Error NaAVBwdDispatch(ffi::AnyBuffer attn, ffi::AnyBuffer v, ffi::AnyBuffer dout,
                           ffi::Result<ffi::AnyBuffer> dattn, ffi::Result<ffi::AnyBuffer> dv,
                           Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  const Checker c("jnat_na_av_bwd");
  NaShape s;
  // dout [B, X, Y, Z, H, D] has q's layout: decode the shape from it and v.
  JNAT_RETURN_IF_ERROR(
      DecodeShape(c, "dout", dout, "v", v, kernel_size, stride, dilation, is_causal, &s));
  JNAT_RETURN_IF_ERROR(c.Floating("v", v));
  JNAT_RETURN_IF_ERROR(c.Dtype("dout", dout, v.element_type()));
  JNAT_RETURN_IF_ERROR(c.Shape("attn", attn, TokenShape(s, s.heads, s.window())));
  JNAT_RETURN_IF_ERROR(c.Floating("attn", attn));
  JNAT_RETURN_IF_ERROR(c.Shape("dattn", *dattn, TokenShape(s, s.heads, s.window())));
  JNAT_RETURN_IF_ERROR(c.Dtype("dattn", *dattn, attn.element_type()));
  JNAT_RETURN_IF_ERROR(c.Shape("dv", *dv, TokenShape(s, s.kv_heads, s.dim)));
  JNAT_RETURN_IF_ERROR(c.Dtype("dv", *dv, v.element_type()));

  F32In af(attn), vf(v), dof(dout);
  F32Out daf(*dattn), dvf(*dv);
  NaAVBackward(s, af.get(), vf.get(), dof.get(), daf.get(), dvf.get());
  daf.Commit();
  dvf.Commit();
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jnat::cpu

namespace ffi = xla::ffi;
using jnat::cpu::Attr3;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaFwd, jnat::cpu::NaFwdDispatch,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // rpb
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<Attr3>("kernel_size")
                                  .Attr<Attr3>("stride")
                                  .Attr<Attr3>("dilation")
                                  .Attr<Attr3>("is_causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaBwd, jnat::cpu::NaBwdDispatch,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // rpb
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // delta
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // drpb
                                  .Attr<Attr3>("kernel_size")
                                  .Attr<Attr3>("stride")
                                  .Attr<Attr3>("dilation")
                                  .Attr<Attr3>("is_causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaQK, jnat::cpu::NaQKDispatch,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // rpb
                                  .Ret<ffi::AnyBuffer>()  // attn
                                  .Attr<Attr3>("kernel_size")
                                  .Attr<Attr3>("stride")
                                  .Attr<Attr3>("dilation")
                                  .Attr<Attr3>("is_causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaQKBwd, jnat::cpu::NaQKBwdDispatch,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // rpb
                                  .Arg<ffi::AnyBuffer>()  // dattn
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // drpb
                                  .Attr<Attr3>("kernel_size")
                                  .Attr<Attr3>("stride")
                                  .Attr<Attr3>("dilation")
                                  .Attr<Attr3>("is_causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaAV, jnat::cpu::NaAVDispatch,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // attn
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<Attr3>("kernel_size")
                                  .Attr<Attr3>("stride")
                                  .Attr<Attr3>("dilation")
                                  .Attr<Attr3>("is_causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaAVBwd, jnat::cpu::NaAVBwdDispatch,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // attn
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Ret<ffi::AnyBuffer>()  // dattn
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Attr<Attr3>("kernel_size")
                                  .Attr<Attr3>("stride")
                                  .Attr<Attr3>("dilation")
                                  .Attr<Attr3>("is_causal"));
