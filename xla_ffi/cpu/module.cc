// The _jnat_cpu extension: a dict of FFI handler capsules, registered by jnat at import.
#include <nanobind/nanobind.h>

#include "cpu/na_cpu.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule Capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jnat_cpu, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["jnat_na_fwd"] = Capsule(JnatNaFwd);
    d["jnat_na_bwd"] = Capsule(JnatNaBwd);
    d["jnat_na_qk"] = Capsule(JnatNaQK);
    d["jnat_na_qk_bwd"] = Capsule(JnatNaQKBwd);
    d["jnat_na_av"] = Capsule(JnatNaAV);
    d["jnat_na_av_bwd"] = Capsule(JnatNaAVBwd);
    return d;
  });
}
