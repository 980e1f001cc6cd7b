// The _jnat_cpu extension: a dict of FFI handler capsules, registered by jnat at import.
#include <nanobind/nanobind.h>

#include "common/na_module.h"
#include "cpu/na_cpu.h"

NB_MODULE(_jnat_cpu, m) {
  jnat::DefineRegistrations(
      m, {JnatNaFwd, JnatNaBwd, JnatNaQK, JnatNaQKBwd, JnatNaAV, JnatNaAVBwd});
}
