// The CPU kernels of one instruction set, as a KernelTable (na_cpu_isa.h).
//
// CMake compiles this file once per instruction set, defining JNAT_ISA_AVX512, JNAT_ISA_AVX2
// or neither (the baseline). The kernel headers put everything they define into the
// namespace JNAT_ISA_NS, one per instruction set, and a target pragma enables the
// instruction set for exactly those functions: the rest of the module, and any CPU that
// lacks it, never runs its instructions. The standard library and the shared headers are
// included first, outside the pragma: their inline functions are shared by every copy of
// this file, and must stay baseline code (else the linker might keep, say, an AVX-512 copy
// of std::fill for all of them).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "common/na_geometry.h"
#include "common/na_index.h"
#include "cpu/na_cpu_isa.h"
#include "cpu/na_cpu_workers.h"

#if JNAT_ISA_AVX512
#define JNAT_ISA_NS avx512
#define JNAT_ISA_TABLE Avx512Kernels
#if JNAT_ISA_AVX512_ON_AVX2  // the test build of CMake's JNAT_CPU_AVX512_ON_AVX2
#define JNAT_ISA_TARGET "avx2,fma"
#else
#define JNAT_ISA_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#endif
#elif JNAT_ISA_AVX2
#define JNAT_ISA_NS avx2
#define JNAT_ISA_TABLE Avx2Kernels
#define JNAT_ISA_TARGET "avx2,fma"
#else
#define JNAT_ISA_NS baseline
#define JNAT_ISA_TABLE BaselineKernels
#endif

#define JNAT_PRAGMA(x) _Pragma(#x)
#define JNAT_TARGET_PUSH(t) JNAT_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define JNAT_GCC_TARGET(t) JNAT_PRAGMA(GCC target(t))

#if defined(JNAT_ISA_TARGET) && defined(__clang__)
JNAT_TARGET_PUSH(JNAT_ISA_TARGET)
#elif defined(JNAT_ISA_TARGET)
#pragma GCC push_options
JNAT_GCC_TARGET(JNAT_ISA_TARGET)
#endif

#include "cpu/na_cpu_kernels.h"

#if defined(JNAT_ISA_TARGET) && defined(__clang__)
#pragma clang attribute pop
#elif defined(JNAT_ISA_TARGET)
#pragma GCC pop_options
#endif

namespace jnat::cpu {

const KernelTable& JNAT_ISA_TABLE() {
  namespace isa = JNAT_ISA_NS;
  static constexpr KernelTable kTable = {&isa::LaneFusedForward, &isa::LaneFusedBackward,
                                         &isa::NaQK, &isa::NaQKBackward, &isa::NaAV,
                                         &isa::NaAVBackward};
  return kTable;
}

}  // namespace jnat::cpu
