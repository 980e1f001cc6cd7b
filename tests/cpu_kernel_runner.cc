// Runs one CPU kernel of jnat on raw float32 files, outside XLA: the way tests run the
// kernels of an architecture this machine cannot run natively (tests/arm_kernels.py builds
// it for aarch64 and runs it under qemu-user).
//
//   cpu_kernel_runner TARGET DIR
//
// TARGET is one of the FFI targets (jnat_na_fwd, jnat_na_bwd, jnat_na_bwd_dlse, jnat_na_qk,
// jnat_na_qk_bwd, jnat_na_av, jnat_na_av_bwd). DIR holds geometry.txt (batch heads kv_heads
// dim, the three lengths, kernel sizes, strides, dilations and causal flags, has_rpb,
// threads, scale: whitespace-separated) and in0.bin, in1.bin, ... in the target's operand
// order (xla_ffi/cpu/na_cpu.cc); the runner writes out0.bin, ... in its result order. Each
// operand's size is checked against the geometry; the outputs start as NaN, so an entry a
// kernel fails to write shows. The kernels are those the module would select at load
// (JNAT_CPU_ISA, else the best the CPU supports), run on `threads` threads of their own.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "common/na_geometry.h"
#include "cpu/na_cpu_isa.h"
#include "cpu/na_cpu_workers.h"

namespace {

using jnat::NaGeometry;
using jnat::cpu::Workers;

class ThreadWorkers final : public Workers {
 public:
  explicit ThreadWorkers(int64_t n) : n_(n) {}
  int64_t size() const override { return n_; }
  void Run(int64_t n, const std::function<void(int64_t)>& body) const override {
    std::vector<std::thread> threads;
    for (int64_t i = 1; i < n; ++i) threads.emplace_back(body, i);
    body(0);
    for (std::thread& t : threads) t.join();
  }

 private:
  int64_t n_;
};

[[noreturn]] void Fail(const std::string& message) {
  std::fprintf(stderr, "cpu_kernel_runner: %s\n", message.c_str());
  std::exit(2);
}

std::vector<float> ReadFloats(const std::string& path, int64_t n) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail("cannot read " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (static_cast<int64_t>(bytes.size()) != n * 4) {
    Fail(path + " holds " + std::to_string(bytes.size()) + " bytes; the geometry needs " +
         std::to_string(n * 4));
  }
  std::vector<float> x(n);
  std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(x.data()));
  return x;
}

