// Fused neighbourhood attention with kLanes queries per vector (the "lane" layout).
//
// Why: a window holds only K·D multiply-adds per key row, so computing one query at a time
// ends every logit in a horizontal reduction of a short dot product, which costs about as
// much as the dot product itself. Here kLanes consecutive queries of one spatial row (one dilation
// group along the last axis) share each vector. Their windows cover the same key rows on the
// first two axes and, along the last axis, lane j's window starts rel[j] columns after lane
// 0's. With k and v transposed per spatial row ([D][columns], columns ordered by dilation
// group), slot n of all kLanes windows is one vector: in the interior (rel[j] = j) one
// unaligned load (or a shift of two aligned ones), elsewhere (edges, strides, causal
// clipping) one load and a lane permute.
// Logits, softmax, probabilities and the weighted sums over the window (out, dq, as column
// sums of the same transposed rows) are then plain vertical vector code. The scatters into
// key rows (dk, dv) keep rows row-major with lanes along D, where no reductions arise either,
// and take their weights from the lane matrices by broadcast.
//
// Which keys a query sees still comes from common/na_index.h only; results are identical in
// structure to the unfused kernels (na_cpu_kernels.h), up to float rounding.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/na_index.h"
#include "cpu/na_cpu_isa.h"
#include "cpu/na_cpu_lane_ops.h"
#include "cpu/na_cpu_vec.h"
#include "cpu/na_cpu_work.h"
#include "cpu/na_cpu_workers.h"

namespace jnat::cpu::JNAT_ISA_NS {

// Up to kLanes consecutive queries of one dilation group along the last axis. The last axis alone
// decides a tile, so one list serves every spatial row.
struct LaneTile {
  alignas(64) int32_t rel[kLanes];  // lane's window start - start0, in [0, kLanes)
  alignas(64) int32_t count[kLanes];  // valid slots along the last axis (< K: causal)
  alignas(64) int32_t rpb0[kLanes];   // rpb index of slot 0 along the last axis
  alignas(64) int32_t rpb_shift[kLanes];  // rpb0 - rpb_lo
  int64_t group = 0;   // dilation group along the last axis
  int64_t first = 0;   // group index of lane 0's query
  int64_t lanes = 0;   // valid lanes; the rest repeat the last one
  int64_t start0 = 0;  // group index of lane 0's window start
  int64_t span = 0;    // columns touched from start0: rel + count of the last lane
  int32_t rpb_lo = 0;    // the valid lanes' smallest rpb0
  int32_t rpb_span = 0;  // their largest rpb0 - rpb_lo + 1, at most kLanes (1: one bias per slot
                         // for all lanes)
  bool shifted = false;  // rel[j] == j for every lane: no permute needed
  bool full = false;     // every valid lane sees all K slots: no mask needed
  bool aligned = false;  // shifted, and start0 falls on a 64-byte boundary of the transposed
                         // rows (set by ColumnLayout)
};

inline std::vector<LaneTile> LaneTilesOfRow(const NaGeometry& s) {
  const int64_t L = s.length[2], K = s.kernel[2], S = s.stride[2], dil = s.dilation[2];
  const bool causal = s.causal[2];
  std::vector<LaneTile> tiles;
  for (int64_t g = 0; g < dil; ++g) {
    const int64_t lg = GroupLength(L, dil, g);
    for (int64_t ig = 0; ig < lg;) {
      LaneTile t;
      t.group = g;
      t.first = ig;
      t.start0 = WindowStart(ig, lg, K, S, causal);
      int64_t j = 0;
      // Windows start in non-decreasing order; a tile ends where one would leave the kLanes
      // columns a permute can reach (only with strides).
      for (; j < kLanes && ig + j < lg; ++j) {
        const int64_t start = WindowStart(ig + j, lg, K, S, causal);
        if (start - t.start0 >= kLanes) break;
        t.rel[j] = static_cast<int32_t>(start - t.start0);
        t.count[j] = static_cast<int32_t>(WindowCount(ig + j, start, K, causal));
        t.rpb0[j] = static_cast<int32_t>(RpbIndex(start, ig + j, K));
      }
      t.lanes = j;
      t.shifted = t.full = true;
      for (int64_t i = 0; i < t.lanes; ++i) {
        t.shifted = t.shifted && t.rel[i] == i;
        t.full = t.full && t.count[i] == K;
      }
      for (; j < kLanes; ++j) {
        t.rel[j] = t.shifted ? static_cast<int32_t>(j) : t.rel[j - 1];
        t.count[j] = t.count[j - 1];
        t.rpb0[j] = t.rpb0[j - 1];
      }
      // rpb0[j] = rel[j] - j + a constant, and rel and j each grow by less than kLanes across a
      // tile: the lanes' rpb0 lie within kLanes of each other.
      t.rpb_lo = *std::min_element(t.rpb0, t.rpb0 + kLanes);
      t.rpb_span = *std::max_element(t.rpb0, t.rpb0 + kLanes) - t.rpb_lo + 1;
      for (j = 0; j < kLanes; ++j) t.rpb_shift[j] = t.rpb0[j] - t.rpb_lo;
      t.span = t.rel[t.lanes - 1] + t.count[t.lanes - 1];
      tiles.push_back(t);
      ig += t.lanes;
    }
  }
  return tiles;
}

// Asks for the cache lines of n rows of D floats, `stride` floats apart (kWrite: to be
// written), ahead of their use. Tokens of a [B, tokens, H, D] tensor lie H * D floats apart, a
// pattern the hardware prefetchers do not follow: without this, the transposes into and out
// of the lane layout wait on memory for most of their time.
template <bool kWrite>
inline void PrefetchRows(const float* x, int64_t n, int64_t stride, int64_t D) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(x + i * stride + d, kWrite ? 1 : 0);
  }
}

// PrefetchRows of the tile's queries in spatial row `row` of batch b of x [B, tokens, H, D]:
// heads [h0, h0 + heads), side by side.
template <bool kWrite>
inline void PrefetchTile(const NaGeometry& s, const float* x, int64_t b, int64_t row,
                         const LaneTile& tile, int64_t h0, int64_t heads) {
  const int64_t token = row * s.length[2] + tile.group + tile.first * s.dilation[2];
  PrefetchRows<kWrite>(x + ((b * s.tokens() + token) * s.heads + h0) * s.dim, tile.lanes,
                       s.dilation[2] * s.heads * s.dim, heads * s.dim);
}

// Columns of the transposed rows: group g of the last axis from column offset[g]. Each group
// starts where its interior tiles' windows begin on a 64-byte boundary, so those tiles read
// aligned vectors and shift them in registers (LaneDots, LaneColumnSums). Gaps are zeros.
struct ColumnLayout {
  std::vector<int64_t> offset;  // [dilation + 1]; offset[dilation]: end of the last group
  int64_t width = 0;

