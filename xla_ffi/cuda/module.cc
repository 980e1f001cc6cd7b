// The _jnat_cuda extension: a dict of FFI handler capsules, registered by jnat at import for
// the "CUDA" platform under the same target names as the CPU kernels.
#include <nanobind/nanobind.h>

#include "cuda/na_handlers.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule Capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jnat_cuda, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["jnat_na_fwd"] = Capsule(JnatNaFwdCuda);
    d["jnat_na_bwd"] = Capsule(JnatNaBwdCuda);
    d["jnat_na_qk"] = Capsule(JnatNaQKCuda);
    d["jnat_na_qk_bwd"] = Capsule(JnatNaQKBwdCuda);
    d["jnat_na_av"] = Capsule(JnatNaAVCuda);
    d["jnat_na_av_bwd"] = Capsule(JnatNaAVBwdCuda);
    return d;
  });
}
