// Fused backward on tensor cores for bfloat16 / float16, FlashAttention-2 style: the
// probabilities are recomputed from the saved lse, P = exp(scale q.k - lse), and with
// dP = dout.v and dS = P (dP - delta) (delta = rowsum(dout * out) - dlse, from the caller):
//   dq = scale dS K   (BwdMmaQueryKernel: query-major, over the forward's query boxes and
//                      key halos)
//   dk = scale dS^T Q, dv = P^T dout
//                     (BwdMmaKeyKernel: key-major, over boxes of keys and the box of queries
//                      whose windows reach them, for every query head of the kv head)
// Every product is mma.sync m16n8k16 with fp32 accumulation; P and dS enter the second
// products rounded to the 16-bit input type. Each output element is written once by one
// thread, without atomics: results are deterministic. No rpb here (LaunchNaBackwardMma
// declines it), and nothing of size N * prod(kernel_size) touches global memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "cuda/na_cuda.h"
#include "cuda/na_cuda_common.cuh"
#include "cuda/na_mma.cuh"
#include "cuda/tile_config.h"

namespace jnat::cuda {
namespace {

struct BwdTileArgs {
  NaDims s;
  QueryTile tile;  // query boxes (dq) and key boxes (dk, dv) alike
  const uint16_t *q, *k, *v, *dout;
  const float *lse, *delta;
  float scale;
  uint16_t *dq, *dk, *dv;
  int vec;
};

// Shared memory: two 64-row tiles, then per-column (key or query) group coordinates or
// window starts and counts, two per-column floats, and the row offsets.
constexpr int BwdSmemBytes(int head_dim) {
  return 2 * kTileKeys * (head_dim + kSmemPad) * 2 + kTileKeys * 6 * 4 + kTileKeys * 2 * 4 +
         kTileKeys * 8;
}

// c[8][4] = A (16 x HD, fragments a[HD/16][4]) times the 64 x HD tile at rows, transposed:
// a 16 x 64 block of row . row dot products.
template <typename T, int HD>
__device__ __forceinline__ void RowDots(float (*c)[4], const uint32_t (*a)[4],
                                        const uint16_t* rows, int lane) {
  constexpr int kLd = HD + kSmemPad;
#pragma unroll
  for (int nb = 0; nb < kTileKeys / 8; ++nb) c[nb][0] = c[nb][1] = c[nb][2] = c[nb][3] = 0.0f;
#pragma unroll
  for (int kc = 0; kc < HD / 16; ++kc) {
#pragma unroll
    for (int p = 0; p < kTileKeys / 16; ++p) {
      uint32_t bf[4];
      Ldmatrix4(bf, rows + (p * 16 + (lane % 8) + (lane / 16) * 8) * kLd + kc * 16 +
                        ((lane / 8) % 2) * 8);
      Mma<T>::Run(c[2 * p], a[kc], bf[0], bf[1]);
      Mma<T>::Run(c[2 * p + 1], a[kc], bf[2], bf[3]);
    }
  }
}

// The A fragments of this warp's 16 rows of a staged tile.
template <int HD>
__device__ __forceinline__ void LoadRowFragments(uint32_t (*f)[4], const uint16_t* tile,
                                                 int warp, int lane) {
  constexpr int kLd = HD + kSmemPad;
#pragma unroll
  for (int kc = 0; kc < HD / 16; ++kc) {
    Ldmatrix4(f[kc], tile + (warp * 16 + (lane % 16)) * kLd + kc * 16 + (lane / 16) * 8);
  }
}

// Writes this thread's part of a warp's 16 x HD accumulator (rows row[0], row[1]: element
// offsets, -1 for none) times `mul` as 16-bit values.
template <typename T, int HD>
__device__ __forceinline__ void StoreRows(uint16_t* out, const float (*acc)[4],
                                          const int64_t* row, int64_t D, float mul, int lane) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (row[i] < 0) continue;
#pragma unroll
    for (int nb = 0; nb < HD / 8; ++nb) {
      const int col = nb * 8 + (lane % 4) * 2;
      if (col < D) out[row[i] + col] = Mma<T>::Bits(acc[nb][2 * i] * mul);
      if (col + 1 < D) out[row[i] + col + 1] = Mma<T>::Bits(acc[nb][2 * i + 1] * mul);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dq: the forward's walk (query box, key halo in steps of 64), P recomputed from lse.

template <typename T, int HD>
__global__ void __launch_bounds__(32 * kTileWarps, 2) BwdMmaQueryKernel(BwdTileArgs a) {
  constexpr int kLd = HD + kSmemPad;
  constexpr int kSBlocks = kTileKeys / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem);  // Q, then K
  uint16_t* vs = ks + kTileKeys * kLd;                // dout, then V
  int* kg = reinterpret_cast<int*>(vs + kTileKeys * kLd);  // [3][kTileKeys] group coords
  int64_t* roff = reinterpret_cast<int64_t*>(kg + 6 * kTileKeys + 2 * kTileKeys);

  const NaDims& s = a.s;
  const QueryTile& tile = a.tile;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t D = s.dim, H = s.heads, N = s.tokens;
  const TileBox bx = MakeTileBox(s, tile, blockIdx.x);
  if (bx.empty()) return;
  const int64_t halo = bx.ext[0] * bx.ext[1] * bx.ext[2];
  const int64_t steps = (halo + kTileKeys - 1) / kTileKeys;

  for (int64_t bh = blockIdx.y; bh < s.batch * H; bh += gridDim.y) {
    const int64_t b = bh / H, h = bh % H, hk = h / s.group;
    auto query_row = [&](int r, int64_t* pos) -> int64_t {  // element offset, -1: none
      const bool valid = bx.Row(s, tile, r, pos);
      const int64_t token = (pos[0] * s.length[1] + pos[1]) * s.length[2] + pos[2];
      return valid ? ((b * N + token) * H + h) * D : -1;
    };

    __syncthreads();  // the previous (batch, head) is done with shared memory
    if (tid < kTileQueries) {
      int64_t pos[3];
      roff[tid] = query_row(tid, pos);
    }
    __syncthreads();
    LoadRows<HD>(ks, a.q, roff, D, a.vec != 0);
    LoadRows<HD>(vs, a.dout, roff, D, a.vec != 0);

    // This thread's rows r, r + 8: window start and count per axis (group coordinates),
    // lse and delta.
    int ws[2][3], cnt[2][3];
    int64_t qrow[2];
    float lse[2], delta[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int64_t pos[3];
      qrow[i] = query_row(warp * 16 + lane / 4 + 8 * i, pos);
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        const AxisWindow w = AxisWindowOf(s, ax, pos[ax]);
        ws[i][ax] = static_cast<int>((w.first - bx.grp[ax]) / s.dilation[ax]);
        cnt[i][ax] = qrow[i] >= 0 ? static_cast<int>(w.count) : 0;
      }
      lse[i] = qrow[i] >= 0 ? a.lse[qrow[i] / D] : 0.0f;
      delta[i] = qrow[i] >= 0 ? a.delta[qrow[i] / D] : 0.0f;
    }
    __syncthreads();  // Q and dout staged

    uint32_t qf[HD / 16][4], dof[HD / 16][4];
    LoadRowFragments<HD>(qf, ks, warp, lane);
    LoadRowFragments<HD>(dof, vs, warp, lane);
    float dq[HD / 8][4];
#pragma unroll
    for (int nb = 0; nb < HD / 8; ++nb) dq[nb][0] = dq[nb][1] = dq[nb][2] = dq[nb][3] = 0.0f;

    for (int64_t step = 0; step < steps; ++step) {
      __syncthreads();  // the previous step's tiles and offsets are consumed
      if (tid < kTileKeys) {
        const int64_t e = step * kTileKeys + tid;
        if (e < halo) {
          const int64_t e2 = e % bx.ext[2], e1 = (e / bx.ext[2]) % bx.ext[1],
                        e0 = e / (bx.ext[2] * bx.ext[1]);
          const int64_t g0 = bx.lo[0] + e0, g1 = bx.lo[1] + e1, g2 = bx.lo[2] + e2;
          kg[tid] = static_cast<int>(g0);
          kg[kTileKeys + tid] = static_cast<int>(g1);
          kg[2 * kTileKeys + tid] = static_cast<int>(g2);
          const int64_t p0 = bx.grp[0] + g0 * s.dilation[0], p1 = bx.grp[1] + g1 * s.dilation[1],
                        p2 = bx.grp[2] + g2 * s.dilation[2];
          const int64_t key = (p0 * s.length[1] + p1) * s.length[2] + p2;
          roff[tid] = ((b * N + key) * s.kv_heads + hk) * D;
        } else {  // past the halo: fails every window test below
          kg[tid] = kg[kTileKeys + tid] = kg[2 * kTileKeys + tid] = INT_MIN / 2;
          roff[tid] = -1;
        }
      }
      __syncthreads();
      LoadRows<HD>(ks, a.k, roff, D, a.vec != 0);
      LoadRows<HD>(vs, a.v, roff, D, a.vec != 0);
      __syncthreads();

      float sc[kSBlocks][4], dp[kSBlocks][4];
      RowDots<T, HD>(sc, qf, ks, lane);   // q . k
      RowDots<T, HD>(dp, dof, vs, lane);  // dout . v
#pragma unroll
      for (int nb = 0; nb < kSBlocks; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          const int col = nb * 8 + (lane % 4) * 2 + (e & 1);
          const bool in_window =
              static_cast<unsigned>(kg[col] - ws[i][0]) < static_cast<unsigned>(cnt[i][0]) &&
              static_cast<unsigned>(kg[kTileKeys + col] - ws[i][1]) <
                  static_cast<unsigned>(cnt[i][1]) &&
              static_cast<unsigned>(kg[2 * kTileKeys + col] - ws[i][2]) <
                  static_cast<unsigned>(cnt[i][2]);
          const float p = in_window ? __expf(sc[nb][e] * a.scale - lse[i]) : 0.0f;
          sc[nb][e] = p * (dp[nb][e] - delta[i]);  // dS
        }
      }
      AccumulatePTimesRows<T, HD>(dq, sc, ks, lane);  // dS K
    }
    StoreRows<T, HD>(a.dq, dq, qrow, D, a.scale, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// dk, dv: a box of keys; along each axis the queries whose windows hold a key of the box are
// one range of group coordinates (window starts and ends are monotone), so they form a box
// too, walked in steps of 64 queries for each query head of the kv head.

template <typename T, int HD>
__global__ void __launch_bounds__(32 * kTileWarps, 2) BwdMmaKeyKernel(BwdTileArgs a) {
  constexpr int kLd = HD + kSmemPad;
  constexpr int kSBlocks = kTileQueries / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem);  // K, then Q
  uint16_t* ds = qs + kTileQueries * kLd;             // V, then dout
  int* qws = reinterpret_cast<int*>(ds + kTileQueries * kLd);  // [3][64] window starts
  int* qcnt = qws + 3 * kTileQueries;                           // [3][64] window counts
  float* qlse = reinterpret_cast<float*>(qcnt + 3 * kTileQueries);
  float* qdelta = qlse + kTileQueries;
  int64_t* roff = reinterpret_cast<int64_t*>(qdelta + kTileQueries);

  const NaDims& s = a.s;
  const QueryTile& tile = a.tile;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t D = s.dim, H = s.heads, N = s.tokens, G = s.group;
  const TileBox bx = MakeTileBox(s, tile, blockIdx.x);  // keys; its halo is unused
  if (bx.empty()) return;
  // The query box: per axis, the union of the box's keys' inverse ranges.
  int64_t qlo[3], qext[3];
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    int64_t first = LLONG_MAX, last = LLONG_MIN;
    for (int j = 0; j < bx.n[ax]; ++j) {
      int64_t lo, hi;
      InverseRange(s, ax, bx.grp[ax] + (bx.c0[ax] + j) * s.dilation[ax], &lo, &hi);
      if (lo <= hi) {
        first = lo < first ? lo : first;
        last = hi > last ? hi : last;
      }
    }
    qlo[ax] = first;
    qext[ax] = first <= last ? last - first + 1 : 0;
  }
  const int64_t halo = qext[0] * qext[1] * qext[2];
  const int64_t steps = (halo + kTileQueries - 1) / kTileQueries;

