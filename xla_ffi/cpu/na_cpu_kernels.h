// Neighbourhood attention on the CPU: plain float32 compute, no XLA types.
//
// Tensors are rank-3 spatial, heads-last and row-major: q [B, L0, L1, L2, H, D], k and v
// [B, L0, L1, L2, Hkv, D] (query head h reads kv head h / (H / Hkv)), rpb [H, 2K0-1, 2K1-1,
// 2K2-1] (nullptr: none), attention weights [B, L0, L1, L2, H, K0*K1*K2] with the window
// flattened row-major. Which keys a query sees comes from common/na_index.h only.
//
// The fused forward and backward take kLanes queries per vector (na_cpu_lanes.h); the
// kernels here are the unfused ops, one query at a time, and the table of all six
// (KernelTable, na_cpu_isa.h) that na_cpu_isa_kernels.cc builds per instruction set.
//
// Threads: the forward kernels split the query tokens. The backward kernels scatter into
// key rows; they give each (batch, kv head) its own accumulators, and when there are too few
// of those for the threads they also split the tokens into bands with private float32
// accumulators summed in a fixed order (na_cpu_work.h). Results do not depend on scheduling.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/na_index.h"
#include "cpu/na_cpu_isa.h"
#include "cpu/na_cpu_lanes.h"
#include "cpu/na_cpu_rows.h"
#include "cpu/na_cpu_work.h"
#include "cpu/na_cpu_workers.h"

namespace jnat::cpu::JNAT_ISA_NS {

// The valid slots of one query token's window: key token, window slot, rpb offset (within a
// head). Returns how many there are (at least 1 for a valid shape).
inline int64_t BuildWindow(const NaGeometry& s, int64_t token, int64_t* key, int64_t* slot,
                           int64_t* bias) {
  const int64_t i2 = token % s.length[2];
  const int64_t i1 = (token / s.length[2]) % s.length[1];
  const int64_t i0 = token / (s.length[2] * s.length[1]);
  const int64_t idx[3] = {i0, i1, i2};
  AxisWindow w[3];
  for (int a = 0; a < 3; ++a) {
    w[a] = QueryWindow(idx[a], s.length[a], s.kernel[a], s.stride[a], s.dilation[a], s.causal[a]);
  }
  const int64_t r1 = s.rpb_extent(1), r2 = s.rpb_extent(2);
  int64_t n = 0;
  for (int64_t n0 = 0; n0 < w[0].count; ++n0) {
    const int64_t p0 = w[0].first + n0 * w[0].step;
    for (int64_t n1 = 0; n1 < w[1].count; ++n1) {
      const int64_t p1 = w[1].first + n1 * w[1].step;
      const int64_t row = (p0 * s.length[1] + p1) * s.length[2];
      const int64_t slot_row = (n0 * s.kernel[1] + n1) * s.kernel[2];
      const int64_t bias_row = ((w[0].rpb0 + n0) * r1 + w[1].rpb0 + n1) * r2 + w[2].rpb0;
      for (int64_t n2 = 0; n2 < w[2].count; ++n2) {
        key[n] = row + w[2].first + n2 * w[2].step;
        slot[n] = slot_row + n2;
        bias[n] = bias_row + n2;
        ++n;
      }
    }
  }
  return n;
}

// Per-thread work arrays for one query at a time.
struct QueryScratch {
  std::vector<int64_t> key, slot, bias;  // the window (BuildWindow)
  std::vector<const float*> rows;        // its key or value rows
  std::vector<float> s0, zeros;          // one float per slot; a row of zeros

