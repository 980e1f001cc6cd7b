// The CUDA kernels' interface: problem sizes as a plain struct and one launcher per kernel
// family. No XLA types: the handlers (na_handlers.cu) decode and validate the FFI call into
// NaParams (common/na_params.h), convert it with MakeDims and call these.
//
// Tensors are rank-3 spatial, heads-last, row-major: q [B, L0, L1, L2, H, D], k and v
// [B, L0, L1, L2, Hkv, D], rpb float32 [H, R0, R1, R2] (R = 2K-1; nullptr: none), lse and
// delta float32 [B, L0, L1, L2, H], attention weights [B, L0, L1, L2, H, K0*K1*K2].
// Element types are passed as int (0 float32, 1 bfloat16, 2 float16: jnat::Dtype).
//
// Every launcher writes each element of its outputs, returns the launch status and never
// synchronises. Results are deterministic: no atomics; the rpb gradient is reduced from
// per-block partials in a fixed order.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace jnat::cuda {

struct NaDims {
  int64_t batch, heads, kv_heads, dim, group;
  int64_t length[3], kernel[3], stride[3], dilation[3];
  int causal[3];
  int64_t tokens, window;
  int64_t rpb_extent[3], rpb_size;
};

// Workspace the rpb-gradient launchers need (bytes; 0 without rpb).
size_t DrpbScratchBytes(const NaDims& s, bool has_rpb);

// Fused forward: out (dtype) and lse (float32, natural log).
cudaError_t LaunchNaForward(const NaDims& s, int dtype, const void* q, const void* k,
                            const void* v, const float* rpb, float scale, void* out, float* lse,
                            cudaStream_t stream);

// Fused backward from lse and delta: dq, dk, dv (dtype), drpb (float32, when rpb != nullptr).
cudaError_t LaunchNaBackward(const NaDims& s, int dtype, const void* q, const void* k,
                             const void* v, const float* rpb, const void* dout, const float* lse,
                             const float* delta, float scale, void* dq, void* dk, void* dv,
                             float* drpb, void* scratch, cudaStream_t stream);

// The tensor-core fused backward (bfloat16 / float16, head_dim <= 64, no rpb), selected by
// the handler only on request (JNAT_CUDA_TC_BWD=1) while it awaits validation on a GPU;
// LaunchNaBackward stays the default.
bool NaBackwardMmaApplies(const NaDims& s, int dtype, bool has_rpb);
cudaError_t LaunchNaBackwardMma(const NaDims& s, int dtype, const void* q, const void* k,
                                const void* v, const void* dout, const float* lse,
                                const float* delta, float scale, void* dq, void* dk, void* dv,
                                cudaStream_t stream);

// attn = q.k + rpb (no scale), -inf at masked slots; attn has q's dtype.
cudaError_t LaunchNaQK(const NaDims& s, int dtype, const void* q, const void* k,
                       const float* rpb, void* attn, cudaStream_t stream);

// Backward of NaQK: dq, dk (dtype) and drpb (float32, when drpb != nullptr).
cudaError_t LaunchNaQKBackward(const NaDims& s, int dtype, int dattn_dtype, const void* q,
                               const void* k, const void* dattn, void* dq, void* dk,
                               float* drpb, void* scratch, cudaStream_t stream);

// out = sum over valid slots of attn * v; out has v's dtype.
cudaError_t LaunchNaAV(const NaDims& s, int dtype, int attn_dtype, const void* attn,
                       const void* v, void* out, cudaStream_t stream);

// Backward of NaAV: dattn (attn's dtype, 0 at masked slots) and dv (v's dtype).
cudaError_t LaunchNaAVBackward(const NaDims& s, int dtype, int attn_dtype, const void* attn,
                               const void* v, const void* dout, void* dattn, void* dv,
                               cudaStream_t stream);

// The general fused forward (any dtype and head_dim, float32 FMA): LaunchNaForward uses it
// where the tensor-core kernel does not apply.
cudaError_t LaunchNaForwardSimt(const NaDims& s, int dtype, const void* q, const void* k,
                                const void* v, const float* rpb, float scale, void* out,
                                float* lse, cudaStream_t stream);

}  // namespace jnat::cuda