  // Marks the tiles that come out aligned.
  ColumnLayout(const NaGeometry& s, std::vector<LaneTile>& tiles) : offset(s.dilation[2] + 1, 0) {
    int64_t end = 0;
    for (int64_t g = 0; g < s.dilation[2]; ++g) {
      int64_t start0 = 0;  // window start of the group's first shifted tile
      for (const LaneTile& t : tiles) {
        if (t.group == g && t.shifted) {
          start0 = t.start0;
          break;
        }
      }
      offset[g] = end + ((16 - (end + start0) % 16) % 16);
      end = offset[g] + GroupLength(s.length[2], s.dilation[2], g);
    }
    offset[s.dilation[2]] = end;
    for (LaneTile& t : tiles) t.aligned = t.shifted && (offset[t.group] + t.start0) % 16 == 0;
    // Vector loads for lanes past the tile or slots past a causal window may run into the
    // next row of the buffer (finite data, unused): see slack(). No multiple of 1024 floats,
    // whose rows would all fall into the same cache sets.
    width = (end + 15) / 16 * 16;
    if (width % 1024 == 0) width += 16;
  }

  // Floats after the last row that such loads may reach.
  static int64_t slack(const NaGeometry& s) { return s.kernel[2] + 64; }
};

// k or v of a few kv heads of one batch transposed per spatial row: a [D][width] matrix per
// head and row, whose columns are the row's tokens ordered by dilation group along the last
// axis (group g from column offset(g)), then zeros, so that a vector load from any window
// slot stays in bounds. Each row only when the tiles first need it (Cover), all the heads at
// once: a token's heads lie side by side in memory, so that the rows stream in whole. Rows
// live in a ring of `ring` slots, as many as the key rows of one block of query rows span
// (KeyRowSpan): what the tiles read stays in the cache, and so do the slots the next rows
// are written to.
class PlaneTransposed {
 public:
  // Room for `heads` kv heads; buffer: the CallScratch slot to use.
  PlaneTransposed(const NaGeometry& s, const ColumnLayout& layout, int64_t ring, int64_t heads,
                  int buffer)
      : s_(s), rows_(s.length[0] * s.length[1]), ring_(std::min(ring, rows_)),
        width_(layout.width), slots_(heads * ring_), offset_(layout.offset),
        storage_(buffer, static_cast<size_t>(slots_ * s.dim * width_ + ColumnLayout::slack(s))),
        data_(storage_.data()) {
    std::fill(data_ + slots_ * s.dim * width_,
              data_ + slots_ * s.dim * width_ + ColumnLayout::slack(s), 0.0f);
    // Zeros outside the groups, once: Fill writes only the groups' columns.
    const int64_t L2 = s.length[2], dil = s.dilation[2];
    for (int64_t c = 0; c < slots_ * s.dim; ++c) {
      float* col = data_ + c * width_;
      std::fill(col, col + offset_[0], 0.0f);
      for (int64_t g = 0; g < dil; ++g) {
        const int64_t group_end = offset_[g] + GroupLength(L2, dil, g);
        std::fill(col + group_end, col + (g + 1 < dil ? offset_[g + 1] : width_), 0.0f);
      }
    }
  }

  // Makes spatial rows [row_begin, row_end) of kv heads [hk0, hk0 + heads) of batch b of x
  // [B, tokens, Hkv, D] readable (row_end - row_begin <= ring, heads <= the room), transposing
  // those not held (rows in between included); rows held before may be dropped.
  void Cover(const float* x, int64_t b, int64_t hk0, int64_t heads, int64_t row_begin,
             int64_t row_end) {
    if (b != b_ || hk0 != hk0_ || heads != heads_ || row_end <= lo_ || row_begin >= hi_) {
      b_ = b;
      hk0_ = hk0;
      heads_ = heads;
      lo_ = hi_ = ahead_ = row_begin;
    }
    if (row_begin < lo_) {  // the slots of rows from row_begin + ring on are reused
      Fill(x, row_begin, lo_);
      lo_ = row_begin;
      hi_ = std::min(hi_, lo_ + ring_);
    }
    if (row_end > hi_) {
      Fill(x, hi_, row_end);
      hi_ = row_end;
      lo_ = std::max(lo_, hi_ - ring_);
      // The next few rows, on their way while the tiles work on these.
      const int64_t from = std::max(ahead_, row_end), to = std::min(rows_, row_end + kAheadRows);
      const int64_t Hkv = s_.kv_heads, D = s_.dim, L2 = s_.length[2];
      if (from < to) {
        PrefetchRows<false>(x + ((b_ * s_.tokens() + from * L2) * Hkv + hk0_) * D,
                            (to - from) * L2, Hkv * D, heads_ * D);
        ahead_ = to;
      }
    }
  }

  // Spatial row `row` (= x0 * L1 + x1) of kv head hk, one that Cover made readable:
  // [D][width].
  float* Row(int64_t hk, int64_t row) const {
    return data_ + ((hk - hk0_) * ring_ + row % ring_) * s_.dim * width_;
  }
  int64_t width() const { return width_; }
  int64_t offset(int64_t group) const { return offset_[group]; }

  // Floats one kv head of the ring takes.
  static int64_t HeadFloats(const NaGeometry& s, const ColumnLayout& layout, int64_t ring) {
    return std::min(ring, s.length[0] * s.length[1]) * s.dim * layout.width;
  }

 private:
  // Transposes spatial rows [row_begin, row_end) of the heads.
  void Fill(const float* x, int64_t row_begin, int64_t row_end) {
    const int64_t L2 = s_.length[2], dil = s_.dilation[2], D = s_.dim, Hkv = s_.kv_heads;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const float* src = x + ((b_ * s_.tokens() + row * L2) * Hkv + hk0_) * D;
      for (int64_t g = 0; g < dil; ++g) {
        const int64_t lg = GroupLength(L2, dil, g);
        for (int64_t c = 0; c < lg; c += kLanes) {
          const int64_t n = std::min<int64_t>(kLanes, lg - c);
          for (int64_t h = 0; h < heads_; ++h) {
            StoreTransposed(src + (g + c * dil) * Hkv * D + h * D, dil * Hkv * D, n, D, 1.0f,
                            Row(hk0_ + h, row) + offset_[g] + c, width_, n);
          }
        }
      }
    }
  }

  static constexpr int64_t kAheadRows = 4;  // rows prefetched past those transposed
  const NaGeometry& s_;
  int64_t rows_, ring_, width_, slots_;
  int64_t b_ = -1, hk0_ = -1, heads_ = 0;  // the heads held
  int64_t lo_ = 0, hi_ = 0;                // and their rows
  int64_t ahead_ = 0;                      // rows prefetched: up to here
  std::vector<int64_t> offset_;
  CallScratch storage_;
  float* data_;
};

