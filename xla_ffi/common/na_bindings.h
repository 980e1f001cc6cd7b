// The buffers and attributes each neighbourhood attention handler binds, in call order.
//
// jnat lowers an op to the same custom call whatever the platform, so the CPU and CUDA
// handlers must decode the same operands, results and attributes. Each op's list lives here
// once: a backend starts from ffi::Ffi::Bind(), adds its own context (the CUDA handlers take
// their stream), and passes that binding to the op's function, which appends the rest. The
// Dispatch function's parameters follow the same order.
#pragma once

#include <utility>

#include "common/na_params.h"
#include "xla/ffi/api/ffi.h"

namespace jnat {

// The window attributes every op ends with (int64[3] each, one entry per spatial axis).
template <typename Binding>
auto BindWindowAttrs(Binding b) {
  return std::move(b)
      .template Attr<Attr3>("kernel_size")
      .template Attr<Attr3>("stride")
      .template Attr<Attr3>("dilation")
      .template Attr<Attr3>("is_causal");
}

template <typename Binding>
auto BindNaFwd(Binding b) {
  return BindWindowAttrs(std::move(b)
                             .template Arg<ffi::AnyBuffer>()   // q
                             .template Arg<ffi::AnyBuffer>()   // k
                             .template Arg<ffi::AnyBuffer>()   // v
                             .template Arg<ffi::AnyBuffer>()   // rpb
                             .template Ret<ffi::AnyBuffer>()   // out
                             .template Ret<ffi::AnyBuffer>())  // lse
      .template Attr<float>("scale");
}

template <typename Binding>
auto BindNaBwd(Binding b) {
  return BindWindowAttrs(std::move(b)
                             .template Arg<ffi::AnyBuffer>()   // q
                             .template Arg<ffi::AnyBuffer>()   // k
                             .template Arg<ffi::AnyBuffer>()   // v
                             .template Arg<ffi::AnyBuffer>()   // rpb
                             .template Arg<ffi::AnyBuffer>()   // dout
                             .template Arg<ffi::AnyBuffer>()   // lse
                             .template Arg<ffi::AnyBuffer>()   // delta (jnat_na_bwd_dlse: dlse)
                             .template Ret<ffi::AnyBuffer>()   // dq
                             .template Ret<ffi::AnyBuffer>()   // dk
                             .template Ret<ffi::AnyBuffer>()   // dv
                             .template Ret<ffi::AnyBuffer>())  // drpb
      .template Attr<float>("scale");
}

template <typename Binding>
auto BindNaQK(Binding b) {
  return BindWindowAttrs(std::move(b)
                             .template Arg<ffi::AnyBuffer>()    // q
                             .template Arg<ffi::AnyBuffer>()    // k
                             .template Arg<ffi::AnyBuffer>()    // rpb
                             .template Ret<ffi::AnyBuffer>());  // attn
}

template <typename Binding>
auto BindNaQKBwd(Binding b) {
  return BindWindowAttrs(std::move(b)
                             .template Arg<ffi::AnyBuffer>()    // q
                             .template Arg<ffi::AnyBuffer>()    // k
                             .template Arg<ffi::AnyBuffer>()    // rpb
                             .template Arg<ffi::AnyBuffer>()    // dattn
                             .template Ret<ffi::AnyBuffer>()    // dq
                             .template Ret<ffi::AnyBuffer>()    // dk
                             .template Ret<ffi::AnyBuffer>());  // drpb
}

template <typename Binding>
auto BindNaAV(Binding b) {
  return BindWindowAttrs(std::move(b)
                             .template Arg<ffi::AnyBuffer>()    // attn
                             .template Arg<ffi::AnyBuffer>()    // v
                             .template Ret<ffi::AnyBuffer>());  // out
}

template <typename Binding>
auto BindNaAVBwd(Binding b) {
  return BindWindowAttrs(std::move(b)
                             .template Arg<ffi::AnyBuffer>()    // attn
                             .template Arg<ffi::AnyBuffer>()    // v
                             .template Arg<ffi::AnyBuffer>()    // dout
                             .template Ret<ffi::AnyBuffer>()    // dattn
                             .template Ret<ffi::AnyBuffer>());  // dv
}

}  // namespace jnat
