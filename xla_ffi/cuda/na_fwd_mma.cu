// Fused forward on tensor cores for bfloat16 / float16 (fp32 accumulation and softmax).
//
// A block owns a box of up to 64 queries (one dilation group per axis, tile_config.h) for
// one (batch, head). Because window starts are monotone along each axis, the keys of all its
// windows lie in one box: the halo, [min start, max start + K) per axis. The block walks the
// halo in steps of 64 keys: each step stages K and V rows in shared memory, computes the
// 64 x 64 logits with mma.sync m16n8k16 (each warp owns 16 query rows), masks every
// (query, key) pair with the query's per-axis window (from na_index.h, in dilation-group
// coordinates), adds rpb, and folds the step into an online softmax and the P.V product.
// Nothing of size N * prod(kernel_size) touches global memory: the output and lse are
// written once at the end.
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

struct FwdTileArgs {
  NaDims s;
  QueryTile tile;
  const uint16_t *q, *k, *v;  // 16-bit elements, copied as bits
  const float* rpb;
  float scale;
  uint16_t* out;
  float* lse;
  int vec;  // rows are 16-byte aligned with head_dim % 8 == 0: 16-byte copies
};

template <typename T, int HD>
__global__ void __launch_bounds__(32 * kTileWarps, FwdMinBlocks(HD)) FwdMmaKernel(FwdTileArgs a) {
  static_assert(kTileQueries == kTileKeys, "row-offset staging assumes equal tile heights");
  constexpr int kLd = HD + kSmemPad;
  constexpr int kKSteps = HD / 16;    // k-steps of Q.K^T
  constexpr int kDBlocks = HD / 8;    // n8 blocks of the output
  constexpr int kSBlocks = kTileKeys / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  // Q is staged in the K buffer: it lives in registers once its fragments are loaded.
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem);
  uint16_t* qs = ks;
  uint16_t* vs = ks + kTileKeys * kLd;
  int* kg = reinterpret_cast<int*>(vs + kTileKeys * kLd);  // [3][kTileKeys] group coords
  unsigned* kr = reinterpret_cast<unsigned*>(kg + 3 * kTileKeys);  // rpb offset part
  int64_t* roff = reinterpret_cast<int64_t*>(kr + kTileKeys);       // row offsets

  const NaDims& s = a.s;
  const QueryTile& tile = a.tile;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t D = s.dim, H = s.heads, N = s.tokens;

  const TileBox bx = MakeTileBox(s, tile, blockIdx.x);
  if (bx.empty()) return;  // a box past a short dilation group's end
  const int64_t* grp = bx.grp;
  const int64_t *lo = bx.lo, *ext = bx.ext;
  const int64_t halo = ext[0] * ext[1] * ext[2];
  const int64_t steps = (halo + kTileKeys - 1) / kTileKeys;
  const unsigned r12 = static_cast<unsigned>(s.rpb_extent[1] * s.rpb_extent[2]);
  const unsigned r2 = static_cast<unsigned>(s.rpb_extent[2]);

  for (int64_t bh = blockIdx.y; bh < s.batch * H; bh += gridDim.y) {
    const int64_t b = bh / H, h = bh % H, hk = h / s.group;
    const float* rpb_h = a.rpb != nullptr ? a.rpb + h * s.rpb_size : nullptr;

    auto query_of = [&](int r, int64_t* pos) { return bx.Row(s, tile, r, pos); };

    __syncthreads();  // the previous (batch, head) is done with shared memory
    if (tid < kTileQueries) {
      int64_t pos[3];
      const bool valid = query_of(tid, pos);
      const int64_t token = (pos[0] * s.length[1] + pos[1]) * s.length[2] + pos[2];
      roff[tid] = valid ? ((b * N + token) * H + h) * D : -1;
    }
    __syncthreads();
    LoadRows<HD>(qs, a.q, roff, D, a.vec != 0);

    // This thread's two rows (r and r + 8 of its warp's 16): window start and count per axis
    // in group coordinates, and the rpb offset base (see kr below).
    int ws[2][3], cnt[2][3];
    unsigned rbase[2];
    int64_t qidx[2];
    bool qvalid[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int64_t pos[3];
      qvalid[i] = query_of(warp * 16 + lane / 4 + 8 * i, pos);
      unsigned base = 0;
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        const AxisWindow w = AxisWindowOf(s, ax, pos[ax]);
        ws[i][ax] = static_cast<int>((w.first - grp[ax]) / s.dilation[ax]);
        cnt[i][ax] = qvalid[i] ? static_cast<int>(w.count) : 0;
        const unsigned part = static_cast<unsigned>(w.rpb0) - static_cast<unsigned>(ws[i][ax]);
        base = ax == 0 ? part * r12 : ax == 1 ? base + part * r2 : base + part;
      }
      rbase[i] = base;
      const int64_t token = (pos[0] * s.length[1] + pos[1]) * s.length[2] + pos[2];
      qidx[i] = (b * N + token) * H + h;
    }
    __syncthreads();  // Q staged

    uint32_t qf[kKSteps][4];