// The key rows that the windows of spatial row (x0, x1) cover: spatial row index and rpb
// offset (within a head, without the last axis' part) of each.
inline int64_t KeyRowsOf(const NaGeometry& s, int64_t row, int64_t* key_row, int64_t* bias_row) {
  const int64_t x0 = row / s.length[1], x1 = row % s.length[1];
  const AxisWindow w0 =
      QueryWindow(x0, s.length[0], s.kernel[0], s.stride[0], s.dilation[0], s.causal[0]);
  const AxisWindow w1 =
      QueryWindow(x1, s.length[1], s.kernel[1], s.stride[1], s.dilation[1], s.causal[1]);
  int64_t n = 0;
  for (int64_t n0 = 0; n0 < w0.count; ++n0) {
    for (int64_t n1 = 0; n1 < w1.count; ++n1) {
      key_row[n] = (w0.first + n0 * w0.step) * s.length[1] + w1.first + n1 * w1.step;
      bias_row[n] = ((w0.rpb0 + n0) * s.rpb_extent(1) + w1.rpb0 + n1) * s.rpb_extent(2);
      ++n;
    }
  }
  return n;
}

// Transposes into kt and vt the key rows key_row[0 .. n) of kv heads [hk0, hk0 + heads) of
// batch b that they lack.
inline void CoverKeyRows(const float* k, const float* v, int64_t b, int64_t hk0, int64_t heads,
                         const int64_t* key_row, int64_t n, PlaneTransposed& kt,
                         PlaneTransposed& vt) {
  const auto [first, last] = std::minmax_element(key_row, key_row + n);
  kt.Cover(k, b, hk0, heads, *first, *last + 1);
  vt.Cover(v, b, hk0, heads, *first, *last + 1);
}

// The spatial rows in the order they are blocked (kRowBlock consecutive ones run together):
// along the second axis by dilation group, so that neighbours in a block share key rows.
inline std::vector<int64_t> BlockedRowOrder(const NaGeometry& s) {
  const int64_t L1 = s.length[1], dil = s.dilation[1];
  std::vector<int64_t> order;
  order.reserve(s.length[0] * L1);
  for (int64_t x0 = 0; x0 < s.length[0]; ++x0) {
    for (int64_t g = 0; g < dil; ++g) {
      for (int64_t x1 = g; x1 < L1; x1 += dil) order.push_back(x0 * L1 + x1);
    }
  }
  return order;
}

// The union of the key rows of n query rows (key_row[i][0 .. n_rows[i]), each ascending),
// ascending, into union_row, with which query rows see each one (of); returns its size.
inline int64_t UnionOfKeyRows(int64_t n, const int64_t* const* key_row, const int64_t* n_rows,
                              int64_t* union_row, KeyRowOf* of) {
  int64_t next[kRowBlock] = {}, size = 0;
  for (;;) {
    int64_t key = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (next[i] < n_rows[i] && (key < 0 || key_row[i][next[i]] < key)) key = key_row[i][next[i]];
    }
    if (key < 0) return size;
    KeyRowOf o;
    for (int64_t i = 0; i < n; ++i) {
      if (next[i] < n_rows[i] && key_row[i][next[i]] == key) {
        o.mask |= 1 << i;
        o.at[i] = static_cast<int32_t>(next[i]++);
      }
    }
    union_row[size] = key;
    of[size++] = o;
  }
}

// The most spatial rows, first to last, that the key rows of one block of query rows
// (BlockedRowOrder) span: the ring a PlaneTransposed needs, for blocks and single rows alike.
inline int64_t KeyRowSpan(const NaGeometry& s) {
  const std::vector<int64_t> order = BlockedRowOrder(s);
  std::vector<int64_t> key_row(s.kernel[0] * s.kernel[1]), bias_row(key_row.size());
  int64_t span = 1;
  for (size_t block = 0; block < order.size(); block += kRowBlock) {
    int64_t first = s.length[0] * s.length[1], last = -1;
    for (size_t i = block; i < std::min(order.size(), block + kRowBlock); ++i) {
      const int64_t n = KeyRowsOf(s, order[i], key_row.data(), bias_row.data());
      first = std::min(first, key_row[0]);
      last = std::max(last, key_row[n - 1]);
    }
    span = std::max(span, last - first + 1);
  }
  return span;
}

// What the fused forward and backward take from the geometry alone. Their units of work are
// (block of query rows, tile) pairs: unit u is tile u % n_tiles of block u / n_tiles.
struct LanePlan {
  std::vector<LaneTile> tiles;     // of one spatial row
  ColumnLayout layout;             // of the transposed k and v rows
  std::vector<int64_t> row_order;  // the spatial rows, blocked (BlockedRowOrder)
  int64_t ring;                    // spatial rows a PlaneTransposed holds (KeyRowSpan)
  int64_t n_tiles, rows, n_blocks;

  explicit LanePlan(const NaGeometry& s)
      : tiles(LaneTilesOfRow(s)), layout(s, tiles), row_order(BlockedRowOrder(s)),
        ring(KeyRowSpan(s)), n_tiles(static_cast<int64_t>(tiles.size())),
        rows(s.length[0] * s.length[1]), n_blocks((rows + kRowBlock - 1) / kRowBlock) {}
};

// Where one tile of one head lives: its queries' token rows and the key rows of its windows.
struct LaneTask {
  const LaneTile* tile = nullptr;
  int64_t b = 0, h = 0, hk = 0, row = 0;
  int64_t n_rows = 0;          // key rows
  const int64_t* key_row = nullptr;
  const int64_t* bias_row = nullptr;

  // Token index (within the batch) of lane j's query.
  int64_t token(const NaGeometry& s, int64_t j) const {
    return row * s.length[2] + tile->group + (tile->first + j) * s.dilation[2];
  }
  // Lane j's query row of a [B, tokens, H, D] tensor (nullptr for padding lanes).
  const float* query_row(const NaGeometry& s, const float* x, int64_t j) const {
    return j < tile->lanes ? x + ((b * s.tokens() + token(s, j)) * s.heads + h) * s.dim : nullptr;
  }
  // scale * the tile's query rows of a [B, tokens, H, D] tensor, as a lane matrix into xt
  // (padding lanes zero).
  void LoadTransposed(const NaGeometry& s, const float* x, float scale, float* xt) const {
    StoreTransposed(query_row(s, x, 0), s.dilation[2] * s.heads * s.dim, tile->lanes, s.dim,
                    scale, xt, kLanes, kLanes);
  }
  // Spatial row key's slot-0 column of lane 0, in transposed kv rows holding kv head hk.
  const float* window(const PlaneTransposed& t, int64_t key) const {
    return t.Row(hk, key) + t.offset(tile->group) + tile->start0;
  }
  // Key row r's token at group column c, in a [B, tokens, Hkv, D] tensor: its index.
  int64_t key_token(const NaGeometry& s, int64_t r, int64_t c) const {
    return key_row[r] * s.length[2] + tile->group + c * s.dilation[2];
  }
};

