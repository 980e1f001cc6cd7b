// XLA FFI handlers of the CUDA neighbourhood attention kernels.
//
// Each op: a Dispatch that decodes and validates every buffer and attribute
// (common/na_params.h), launches on XLA's stream (na_cuda.h) and turns a launch error into
// ffi::Error::Internal; then the handler symbol, binding the context and then the op's buffers
// and attributes (common/na_bindings.h).
// Handlers that never allocate are command-buffer compatible; the two with an rpb gradient
// take stream-ordered workspace (cudaMallocAsync): XLA's FFI scratch allocator gave none
// under jax 0.11 on an H200 (every request failed, 88 bytes included).
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "common/na_bindings.h"
#include "common/na_params.h"
#include "cuda/na_cuda.h"
#include "cuda/na_handlers.h"
#include "xla/ffi/api/ffi.h"

namespace jnat::cuda {
namespace {

namespace ffi = xla::ffi;
using Stream = ffi::PlatformStream<cudaStream_t>;

NaDims MakeDims(const NaParams& p) {
  NaDims s{};
  s.batch = p.batch;
  s.heads = p.heads;
  s.kv_heads = p.kv_heads;
  s.dim = p.dim;
  s.group = p.group();
  for (int a = 0; a < 3; ++a) {
    s.length[a] = p.length[a];
    s.kernel[a] = p.kernel[a];
    s.stride[a] = p.stride[a];
    s.dilation[a] = p.dilation[a];
    s.causal[a] = p.causal[a] ? 1 : 0;
    s.rpb_extent[a] = p.rpb_extent(a);
  }
  s.tokens = p.tokens();
  s.window = p.window();
  s.rpb_size = p.rpb_size();
  return s;
}

int DtypeCode(Dtype d) { return static_cast<int>(d); }

ffi::Error Launched(const char* op, cudaError_t err) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
}

// Workspace for the rpb-gradient partials (nullptr when none is needed), allocated and
// freed in stream order around the launch that uses it.
ffi::Error AllocWorkspace(const char* op, cudaStream_t stream, size_t bytes, void** ptr) {
  *ptr = nullptr;
  if (bytes == 0) return ffi::Error::Success();
  const cudaError_t err = cudaMallocAsync(ptr, bytes, stream);
  if (err != cudaSuccess) {
    *ptr = nullptr;
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(op) + ": could not allocate " + std::to_string(bytes) +
                          " bytes of workspace: " + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// The launch's error, else the error of freeing its workspace.
cudaError_t FreeWorkspace(cudaError_t launched, void* work, cudaStream_t stream) {
  if (work == nullptr) return launched;
  const cudaError_t freed = cudaFreeAsync(work, stream);
  return launched != cudaSuccess ? launched : freed;
}

// JNAT_CUDA_TC_BWD=1 opts into the tensor-core backward where it applies (na_cuda.h).
bool TensorCoreBackwardRequested() {
  const char* v = std::getenv("JNAT_CUDA_TC_BWD");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// ---------------------------------------------------------------------------------------------

ffi::Error NaFwdDispatch(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::AnyBuffer rpb, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::AnyBuffer> lse, Attr3 kernel_size, Attr3 stride,
                         Attr3 dilation, Attr3 is_causal, float scale) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaFwd(q, k, v, rpb, *out, *lse,
                                {kernel_size, stride, dilation, is_causal}, scale, &p));
  return Launched("jnat_na_fwd",
                  LaunchNaForward(MakeDims(p), DtypeCode(p.dtype), q.untyped_data(),
                                  k.untyped_data(), v.untyped_data(), p.rpb_or_null(rpb), p.scale,
                                  out->untyped_data(), static_cast<float*>(lse->untyped_data()),
                                  stream));
}

ffi::Error NaBwdDispatch(cudaStream_t stream, ffi::AnyBuffer q,
                         ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rpb,
                         ffi::AnyBuffer dout, ffi::AnyBuffer lse, ffi::AnyBuffer delta,
                         ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> drpb,
                         Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal,
                         float scale) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaBwd(q, k, v, rpb, dout, lse, delta, *dq, *dk, *dv, *drpb,
                                {kernel_size, stride, dilation, is_causal}, scale, &p));
  const NaDims s = MakeDims(p);
  if (TensorCoreBackwardRequested() && NaBackwardMmaApplies(s, DtypeCode(p.dtype), p.has_rpb)) {
    return Launched("jnat_na_bwd",
                    LaunchNaBackwardMma(s, DtypeCode(p.dtype), q.untyped_data(), k.untyped_data(),
                                        v.untyped_data(), dout.untyped_data(),
                                        static_cast<const float*>(lse.untyped_data()),
                                        static_cast<const float*>(delta.untyped_data()), p.scale,
                                        dq->untyped_data(), dk->untyped_data(),
                                        dv->untyped_data(), stream));
  }
  void* work = nullptr;
  JNAT_PARAMS_CHECK(
      AllocWorkspace("jnat_na_bwd", stream, DrpbScratchBytes(s, p.has_rpb), &work));
  const cudaError_t err = LaunchNaBackward(
      s, DtypeCode(p.dtype), q.untyped_data(), k.untyped_data(), v.untyped_data(),
      p.rpb_or_null(rpb), dout.untyped_data(), static_cast<const float*>(lse.untyped_data()),
      static_cast<const float*>(delta.untyped_data()), p.scale, dq->untyped_data(),
      dk->untyped_data(), dv->untyped_data(), p.drpb_or_null(*drpb), work, stream);
  return Launched("jnat_na_bwd", FreeWorkspace(err, work, stream));
}

