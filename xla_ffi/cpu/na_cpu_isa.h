// Which instruction set the CPU kernels run with, chosen at run time, and the CPU's caches.
//
// The kernels are compiled once per instruction set (na_cpu_isa_kernels.cc) into one module
// that loads on any CPU of its architecture: x86-64 has AVX-512, AVX2 + FMA and a baseline
// (SSE2); Arm has the baseline (NEON). At load the module takes the best one the CPU supports,
// or the one the environment variable JNAT_CPU_ISA names; SelectIsa() switches in process.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/na_geometry.h"
#include "cpu/na_cpu_workers.h"

namespace jnat::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The softmax backward's row term delta = rowsum(dout * out) - dlse, per (token, head): given
// (jnat_na_bwd: `stat` is delta), or summed by the backward from what it already holds, as
// rowsum(p * dp) (= dout . out) - dlse (jnat_na_bwd_dlse: `stat` is dlse), which spares a
// pass over dout and out before the call.
struct RowTerm {
  const float* stat;
  bool stat_is_dlse;
};

// The six kernels, of one instruction set. Tensor layouts: na_cpu_kernels.h.
struct KernelTable {
  void (*fused_forward)(const NaGeometry& s, const Workers& workers, const float* q,
                        const float* k, const float* v, const float* rpb, float scale,
                        float* out, float* lse);
  void (*fused_backward)(const NaGeometry& s, const Workers& workers, const float* q,
                         const float* k, const float* v, const float* rpb, const float* dout,
                         const float* lse, RowTerm row_term, float scale, float* dq,
                         float* dk, float* dv, float* drpb);
  void (*qk)(const NaGeometry& s, const Workers& workers, const float* q, const float* k,
             const float* rpb, float* attn);
  void (*qk_backward)(const NaGeometry& s, const Workers& workers, const float* q,
                      const float* k, const float* dattn, float* dq, float* dk, float* drpb);
  void (*av)(const NaGeometry& s, const Workers& workers, const float* attn, const float* v,
             float* out);
  void (*av_backward)(const NaGeometry& s, const Workers& workers, const float* attn,
                      const float* v, const float* dout, float* dattn, float* dv);
};

// The tables, one per compiled instruction set (na_cpu_isa_kernels.cc). Only call one whose
// instruction set the CPU supports.
const KernelTable& BaselineKernels();
#if defined(__x86_64__)
const KernelTable& Avx2Kernels();
const KernelTable& Avx512Kernels();
#endif

// "avx512", "avx2" or "baseline": the names JNAT_CPU_ISA takes.
const char* IsaName(Isa isa);
// What the baseline vectors are on this architecture ("sse2", "neon").
const char* BaselineVectors();
// The instruction sets of this module that the CPU supports, best first.
std::vector<Isa> SupportedIsas();

// Selects the kernels by name; throws std::invalid_argument for an unknown name or one the
// CPU does not support, leaving the selection as it was.
void SelectIsa(const std::string& name);
// At load: JNAT_CPU_ISA if set, else the best supported. An invalid JNAT_CPU_ISA leaves no
// kernels selected and its message in IsaError(), which every kernel call then returns.
void SelectIsaFromEnvironment();
// The selected kernels and their instruction set; nullptr / kBaseline when none is selected.
const KernelTable* ActiveKernels();
Isa ActiveIsa();
// Why no kernels are selected ("" when they are).
std::string IsaError();

// The CPU's L2 cache (per core) in bytes as the operating system reports it; 0 if unknown.
// The forward sizes its working set by it.
int64_t L2CacheBytes();

}  // namespace jnat::cpu