// Per-thread buffers; lane matrices are 64-byte aligned. `matrices` of each kind: the query
// rows of a block (forward), times the heads of a kv head (backward).
struct LaneScratch {
  int64_t slots;  // the window size: rows of a logits lane matrix
  int64_t key_rows;  // of one query row: K0 * K1
  // Per query row of a block: key rows and their rpb offsets, key_rows apart.
  std::vector<int64_t> key_row, bias_row;
  std::vector<int64_t> union_row;  // the block's key rows
  std::vector<KeyRowOf> of;        // which query rows see each
  std::vector<const float*> rows;  // one pointer per key row
  AlignedFloats xt, yt, buf;  // xt, yt: [matrices][D][kLanes]
  // [matrices][kLanes][PaddedDim] compact copies of the tile's q and dout rows (backward),
  // zero-padded to whole vectors. In the tensors they lie heads * D floats apart, a power of
  // two that would map them all to a few cache sets, where the key rows streaming through
  // the scatter evict them.
  AlignedFloats q_rows, dout_rows;
  float* s0;  // [matrices][slots][kLanes] logits, probabilities
  float* s1;  // [matrices][slots][kLanes] second lane matrix (backward: scaled ds)
  float* s2;  // [kRowBlock][slots][kLanes] temporary
  float* stat;  // [4][kLanes] per-lane statistics

  LaneScratch(const NaGeometry& s, int64_t matrices)
      : slots(s.window()), key_rows(s.kernel[0] * s.kernel[1]),
        key_row(kRowBlock * key_rows), bias_row(key_row.size()), union_row(key_row.size()),
        of(key_row.size()), rows(key_row.size()), xt(matrices * s.dim * kLanes),
        yt(matrices * s.dim * kLanes),
        buf((2 * matrices + kRowBlock) * slots * kLanes + 4 * kLanes),
        q_rows(matrices * kLanes * PaddedDim(s), true),
        dout_rows(matrices * kLanes * PaddedDim(s), true) {
    s0 = buf.data();
    s1 = s0 + matrices * slots * kLanes;
    s2 = s1 + matrices * slots * kLanes;
    stat = s2 + kRowBlock * slots * kLanes;
  }
};

// rpb ([H][RR]) followed by kLanes zeros, so that SlotBias may load a whole vector from any
// entry; empty without rpb.
inline std::vector<float> PaddedRpb(const NaGeometry& s, const float* rpb) {
  if (rpb == nullptr) return {};
  std::vector<float> padded(s.heads * s.rpb_size() + kLanes, 0.0f);
  std::copy(rpb, rpb + s.heads * s.rpb_size(), padded.begin());
  return padded;
}

// The lanes' rpb at slot n of key row r of the tile's windows (rpb_h: this head's rpb, from
// PaddedRpb): lane j's is entry rpb_shift[j] of `row`. Where the lanes' windows differ (a tile
// at an edge, or strides), one load and a permute instead of a gather.
inline Vf SlotBias(const LaneTask& t, const float* rpb_h, int64_t r, int64_t n) {
  const LaneTile& tile = *t.tile;
  const float* row = rpb_h + t.bias_row[r] + n + tile.rpb_lo;
  return tile.rpb_span == 1 ? Set1(*row) : Permute(LoadU(row), LoadI(tile.rpb_shift));
}

// Adds the lanes' rpb gradient ds at slot n of key row r to the lane sums rpb_lanes ([RR]
// [kLanes]: each lane sums into its own column, one entry per row), where SlotBias read it.
inline void AddSlotBiasGrad(const LaneTask& t, float* rpb_lanes, int64_t r, int64_t n, Vf ds) {
  const LaneTile& tile = *t.tile;
  float* row = rpb_lanes + (t.bias_row[r] + n + tile.rpb_lo) * kLanes;
  if (tile.rpb_span == 1) {
    Store(row, Load(row) + ds);
    return;
  }
  const Vi shift = LoadI(tile.rpb_shift);
  for (int32_t o = 0; o < tile.rpb_span; ++o) {  // one masked vector add per distinct entry
    float* x = row + o * kLanes;
    Store(x, Load(x) + Select(shift == Set1I(o), ds, Vf{}));
  }
}

