// Shapes and work partitioning shared by the CPU kernels (na_cpu_kernels.h, na_cpu_lanes.h).
//
// Tensors are rank-3 spatial, heads-last and row-major: q [B, L0, L1, L2, H, D], k and v
// [B, L0, L1, L2, Hkv, D] (query head h reads kv head h / (H / Hkv)), rpb [H, 2K0-1, 2K1-1,
// 2K2-1] (nullptr: none).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/na_geometry.h"
#include "cpu/na_cpu_vec.h"
#include "cpu/na_cpu_workers.h"

namespace jnat::cpu::JNAT_ISA_NS {

// Parallel regions only pay off above this many multiply-adds.
inline bool WorthThreads(const NaGeometry& s) {
  return static_cast<double>(s.batch) * s.tokens() * s.heads * s.window() * (s.dim + 1) > 3.0e4;
}

// Row length of the backward's scatter buffers: D rounded up to whole vectors, so that the
// scatter needs no partial loads and stores.
inline int64_t PaddedDim(const NaGeometry& s) { return (s.dim + kLanes - 1) / kLanes * kLanes; }

// 64-byte aligned float storage, left uninitialised unless `zeroed`.
class AlignedFloats {
 public:
  explicit AlignedFloats(size_t n, bool zeroed = false)
      : raw_(zeroed ? new float[n + 16]() : new float[n + 16]) {
    data_ = Align(raw_.get());
  }
  float* data() const { return data_; }

  static float* Align(float* p) {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
  }

 private:
  std::unique_ptr<float[]> raw_;
  float* data_;
};

// 64-byte aligned scratch for one call, left uninitialised. Up to kKeepFloats it is storage
// the calling thread keeps from one call to the next (slot: which of a call's buffers), as
// fresh large allocations are untouched pages from the OS and faulting them in costs more than
// the work written into them; larger requests get their own allocation, so that no thread
// holds on to much memory.
class CallScratch {
 public:
  static constexpr size_t kKeepFloats = size_t{16} << 20;  // 64 MiB

  CallScratch(int slot, size_t n) {
    if (n > kKeepFloats) {
      own_ = std::make_unique<AlignedFloats>(n);
      data_ = own_->data();
      return;
    }
    thread_local std::vector<float> kept[4];
    std::vector<float>& b = kept[slot];
    if (b.size() < n + 16) b.resize(n + 16);
    data_ = AlignedFloats::Align(b.data());
  }
  float* data() const { return data_; }