  for (int64_t bh = blockIdx.y; bh < s.batch * s.kv_heads; bh += gridDim.y) {
    const int64_t b = bh / s.kv_heads, hk = bh % s.kv_heads;
    auto key_row = [&](int r, int64_t* pos) -> int64_t {
      const bool valid = bx.Row(s, tile, r, pos);
      const int64_t token = (pos[0] * s.length[1] + pos[1]) * s.length[2] + pos[2];
      return valid ? ((b * N + token) * s.kv_heads + hk) * D : -1;
    };

    __syncthreads();
    if (tid < kTileKeys) {
      int64_t pos[3];
      roff[tid] = key_row(tid, pos);
    }
    __syncthreads();
    LoadRows<HD>(qs, a.k, roff, D, a.vec != 0);
    LoadRows<HD>(ds, a.v, roff, D, a.vec != 0);
    // This thread's key rows r, r + 8: group coordinates (a far-off value for no key).
    int kgc[2][3];
    int64_t krow[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int64_t pos[3];
      krow[i] = key_row(warp * 16 + lane / 4 + 8 * i, pos);
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        kgc[i][ax] = krow[i] >= 0 ? static_cast<int>((pos[ax] - bx.grp[ax]) / s.dilation[ax])
                                  : INT_MIN / 2;
      }
    }
    __syncthreads();
    uint32_t kf[HD / 16][4], vf[HD / 16][4];
    LoadRowFragments<HD>(kf, qs, warp, lane);
    LoadRowFragments<HD>(vf, ds, warp, lane);
    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int nb = 0; nb < HD / 8; ++nb) {
      dk[nb][0] = dk[nb][1] = dk[nb][2] = dk[nb][3] = 0.0f;
      dv[nb][0] = dv[nb][1] = dv[nb][2] = dv[nb][3] = 0.0f;
    }

