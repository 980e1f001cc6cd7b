// The one function of a jnat extension module: registrations(), a dict from custom-call
// target name to FFI handler capsule, which jnat registers with XLA at import.
//
// Every backend serves the same six targets (jnat lowers an op to the same custom call
// whatever the platform), so the target names are spelled here once and a module only says
// which of its handler symbols serves each. The CPU module serves a seventh, the backward that
// sums the softmax row term itself and takes dlse in delta's place (cpu/na_cpu_isa.h RowTerm):
// jnat's CPU lowering calls it instead of jnat_na_bwd.
#pragma once

#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

namespace jnat {

struct NaHandlers {
  XLA_FFI_Handler* fwd;
  XLA_FFI_Handler* bwd;
  XLA_FFI_Handler* qk;
  XLA_FFI_Handler* qk_bwd;
  XLA_FFI_Handler* av;
  XLA_FFI_Handler* av_bwd;
  XLA_FFI_Handler* bwd_dlse = nullptr;  // CPU only
};

inline void DefineRegistrations(nanobind::module_& m, NaHandlers h) {
  m.def("registrations", [h]() {
    const auto capsule = [](XLA_FFI_Handler* fn) {
      return nanobind::capsule(reinterpret_cast<void*>(fn));
    };
    nanobind::dict d;
    d["jnat_na_fwd"] = capsule(h.fwd);
    d["jnat_na_bwd"] = capsule(h.bwd);
    d["jnat_na_qk"] = capsule(h.qk);
    d["jnat_na_qk_bwd"] = capsule(h.qk_bwd);
    d["jnat_na_av"] = capsule(h.av);
    d["jnat_na_av_bwd"] = capsule(h.av_bwd);
    if (h.bwd_dlse != nullptr) d["jnat_na_bwd_dlse"] = capsule(h.bwd_dlse);
    return d;
  });
}

}  // namespace jnat