// Adds this head's rpb to the logits of every slot and sets masked slots to -inf; returns
// the lanes' maxima. logit: [n_rows * K2][kLanes].
inline Vf FinishLogits(const NaGeometry& s, const LaneTask& t, const float* rpb_h, float* logit) {
  const LaneTile& tile = *t.tile;
  const int64_t K2 = s.kernel[2];
  const Vi count = LoadI(tile.count);
  const Vf neg_inf = Set1(-INFINITY);
  Vf m = neg_inf;
  for (int64_t r = 0; r < t.n_rows; ++r) {
    for (int64_t n = 0; n < K2; ++n) {
      float* x = logit + (r * K2 + n) * kLanes;
      Vf v = Load(x);
      if (rpb_h != nullptr) v += SlotBias(t, rpb_h, r, n);
      if (!tile.full) v = Select(count > Set1I(static_cast<int32_t>(n)), v, neg_inf);
      Store(x, v);
      m = Max(m, v);
    }
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Forward.

// One tile in the query rows of a block (kRowBlock at most), and the union of their key rows.
struct LaneBlock {
  int64_t n = 0;  // query rows
  LaneTask task[kRowBlock];
  int64_t n_union = 0;
  const int64_t* union_row = nullptr;
  const KeyRowOf* of = nullptr;
};

// Sets up blk for block `block` of the blocked row order in batch b: its query rows' key rows
// and their union (in sc).
inline void StartBlock(const NaGeometry& s, const std::vector<int64_t>& row_order,
                       int64_t block, int64_t b, LaneScratch& sc, LaneBlock& blk) {
  blk.n = std::min<int64_t>(kRowBlock, static_cast<int64_t>(row_order.size()) - block * kRowBlock);
  const int64_t* key_rows[kRowBlock];
  int64_t n_rows[kRowBlock];
  for (int64_t i = 0; i < blk.n; ++i) {
    LaneTask& t = blk.task[i];
    t.b = b;
    t.row = row_order[block * kRowBlock + i];
    t.key_row = sc.key_row.data() + i * sc.key_rows;
    t.bias_row = sc.bias_row.data() + i * sc.key_rows;
    t.n_rows = KeyRowsOf(s, t.row, sc.key_row.data() + i * sc.key_rows,
                         sc.bias_row.data() + i * sc.key_rows);
    key_rows[i] = t.key_row;
    n_rows[i] = t.n_rows;
  }
  blk.n_union = UnionOfKeyRows(blk.n, key_rows, n_rows, sc.union_row.data(), sc.of.data());
  blk.union_row = sc.union_row.data();
  blk.of = sc.of.data();
}

// LaneDots of every key row of the block's union against the transposed plane t, for the
// query rows that see it: out[i] += xt[i] . key rows, at query row i's slots.
inline void BlockDots(const NaGeometry& s, const LaneBlock& blk, const PlaneTransposed& t,
                      float* const* xt, float* const* out) {
  const LaneTile& tile = *blk.task[0].tile;
  const int64_t K2 = s.kernel[2];
  for (int64_t u = 0; u < blk.n_union; ++u) {  // each key row once for the rows that see it
    const float* x[kRowBlock];
    float* out_u[kRowBlock];
    int64_t m = 0;
    for (int64_t i = 0; i < blk.n; ++i) {
      if (blk.of[u].mask >> i & 1) {
        x[m] = xt[i];
        out_u[m++] = out[i] + blk.of[u].at[i] * K2 * kLanes;
      }
    }
    LaneDots(m, x, blk.task[0].window(t, blk.union_row[u]), t.width(), s.dim, K2,
             tile.shifted ? nullptr : tile.rel, tile.aligned, out_u);
  }
}

// LaneColumnSums of the weights w[i] of the block's query rows over the union's key rows of
// the transposed plane t, into out[i].
inline void BlockColumnSums(const NaGeometry& s, const LaneBlock& blk, const PlaneTransposed& t,
                            float* const* w, LaneScratch& sc, float* const* out) {
  const LaneTile& tile = *blk.task[0].tile;
  for (int64_t u = 0; u < blk.n_union; ++u) sc.rows[u] = blk.task[0].window(t, blk.union_row[u]);
  LaneColumnSums(blk.n, w, sc.rows.data(), blk.of, blk.n_union, s.kernel[2], t.width(), s.dim,
                 tile.shifted ? nullptr : tile.rel, tile.aligned, out);
}

// One tile of one head in the query rows of a block: out and lse of their queries.
inline void LaneForwardTile(const NaGeometry& s, const LaneBlock& blk, const PlaneTransposed& kt,
                            const PlaneTransposed& vt, const float* q, const float* rpb,
                            float scale, LaneScratch& sc, float* out, float* lse) {
  const LaneTile& tile = *blk.task[0].tile;
  const int64_t K2 = s.kernel[2], D = s.dim;
  float* xt[kRowBlock];
  float* logit[kRowBlock];
  float* yt[kRowBlock];
  for (int64_t i = 0; i < blk.n; ++i) {
    xt[i] = sc.xt.data() + i * D * kLanes;
    logit[i] = sc.s0 + i * sc.slots * kLanes;
    yt[i] = sc.yt.data() + i * D * kLanes;
    blk.task[i].LoadTransposed(s, q, scale, xt[i]);
  }
  BlockDots(s, blk, kt, xt, logit);
  Vf m[kRowBlock], sum[kRowBlock];
  for (int64_t i = 0; i < blk.n; ++i) {
    const LaneTask& t = blk.task[i];
    m[i] = FinishLogits(s, t, rpb != nullptr ? rpb + t.h * s.rpb_size() : nullptr, logit[i]);
    sum[i] = Vf{};
    for (int64_t n = 0; n < t.n_rows * K2; ++n) {
      float* x = logit[i] + n * kLanes;
      const Vf e = Exp(Load(x) - m[i]);
      Store(x, e);
      sum[i] += e;
    }
  }
  BlockColumnSums(s, blk, vt, logit, sc, yt);
  for (int64_t i = 0; i < blk.n; ++i) {
    const LaneTask& t = blk.task[i];
    // A window whose every logit is -inf (sum 0) gives output 0, written here so that no
    // pass over the output is needed afterwards.
    const auto some = sum[i] > Vf{};
    const Vf inv = Set1(1.0f) / (some ? sum[i] : Set1(1.0f));
    for (int64_t d = 0; d < D; ++d) {
      float* y = yt[i] + d * kLanes;
      Store(y, some ? inv * Load(y) : Vf{});
    }
    const int64_t q0 = (t.b * s.tokens() + t.token(s, 0)) * s.heads + t.h;
    const int64_t lane_step = s.dilation[2] * s.heads;  // between consecutive lanes' queries
    StoreLanesToRows(yt[i], tile.lanes, D, out + q0 * D, lane_step * D);
    Store(sc.stat, m[i]);
    Store(sc.stat + kLanes, sum[i]);
    Store(sc.stat + 2 * kLanes, m[i] + LogAtLeastOne(sum[i]));
    for (int64_t j = 0; j < tile.lanes; ++j) {
      // A sum under 1 (0: every logit of the window -inf) takes the library's log: lse -inf.
      const float total = sc.stat[kLanes + j];
      lse[q0 + j * lane_step] =
          total >= 1.0f ? sc.stat[2 * kLanes + j] : sc.stat[j] + std::log(total);
    }
  }
}

// The forward's budget for the transposed k and v rows of the kv heads it runs together:
// 640 KiB, measured best with a 1 MiB L2 (AMD Zen 5); with less L2, the same share of it
// (AMD Zen 3, 512 KiB: 320 KiB, two heads instead of four on 2D 56² K7 D32, whose forward
// took 0.95x the time in alternating runs).
inline int64_t HeadsBytes() {
  const int64_t kBudget = 640 * 1024, l2 = L2CacheBytes();
  return l2 > 0 ? std::min(kBudget, l2 * 5 / 8) : kBudget;
}

inline void LaneFusedForward(const NaGeometry& s, const Workers& workers, const float* q,
                             const float* k, const float* v, const float* rpb, float scale,
                             float* out, float* lse) {
  const std::vector<float> rpb_padded = PaddedRpb(s, rpb);
  if (rpb != nullptr) rpb = rpb_padded.data();
  const LanePlan plan(s);
  const int64_t G = s.group(), units = plan.n_blocks * plan.n_tiles;
  // kv heads that run together: as many as keep their transposed rows (k and v) within
  // HeadsBytes(), so that they stay in the L2 cache.
  const int64_t head_bytes = 2 * 4 * PlaneTransposed::HeadFloats(s, plan.layout, plan.ring);
  const int64_t chunk = std::clamp<int64_t>(HeadsBytes() / head_bytes, 1, s.kv_heads);
  const int64_t chunks = (s.kv_heads + chunk - 1) / chunk, planes = s.batch * chunks;
  const bool threads = WorthThreads(s);
  // Each worker transposes the (batch, kv heads) planes it works on into its own buffers, so
  // that workers meet only at the end: on a busy machine every barrier waits for whichever
  // thread was descheduled. With fewer planes than workers, planes are split into bands of
  // (row block, tile) units, each transposing only the key rows its windows cover.
  const int64_t P = threads ? workers.size() : 1;
  const int64_t bands = std::min(units, (P + planes - 1) / planes);
  const int64_t band_len = (units + bands - 1) / bands;
  struct Scratch {
    LaneScratch lanes;
    PlaneTransposed kt, vt;
  };
  ForEachItem(workers, threads, planes * bands,
              [&] {
                return Scratch{LaneScratch(s, kRowBlock),
                               PlaneTransposed(s, plan.layout, plan.ring, chunk, 0),
                               PlaneTransposed(s, plan.layout, plan.ring, chunk, 1)};
              },
              [&](Scratch& sc, int64_t item) {
    const int64_t b = item / bands / chunks, hk0 = item / bands % chunks * chunk;
    const int64_t heads = std::min(chunk, s.kv_heads - hk0);
    const int64_t u0 = item % bands * band_len, u1 = std::min(units, u0 + band_len);
    // The query rows of q and out that unit u reads and writes, all heads.
    auto prefetch = [&](int64_t u) {
      const LaneTile& tile = plan.tiles[u % plan.n_tiles];
      const int64_t first = u / plan.n_tiles * kRowBlock;
      for (int64_t i = 0; i < std::min<int64_t>(kRowBlock, plan.rows - first); ++i) {
        const int64_t row = plan.row_order[first + i];
        PrefetchTile<false>(s, q, b, row, tile, hk0 * G, heads * G);
        PrefetchTile<true>(s, out, b, row, tile, hk0 * G, heads * G);
      }
    };
    LaneBlock blk;
    int64_t block = -1;
    for (int64_t u = u0; u < u1; ++u) {
      if (u + 1 < u1) prefetch(u + 1);
      if (u / plan.n_tiles != block) {
        block = u / plan.n_tiles;
        StartBlock(s, plan.row_order, block, b, sc.lanes, blk);
        CoverKeyRows(k, v, b, hk0, heads, blk.union_row, blk.n_union, sc.kt, sc.vt);
      }
      for (int64_t i = 0; i < blk.n; ++i) blk.task[i].tile = &plan.tiles[u % plan.n_tiles];
      for (int64_t hk = hk0; hk < hk0 + heads; ++hk) {
        for (int64_t g = 0; g < G; ++g) {  // heads sharing the kv head: the same key rows
          for (int64_t i = 0; i < blk.n; ++i) {
            blk.task[i].hk = hk;
            blk.task[i].h = hk * G + g;
          }
          LaneForwardTile(s, blk, sc.kt, sc.vt, q, rpb, scale, sc.lanes, out, lse);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Lane vector of a per-(token, head) statistic [B, tokens, H] for the tile's queries.
inline Vf LaneStat(const NaGeometry& s, const LaneTask& t, const float* x) {
  const int64_t q0 = (t.b * s.tokens() + t.token(s, 0)) * s.heads + t.h;
  const int64_t step = s.dilation[2] * s.heads;
  Vf r = {};
  for (int64_t j = 0; j < t.tile->lanes; ++j) r[j] = x[q0 + j * step];
  return r;
}

// Head g (of the kv head's G) of one tile in the query rows of a block: for query row i,
// probabilities p (into sc.s0 + (i * G + g) * slots * kLanes) and scale * ds (into sc.s1 +
// ...), compact copies of its q and dout rows (sc.q_rows, sc.dout_rows + (i * G + g) * kLanes
// * Dp), and dq of its queries; and adds the head's rpb gradient to rpb_lanes ([RR][kLanes]:
// each rpb entry's sums by lane, reduced once per item; or nullptr).
inline void LaneBackwardHead(const NaGeometry& s, const LaneBlock& blk, const PlaneTransposed& kt,
                             const PlaneTransposed& vt, const float* q, const float* rpb,
                             const float* dout, const float* lse, RowTerm row_term,
                             float scale, int64_t g, LaneScratch& sc, float* rpb_lanes,
                             float* dq) {
  const LaneTile& tile = *blk.task[0].tile;
  const int64_t K2 = s.kernel[2], D = s.dim, Dp = PaddedDim(s), G = s.group();
  float* xt[kRowBlock];
  float* yt[kRowBlock];
  float* p[kRowBlock];
  float* ds[kRowBlock];
  float* dp[kRowBlock];
  for (int64_t i = 0; i < blk.n; ++i) {
    const LaneTask& t = blk.task[i];
    xt[i] = sc.xt.data() + i * D * kLanes;
    yt[i] = sc.yt.data() + i * D * kLanes;
    p[i] = sc.s0 + (i * G + g) * sc.slots * kLanes;
    ds[i] = sc.s1 + (i * G + g) * sc.slots * kLanes;
    dp[i] = sc.s2 + i * sc.slots * kLanes;
    float* q_copy = sc.q_rows.data() + (i * G + g) * kLanes * Dp;
    float* dout_copy = sc.dout_rows.data() + (i * G + g) * kLanes * Dp;
    t.LoadTransposed(s, q, scale, xt[i]);
    t.LoadTransposed(s, dout, 1.0f, yt[i]);
    for (int64_t j = 0; j < tile.lanes; ++j) {
      CopyFloats(t.query_row(s, q, j), D, q_copy + j * Dp);
      CopyFloats(t.query_row(s, dout, j), D, dout_copy + j * Dp);
    }
  }
  BlockDots(s, blk, kt, xt, p);
  BlockDots(s, blk, vt, yt, dp);
  const Vi count = LoadI(tile.count);
  for (int64_t i = 0; i < blk.n; ++i) {
    const LaneTask& t = blk.task[i];
    const float* rpb_h = rpb != nullptr ? rpb + t.h * s.rpb_size() : nullptr;
    const Vf lse_v = LaneStat(s, t, lse);
    Vf p_dot_dp = {};  // rowsum(p * dp)
    for (int64_t r = 0; r < t.n_rows; ++r) {
      for (int64_t n = 0; n < K2; ++n) {
        const int64_t at = (r * K2 + n) * kLanes;
        Vf logit = Load(p[i] + at);
        if (rpb_h != nullptr) logit += SlotBias(t, rpb_h, r, n);
        // p = 0 at masked slots, and ds = 0 whatever dp holds.
        const Vi valid = count > Set1I(static_cast<int32_t>(n));
        const Vf pv = Select(valid, Exp(logit - lse_v), Vf{});
        Store(p[i] + at, pv);
        p_dot_dp += Select(valid, pv * Load(dp[i] + at), Vf{});
      }
    }
    const Vf stat = LaneStat(s, t, row_term.stat);
    const Vf delta_v = row_term.stat_is_dlse ? p_dot_dp - stat : stat;
    for (int64_t r = 0; r < t.n_rows; ++r) {
      for (int64_t n = 0; n < K2; ++n) {
        const int64_t at = (r * K2 + n) * kLanes;
        const Vi valid = count > Set1I(static_cast<int32_t>(n));
        const Vf dsv = Select(valid, Load(p[i] + at) * (Load(dp[i] + at) - delta_v), Vf{});
        Store(ds[i] + at, Set1(scale) * dsv);
        // Padding lanes add 0: their q and dout rows are zeros (dp = delta = 0) and Exp is
        // finite.
        if (rpb_lanes != nullptr) AddSlotBiasGrad(t, rpb_lanes, r, n, dsv);
      }
    }
  }
  BlockColumnSums(s, blk, kt, ds, sc, yt);  // dq, over dout's transposed rows
  for (int64_t i = 0; i < blk.n; ++i) {
    const LaneTask& t = blk.task[i];
    const int64_t q0 = (t.b * s.tokens() + t.token(s, 0)) * s.heads + t.h;
    StoreLanesToRows(yt[i], tile.lanes, D, dq + q0 * D, s.dilation[2] * s.heads * D);
  }
}

// Vectors of a row that the scatter updates per pass, and key rows LaneScatterRows updates at
// once: NC accumulator vectors for each of dk and dv per key row and the two weights in
// registers (the q and dout rows are memory operands). That form is for 32 vector registers;
// with 16, two key rows of 4 vectors spill, and one key row, one tensor or half rows per pass
// measured no faster: LaneScatterLanes keeps the q / dout rows in registers instead.
inline constexpr int kScatterChunk = 4;
template <int NC>
inline constexpr int kScatterKeyRows = std::clamp((kRegisters - 2) / (2 * NC), 2, 4);

// acc_a / acc_b rows of the keys in R consecutive key rows of the block's union, from union
// row u0, at the tile's columns += the sum over the query rows i in kMask (all of which see
// these key rows) and their (head, lane) pairs that see the key of weight * (the pair's row
// of xa[i] / xb[i], [heads][kLanes][Dp]): one read-modify-write per key for the whole block.
// Pair (g, j) of query row i sees key column start0 + c at slot c - rel[j] of its lane
// matrices wa[i] / wb[i] (from the key row's first slot). Which lanes see a column depends on
// the tile alone, so the R key rows share the walk over columns and lanes (and the lanes'
// rows, hot in the cache), and their accumulators are R independent chains of multiply-adds.
// Columns d0 .. d0 + kLanes * NC of the rows (accumulator rows and xa / xb rows are Dp =
// PaddedDim floats long).
template <int NC, int R, int kMask>
inline void LaneScatterRows(const NaGeometry& s, const LaneBlock& blk, int64_t u0,
                            const float* const* wa, const float* const* wb,
                            const float* const* xa, const float* const* xb,
                            const ScatterItem& it, int64_t d0) {
  const LaneTile& tile = *blk.task[0].tile;
  const int64_t Dp = PaddedDim(s), G = s.group(), K2 = s.kernel[2], slots = s.window();
  const int64_t key_step = s.dilation[2] * it.stride;  // between a key row's columns
  int32_t lane_w[kLanes];  // lane j's weight at key column c: wa[c * kLanes + lane_w[j]]
  for (int j = 0; j < kLanes; ++j) lane_w[j] = j - tile.rel[j] * kLanes;
  float* ka[R];
  float* kb[R];
  for (int r = 0; r < R; ++r) {
    const int64_t key0 =
        blk.union_row[u0 + r] * s.length[2] + tile.group + tile.start0 * s.dilation[2];
    ka[r] = it.acc_a + key0 * it.stride + d0;
    kb[r] = it.acc_b + key0 * it.stride + d0;
  }
  int64_t jlo = 0, jhi = 0;
  for (int64_t c = 0; c < tile.span; ++c) {  // key column start0 + c
    // Windows start and end in non-decreasing order: the lanes seeing c are a range.
    while (jhi < tile.lanes && tile.rel[jhi] <= c) ++jhi;
    while (jlo < jhi && tile.rel[jlo] + tile.count[jlo] <= c) ++jlo;
    if (jlo == jhi) continue;
    Vf a[R][NC], b[R][NC];
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < NC; ++v) {
        a[r][v] = LoadU(ka[r] + c * key_step + kLanes * v);
        b[r][v] = LoadU(kb[r] + c * key_step + kLanes * v);
      }
    }
    for (int i = 0; i < kRowBlock; ++i) {
      if (!(kMask >> i & 1)) continue;
      for (int64_t g = 0; g < G; ++g) {
        const float* wa_c = wa[i] + (g * slots + c) * kLanes;
        const float* wb_c = wb[i] + (g * slots + c) * kLanes;
        for (int64_t j = jlo; j < jhi; ++j) {
          const float* ra = xa[i] + (g * kLanes + j) * Dp + d0;
          const float* rb = xb[i] + (g * kLanes + j) * Dp + d0;
          for (int r = 0; r < R; ++r) {
            const Vf va = Set1(wa_c[r * K2 * kLanes + lane_w[j]]);
            const Vf vb = Set1(wb_c[r * K2 * kLanes + lane_w[j]]);
            for (int v = 0; v < NC; ++v) {
              a[r][v] = Fma(va, LoadU(ra + kLanes * v), a[r][v]);
              b[r][v] = Fma(vb, LoadU(rb + kLanes * v), b[r][v]);
            }
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < NC; ++v) {
        StoreU(ka[r] + c * key_step + kLanes * v, a[r][v]);
        StoreU(kb[r] + c * key_step + kLanes * v, b[r][v]);
      }
    }
  }
}

// dk += scale * ds q (or dv += p dout) over the windows of one tile in the query rows of a
// block, the form for 16 vector registers: LaneScatterRows' accumulators for two key rows of
// both tensors would not fit them. Here the rows of L lanes (NC vectors each, from d0) stay in
// registers, and each key column's accumulator row is read once per lane group, updated by
// the lanes that see the column, and written back (the key row's columns stay in the L1 cache).
// weights: the G heads' lane matrices of the block ([kRowBlock * G][slots][kLanes]); rows:
// their compact rows ([kRowBlock * G][kLanes][Dp]); acc: the accumulator (ScatterItem).
template <int NC, int L>
inline void LaneScatterLanes(const NaGeometry& s, const LaneBlock& blk, int64_t slots,
                             const float* weights, const float* rows, float* acc, int64_t stride,
                             int64_t d0) {
  const LaneTile& tile = *blk.task[0].tile;
  const int64_t G = s.group(), K2 = s.kernel[2], Dp = PaddedDim(s);
  const int64_t key_step = s.dilation[2] * stride;  // between a key row's columns
  float* const column0 = acc + (tile.group + tile.start0 * s.dilation[2]) * stride + d0;
  for (int64_t u = 0; u < blk.n_union; ++u) {
    float* key = column0 + blk.union_row[u] * s.length[2] * stride;  // column start0
    for (int64_t i = 0; i < blk.n; ++i) {
      if (!(blk.of[u].mask >> i & 1)) continue;
      for (int64_t g = 0; g < G; ++g) {
        const float* w = weights + ((i * G + g) * slots + blk.of[u].at[i] * K2) * kLanes;
        const float* x = rows + (i * G + g) * kLanes * Dp + d0;
        for (int64_t j0 = 0; j0 < tile.lanes; j0 += L) {
          WithCount<L>(std::min<int64_t>(L, tile.lanes - j0), [&](auto lanes) {
            constexpr int M = decltype(lanes)::value;
            Vf xr[M][NC];
            int64_t lo[M], hi[M];  // the columns lane j0 + l sees
            const float* wl[M];    // its weight at column c: wl[l][c * kLanes]
            for (int l = 0; l < M; ++l) {
              for (int v = 0; v < NC; ++v) xr[l][v] = LoadU(x + (j0 + l) * Dp + kLanes * v);
              lo[l] = tile.rel[j0 + l];
              hi[l] = lo[l] + tile.count[j0 + l];
              wl[l] = w + j0 + l - lo[l] * kLanes;
            }
            // Windows start and end in non-decreasing order: the group sees lo[0] .. hi[M - 1].
            for (int64_t c = lo[0]; c < hi[M - 1]; ++c) {
              Vf t[NC];
              for (int v = 0; v < NC; ++v) t[v] = LoadU(key + c * key_step + kLanes * v);
              for (int l = 0; l < M; ++l) {
                if (c < lo[l] || c >= hi[l]) continue;
                const Vf wv = Set1(wl[l][c * kLanes]);
                for (int v = 0; v < NC; ++v) t[v] = Fma(wv, xr[l][v], t[v]);
              }
              for (int v = 0; v < NC; ++v) StoreU(key + c * key_step + kLanes * v, t[v]);
            }
          });
        }
      }
    }
  }
}

// dk += scale * ds q and dv += p dout over the windows of one tile in the query rows of a
// block (LaneBackwardHead's results for the G heads): with 32 vector registers each key row of
// the block's union once, for all the query rows that see it (LaneScatterRows); with 16, a
// few lanes' rows at a time over the key rows their windows cover (LaneScatterLanes, 1-6%
// less backward time on AVX2 and the baseline than LaneScatterRows there, measured).
inline void LaneScatter(const NaGeometry& s, const LaneBlock& blk, const LaneScratch& sc,
                        const ScatterItem& it) {
  const int64_t G = s.group(), K2 = s.kernel[2], Dp = PaddedDim(s);
  // Longer rows go kScatterChunk vectors at a time; key rows kScatterKeyRows at a time, from
  // runs of consecutive union rows that the same query rows see.
  for (int64_t d = 0; d < Dp; d += kScatterChunk * kLanes) {
    WithCount<kScatterChunk>((std::min<int64_t>(Dp - d, kScatterChunk * kLanes)) / kLanes,
                             [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      if constexpr (kRegisters == 16) {
        // Lanes per group: their rows, a weight and a column's accumulators in registers.
        constexpr int L = std::max(1, (kRegisters - 1 - NC) / (NC + 1));
        LaneScatterLanes<NC, L>(s, blk, sc.slots, sc.s1, sc.q_rows.data(), it.acc_a, it.stride,
                                d);  // dk += scale * ds q
        LaneScatterLanes<NC, L>(s, blk, sc.slots, sc.s0, sc.dout_rows.data(), it.acc_b,
                                it.stride, d);  // dv += p dout
      } else {
        constexpr int R = kScatterKeyRows<NC>;
        for (int64_t u = 0; u < blk.n_union;) {
          const int32_t mask = blk.of[u].mask;
          int64_t n = 1;
          while (n < R && u + n < blk.n_union && blk.of[u + n].mask == mask) ++n;
          // Query row i's weights from key row u, and its q and dout rows.
          const float* wa[kRowBlock] = {};
          const float* wb[kRowBlock] = {};
          const float* xa[kRowBlock] = {};
          const float* xb[kRowBlock] = {};
          for (int64_t i = 0; i < blk.n; ++i) {
            const int64_t w0 = (i * G * sc.slots + blk.of[u].at[i] * K2) * kLanes;
            wa[i] = sc.s1 + w0;  // scale * ds
            wb[i] = sc.s0 + w0;  // p
            xa[i] = sc.q_rows.data() + i * G * kLanes * Dp;
            xb[i] = sc.dout_rows.data() + i * G * kLanes * Dp;
          }
          WithCount<R>(n, [&](auto rows) {
            WithCount<(1 << kRowBlock) - 1>(mask, [&](auto m) {
              LaneScatterRows<NC, decltype(rows)::value, decltype(m)::value>(s, blk, u, wa, wb,
                                                                             xa, xb, it, d);
            });
          });
          u += n;
        }
      }
    });
  }
}

inline void LaneFusedBackward(const NaGeometry& s, const Workers& workers, const float* q,
                              const float* k, const float* v, const float* rpb,
                              const float* dout, const float* lse, RowTerm row_term,
                              float scale, float* dq, float* dk, float* dv, float* drpb) {
  const std::vector<float> rpb_padded = PaddedRpb(s, rpb);
  if (rpb != nullptr) rpb = rpb_padded.data();
  const LanePlan plan(s);
  const int64_t G = s.group(), RR = s.rpb_size();
  struct Scratch {
    LaneScratch lanes;
    PlaneTransposed kt, vt;
    AlignedFloats rpb_lanes;  // [G][RR][kLanes]: the item's rpb gradient by lane
  };
  ForEachScatterItem(s, workers, plan.n_blocks * plan.n_tiles, PaddedDim(s), dk, dv,
                     rpb != nullptr ? drpb : nullptr,
                     [&] {
                       return Scratch{LaneScratch(s, kRowBlock * G),
                                      PlaneTransposed(s, plan.layout, plan.ring, 1, 0),
                                      PlaneTransposed(s, plan.layout, plan.ring, 1, 1),
                                      AlignedFloats(rpb != nullptr ? G * RR * kLanes : 0)};
                     },
                     [&](Scratch& sc, const ScatterItem& it) {
    float* const rpb_lanes = it.rpb != nullptr ? sc.rpb_lanes.data() : nullptr;
    if (rpb_lanes != nullptr) std::fill(rpb_lanes, rpb_lanes + G * RR * kLanes, 0.0f);
    LaneBlock blk;
    int64_t block = -1;
    for (int64_t u = it.tile_begin; u < it.tile_end; ++u) {
      if (u / plan.n_tiles != block) {
        block = u / plan.n_tiles;
        StartBlock(s, plan.row_order, block, it.b, sc.lanes, blk);
        CoverKeyRows(k, v, it.b, it.hk, 1, blk.union_row, blk.n_union, sc.kt, sc.vt);
      }
      for (int64_t i = 0; i < blk.n; ++i) {
        blk.task[i].tile = &plan.tiles[u % plan.n_tiles];
        blk.task[i].hk = it.hk;
      }
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < blk.n; ++i) blk.task[i].h = it.hk * G + g;
        LaneBackwardHead(s, blk, sc.kt, sc.vt, q, rpb, dout, lse, row_term, scale, g, sc.lanes,
                         rpb_lanes != nullptr ? rpb_lanes + g * RR * kLanes : nullptr, dq);
      }
      // All G heads' and query rows' contributions, one pass over the keys.
      LaneScatter(s, blk, sc.lanes, it);
    }
    if (rpb_lanes != nullptr) {
      for (int64_t r = 0; r < G * RR; ++r) it.rpb[r] += ReduceAdd(Load(rpb_lanes + r * kLanes));
    }
  });
}

}  // namespace jnat::cpu::JNAT_ISA_NS