#pragma unroll
    for (int kc = 0; kc < kKSteps; ++kc) {
      Ldmatrix4(qf[kc], qs + (warp * 16 + (lane % 16)) * kLd + kc * 16 + (lane / 16) * 8);
    }
    float o[kDBlocks][4];
#pragma unroll
    for (int nb = 0; nb < kDBlocks; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    for (int64_t step = 0; step < steps; ++step) {
      __syncthreads();  // the previous step's K, V and offsets are consumed
      if (tid < kTileKeys) {
        const int64_t e = step * kTileKeys + tid;
        if (e < halo) {
          const int64_t e2 = e % ext[2], e1 = (e / ext[2]) % ext[1], e0 = e / (ext[2] * ext[1]);
          const int64_t g0 = lo[0] + e0, g1 = lo[1] + e1, g2 = lo[2] + e2;
          kg[tid] = static_cast<int>(g0);
          kg[kTileKeys + tid] = static_cast<int>(g1);
          kg[2 * kTileKeys + tid] = static_cast<int>(g2);
          kr[tid] = static_cast<unsigned>(g0) * r12 + static_cast<unsigned>(g1) * r2 +
                    static_cast<unsigned>(g2);
          const int64_t p0 = grp[0] + g0 * s.dilation[0], p1 = grp[1] + g1 * s.dilation[1],
                        p2 = grp[2] + g2 * s.dilation[2];
          const int64_t key = (p0 * s.length[1] + p1) * s.length[2] + p2;
          roff[tid] = ((b * N + key) * s.kv_heads + hk) * D;
        } else {  // past the halo: fails every window test below
          kg[tid] = kg[kTileKeys + tid] = kg[2 * kTileKeys + tid] = INT_MIN / 2;
          kr[tid] = 0;
          roff[tid] = -1;
        }
      }
      __syncthreads();
      LoadRows<HD>(ks, a.k, roff, D, a.vec != 0);
      LoadRows<HD>(vs, a.v, roff, D, a.vec != 0);
      __syncthreads();

      // S = Q K^T: 16 x 64 per warp.
      float sc[kSBlocks][4];
#pragma unroll
      for (int nb = 0; nb < kSBlocks; ++nb) sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.0f;
#pragma unroll
      for (int kc = 0; kc < kKSteps; ++kc) {
#pragma unroll
        for (int p = 0; p < kSBlocks / 2; ++p) {
          uint32_t bf[4];
          Ldmatrix4(bf, ks + (p * 16 + (lane % 8) + (lane / 16) * 8) * kLd + kc * 16 +
                            ((lane / 8) % 2) * 8);
          Mma<T>::Run(sc[2 * p], qf[kc], bf[0], bf[1]);
          Mma<T>::Run(sc[2 * p + 1], qf[kc], bf[2], bf[3]);
        }
      }

      // Window mask, scale and rpb; then the online softmax of rows r (i = 0) and r + 8.
      float row_max[2] = {-INFINITY, -INFINITY};
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
          float x = sc[nb][e] * a.scale;
          if (in_window && rpb_h != nullptr) x += rpb_h[rbase[i] + kr[col]];
          x = in_window ? x : -INFINITY;
          sc[nb][e] = x;
          row_max[i] = fmaxf(row_max[i], x);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        row_max[i] = fmaxf(row_max[i], __shfl_xor_sync(kFullMask, row_max[i], 1));
        row_max[i] = fmaxf(row_max[i], __shfl_xor_sync(kFullMask, row_max[i], 2));
        const float m_new = fmaxf(m[i], row_max[i]);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // rows with no key yet
        const float corr = __expf(m[i] - m_use);
        m[i] = m_new;
        l[i] *= corr;
#pragma unroll
        for (int nb = 0; nb < kDBlocks; ++nb) {
          o[nb][2 * i] *= corr;
          o[nb][2 * i + 1] *= corr;
        }
#pragma unroll
        for (int nb = 0; nb < kSBlocks; ++nb) {
          const float p0 = __expf(sc[nb][2 * i] - m_use);
          const float p1 = __expf(sc[nb][2 * i + 1] - m_use);
          sc[nb][2 * i] = p0;
          sc[nb][2 * i + 1] = p1;
          l[i] += p0 + p1;
        }
      }

      AccumulatePTimesRows<T, HD>(o, sc, vs, lane);  // O += P V
    }

    // Epilogue: normalise, write the output rows and the lse.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] += __shfl_xor_sync(kFullMask, l[i], 1);
      l[i] += __shfl_xor_sync(kFullMask, l[i], 2);
      if (!qvalid[i]) continue;
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      const int64_t orow = qidx[i] * D;
#pragma unroll
      for (int nb = 0; nb < kDBlocks; ++nb) {
        const int col = nb * 8 + (lane % 4) * 2;
        if (col < D) a.out[orow + col] = Mma<T>::Bits(o[nb][2 * i] * inv);
        if (col + 1 < D) a.out[orow + col + 1] = Mma<T>::Bits(o[nb][2 * i + 1] * inv);
      }
      if (lane % 4 == 0) a.lse[qidx[i]] = m[i] + logf(l[i]);
    }
  }
}