ffi::Error NaQKDispatch(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                        ffi::AnyBuffer rpb, ffi::Result<ffi::AnyBuffer> attn, Attr3 kernel_size,
                        Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(
      DecodeNaQK(q, k, rpb, *attn, {kernel_size, stride, dilation, is_causal}, &p));
  return Launched("jnat_na_qk",
                  LaunchNaQK(MakeDims(p), DtypeCode(p.dtype), q.untyped_data(), k.untyped_data(),
                             p.rpb_or_null(rpb), attn->untyped_data(), stream));
}

ffi::Error NaQKBwdDispatch(cudaStream_t stream, ffi::AnyBuffer q,
                           ffi::AnyBuffer k, ffi::AnyBuffer rpb, ffi::AnyBuffer dattn,
                           ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                           ffi::Result<ffi::AnyBuffer> drpb, Attr3 kernel_size, Attr3 stride,
                           Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaQKBwd(q, k, rpb, dattn, *dq, *dk, *drpb,
                                  {kernel_size, stride, dilation, is_causal}, &p));
  const NaDims s = MakeDims(p);
  void* work = nullptr;
  JNAT_PARAMS_CHECK(
      AllocWorkspace("jnat_na_qk_bwd", stream, DrpbScratchBytes(s, p.has_rpb), &work));
  const cudaError_t err = LaunchNaQKBackward(
      s, DtypeCode(p.dtype), DtypeCode(p.attn_dtype), q.untyped_data(), k.untyped_data(),
      dattn.untyped_data(), dq->untyped_data(), dk->untyped_data(), p.drpb_or_null(*drpb), work,
      stream);
  return Launched("jnat_na_qk_bwd", FreeWorkspace(err, work, stream));
}

ffi::Error NaAVDispatch(cudaStream_t stream, ffi::AnyBuffer attn, ffi::AnyBuffer v,
                        ffi::Result<ffi::AnyBuffer> out, Attr3 kernel_size, Attr3 stride,
                        Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaAV(attn, v, *out, {kernel_size, stride, dilation, is_causal}, &p));
  return Launched("jnat_na_av",
                  LaunchNaAV(MakeDims(p), DtypeCode(p.dtype), DtypeCode(p.attn_dtype),
                             attn.untyped_data(), v.untyped_data(), out->untyped_data(), stream));
}

ffi::Error NaAVBwdDispatch(cudaStream_t stream, ffi::AnyBuffer attn, ffi::AnyBuffer v,
                           ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dattn,
                           ffi::Result<ffi::AnyBuffer> dv, Attr3 kernel_size, Attr3 stride,
                           Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaAVBwd(attn, v, dout, *dattn, *dv,
                                  {kernel_size, stride, dilation, is_causal}, &p));
  return Launched("jnat_na_av_bwd",
                  LaunchNaAVBackward(MakeDims(p), DtypeCode(p.dtype), DtypeCode(p.attn_dtype),
                                     attn.untyped_data(), v.untyped_data(), dout.untyped_data(),
                                     dattn->untyped_data(), dv->untyped_data(), stream));
}

}  // namespace
}  // namespace jnat::cuda

namespace ffi = xla::ffi;
using jnat::cuda::Stream;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaFwdCuda, jnat::cuda::NaFwdDispatch,
                              jnat::BindNaFwd(ffi::Ffi::Bind().Ctx<Stream>()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaBwdCuda, jnat::cuda::NaBwdDispatch,
                              jnat::BindNaBwd(ffi::Ffi::Bind().Ctx<Stream>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaQKCuda, jnat::cuda::NaQKDispatch,
                              jnat::BindNaQK(ffi::Ffi::Bind().Ctx<Stream>()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaQKBwdCuda, jnat::cuda::NaQKBwdDispatch,
                              jnat::BindNaQKBwd(ffi::Ffi::Bind().Ctx<Stream>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaAVCuda, jnat::cuda::NaAVDispatch,
                              jnat::BindNaAV(ffi::Ffi::Bind().Ctx<Stream>()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaAVBwdCuda, jnat::cuda::NaAVBwdDispatch,
                              jnat::BindNaAVBwd(ffi::Ffi::Bind().Ctx<Stream>()),
                              {ffi::Traits::kCmdBufferCompatible});
