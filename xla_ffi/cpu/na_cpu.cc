// XLA FFI handlers of the CPU neighbourhood attention kernels.
//
// Each op: a Dispatch that decodes and validates every buffer and attribute
// (common/na_params.h, shared with the CUDA handlers), takes float32 views of the inputs
// (na_cpu_f32_buffers.h), runs the float32 kernel of the selected instruction set
// (na_cpu_isa.h) on XLA's intra-op threads and converts the outputs back to their dtypes;
// then the handler symbol, binding XLA's thread pool and the op's buffers and attributes
// (common/na_bindings.h).
#include "cpu/na_cpu.h"

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "common/na_bindings.h"
#include "common/na_params.h"
#include "cpu/na_cpu_f32_buffers.h"
#include "cpu/na_cpu_isa.h"
#include "cpu/na_cpu_workers.h"
#include "xla/ffi/api/ffi.h"

namespace jnat::cpu {
namespace {

std::atomic<int64_t> last_pool_threads{0};

// Workers over the ThreadPool context of one handler call.
class PoolWorkers final : public Workers {
 public:
  explicit PoolWorkers(ffi::ThreadPool& pool)
      : pool_(pool), size_(std::max<int64_t>(1, pool.num_threads())) {
    last_pool_threads.store(size_, std::memory_order_relaxed);
  }

  int64_t size() const override { return size_; }

  void Run(int64_t n, const std::function<void(int64_t)>& body) const override {
    if (n <= 1) {
      body(0);
      return;
    }
    // Tasks that start after the caller is done must not touch `body`: they find `closed`.
    struct Shared {
      std::mutex mutex;
      std::condition_variable idle;
      int64_t running = 0;
      bool closed = false;
      const std::function<void(int64_t)>* body;
    };
    auto shared = std::make_shared<Shared>();
    shared->body = &body;
    for (int64_t i = 1; i < n; ++i) {
      pool_.Schedule([shared, i] {
        {
          std::lock_guard<std::mutex> lock(shared->mutex);
          if (shared->closed) return;
          ++shared->running;
        }
        (*shared->body)(i);
        std::lock_guard<std::mutex> lock(shared->mutex);
        if (--shared->running == 0) shared->idle.notify_all();
      });
    }
    body(0);
    std::unique_lock<std::mutex> lock(shared->mutex);
    shared->closed = true;
    shared->idle.wait(lock, [&] { return shared->running == 0; });
  }

 private:
  ffi::ThreadPool& pool_;
  int64_t size_;
};

// The selected kernels, or the error every call returns when JNAT_CPU_ISA was invalid.
ffi::Error Kernels(const KernelTable** table) {
  *table = ActiveKernels();
  if (*table == nullptr) return ffi::Error(ffi::ErrorCode::kInvalidArgument, IsaError());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------

ffi::Error NaFwdDispatch(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rpb,
                         ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                         Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal,
                         float scale) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaFwd(q, k, v, rpb, *out, *lse,
                                {kernel_size, stride, dilation, is_causal}, scale, &p));
  const KernelTable* kernels;
  JNAT_PARAMS_CHECK(Kernels(&kernels));
  const PoolWorkers workers(pool);
  F32In qf(workers, q), kf(workers, k), vf(workers, v);
  F32Out of(workers, *out);
  kernels->fused_forward(p, workers, qf.get(), kf.get(), vf.get(), p.rpb_or_null(rpb), p.scale,
                 of.get(), static_cast<float*>(lse->untyped_data()));
  of.Commit();
  return ffi::Error::Success();
}

// kDeltaIsDlse: jnat_na_bwd_dlse, which takes dlse in delta's place (RowTerm).
template <bool kDeltaIsDlse>
ffi::Error NaBwdDispatch(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rpb,
                         ffi::AnyBuffer dout, ffi::AnyBuffer lse, ffi::AnyBuffer delta,
                         ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> drpb,
                         Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal,
                         float scale) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaBwd(q, k, v, rpb, dout, lse, delta, *dq, *dk, *dv, *drpb,
                                {kernel_size, stride, dilation, is_causal}, scale, &p,
                                kDeltaIsDlse));
  const KernelTable* kernels;
  JNAT_PARAMS_CHECK(Kernels(&kernels));
  const PoolWorkers workers(pool);
  F32In qf(workers, q), kf(workers, k), vf(workers, v), dof(workers, dout);
  F32Out dqf(workers, *dq), dkf(workers, *dk), dvf(workers, *dv);
  kernels->fused_backward(p, workers, qf.get(), kf.get(), vf.get(), p.rpb_or_null(rpb), dof.get(),
                  static_cast<const float*>(lse.untyped_data()),
                  RowTerm{static_cast<const float*>(delta.untyped_data()), kDeltaIsDlse},
                  p.scale, dqf.get(), dkf.get(),
                  dvf.get(), p.drpb_or_null(*drpb));
  dqf.Commit();
  dkf.Commit();
  dvf.Commit();
  return ffi::Error::Success();
}