 private:
  std::unique_ptr<AlignedFloats> own_;
  float* data_;
};

// ---------------------------------------------------------------------------------------------
// Backward scatters: every query adds to the key rows of its window, so the work is split by
// (batch, kv head), each of which owns its key rows. When there are too few of those to
// balance the threads, each one's tiles of queries are also split into bands with private
// float32 accumulators, summed afterwards in a fixed order: results never depend on scheduling.

// One unit of scatter work: tiles [tile_begin, tile_end) of (b, hk). Its accumulators are
// always compact ([tokens][stride], stride >= D): in the outputs a key's row lies Hkv * D
// floats from the next, a power of two that maps the rows a tile updates to a few cache sets.
struct ScatterItem {
  int64_t b = 0, hk = 0;
  int64_t tile_begin = 0, tile_end = 0;
  float* acc_a = nullptr;  // key token t's accumulator row: acc_a + t * stride
  float* acc_b = nullptr;  // the second accumulator (or nullptr)
  int64_t stride = 0;
  float* rpb = nullptr;  // [G, RR] rpb gradient of the kv head's query heads (or nullptr)
};

// Runs body(scratch, item) over a partition of n_tiles tiles per (batch, kv head), scratch
// coming from make_scratch() once per worker, and sums the items' contributions into acc_a /
// acc_b ([B, tokens, Hkv, D], overwritten; acc_b may be nullptr) and drpb ([H, RR],
// overwritten; nullptr: none). The items' accumulator rows are `stride` floats apart.
template <typename MakeScratch, typename Body>
void ForEachScatterItem(const NaGeometry& s, const Workers& workers, int64_t n_tiles,
                        int64_t stride, float* acc_a, float* acc_b, float* drpb,
                        MakeScratch&& make_scratch, Body&& body) {
  const int64_t N = s.tokens(), D = s.dim, G = s.group(), RR = s.rpb_size();
  const int64_t units = s.batch * s.kv_heads;
  const int64_t n_acc = acc_b != nullptr ? 2 : 1;
  const bool threads = WorthThreads(s);
  const int64_t P = threads ? workers.size() : 1;

  int64_t bands = 1;
  if (P > 1 && units % P != 0 && units < 4 * P) {
    bands = std::min<int64_t>(P, n_tiles);
    const double budget = 1.0 * (int64_t{1} << 30);  // bytes of private accumulators
    while (bands > 1 && 4.0 * bands * units * N * D * n_acc > budget) --bands;
  }
  const int64_t items = units * bands;
  const int64_t band_len = (n_tiles + bands - 1) / bands;

  const int64_t plane = N * stride;  // one item's accumulator
  std::vector<float> priv_a, priv_b;
  if (bands > 1) {
    priv_a.assign(static_cast<size_t>(items * plane), 0.0f);
    if (n_acc == 2) priv_b.assign(static_cast<size_t>(items * plane), 0.0f);
  }
  std::vector<float> priv_rpb(drpb != nullptr ? static_cast<size_t>(items * G * RR) : 0, 0.0f);

  ForEachItem(workers, threads, items, make_scratch, [&](auto& scratch, int64_t i) {
    ScatterItem it;
    const int64_t band = i % bands, unit = i / bands;
    it.b = unit / s.kv_heads;
    it.hk = unit % s.kv_heads;
    it.tile_begin = band * band_len;
    it.tile_end = std::min(n_tiles, (band + 1) * band_len);
    it.stride = stride;
    if (bands > 1) {
      it.acc_a = priv_a.data() + i * plane;
      it.acc_b = n_acc == 2 ? priv_b.data() + i * plane : nullptr;
    }
    // Otherwise this thread's buffers, copied out below.
    const CallScratch own_a(2, bands == 1 ? plane : 0), own_b(3, bands == 1 ? plane : 0);
    if (bands == 1) {
      it.acc_a = own_a.data();
      it.acc_b = n_acc == 2 ? own_b.data() : nullptr;
      std::fill(it.acc_a, it.acc_a + plane, 0.0f);
      if (n_acc == 2) std::fill(it.acc_b, it.acc_b + plane, 0.0f);
    }
    it.rpb = drpb != nullptr ? priv_rpb.data() + i * G * RR : nullptr;
    body(scratch, it);
    if (bands == 1) {
      for (int pass = 0; pass < n_acc; ++pass) {
        const float* src = pass == 0 ? it.acc_a : it.acc_b;
        float* dst = (pass == 0 ? acc_a : acc_b) + (it.b * N * s.kv_heads + it.hk) * D;
        for (int64_t t = 0; t < N; ++t) {
          CopyFloats(src + t * stride, D, dst + t * s.kv_heads * D);
        }
      }
    }
  });

  if (bands > 1) {  // the bands' accumulators, summed in band order
    const int64_t rows = s.batch * N * s.kv_heads;
    ForEachRange(workers, rows, threads ? 64 : rows + 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t hk = r % s.kv_heads, t = (r / s.kv_heads) % N, b = r / (s.kv_heads * N);
        const int64_t first = (b * s.kv_heads + hk) * bands;
        for (int pass = 0; pass < n_acc; ++pass) {
          const float* src = (pass == 0 ? priv_a : priv_b).data() + t * stride;
          float* dst = (pass == 0 ? acc_a : acc_b) + r * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[first * plane + d];
          for (int64_t j = 1; j < bands; ++j) {
            const float* sj = src + (first + j) * plane;
            for (int64_t d = 0; d < D; ++d) dst[d] += sj[d];
          }
        }
      }
    });
  }

  if (drpb != nullptr) {
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t hk = h / G, g = h % G;
      float* dst = drpb + h * RR;
      std::fill(dst, dst + RR, 0.0f);
      for (int64_t b = 0; b < s.batch; ++b) {
        for (int64_t band = 0; band < bands; ++band) {
          const int64_t item = (b * s.kv_heads + hk) * bands + band;
          const float* src = priv_rpb.data() + (item * G + g) * RR;
          for (int64_t r = 0; r < RR; ++r) dst[r] += src[r];
        }
      }
    }
  }
}

}  // namespace jnat::cpu::JNAT_ISA_NS
