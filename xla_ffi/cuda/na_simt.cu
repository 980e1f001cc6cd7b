// Warp-per-row CUDA kernels: the general fused forward, the fused backward, and the unfused
// qk / av ops with their backwards. Float32 arithmetic on any dtype (loads convert) and any
// head_dim; no tensor cores (the half-precision forward has its own kernel, na_fwd_mma.cu).
//
// One warp owns one output row: a query (forward, dq, attention weights) or a key (dk, dv).
// Its lanes split the head dimension (lane l holds dims l, l + 32, ... of a 256-wide pass;
// longer heads take several passes), so every row access is coalesced; dot products reduce
// with a fixed shuffle butterfly. Query-major kernels walk the window (na_index.h); key-major
// kernels walk the inverse window, testing each candidate query's window for the key, so
// the gradients of k and v are sums over their own readers: no atomics, no
// N * prod(kernel_size) intermediate. The rpb gradient goes through per-warp partial rows
// (shared memory when they fit) reduced in a fixed order by a second kernel: every result
// is deterministic.
#include <cmath>
#include <cstdint>

#include "cuda/na_cuda.h"
#include "cuda/na_cuda_common.cuh"

namespace jnat::cuda {
namespace {

constexpr int kWarps = 8;  // warps per block
constexpr int kThreads = 32 * kWarps;
// Two resident blocks per SM: a 128-register cap, stated so that ptxas neither spills to
// reach a higher occupancy of its own choosing nor drops to one block per SM.
constexpr int kMinBlocks = 2;
constexpr int kLaneDims = 8;  // register-held dims per lane and pass
constexpr int kPassDims = 32 * kLaneDims;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops cover the rest

__device__ __forceinline__ int64_t GridWarp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}

__device__ __forceinline__ int64_t GridWarps() {
  return (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
}

int BlocksForWarps(int64_t warps) {
  int64_t blocks = (warps + kWarps - 1) / kWarps;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

// Lane-held part of a row: dims lane + 32 j (j < kLaneDims) of the first pass, dim
// lane + 32 j at r[j * kStride] (registers: 1; a warp's row in shared memory: 32, from
// r = row + lane, so lanes hit distinct banks).
template <int kStride = 1>
__device__ __forceinline__ void LoadLaneRow(const void* p, int64_t row, int64_t D, int dt,
                                            int lane, float* r) {
#pragma unroll
  for (int j = 0; j < kLaneDims; ++j) {
    const int64_t d = lane + 32 * j;
    r[j * kStride] = d < D ? LoadF(p, row + d, dt) : 0.0f;
  }
}

// This lane's share of x . y where x is lane-held (xr, laid out as LoadLaneRow<kStride>
// writes it) and y is at y[row]. Dims beyond the first pass are read from x[xrow] directly.
template <int kStride = 1>
__device__ __forceinline__ float LaneDot(const float* xr, const void* x, int64_t xrow,
                                         const void* y, int64_t yrow, int64_t D, int dt,
                                         int lane) {
  float part = 0.0f;
#pragma unroll
  for (int j = 0; j < kLaneDims; ++j) {
    const int64_t d = lane + 32 * j;
    if (d < D) part += xr[j * kStride] * LoadF(y, yrow + d, dt);
  }
  for (int64_t d = kPassDims + lane; d < D; d += 32) {
    part += LoadF(x, xrow + d, dt) * LoadF(y, yrow + d, dt);
  }
  return part;
}

// Offset of the key row (b, key token, kv head hk) in a [B, N, Hkv, D] tensor.
__device__ __forceinline__ int64_t KeyRow(const NaDims& s, int64_t b, int64_t key, int64_t hk) {
  return ((b * s.tokens + key) * s.kv_heads + hk) * s.dim;
}

// Walks the valid slots of a query's window: f(slot, key token, rpb offset within a head).
// Slot, token and rpb offset are row-major over the three axes, built up axis by axis.
template <typename F>
__device__ __forceinline__ void ForEachSlot(const NaDims& s, const AxisWindow* w, F&& f) {
  for (int64_t n0 = 0; n0 < w[0].count; ++n0) {
    const int64_t p0 = w[0].first + n0 * w[0].step;
    const int64_t r0 = (w[0].rpb0 + n0) * s.rpb_extent[1] + w[1].rpb0;
    for (int64_t n1 = 0; n1 < w[1].count; ++n1) {
      const int64_t p1 = w[1].first + n1 * w[1].step;
      const int64_t row = (p0 * s.length[1] + p1) * s.length[2];
      const int64_t slot01 = (n0 * s.kernel[1] + n1) * s.kernel[2];
      const int64_t r01 = (r0 + n1) * s.rpb_extent[2] + w[2].rpb0;
      for (int64_t n2 = 0; n2 < w[2].count; ++n2) {
        f(slot01 + n2, row + w[2].first + n2 * w[2].step, r01 + n2);
      }
    }
  }
}

__device__ __forceinline__ void QueryWindows(const NaDims& s, int64_t token, AxisWindow* w) {
  const Coord3 c = TokenCoord(s, token);
#pragma unroll
  for (int a = 0; a < 3; ++a) w[a] = AxisWindowOf(s, a, c.i[a]);
}

// ---------------------------------------------------------------------------------------------
// Fused forward, one warp per (batch, token, head), online softmax over the window.

__global__ void __launch_bounds__(kThreads, kMinBlocks)
    FwdSimtKernel(NaDims s, int dt, const void* q, const void* k, const void* v, const float* rpb,
                  float scale, void* out, float* lse) {
  const int lane = threadIdx.x & 31;
  const int64_t D = s.dim, H = s.heads, N = s.tokens;
  const int64_t total = s.batch * N * H;
  for (int64_t qi = GridWarp(); qi < total; qi += GridWarps()) {
    const int64_t h = qi % H, b = qi / H / N, t = (qi / H) % N, hk = h / s.group;
    AxisWindow w[3];
    QueryWindows(s, t, w);
    const int64_t qrow = qi * D;
    const float* rpb_h = rpb != nullptr ? rpb + h * s.rpb_size : nullptr;
    float qr[kLaneDims];
    LoadLaneRow(q, qrow, D, dt, lane, qr);
    for (int64_t d0 = 0; d0 < D || d0 == 0; d0 += kPassDims) {
      float acc[kLaneDims];
#pragma unroll
      for (int j = 0; j < kLaneDims; ++j) acc[j] = 0.0f;
      float m = -INFINITY, l = 0.0f;
      ForEachSlot(s, w, [&](int64_t, int64_t key, int64_t roff) {
        const int64_t krow = KeyRow(s, b, key, hk);
        float x = WarpSum(LaneDot(qr, q, qrow, k, krow, D, dt, lane)) * scale;
        if (rpb_h != nullptr) x += rpb_h[roff];
        const float m_new = fmaxf(m, x);
        const float corr = expf(m - m_new);
        const float p = expf(x - m_new);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < kLaneDims; ++j) {
          const int64_t d = d0 + lane + 32 * j;
          if (d < D) acc[j] = acc[j] * corr + p * LoadF(v, krow + d, dt);
        }
        m = m_new;
      });
      const float inv = 1.0f / l;
#pragma unroll
      for (int j = 0; j < kLaneDims; ++j) {
        const int64_t d = d0 + lane + 32 * j;
        if (d < D) StoreF(out, qrow + d, acc[j] * inv, dt);
      }
      if (d0 == 0 && lane == 0) lse[qi] = m + logf(l);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Query-major backward: dq, and rpb-gradient partials. Mode kFused recomputes
// ds = p (dout.v - delta) from lse; mode kQK reads ds from dattn.

enum QueryMode : int { kFused = 0, kQK = 1 };

struct BwdQueryArgs {
  NaDims s;
  int dt, adt, mode;
  const void *q, *k, *v, *dout, *dattn;
  const float *rpb, *lse, *delta;
  float scale;
  void* dq;
  float* partial;  // nullptr: no rpb gradient
  int64_t chunks, chunk_len;
  int smem_partial;
};

// Blocks are (head, chunk of chunk_len (batch, token) rows); warp w takes rows w, w + 8, ...
// of its block's chunk in order and adds its ds into its own partial row (lane 0 only).
// The dtype is a template parameter, as for KeyMajorKernel (see there).
template <int kDt>
__global__ void __launch_bounds__(kThreads, kMinBlocks) BwdQueryKernel(BwdQueryArgs a) {
  extern __shared__ float shared_partial[];  // [kWarps][RR] in smem mode
  const NaDims& s = a.s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t D = s.dim, H = s.heads, N = s.tokens, KK = s.window, RR = s.rpb_size;
  const int64_t rows = s.batch * N;
  const bool fused = a.mode == kFused;
  for (int64_t blk = blockIdx.x; blk < a.chunks * H; blk += gridDim.x) {
    const int64_t h = blk % H, ch = blk / H, hk = h / s.group;
    float* acc = nullptr;
    if (a.partial != nullptr) {
      acc = a.smem_partial ? shared_partial + warp * RR
                           : a.partial + ((h * a.chunks + ch) * kWarps + warp) * RR;
      for (int64_t r = lane; r < RR; r += 32) acc[r] = 0.0f;
      __syncwarp();
    }
    const float* rpb_h = a.rpb != nullptr ? a.rpb + h * RR : nullptr;
    const int64_t u_end = (ch + 1) * a.chunk_len < rows ? (ch + 1) * a.chunk_len : rows;
    for (int64_t u = ch * a.chunk_len + warp; u < u_end; u += kWarps) {
      const int64_t b = u / N, t = u % N, qi = u * H + h, qrow = qi * D;
      AxisWindow w[3];
      QueryWindows(s, t, w);
      float qr[kLaneDims], dor[kLaneDims];
      float lse_q = 0.0f, delta_q = 0.0f;
      if (fused) {
        LoadLaneRow(a.q, qrow, D, kDt, lane, qr);
        LoadLaneRow(a.dout, qrow, D, kDt, lane, dor);
        lse_q = a.lse[qi];
        delta_q = a.delta[qi];
      }
      for (int64_t d0 = 0; d0 < D || d0 == 0; d0 += kPassDims) {
        float dq[kLaneDims];
#pragma unroll
        for (int j = 0; j < kLaneDims; ++j) dq[j] = 0.0f;
        ForEachSlot(s, w, [&](int64_t slot, int64_t key, int64_t roff) {
          const int64_t krow = KeyRow(s, b, key, hk);
          float ds;
          if (fused) {
            const float kd = WarpSum(LaneDot(qr, a.q, qrow, a.k, krow, D, kDt, lane));
            const float vd = WarpSum(LaneDot(dor, a.dout, qrow, a.v, krow, D, kDt, lane));
            float x = kd * a.scale;
            if (rpb_h != nullptr) x += rpb_h[roff];
            ds = expf(x - lse_q) * (vd - delta_q);
          } else {
            ds = LoadF(a.dattn, qi * KK + slot, a.adt);
          }
#pragma unroll
          for (int j = 0; j < kLaneDims; ++j) {
            const int64_t d = d0 + lane + 32 * j;
            if (d < D) dq[j] += ds * LoadF(a.k, krow + d, kDt);
          }
          if (d0 == 0 && acc != nullptr && lane == 0) acc[roff] += ds;
        });
        const float out_scale = fused ? a.scale : 1.0f;
#pragma unroll
        for (int j = 0; j < kLaneDims; ++j) {
          const int64_t d = d0 + lane + 32 * j;
          if (d < D) StoreF(a.dq, qrow + d, dq[j] * out_scale, kDt);
        }
      }
    }
    if (a.partial != nullptr && a.smem_partial) {
      __syncthreads();
      for (int64_t r = threadIdx.x; r < RR; r += kThreads) {
        float sum = 0.0f;
        for (int i = 0; i < kWarps; ++i) sum += shared_partial[i * RR + r];
        a.partial[(h * a.chunks + ch) * RR + r] = sum;
      }
      __syncthreads();
    }
  }
}

// drpb[h, r] = sum over the head's partial rows, in order.
__global__ void DrpbReduceKernel(const float* partial, int64_t heads, int64_t rows_per_head,
                                 int64_t rr, float* drpb) {
  const int64_t n = heads * rr;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t h = i / rr, r = i % rr;
    const float* src = partial + h * rows_per_head * rr + r;
    float sum = 0.0f;
    for (int64_t j = 0; j < rows_per_head; ++j) sum += src[j * rr];
    drpb[i] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Key-major backward: one warp per (batch, key token, kv head) sums over the queries (and
// the query heads of its group) whose windows hold the key.
//   kKeyFused: out1 = dk = scale sum ds q, out2 = dv = sum p dout
//   kKeyQK:    out1 = dk = sum dattn q
//   kKeyAV:    out1 = dv = sum attn dout        (x is dout)

enum KeyMode : int { kKeyFused = 0, kKeyQK = 1, kKeyAV = 2 };

struct KeyArgs {
  NaDims s;
  int dt, adt, mode;
  const void *x, *dout, *k, *v, *attn;  // x: q (fused, qk) or dout (av)
  const float *rpb, *lse, *delta;
  float scale;
  void *out1, *out2;
};

// Mode and dtype are template parameters: the unfused modes carry none of the fused mode's
// state, and loads need no per-element dtype switch. With the fused mode's k and v rows in
// shared memory (read once per query, conflict-free), every mode fits kMinBlocks' cap.
template <int kMode, int kDt>
__global__ void __launch_bounds__(kThreads, kMinBlocks) KeyMajorKernel(KeyArgs a) {
  constexpr bool fused = kMode == kKeyFused;
  __shared__ float kv_rows[fused ? kWarps * 2 * kPassDims : 1];
  const NaDims& s = a.s;
  const int lane = threadIdx.x & 31;
  float* kr = kv_rows + (threadIdx.x >> 5) * 2 * kPassDims + lane;  // the warp's k row
  float* vr = kr + kPassDims;                                        // and its v row
  const int64_t D = s.dim, H = s.heads, N = s.tokens, KK = s.window, G = s.group;
  const int64_t total = s.batch * N * s.kv_heads;
  for (int64_t ki = GridWarp(); ki < total; ki += GridWarps()) {
    const int64_t hk = ki % s.kv_heads, b = ki / s.kv_heads / N, t = (ki / s.kv_heads) % N;
    const int64_t krow = ki * D;
    const Coord3 kp = TokenCoord(s, t);
    // Per axis: the key's dilation group, its group coordinate and the group's length, and the
    // group coordinates [lo, hi] of the candidate queries (all in the key's group).
    int64_t grp[3], kg[3], lg[3], lo[3], hi[3];
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      grp[ax] = kp.i[ax] % s.dilation[ax];
      kg[ax] = kp.i[ax] / s.dilation[ax];
      lg[ax] = GroupLength(s.length[ax], s.dilation[ax], grp[ax]);
      InverseRange(s, ax, kp.i[ax], &lo[ax], &hi[ax]);
    }
    if (fused) {
      __syncwarp();  // the previous key's rows are consumed
      LoadLaneRow<32>(a.k, krow, D, kDt, lane, kr);
      LoadLaneRow<32>(a.v, krow, D, kDt, lane, vr);
    }
    for (int64_t d0 = 0; d0 < D || d0 == 0; d0 += kPassDims) {
      float acc1[kLaneDims], acc2[kLaneDims];
#pragma unroll
      for (int j = 0; j < kLaneDims; ++j) acc1[j] = acc2[j] = 0.0f;
      // Query row, window slot and rpb offset are built up axis by axis, as in ForEachSlot.
      for (int64_t ig0 = lo[0]; ig0 <= hi[0]; ++ig0) {
        int64_t rpb0;
        const int64_t n0 = GroupSlot(s, 0, ig0, kg[0], lg[0], &rpb0);
        if (n0 < 0) continue;
        const int64_t i0 = grp[0] + ig0 * s.dilation[0];
        const int64_t r0 = (rpb0 + n0) * s.rpb_extent[1];
        for (int64_t ig1 = lo[1]; ig1 <= hi[1]; ++ig1) {
          const int64_t n1 = GroupSlot(s, 1, ig1, kg[1], lg[1], &rpb0);
          if (n1 < 0) continue;
          const int64_t i1 = grp[1] + ig1 * s.dilation[1];
          // (batch, token) row of the query at i2 = grp[2] + ig2 * dilation: row01 + ig2 * dilation
          const int64_t row01 = b * N + (i0 * s.length[1] + i1) * s.length[2] + grp[2];
          const int64_t slot01 = (n0 * s.kernel[1] + n1) * s.kernel[2];
          const int64_t r01 = (r0 + rpb0 + n1) * s.rpb_extent[2];
          for (int64_t ig2 = lo[2]; ig2 <= hi[2]; ++ig2) {
            const int64_t n2 = GroupSlot(s, 2, ig2, kg[2], lg[2], &rpb0);
            if (n2 < 0) continue;
            const int64_t qrow_bt = row01 + ig2 * s.dilation[2];
            const int64_t slot = slot01 + n2;
            const int64_t roff = r01 + rpb0 + n2;
            for (int64_t gh = 0; gh < G; ++gh) {
              const int64_t h = hk * G + gh, qi = qrow_bt * H + h, qrow = qi * D;
              float w1, w2 = 0.0f;
              if (fused) {
                const float kd = WarpSum(LaneDot<32>(kr, a.k, krow, a.x, qrow, D, kDt, lane));
                const float vd = WarpSum(LaneDot<32>(vr, a.v, krow, a.dout, qrow, D, kDt, lane));
                float xl = kd * a.scale;
                if (a.rpb != nullptr) xl += a.rpb[h * s.rpb_size + roff];
                w2 = expf(xl - a.lse[qi]);
                w1 = w2 * (vd - a.delta[qi]) * a.scale;
              } else {
                w1 = LoadF(a.attn, qi * KK + slot, a.adt);
              }
#pragma unroll
              for (int j = 0; j < kLaneDims; ++j) {
                const int64_t d = d0 + lane + 32 * j;
                if (d < D) {
                  acc1[j] += w1 * LoadF(a.x, qrow + d, kDt);
                  if (fused) acc2[j] += w2 * LoadF(a.dout, qrow + d, kDt);
                }
              }
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kLaneDims; ++j) {
        const int64_t d = d0 + lane + 32 * j;
        if (d < D) {
          StoreF(a.out1, krow + d, acc1[j], kDt);
          if (fused) StoreF(a.out2, krow + d, acc2[j], kDt);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Unfused query-major kernels. Slot n of a row is written by lane n % 32 (the masked-slot
// fill too), so no two lanes ever write one element.

__global__ void __launch_bounds__(kThreads, kMinBlocks)
    QKKernel(NaDims s, int dt, const void* q, const void* k, const float* rpb, void* attn) {
  const int lane = threadIdx.x & 31;
  const int64_t D = s.dim, H = s.heads, N = s.tokens, KK = s.window;
  const int64_t total = s.batch * N * H;
  for (int64_t qi = GridWarp(); qi < total; qi += GridWarps()) {
    const int64_t h = qi % H, b = qi / H / N, t = (qi / H) % N, hk = h / s.group;
    AxisWindow w[3];
    QueryWindows(s, t, w);
    const int64_t qrow = qi * D, arow = qi * KK;
    if (w[0].count * w[1].count * w[2].count < KK) {
      for (int64_t n = lane; n < KK; n += 32) StoreF(attn, arow + n, -INFINITY, dt);
    }
    float qr[kLaneDims];
    LoadLaneRow(q, qrow, D, dt, lane, qr);
    const float* rpb_h = rpb != nullptr ? rpb + h * s.rpb_size : nullptr;
    ForEachSlot(s, w, [&](int64_t slot, int64_t key, int64_t roff) {
      float x = WarpSum(LaneDot(qr, q, qrow, k, KeyRow(s, b, key, hk), D, dt, lane));
      if (rpb_h != nullptr) x += rpb_h[roff];
      if (lane == slot % 32) StoreF(attn, arow + slot, x, dt);
    });
  }
}

__global__ void __launch_bounds__(kThreads, kMinBlocks)
    AVKernel(NaDims s, int dt, int adt, const void* attn, const void* v, void* out) {
  const int lane = threadIdx.x & 31;
  const int64_t D = s.dim, H = s.heads, N = s.tokens, KK = s.window;
  const int64_t total = s.batch * N * H;
  for (int64_t qi = GridWarp(); qi < total; qi += GridWarps()) {
    const int64_t h = qi % H, b = qi / H / N, t = (qi / H) % N, hk = h / s.group;
    AxisWindow w[3];
    QueryWindows(s, t, w);
    const int64_t orow = qi * D, arow = qi * KK;
    for (int64_t d0 = 0; d0 < D; d0 += kPassDims) {
      float acc[kLaneDims];
#pragma unroll
      for (int j = 0; j < kLaneDims; ++j) acc[j] = 0.0f;
      ForEachSlot(s, w, [&](int64_t slot, int64_t key, int64_t) {
        const float wt = LoadF(attn, arow + slot, adt);
        const int64_t vrow = KeyRow(s, b, key, hk);
#pragma unroll
        for (int j = 0; j < kLaneDims; ++j) {
          const int64_t d = d0 + lane + 32 * j;
          if (d < D) acc[j] += wt * LoadF(v, vrow + d, dt);
        }
      });
#pragma unroll
      for (int j = 0; j < kLaneDims; ++j) {
        const int64_t d = d0 + lane + 32 * j;
        if (d < D) StoreF(out, orow + d, acc[j], dt);
      }
    }
  }
}

// dattn[slot] = dout . v_slot, 0 at masked slots.
__global__ void __launch_bounds__(kThreads, kMinBlocks) AVBwdQueryKernel(NaDims s, int dt, int adt,
                                                             const void* v, const void* dout,
                                                             void* dattn) {
  const int lane = threadIdx.x & 31;
  const int64_t D = s.dim, H = s.heads, N = s.tokens, KK = s.window;
  const int64_t total = s.batch * N * H;
  for (int64_t qi = GridWarp(); qi < total; qi += GridWarps()) {
    const int64_t h = qi % H, b = qi / H / N, t = (qi / H) % N, hk = h / s.group;
    AxisWindow w[3];
    QueryWindows(s, t, w);
    const int64_t qrow = qi * D, arow = qi * KK;
    if (w[0].count * w[1].count * w[2].count < KK) {
      for (int64_t n = lane; n < KK; n += 32) StoreF(dattn, arow + n, 0.0f, adt);
    }
    float dor[kLaneDims];
    LoadLaneRow(dout, qrow, D, dt, lane, dor);
    ForEachSlot(s, w, [&](int64_t slot, int64_t key, int64_t) {
      const float x = WarpSum(LaneDot(dor, dout, qrow, v, KeyRow(s, b, key, hk), D, dt, lane));
      if (lane == slot % 32) StoreF(dattn, arow + slot, x, adt);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// How the rpb gradient is split: chunks of rows per head, partial rows in shared memory
// when kWarps of them fit in 32 KiB, the partial buffer capped at 256 MiB.

struct DrpbPlan {
  int64_t chunks = 1, chunk_len = 1, rows_per_head = 1;
  bool smem = true;
  size_t bytes = 0;
};

DrpbPlan PlanDrpb(const NaDims& s) {
  DrpbPlan p;
  const int64_t rows = s.batch * s.tokens, rr = s.rpb_size;
  p.smem = kWarps * rr * static_cast<int64_t>(sizeof(float)) <= 32 * 1024;
  const int64_t per_chunk = p.smem ? 1 : kWarps;
  p.chunk_len = 64;
  p.chunks = rows > 0 ? (rows + p.chunk_len - 1) / p.chunk_len : 1;
  const int64_t budget = (int64_t{256} << 20) / static_cast<int64_t>(sizeof(float));
  const int64_t per_head = s.heads * per_chunk * rr;
  if (per_head > 0 && p.chunks * per_head > budget) {
    p.chunks = budget / per_head > 1 ? budget / per_head : 1;
    p.chunk_len = (rows + p.chunks - 1) / p.chunks;
    if (p.chunk_len < 1) p.chunk_len = 1;
    p.chunks = rows > 0 ? (rows + p.chunk_len - 1) / p.chunk_len : 1;
  }
  p.rows_per_head = p.chunks * per_chunk;
  p.bytes = static_cast<size_t>(s.heads * p.rows_per_head * rr) * sizeof(float);
  return p;
}

cudaError_t LaunchBwdQuery(BwdQueryArgs a, cudaStream_t stream, float* drpb) {
  const NaDims& s = a.s;
  DrpbPlan plan = PlanDrpb(s);
  if (drpb == nullptr) {
    a.partial = nullptr;
    plan.chunk_len = 64;
    plan.chunks = (s.batch * s.tokens + plan.chunk_len - 1) / plan.chunk_len;
    plan.smem = false;
  }
  a.chunks = plan.chunks;
  a.chunk_len = plan.chunk_len;
  a.smem_partial = plan.smem ? 1 : 0;
  const size_t smem = a.partial != nullptr && plan.smem
                          ? static_cast<size_t>(kWarps * s.rpb_size) * sizeof(float)
                          : 0;
  int64_t blocks = a.chunks * s.heads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (s.batch * s.tokens > 0 && s.heads > 0) {
    const int grid = static_cast<int>(blocks);
    switch (a.dt) {
      case 1: BwdQueryKernel<1><<<grid, kThreads, smem, stream>>>(a); break;
      case 2: BwdQueryKernel<2><<<grid, kThreads, smem, stream>>>(a); break;
      default: BwdQueryKernel<0><<<grid, kThreads, smem, stream>>>(a); break;
    }
  }
  if (drpb != nullptr) {
    const int64_t n = s.heads * s.rpb_size;
    int64_t rblocks = (n + 255) / 256;
    if (rblocks > kMaxBlocks) rblocks = kMaxBlocks;
    if (n > 0) {
      if (s.batch * s.tokens > 0) {
        DrpbReduceKernel<<<static_cast<int>(rblocks), 256, 0, stream>>>(
            a.partial, s.heads, plan.rows_per_head, s.rpb_size, drpb);
      } else {
        cudaMemsetAsync(drpb, 0, static_cast<size_t>(n) * sizeof(float), stream);
      }
    }
  }
  return cudaGetLastError();
}

template <int kMode>
void LaunchKeyMajorMode(const KeyArgs& a, int blocks, cudaStream_t stream) {
  switch (a.dt) {
    case 1: KeyMajorKernel<kMode, 1><<<blocks, kThreads, 0, stream>>>(a); break;
    case 2: KeyMajorKernel<kMode, 2><<<blocks, kThreads, 0, stream>>>(a); break;
    default: KeyMajorKernel<kMode, 0><<<blocks, kThreads, 0, stream>>>(a); break;
  }
}

cudaError_t LaunchKeyMajor(const KeyArgs& a, cudaStream_t stream) {
  const int64_t warps = a.s.batch * a.s.tokens * a.s.kv_heads;
  if (warps > 0) {
    const int blocks = BlocksForWarps(warps);
    switch (a.mode) {
      case kKeyFused: LaunchKeyMajorMode<kKeyFused>(a, blocks, stream); break;
      case kKeyQK: LaunchKeyMajorMode<kKeyQK>(a, blocks, stream); break;
      default: LaunchKeyMajorMode<kKeyAV>(a, blocks, stream); break;
    }
  }
  return cudaGetLastError();
}

}  // namespace

size_t DrpbScratchBytes(const NaDims& s, bool has_rpb) {
  return has_rpb ? PlanDrpb(s).bytes : 0;
}

cudaError_t LaunchNaForwardSimt(const NaDims& s, int dtype, const void* q, const void* k,
                                const void* v, const float* rpb, float scale, void* out,
                                float* lse, cudaStream_t stream) {
  const int64_t warps = s.batch * s.tokens * s.heads;
  if (warps > 0) {
    FwdSimtKernel<<<BlocksForWarps(warps), kThreads, 0, stream>>>(s, dtype, q, k, v, rpb, scale,
                                                                   out, lse);
  }
  return cudaGetLastError();
}

cudaError_t LaunchNaBackward(const NaDims& s, int dtype, const void* q, const void* k,
                             const void* v, const float* rpb, const void* dout, const float* lse,
                             const float* delta, float scale, void* dq, void* dk, void* dv,
                             float* drpb, void* scratch, cudaStream_t stream) {
  BwdQueryArgs qa{};
  qa.s = s;
  qa.dt = dtype;
  qa.adt = dtype;
  qa.mode = kFused;
  qa.q = q;
  qa.k = k;
  qa.v = v;
  qa.dout = dout;
  qa.rpb = rpb;
  qa.lse = lse;
  qa.delta = delta;
  qa.scale = scale;
  qa.dq = dq;
  qa.partial = static_cast<float*>(scratch);
  cudaError_t err = LaunchBwdQuery(qa, stream, rpb != nullptr ? drpb : nullptr);
  if (err != cudaSuccess) return err;
  KeyArgs ka{};
  ka.s = s;
  ka.dt = dtype;
  ka.adt = dtype;
  ka.mode = kKeyFused;
  ka.x = q;
  ka.dout = dout;
  ka.k = k;
  ka.v = v;
  ka.rpb = rpb;
  ka.lse = lse;
  ka.delta = delta;
  ka.scale = scale;
  ka.out1 = dk;
  ka.out2 = dv;
  return LaunchKeyMajor(ka, stream);
}

cudaError_t LaunchNaQK(const NaDims& s, int dtype, const void* q, const void* k,
                       const float* rpb, void* attn, cudaStream_t stream) {
  const int64_t warps = s.batch * s.tokens * s.heads;
  if (warps > 0) QKKernel<<<BlocksForWarps(warps), kThreads, 0, stream>>>(s, dtype, q, k, rpb, attn);
  return cudaGetLastError();
}

cudaError_t LaunchNaQKBackward(const NaDims& s, int dtype, int dattn_dtype, const void* q,
                               const void* k, const void* dattn, void* dq, void* dk,
                               float* drpb, void* scratch, cudaStream_t stream) {
  BwdQueryArgs qa{};
  qa.s = s;
  qa.dt = dtype;
  qa.adt = dattn_dtype;
  qa.mode = kQK;
  qa.q = q;
  qa.k = k;
  qa.dattn = dattn;
  qa.scale = 1.0f;
  qa.dq = dq;
  qa.partial = static_cast<float*>(scratch);
  cudaError_t err = LaunchBwdQuery(qa, stream, drpb);
  if (err != cudaSuccess) return err;
  KeyArgs ka{};
  ka.s = s;
  ka.dt = dtype;
  ka.adt = dattn_dtype;
  ka.mode = kKeyQK;
  ka.x = q;
  ka.attn = dattn;
  ka.out1 = dk;
  return LaunchKeyMajor(ka, stream);
}

cudaError_t LaunchNaAV(const NaDims& s, int dtype, int attn_dtype, const void* attn,
                       const void* v, void* out, cudaStream_t stream) {
  const int64_t warps = s.batch * s.tokens * s.heads;
  if (warps > 0 && s.dim > 0) {
    AVKernel<<<BlocksForWarps(warps), kThreads, 0, stream>>>(s, dtype, attn_dtype, attn, v, out);
  }
  return cudaGetLastError();
}

cudaError_t LaunchNaAVBackward(const NaDims& s, int dtype, int attn_dtype, const void* attn,
                               const void* v, const void* dout, void* dattn, void* dv,
                               cudaStream_t stream) {
  const int64_t warps = s.batch * s.tokens * s.heads;
  if (warps > 0) {
    AVBwdQueryKernel<<<BlocksForWarps(warps), kThreads, 0, stream>>>(s, dtype, attn_dtype, v,
                                                                      dout, dattn);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  KeyArgs ka{};
  ka.s = s;
  ka.dt = dtype;
  ka.adt = attn_dtype;
  ka.mode = kKeyAV;
  ka.x = dout;
  ka.attn = attn;
  ka.out1 = dv;
  return LaunchKeyMajor(ka, stream);
}

}  // namespace jnat::cuda