ffi::Error NaQKDispatch(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb,
                        ffi::Result<ffi::AnyBuffer> attn, Attr3 kernel_size, Attr3 stride,
                        Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(
      DecodeNaQK(q, k, rpb, *attn, {kernel_size, stride, dilation, is_causal}, &p));
  const KernelTable* kernels;
  JNAT_PARAMS_CHECK(Kernels(&kernels));
  const PoolWorkers workers(pool);
  F32In qf(workers, q), kf(workers, k);
  F32Out af(workers, *attn);
  kernels->qk(p, workers, qf.get(), kf.get(), p.rpb_or_null(rpb), af.get());
  af.Commit();
  return ffi::Error::Success();
}

ffi::Error NaQKBwdDispatch(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb,
                           ffi::AnyBuffer dattn, ffi::Result<ffi::AnyBuffer> dq,
                           ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> drpb,
                           Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaQKBwd(q, k, rpb, dattn, *dq, *dk, *drpb,
                                  {kernel_size, stride, dilation, is_causal}, &p));
  const KernelTable* kernels;
  JNAT_PARAMS_CHECK(Kernels(&kernels));
  const PoolWorkers workers(pool);
  F32In qf(workers, q), kf(workers, k), daf(workers, dattn);
  F32Out dqf(workers, *dq), dkf(workers, *dk);
  kernels->qk_backward(p, workers, qf.get(), kf.get(), daf.get(), dqf.get(), dkf.get(),
               p.drpb_or_null(*drpb));
  dqf.Commit();
  dkf.Commit();
  return ffi::Error::Success();
}

ffi::Error NaAVDispatch(ffi::ThreadPool pool, ffi::AnyBuffer attn, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                        Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaAV(attn, v, *out, {kernel_size, stride, dilation, is_causal}, &p));
  const KernelTable* kernels;
  JNAT_PARAMS_CHECK(Kernels(&kernels));
  const PoolWorkers workers(pool);
  F32In af(workers, attn), vf(workers, v);
  F32Out of(workers, *out);
  kernels->av(p, workers, af.get(), vf.get(), of.get());
  of.Commit();
  return ffi::Error::Success();
}

ffi::Error NaAVBwdDispatch(ffi::ThreadPool pool, ffi::AnyBuffer attn, ffi::AnyBuffer v, ffi::AnyBuffer dout,
                           ffi::Result<ffi::AnyBuffer> dattn, ffi::Result<ffi::AnyBuffer> dv,
                           Attr3 kernel_size, Attr3 stride, Attr3 dilation, Attr3 is_causal) {
  NaParams p;
  JNAT_PARAMS_CHECK(DecodeNaAVBwd(attn, v, dout, *dattn, *dv,
                                  {kernel_size, stride, dilation, is_causal}, &p));
  const KernelTable* kernels;
  JNAT_PARAMS_CHECK(Kernels(&kernels));
  const PoolWorkers workers(pool);
  F32In af(workers, attn), vf(workers, v), dof(workers, dout);
  F32Out daf(workers, *dattn), dvf(workers, *dv);
  kernels->av_backward(p, workers, af.get(), vf.get(), dof.get(), daf.get(), dvf.get());
  daf.Commit();
  dvf.Commit();
  return ffi::Error::Success();
}

}  // namespace

int64_t LastPoolThreads() { return last_pool_threads.load(std::memory_order_relaxed); }

}  // namespace jnat::cpu

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaFwd, jnat::cpu::NaFwdDispatch,
                              jnat::BindNaFwd(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaBwd, jnat::cpu::NaBwdDispatch<false>,
                              jnat::BindNaBwd(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaBwdDlse, jnat::cpu::NaBwdDispatch<true>,
                              jnat::BindNaBwd(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaQK, jnat::cpu::NaQKDispatch,
                              jnat::BindNaQK(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaQKBwd, jnat::cpu::NaQKBwdDispatch,
                              jnat::BindNaQKBwd(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaAV, jnat::cpu::NaAVDispatch,
                              jnat::BindNaAV(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JnatNaAVBwd, jnat::cpu::NaAVBwdDispatch,
                              jnat::BindNaAVBwd(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