  explicit QueryScratch(const NaGeometry& s)
      : key(s.window()), slot(s.window()), bias(s.window()), rows(s.window()), s0(s.window()),
        zeros(s.dim, 0.0f) {}
};

// ---------------------------------------------------------------------------------------------
// Forward kernels: (batch, query token) tasks, all heads of a token, in blocks of tokens.

template <typename PerQuery>
void ForEachQuery(const NaGeometry& s, const Workers& workers, PerQuery&& per_query) {
  const int64_t total = s.batch * s.tokens();
  const int64_t block = std::max<int64_t>(1, total / (8 * workers.size()));
  ForEachItem(workers, WorthThreads(s), (total + block - 1) / block,
              [&] { return QueryScratch(s); }, [&](QueryScratch& sc, int64_t item) {
    for (int64_t bt = item * block; bt < std::min(total, (item + 1) * block); ++bt) {
      const int64_t b = bt / s.tokens();
      const int64_t nv = BuildWindow(s, bt % s.tokens(), sc.key.data(), sc.slot.data(), sc.bias.data());
      for (int64_t h = 0; h < s.heads; ++h) per_query(sc, b, bt, h, h / s.group(), nv);
    }
  });
}

// Row pointers of the window's keys for kv head hk of batch b.
inline void WindowRows(const NaGeometry& s, const float* base, int64_t b, int64_t hk, int64_t nv,
                       const int64_t* key, const float** rows) {
  const int64_t row = s.kv_heads * s.dim;
  const float* head_base = base + b * s.tokens() * row + hk * s.dim;
  for (int64_t i = 0; i < nv; ++i) rows[i] = head_base + key[i] * row;
}

// attn[.., h, slot] = q.k_slot + rpb (no scale); -inf at masked slots.
inline void NaQK(const NaGeometry& s, const Workers& workers, const float* q, const float* k, const float* rpb, float* attn) {
  const int64_t D = s.dim, KK = s.window(), RR = s.rpb_size();
  ForEachQuery(s, workers, [&](QueryScratch& sc, int64_t b, int64_t bt, int64_t h, int64_t hk, int64_t nv) {
    const int64_t qi = bt * s.heads + h;
    WindowRows(s, k, b, hk, nv, sc.key.data(), sc.rows.data());
    float* logit = sc.s0.data();
    DotRows(q + qi * D, sc.rows.data(), nv, D, sc.zeros.data(), logit);
    float* row = attn + qi * KK;
    if (nv < KK) std::fill(row, row + KK, -std::numeric_limits<float>::infinity());
    const float* bh = rpb != nullptr ? rpb + h * RR : nullptr;
    for (int64_t i = 0; i < nv; ++i) row[sc.slot[i]] = logit[i] + (bh ? bh[sc.bias[i]] : 0.0f);
  });
}

// out = sum over valid slots of attn[slot] * v_slot.
inline void NaAV(const NaGeometry& s, const Workers& workers, const float* attn, const float* v, float* out) {
  const int64_t D = s.dim, KK = s.window();
  ForEachQuery(s, workers, [&](QueryScratch& sc, int64_t b, int64_t bt, int64_t h, int64_t hk, int64_t nv) {
    const int64_t qi = bt * s.heads + h;
    WindowRows(s, v, b, hk, nv, sc.key.data(), sc.rows.data());
    const float* row = attn + qi * KK;
    float* w = sc.s0.data();
    for (int64_t i = 0; i < nv; ++i) w[i] = row[sc.slot[i]];
    WeightedSum(w, sc.rows.data(), nv, D, 1.0f, out + qi * D);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward kernels: every query adds weight * (a row of its own) to the rows of its window's
// keys. Queries are taken in tiles of up to kTile tokens of one spatial row and one dilation
// group along the last axis (times the query heads of one kv head): their windows share the
// first two axes and cover one contiguous range of the last, so each key row of the tile is
// read and written once, with the contributions of all tile queries that see it.

// A query's contribution to the key rows: key row of valid slot i += w[i] * x.
struct QueryGrad {
  float* w = nullptr;
  const float* x = nullptr;
  float* rpb = nullptr;  // this head's rpb gradient [RR] to add to directly (or nullptr)
};

inline constexpr int64_t kTile = 8;

// Tiles of one spatial row: (dilation group, first group index) along the last axis.
inline std::vector<std::pair<int64_t, int64_t>> RowTiles(const NaGeometry& s, int64_t tile) {
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t g = 0; g < s.dilation[2]; ++g) {
    const int64_t lg = GroupLength(s.length[2], s.dilation[2], g);
    for (int64_t c = 0; c < lg; c += tile) tiles.emplace_back(g, c);
  }
  return tiles;
}

// Per-thread buffers of ScatterOverQueries: one query's window and a tile's weights.
struct TileScratch {
  QueryScratch query;
  int64_t kkp;  // stride of one query's weights
  std::vector<float> w, tw;
  std::vector<const float*> x, terms;
  std::vector<int64_t> start, end, count;

  TileScratch(const NaGeometry& s, int64_t tile)
      : query(s), kkp(s.window() + 16), w(tile * s.group() * kkp), tw(tile * s.group()),
        x(tw.size()), terms(tw.size()), start(tile), end(tile), count(tile) {}
};

// Runs per_query(sc, b, bt, h, hk, nv, grad) for every query (sc holds its window, as from
// BuildWindow) and sums the contributions into acc ([B, tokens, Hkv, D], overwritten) and
// the rpb gradient into drpb ([H, RR], overwritten; nullptr: none).
template <typename PerQuery>
void ScatterOverQueries(const NaGeometry& s, const Workers& workers, float* acc, float* drpb,
                        PerQuery&& per_query) {
  const int64_t N = s.tokens(), D = s.dim, G = s.group(), RR = s.rpb_size(), KK = s.window();
  const int64_t L1 = s.length[1], L2 = s.length[2], dil2 = s.dilation[2];
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(kTile, (int64_t{1} << 20) / (G * KK + 1)));
  const auto row_tiles = RowTiles(s, tile);
  const int64_t tiles_per_row = static_cast<int64_t>(row_tiles.size());

  ForEachScatterItem(s, workers, s.length[0] * L1 * tiles_per_row, D, acc, nullptr, drpb,
                     [&] { return TileScratch(s, tile); },
                     [&](TileScratch& ts, const ScatterItem& it) {
    QueryScratch& sc = ts.query;
    const int64_t kkp = ts.kkp;
    for (int64_t ti = it.tile_begin; ti < it.tile_end; ++ti) {
      const int64_t row = ti / tiles_per_row;
      const auto [grp, c0] = row_tiles[ti % tiles_per_row];
      const int64_t x0 = row / L1, x1 = row % L1;
      const AxisWindow w0 = QueryWindow(x0, s.length[0], s.kernel[0], s.stride[0], s.dilation[0], s.causal[0]);
      const AxisWindow w1 = QueryWindow(x1, s.length[1], s.kernel[1], s.stride[1], s.dilation[1], s.causal[1]);
      const int64_t jn = std::min(tile, GroupLength(L2, dil2, grp) - c0);
      // The queries: each fills its weights; the last axis window is kept in group units.
      for (int64_t j = 0; j < jn; ++j) {
        const int64_t z = grp + (c0 + j) * dil2;
        const AxisWindow w2 = QueryWindow(z, L2, s.kernel[2], s.stride[2], dil2, s.causal[2]);
        ts.start[j] = (w2.first - grp) / dil2;
        ts.count[j] = w2.count;
        ts.end[j] = ts.start[j] + w2.count;
        const int64_t t = row * L2 + z;
        const int64_t nv = BuildWindow(s, t, sc.key.data(), sc.slot.data(), sc.bias.data());
        for (int64_t g = 0; g < G; ++g) {
          const int64_t q = j * G + g;
          QueryGrad grad;
          grad.w = ts.w.data() + q * kkp;
          grad.rpb = it.rpb != nullptr ? it.rpb + g * RR : nullptr;
          per_query(sc, it.b, it.b * N + t, it.hk * G + g, it.hk, nv, grad);
          ts.x[q] = grad.x;
        }
      }
      // The key rows: one read-modify-write each.
      for (int64_t n0 = 0; n0 < w0.count; ++n0) {
        const int64_t p0 = w0.first + n0 * w0.step;
        for (int64_t n1 = 0; n1 < w1.count; ++n1) {
          const int64_t p1 = w1.first + n1 * w1.step;
          const int64_t row_base = (p0 * L1 + p1) * L2 + grp;
          const int64_t slot_row = n0 * w1.count + n1;
          int64_t jlo = 0;
          for (int64_t cz = ts.start[0]; cz < ts.end[jn - 1]; ++cz) {
            while (jlo < jn && ts.end[jlo] <= cz) ++jlo;
            int64_t m = 0;
            for (int64_t j = jlo; j < jn && ts.start[j] <= cz; ++j) {
              const int64_t i = slot_row * ts.count[j] + (cz - ts.start[j]);
              for (int64_t g = 0; g < G; ++g) {
                const int64_t q = j * G + g;
                ts.tw[m] = ts.w[q * kkp + i];
                ts.terms[m] = ts.x[q];
                ++m;
              }
            }
            if (m == 0) continue;
            const int64_t key = row_base + cz * dil2;
            AccumulateRow(it.acc_a + key * it.stride, D, ts.terms.data(), ts.tw.data(), m);
          }
        }
      }
    }
  });
}

// Backward of NaQK: dq = sum dattn k, dk += dattn q, drpb += dattn (valid slots only).
inline void NaQKBackward(const NaGeometry& s, const Workers& workers, const float* q, const float* k, const float* dattn,
                         float* dq, float* dk, float* drpb) {
  const int64_t D = s.dim, KK = s.window();
  ScatterOverQueries(s, workers, dk, drpb,
                     [&](QueryScratch& sc, int64_t b, int64_t bt, int64_t h, int64_t hk,
                         int64_t nv, QueryGrad& grad) {
    const int64_t qi = bt * s.heads + h;
    const float* row = dattn + qi * KK;
    float* w = grad.w;
    for (int64_t i = 0; i < nv; ++i) w[i] = row[sc.slot[i]];
    WindowRows(s, k, b, hk, nv, sc.key.data(), sc.rows.data());
    WeightedSum(w, sc.rows.data(), nv, D, 1.0f, dq + qi * D);
    if (grad.rpb != nullptr) {
      for (int64_t i = 0; i < nv; ++i) grad.rpb[sc.bias[i]] += w[i];
    }
    grad.x = q + qi * D;
  });
}

// Backward of NaAV: dattn[slot] = dout.v_slot (0 at masked slots), dv += attn[slot] dout.
inline void NaAVBackward(const NaGeometry& s, const Workers& workers, const float* attn, const float* v, const float* dout,
                         float* dattn, float* dv) {
  const int64_t D = s.dim, KK = s.window();
  ScatterOverQueries(s, workers, dv, nullptr,
                     [&](QueryScratch& sc, int64_t b, int64_t bt, int64_t h, int64_t hk,
                         int64_t nv, QueryGrad& grad) {
    const int64_t qi = bt * s.heads + h;
    const float* dorow = dout + qi * D;
    WindowRows(s, v, b, hk, nv, sc.key.data(), sc.rows.data());
    float* dp = sc.s0.data();
    DotRows(dorow, sc.rows.data(), nv, D, sc.zeros.data(), dp);
    float* drow = dattn + qi * KK;
    if (nv < KK) std::fill(drow, drow + KK, 0.0f);
    for (int64_t i = 0; i < nv; ++i) drow[sc.slot[i]] = dp[i];
    const float* arow = attn + qi * KK;
    for (int64_t i = 0; i < nv; ++i) grad.w[i] = arow[sc.slot[i]];
    grad.x = dorow;
  });
}

}  // namespace jnat::cpu::JNAT_ISA_NS
