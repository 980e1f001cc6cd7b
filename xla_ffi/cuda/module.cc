// The _jnat_cuda extension: a dict of FFI handler capsules, registered by jnat at import for
// the "CUDA" platform under the same target names as the CPU kernels.
#include <nanobind/nanobind.h>

#include "common/na_module.h"
#include "cuda/na_handlers.h"

NB_MODULE(_jnat_cuda, m) {
  jnat::DefineRegistrations(m, {JnatNaFwdCuda, JnatNaBwdCuda, JnatNaQKCuda, JnatNaQKBwdCuda,
                                JnatNaAVCuda, JnatNaAVBwdCuda});
}