    for (int64_t gh = 0; gh < G; ++gh) {
      const int64_t h = hk * G + gh;
      for (int64_t step = 0; step < steps; ++step) {
        __syncthreads();  // the previous tiles and per-query values are consumed
        if (tid < kTileQueries) {
          const int64_t e = step * kTileQueries + tid;
          int64_t qi = -1;
          if (e < halo) {
            const int64_t e2 = e % qext[2], e1 = (e / qext[2]) % qext[1],
                          e0 = e / (qext[2] * qext[1]);
            const int64_t g[3] = {qlo[0] + e0, qlo[1] + e1, qlo[2] + e2};
            int64_t p[3];
#pragma unroll
            for (int ax = 0; ax < 3; ++ax) {
              p[ax] = bx.grp[ax] + g[ax] * s.dilation[ax];
              const AxisWindow w = AxisWindowOf(s, ax, p[ax]);
              qws[ax * kTileQueries + tid] =
                  static_cast<int>((w.first - bx.grp[ax]) / s.dilation[ax]);
              qcnt[ax * kTileQueries + tid] = static_cast<int>(w.count);
            }
            qi = (b * N + (p[0] * s.length[1] + p[1]) * s.length[2] + p[2]) * H + h;
          } else {  // past the box: an empty window
            for (int ax = 0; ax < 3; ++ax) {
              qws[ax * kTileQueries + tid] = 0;
              qcnt[ax * kTileQueries + tid] = 0;
            }
          }
          qlse[tid] = qi >= 0 ? a.lse[qi] : 0.0f;
          qdelta[tid] = qi >= 0 ? a.delta[qi] : 0.0f;
          roff[tid] = qi >= 0 ? qi * D : -1;
        }
        __syncthreads();
        LoadRows<HD>(qs, a.q, roff, D, a.vec != 0);
        LoadRows<HD>(ds, a.dout, roff, D, a.vec != 0);
        __syncthreads();

        float st[kSBlocks][4], dpt[kSBlocks][4];
        RowDots<T, HD>(st, kf, qs, lane);   // k . q
        RowDots<T, HD>(dpt, vf, ds, lane);  // v . dout
#pragma unroll
        for (int nb = 0; nb < kSBlocks; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = e >> 1;
            const int col = nb * 8 + (lane % 4) * 2 + (e & 1);
            const bool in_window =
                static_cast<unsigned>(kgc[i][0] - qws[col]) <
                    static_cast<unsigned>(qcnt[col]) &&
                static_cast<unsigned>(kgc[i][1] - qws[kTileQueries + col]) <
                    static_cast<unsigned>(qcnt[kTileQueries + col]) &&
                static_cast<unsigned>(kgc[i][2] - qws[2 * kTileQueries + col]) <
                    static_cast<unsigned>(qcnt[2 * kTileQueries + col]);
            const float p = in_window ? __expf(st[nb][e] * a.scale - qlse[col]) : 0.0f;
            st[nb][e] = p;
            dpt[nb][e] = p * (dpt[nb][e] - qdelta[col]);  // dS^T
          }
        }
        AccumulatePTimesRows<T, HD>(dv, st, ds, lane);   // P^T dout
        AccumulatePTimesRows<T, HD>(dk, dpt, qs, lane);  // dS^T Q
      }
    }
    StoreRows<T, HD>(a.dk, dk, krow, D, a.scale, lane);
    StoreRows<T, HD>(a.dv, dv, krow, D, 1.0f, lane);
  }
}