void WriteFloats(const std::string& path, const std::vector<float>& x) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(x.data()), static_cast<std::streamsize>(x.size() * 4));
  if (!f) Fail("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) Fail("usage: cpu_kernel_runner TARGET DIR");
  const std::string target = argv[1], dir = argv[2];
  NaGeometry s;
  int64_t has_rpb = 0, threads = 1, causal[3] = {};
  float scale = 0.0f;
  {
    std::ifstream f(dir + "/geometry.txt");
    f >> s.batch >> s.heads >> s.kv_heads >> s.dim;
    for (int64_t* axis : {s.length, s.kernel, s.stride, s.dilation, causal}) {
      for (int a = 0; a < 3; ++a) f >> axis[a];
    }
    f >> has_rpb >> threads >> scale;
    if (!f) Fail("cannot parse " + dir + "/geometry.txt");
    for (int a = 0; a < 3; ++a) s.causal[a] = causal[a] != 0;
  }
  // The windows' rules (jnat's Python checks; the handlers' in common/na_params.h).
  bool valid = s.batch >= 0 && s.heads >= 0 && s.kv_heads >= 1 && s.heads % s.kv_heads == 0 &&
               s.dim >= 1 && threads >= 1;
  for (int a = 0; a < 3; ++a) {
    valid = valid && s.kernel[a] >= 1 && s.dilation[a] >= 1 && s.stride[a] >= 1 &&
            s.stride[a] <= s.kernel[a] && s.kernel[a] <= s.length[a] / s.dilation[a];
  }
  if (!valid) Fail("invalid geometry in " + dir + "/geometry.txt");

  // Operand sizes by role (xla_ffi/cpu/na_cpu.cc): Q [B,tokens,H,D], KV [B,tokens,Hkv,D],
  // R rpb [H,RR] (empty without), L [B,tokens,H], A [B,tokens,H,window].
  const int64_t rows = s.batch * s.tokens();
  auto size_of = [&](char role) -> int64_t {
    switch (role) {
      case 'Q': return rows * s.heads * s.dim;
      case 'K': return rows * s.kv_heads * s.dim;
      case 'R': return has_rpb ? s.heads * s.rpb_size() : 0;
      case 'L': return rows * s.heads;
      case 'A': return rows * s.heads * s.window();
    }
    Fail("unknown role");
  };
  struct Signature {
    const char* name;
    const char* in;
    const char* out;
  };
  static constexpr Signature kTargets[] = {
      {"jnat_na_fwd", "QKKR", "QL"},      {"jnat_na_bwd", "QKKRQLL", "QKKR"},
      {"jnat_na_bwd_dlse", "QKKRQLL", "QKKR"}, {"jnat_na_qk", "QKR", "A"},
      {"jnat_na_qk_bwd", "QKRA", "QKR"},  {"jnat_na_av", "AK", "Q"},
      {"jnat_na_av_bwd", "AKQ", "AK"}};
  const Signature* sig = nullptr;
  for (const Signature& t : kTargets) {
    if (target == t.name) sig = &t;
  }
  if (sig == nullptr) Fail("unknown target " + target);

  std::vector<std::vector<float>> in, out;
  for (int i = 0; sig->in[i]; ++i) {
    in.push_back(ReadFloats(dir + "/in" + std::to_string(i) + ".bin", size_of(sig->in[i])));
  }
  for (int i = 0; sig->out[i]; ++i) {
    out.emplace_back(size_of(sig->out[i]), std::numeric_limits<float>::quiet_NaN());
  }
  auto rpb_in = [&](int i) { return has_rpb ? in[i].data() : nullptr; };
  auto rpb_out = [&](int i) { return has_rpb ? out[i].data() : nullptr; };

  jnat::cpu::SelectIsaFromEnvironment();
  const jnat::cpu::KernelTable* kernels = jnat::cpu::ActiveKernels();
  if (kernels == nullptr) Fail(jnat::cpu::IsaError());
  const ThreadWorkers workers(threads);
  if (target == "jnat_na_fwd") {
    kernels->fused_forward(s, workers, in[0].data(), in[1].data(), in[2].data(), rpb_in(3),
                           scale, out[0].data(), out[1].data());
  } else if (target == "jnat_na_bwd" || target == "jnat_na_bwd_dlse") {
    const jnat::cpu::RowTerm row_term{in[6].data(), target == "jnat_na_bwd_dlse"};
    kernels->fused_backward(s, workers, in[0].data(), in[1].data(), in[2].data(), rpb_in(3),
                            in[4].data(), in[5].data(), row_term, scale, out[0].data(),
                            out[1].data(), out[2].data(), rpb_out(3));
  } else if (target == "jnat_na_qk") {
    kernels->qk(s, workers, in[0].data(), in[1].data(), rpb_in(2), out[0].data());
  } else if (target == "jnat_na_qk_bwd") {
    kernels->qk_backward(s, workers, in[0].data(), in[1].data(), in[3].data(), out[0].data(),
                         out[1].data(), rpb_out(2));
  } else if (target == "jnat_na_av") {
    kernels->av(s, workers, in[0].data(), in[1].data(), out[0].data());
  } else {
    kernels->av_backward(s, workers, in[0].data(), in[1].data(), in[2].data(), out[0].data(),
                         out[1].data());
  }
  for (size_t i = 0; i < out.size(); ++i) {
    WriteFloats(dir + "/out" + std::to_string(i) + ".bin", out[i]);
  }
  std::printf("%s\n", jnat::cpu::IsaName(jnat::cpu::ActiveIsa()));
  return 0;
}
