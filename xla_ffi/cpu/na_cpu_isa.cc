// Run-time choice of the CPU kernels' instruction set (na_cpu_isa.h).
#include "cpu/na_cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#if defined(__APPLE__)
#include <sys/sysctl.h>
#else
#include <unistd.h>
#endif

namespace jnat::cpu {
namespace {

constexpr Isa kAllIsas[] = {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline};

bool CpuSupports(Isa isa) {
  switch (isa) {
    case Isa::kBaseline:
      return true;
#if defined(__x86_64__)
    // The feature sets the AVX-512 and AVX2 translation units are compiled for
    // (na_cpu_isa_kernels.cc); these checks include the operating system's support for
    // the wider registers.
    case Isa::kAvx512:
#if JNAT_ISA_AVX512_ON_AVX2  // a test build: that path's kernels use AVX2 + FMA only
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    default:
      return false;
  }
}

const KernelTable& TableOf(Isa isa) {
  switch (isa) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return Avx512Kernels();
    case Isa::kAvx2:
      return Avx2Kernels();
#endif
    default:
      return BaselineKernels();
  }
}

// The selection: written at load and by SelectIsa, read by every kernel call.
std::atomic<const KernelTable*> active_table{nullptr};
std::atomic<Isa> active_isa{Isa::kBaseline};
std::mutex error_mutex;
std::string error;  // guarded by error_mutex

std::string SupportedList() {
  std::string names;
  for (Isa isa : SupportedIsas()) names += std::string(names.empty() ? "" : ", ") + IsaName(isa);
  return names;
}

}  // namespace

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

const char* BaselineVectors() {
#if defined(__x86_64__)
  return "sse2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "generic";
#endif
}

std::vector<Isa> SupportedIsas() {
  std::vector<Isa> isas;
  for (Isa isa : kAllIsas) {
    if (CpuSupports(isa)) isas.push_back(isa);
  }
  return isas;
}

void SelectIsa(const std::string& name) {
  for (Isa isa : kAllIsas) {
    if (name != IsaName(isa)) continue;
    if (!CpuSupports(isa)) {
      throw std::invalid_argument("CPU instruction set '" + name +
                                  "' is not supported by this CPU; it supports: " +
                                  SupportedList());
    }
    active_table.store(&TableOf(isa));
    active_isa.store(isa);
    std::lock_guard<std::mutex> lock(error_mutex);
    error.clear();
    return;
  }
  throw std::invalid_argument("CPU instruction set '" + name +
                              "' is unknown: it must be one of avx512, avx2, baseline (this "
                              "CPU supports: " + SupportedList() + ")");
}

void SelectIsaFromEnvironment() {
  const char* env = std::getenv("JNAT_CPU_ISA");
  if (env == nullptr || *env == '\0') {
    SelectIsa(IsaName(SupportedIsas().front()));
    return;
  }
  try {
    SelectIsa(env);
  } catch (const std::invalid_argument& e) {
    active_table.store(nullptr);
    std::lock_guard<std::mutex> lock(error_mutex);
    error = std::string("JNAT_CPU_ISA=") + env + ": " + e.what();
  }
}

const KernelTable* ActiveKernels() { return active_table.load(); }

Isa ActiveIsa() { return active_isa.load(); }

std::string IsaError() {
  std::lock_guard<std::mutex> lock(error_mutex);
  return error;
}

int64_t L2CacheBytes() {
  static const int64_t bytes = [] {
    int64_t n = 0;
#if defined(__APPLE__)
    size_t size = sizeof(n);
    if (sysctlbyname("hw.l2cachesize", &n, &size, nullptr, 0) != 0) n = 0;
#elif defined(_SC_LEVEL2_CACHE_SIZE)
    n = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return n > 0 ? n : 0;
  }();
  return bytes;
}

}  // namespace jnat::cpu