template <typename T, int HD>
cudaError_t LaunchBwdMma(const BwdTileArgs& a, cudaStream_t stream) {
  constexpr int kSmem = BwdSmemBytes(HD);
  static_assert(kSmem <= 48 * 1024, "no opt-in to large shared memory");
  const unsigned blocks = static_cast<unsigned>(a.tile.total);
  const int64_t bh = a.s.batch * a.s.heads, bkv = a.s.batch * a.s.kv_heads;
  BwdMmaQueryKernel<T, HD><<<dim3(blocks, static_cast<unsigned>(bh < 65535 ? bh : 65535)),
                             32 * kTileWarps, kSmem, stream>>>(a);
  BwdMmaKeyKernel<T, HD><<<dim3(blocks, static_cast<unsigned>(bkv < 65535 ? bkv : 65535)),
                           32 * kTileWarps, kSmem, stream>>>(a);
  return cudaGetLastError();
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool NaBackwardMmaApplies(const NaDims& s, int dtype, bool has_rpb) {
  if (dtype == 0 || has_rpb || BwdHeadDimBucket(s.dim) == 0) return false;
  for (int ax = 0; ax < 3; ++ax) {
    if (s.length[ax] >= (int64_t{1} << 30)) return false;
  }
  const QueryTile tile = ChooseQueryTile(s);
  return tile.total > 0 && tile.total <= INT_MAX;
}

cudaError_t LaunchNaBackwardMma(const NaDims& s, int dtype, const void* q, const void* k,
                                const void* v, const void* dout, const float* lse,
                                const float* delta, float scale, void* dq, void* dk, void* dv,
                                cudaStream_t stream) {
  if (s.batch * s.heads == 0) return cudaGetLastError();
  BwdTileArgs a;
  a.s = s;
  a.tile = ChooseQueryTile(s);
  a.q = static_cast<const uint16_t*>(q);
  a.k = static_cast<const uint16_t*>(k);
  a.v = static_cast<const uint16_t*>(v);
  a.dout = static_cast<const uint16_t*>(dout);
  a.lse = lse;
  a.delta = delta;
  a.scale = scale;
  a.dq = static_cast<uint16_t*>(dq);
  a.dk = static_cast<uint16_t*>(dk);
  a.dv = static_cast<uint16_t*>(dv);
  a.vec = s.dim % 8 == 0 && Aligned16(q) && Aligned16(k) && Aligned16(v) && Aligned16(dout);
  const bool bf16 = dtype == 1;
  if (BwdHeadDimBucket(s.dim) == 32) {
    return bf16 ? LaunchBwdMma<__nv_bfloat16, 32>(a, stream) : LaunchBwdMma<__half, 32>(a, stream);
  }
  return bf16 ? LaunchBwdMma<__nv_bfloat16, 64>(a, stream) : LaunchBwdMma<__half, 64>(a, stream);
}

}  // namespace jnat::cuda
