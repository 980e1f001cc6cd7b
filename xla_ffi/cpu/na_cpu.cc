// XLA FFI handlers of the CPU neighbourhood attention kernels.
//
// Each op: a Dispatch that decodes and validates every buffer and attribute
// (common/na_params.h, shared with the CUDA handlers), takes float32 views of the inputs
// (na_cpu_f32_buffers.h), runs the float32 kernel (na_cpu_kernels.h) and converts the outputs
// back to their dtypes; then the handler symbol, binding the op's buffers and attributes
// (common/na_bindings.h).
#include "cpu/na_cpu.h"

#include "common/na_bindings.h"
#include "common/na_params.h"
#include "cpu/na_cpu_f32_buffers.h"
#include "cpu/na_cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace jnat::cpu {
namespace {

const float* RpbOrNull(const NaParams& p, const ffi::AnyBuffer& rpb) {
  return p.has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr;
}

float* DrpbOrNull(const NaParams& p, ffi::AnyBuffer& drpb) {
  return p.has_rpb ? static_cast<float*>(drpb.untyped_data()) : nullptr;
}

// ---------------------------------------------------------------------------------------------

ffi::Error NaFwdDispatch(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rpb,
                         ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                         Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal,
                         float scale) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaFwd(q, k, v, rpb, *out, *lse,
                                {kernel_size, stride, dilation, is_causal}, scale, &p));
  F32In qf(q), kf(k), vf(v);
  F32Out of(*out);
  NaFusedForward(p, qf.get(), kf.get(), vf.get(), RpbOrNull(p, rpb), p.scale,
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
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaBwd(q, k, v, rpb, dout, lse, delta, *dq, *dk, *dv, *drpb,
                                {kernel_size, stride, dilation, is_causal}, scale, &p));
  F32In qf(q), kf(k), vf(v), dof(dout);
  F32Out dqf(*dq), dkf(*dk), dvf(*dv);
  NaFusedBackward(p, qf.get(), kf.get(), vf.get(), RpbOrNull(p, rpb), dof.get(),
                  static_cast<const float*>(lse.untyped_data()),
                  static_cast<const float*>(delta.untyped_data()), p.scale, dqf.get(), dkf.get(),
                  dvf.get(), DrpbOrNull(p, *drpb));
  dqf.Commit();
  dkf.Commit();
  dvf.Commit();
  return ffi::Error::Success();
}

ffi::Error NaQKDispatch(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb,
                        ffi::Result<ffi::AnyBuffer> attn, Attr3 kernel_size, Attr3 stride,
                        Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(
      DecodeNaQK(q, k, rpb, *attn, {kernel_size, stride, dilation, is_causal}, &p));
  F32In qf(q), kf(k);
  F32Out af(*attn);
  NaQK(p, qf.get(), kf.get(), RpbOrNull(p, rpb), af.get());
  af.Commit();
  return ffi::Error::Success();
}

ffi::Error NaQKBwdDispatch(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb,
                           ffi::AnyBuffer dattn, ffi::Result<ffi::AnyBuffer> dq,
                           ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> drpb,
                           Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaQKBwd(q, k, rpb, dattn, *dq, *dk, *drpb,
                                  {kernel_size, stride, dilation, is_causal}, &p));
  F32In qf(q), kf(k), daf(dattn);
  F32Out dqf(*dq), dkf(*dk);
  NaQKBackward(p, qf.get(), kf.get(), daf.get(), dqf.get(), dkf.get(),
               DrpbOrNull(p, *drpb));
  dqf.Commit();
  dkf.Commit();
  return ffi::Error::Success();
}

ffi::Error NaAVDispatch(ffi::AnyBuffer attn, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                        Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaAV(attn, v, *out, {kernel_size, stride, dilation, is_causal}, &p));
  F32In af(attn), vf(v);
  F32Out of(*out);
  NaAV(p, af.get(), vf.get(), of.get());
  of.Commit();
  return ffi::Error::Success();
}

ffi::Error NaAVBwdDispatch(ffi::AnyBuffer attn, ffi::AnyBuffer v, ffi::AnyBuffer dout,
                           ffi::Result<ffi::AnyBuffer> dattn, ffi::Result<ffi::AnyBuffer> dv,
                           Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaAVBwd(attn, v, dout, *dattn, *dv,
                                  {kernel_size, stride, dilation, is_causal}, &p));
  F32In af(attn), vf(v), dof(dout);
  F32Out daf(*dattn), dvf(*dv);
  NaAVBackward(p, af.get(), vf.get(), dof.get(), daf.get(), dvf.get());
  daf.Commit();
  dvf.Commit();
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jnat::cpu

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaFwd, jnat::cpu::NaFwdDispatch,
                              jnat::BindNaFwd(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaBwd, jnat::cpu::NaBwdDispatch,
                              jnat::BindNaBwd(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaQK, jnat::cpu::NaQKDispatch,
                              jnat::BindNaQK(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaQKBwd, jnat::cpu::NaQKBwdDispatch,
                              jnat::BindNaQKBwd(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaAV, jnat::cpu::NaAVDispatch,
                              jnat::BindNaAV(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaAVBwd, jnat::cpu::NaAVBwdDispatch,
                              jnat::BindNaAVBwd(ffi::Ffi::Bind()));
