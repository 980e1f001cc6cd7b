// The _jnat_cpu extension: a dict of FFI handler capsules, registered by jnat at import, and
// the choice of the kernels' instruction set (na_cpu_isa.h), reported by jnat.cpu_info().
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/na_module.h"
#include "cpu/na_cpu.h"
#include "cpu/na_cpu_isa.h"

namespace {

std::vector<std::string> SupportedIsaNames() {
  std::vector<std::string> names;
  for (jnat::cpu::Isa isa : jnat::cpu::SupportedIsas()) names.push_back(jnat::cpu::IsaName(isa));
  return names;
}

// The selected instruction set's name; raises ValueError if JNAT_CPU_ISA named none usable.
std::string ActiveIsaName() {
  if (jnat::cpu::ActiveKernels() == nullptr) throw std::invalid_argument(jnat::cpu::IsaError());
  return jnat::cpu::IsaName(jnat::cpu::ActiveIsa());
}

// CMake's JNAT_CPU_AVX512_ON_AVX2 test build: "avx512" runs that path's code on AVX2.
#if JNAT_ISA_AVX512_ON_AVX2
constexpr bool kAvx512OnAvx2 = true;
#else
constexpr bool kAvx512OnAvx2 = false;
#endif

}  // namespace

NB_MODULE(_jnat_cpu, m) {
  jnat::DefineRegistrations(
      m, {JnatNaFwd, JnatNaBwd, JnatNaQK, JnatNaQKBwd, JnatNaAV, JnatNaAVBwd, JnatNaBwdDlse});
  jnat::cpu::SelectIsaFromEnvironment();
  m.def("isa", &ActiveIsaName, "The instruction set the CPU kernels run with.");
  m.def("supported_isas", &SupportedIsaNames,
        "The instruction sets of this build that the CPU supports, best first.");
  m.def("baseline_vectors", &jnat::cpu::BaselineVectors,
        "What the baseline instruction set's vectors are here (sse2, neon).");
  m.def("set_isa", &jnat::cpu::SelectIsa, nanobind::arg("name"),
        "Selects the kernels' instruction set in process (tests); ValueError if unsupported.");
  m.def("l2_cache_bytes", &jnat::cpu::L2CacheBytes,
        "The CPU's per-core L2 cache in bytes as the operating system reports it (0: unknown).");
  m.attr("avx512_on_avx2") = kAvx512OnAvx2;
  m.def("pool_threads", &jnat::cpu::LastPoolThreads,
        "Threads of XLA's intra-op pool as the last kernel call saw them (0: no call yet).");
}