template <typename T, int HD>
cudaError_t LaunchMma(const FwdTileArgs& a, cudaStream_t stream) {
  constexpr int kSmem = SmemBytes(HD);
  static_assert(kSmem <= 48 * 1024, "no opt-in to large shared memory (the handler may be "
                                    "captured into a CUDA graph)");
  const int64_t bh = a.s.batch * a.s.heads;
  const dim3 grid(static_cast<unsigned>(a.tile.total),
                  static_cast<unsigned>(bh < 65535 ? bh : 65535));
  FwdMmaKernel<T, HD><<<grid, 32 * kTileWarps, kSmem, stream>>>(a);
  return cudaGetLastError();
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t LaunchNaForward(const NaDims& s, int dtype, const void* q, const void* k,
                            const void* v, const float* rpb, float scale, void* out, float* lse,
                            cudaStream_t stream) {
  const int bucket = HeadDimBucket(s.dim);
  bool mma = dtype != 0 && bucket != 0;
  for (int ax = 0; ax < 3; ++ax) mma = mma && s.length[ax] < (int64_t{1} << 30);
  QueryTile tile{};
  if (mma) {
    tile = ChooseQueryTile(s);
    mma = tile.total > 0 && tile.total <= INT_MAX;
  }
  if (!mma) return LaunchNaForwardSimt(s, dtype, q, k, v, rpb, scale, out, lse, stream);
  if (s.batch * s.heads == 0) return cudaGetLastError();

  FwdTileArgs a;
  a.s = s;
  a.tile = tile;
  a.q = static_cast<const uint16_t*>(q);
  a.k = static_cast<const uint16_t*>(k);
  a.v = static_cast<const uint16_t*>(v);
  a.rpb = rpb;
  a.scale = scale;
  a.out = static_cast<uint16_t*>(out);
  a.lse = lse;
  a.vec = s.dim % 8 == 0 && Aligned16(q) && Aligned16(k) && Aligned16(v);
  const bool bf16 = dtype == 1;
  switch (bucket) {
    case 32: return bf16 ? LaunchMma<__nv_bfloat16, 32>(a, stream) : LaunchMma<__half, 32>(a, stream);
    case 64: return bf16 ? LaunchMma<__nv_bfloat16, 64>(a, stream) : LaunchMma<__half, 64>(a, stream);
    default: return bf16 ? LaunchMma<__nv_bfloat16, 128>(a, stream) : LaunchMma<__half, 128>(a, stream);
  }
}

}  // namespace jnat::cuda
