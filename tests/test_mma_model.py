"""A lane-level NumPy model of the CUDA tensor-core kernels, runnable without a GPU.

Part 1 models `ldmatrix.m8n8` (.x1/.x2/.x4, with and without .trans) and the fragment
layouts of `mma.sync.m16n8k16` (A row-major, B column-major, fp32 C), as the PTX ISA states
them, and feeds them the address formulas of xla_ffi/cuda/na_mma.cuh and na_bwd_mma.cu
(mirrored below, same names): every product must equal a plain matrix product.

Part 2 ports the tile geometry (TileBox, ChooseQueryTile, InverseRange, GroupSlot, the
key-major query box, ForEachSlot's rpb offsets) and checks it against the reference's
neighbourhood tables (`jnat.reference.axis_windows`) on random configurations.
"""

import numpy as np
import pytest

from jnat.reference import axis_windows

WARP = 32
TILE = 64  # kTileQueries == kTileKeys
PAD = 8  # kSmemPad


# --- Part 1: fragments -----------------------------------------------------------------------

def ldmatrix(mem, addr, num, trans=False):
  """Registers [32 lanes][num] of (lo, hi) element pairs; addr[lane] is a row's first element.

  Lanes 8j..8j+7 give the rows of matrix j. Lane L receives, of matrix j, row L/4, columns
  2(L%4) and 2(L%4)+1; with .trans, column L/4, rows 2(L%4) and 2(L%4)+1.
  """
  mats = [np.stack([mem[addr[8 * j + i]:addr[8 * j + i] + 8] for i in range(8)])
          for j in range(num)]
  regs = np.zeros((WARP, num, 2), mem.dtype)
  for lane in range(WARP):
    g, t = lane // 4, lane % 4
    for j, m in enumerate(mats):
      regs[lane, j] = (m[2 * t:2 * t + 2, g] if trans else m[g, 2 * t:2 * t + 2])
  return regs


def _place(frag_pairs, positions, shape):
  out = np.full(shape, np.nan)
  for lane in range(WARP):
    for reg, pair in enumerate(frag_pairs[lane]):
      for half, (r, c) in enumerate(positions(lane, reg)):
        assert np.isnan(out[r, c]), "two lanes hold one element"
        out[r, c] = pair[half]
  assert not np.isnan(out).any(), "an element no lane holds"
  return out


def a_positions(lane, reg):  # A 16 x 16: a0..a7, two per register
  g, t = lane // 4, lane % 4
  row = g + 8 * (reg % 2)
  col = 2 * t + 8 * (reg // 2)
  return [(row, col), (row, col + 1)]


def b_positions(lane, reg):  # B 16 x 8 (k x n): b0..b3, two per register
  g, t = lane // 4, lane % 4
  return [(2 * t + 8 * reg, g), (2 * t + 8 * reg + 1, g)]


def c_positions(lane):  # C 16 x 8: c0..c3
  g, t = lane // 4, lane % 4
  return [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]


def mma(c, a, b):
  """c [32][4] += A B with A from a [32][4 regs][2], B from b [32][2 regs][2]."""
  A = _place(a, a_positions, (16, 16))
  B = _place(b, b_positions, (16, 8))
  C = A @ B
  out = c.copy()
  for lane in range(WARP):
    for i, (r, col) in enumerate(c_positions(lane)):
      out[lane, i] += C[r, col]
  return out


def c_matrix(c):
  out = np.zeros((16, 8))
  for lane in range(WARP):
    for i, (r, col) in enumerate(c_positions(lane)):
      out[r, col] = c[lane, i]
  return out


# The kernels' address formulas (element offsets into a tile with row pitch ld).

def row_fragment_addr(lane, warp, kc, ld):  # LoadRowFragments, forward Q fragments
  return (warp * 16 + lane % 16) * ld + kc * 16 + (lane // 16) * 8


def row_dots_addr(lane, p, kc, ld):  # RowDots, forward K fragments
  return (p * 16 + lane % 8 + (lane // 16) * 8) * ld + kc * 16 + ((lane // 8) % 2) * 8


def trans_rows_addr(lane, kc, dp, ld):  # AccumulatePTimesRows, forward V fragments
  return (kc * 16 + lane % 8 + ((lane // 8) % 2) * 8) * ld + dp * 16 + (lane // 16) * 8


def load_row_fragments(mem, hd, warp, ld):
  return [ldmatrix(mem, [row_fragment_addr(l, warp, kc, ld) for l in range(WARP)], 4)
          for kc in range(hd // 16)]


def row_dots(a_frags, mem, hd, ld):
  """RowDots: c[8] (n8 blocks of a 16 x 64 result) from A fragments and a 64-row tile."""
  c = [np.zeros((WARP, 4)) for _ in range(TILE // 8)]
  for kc in range(hd // 16):
    for p in range(TILE // 16):
      bf = ldmatrix(mem, [row_dots_addr(l, p, kc, ld) for l in range(WARP)], 4)
      c[2 * p] = mma(c[2 * p], a_frags[kc], bf[:, 0:2])
      c[2 * p + 1] = mma(c[2 * p + 1], a_frags[kc], bf[:, 2:4])
  return c


def accumulate_p_times_rows(acc, p, mem, hd, ld):
  """AccumulatePTimesRows: acc[HD/8] += P (C-layout blocks p[8]) times a 64-row tile."""
  acc = [x.copy() for x in acc]
  for kc in range(TILE // 16):
    # pa[0..3] = Pack(p[2kc][0,1]), Pack(p[2kc][2,3]), Pack(p[2kc+1][0,1]), Pack(p[2kc+1][2,3])
    pa = np.stack([p[2 * kc][:, 0:2], p[2 * kc][:, 2:4], p[2 * kc + 1][:, 0:2],
                   p[2 * kc + 1][:, 2:4]], axis=1)
    for dp in range(hd // 16):
      bf = ldmatrix(mem, [trans_rows_addr(l, kc, dp, ld) for l in range(WARP)], 4, trans=True)
      acc[2 * dp] = mma(acc[2 * dp], pa, bf[:, 0:2])
      acc[2 * dp + 1] = mma(acc[2 * dp + 1], pa, bf[:, 2:4])
  return acc


def _tile(rng, rows, hd):
  """A padded shared-memory tile (pitch hd + PAD) of small integers (exact in float64)."""
  ld = hd + PAD
  tile = rng.integers(-4, 5, size=(rows, ld)).astype(np.float64)
  return tile, tile.reshape(-1), ld


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_gives_each_lane_its_matrix_elements(num, trans):
  rng = np.random.default_rng(num + 10 * trans)
  mem = np.arange(4096, dtype=np.float64)
  rows = rng.choice(4096 // 8, size=WARP, replace=False) * 8  # any 8 distinct rows
  regs = ldmatrix(mem, rows, num, trans)
  for j in range(num):
    m = np.stack([mem[rows[8 * j + i]:rows[8 * j + i] + 8] for i in range(8)])
    m = m.T if trans else m
    for lane in range(WARP):
      assert list(regs[lane, j]) == [m[lane // 4, 2 * (lane % 4)], m[lane // 4, 2 * (lane % 4) + 1]]


def test_ldmatrix_x2_gives_an_mma_b_fragment():
  # The usual B load: rows 0-7 and 8-15 of a k-major 16 x 8 block, transposed.
  rng = np.random.default_rng(1)
  kn = rng.integers(-4, 5, size=(16, 8)).astype(np.float64)
  a = rng.integers(-4, 5, size=(16, 16)).astype(np.float64)
  mem = kn.reshape(-1)
  bf = ldmatrix(mem, [(l % 16) * 8 for l in range(WARP)], 2, trans=True)
  afr = np.zeros((WARP, 4, 2))
  for lane in range(WARP):
    for reg in range(4):
      afr[lane, reg] = [a[r, c] for r, c in a_positions(lane, reg)]
  assert np.array_equal(c_matrix(mma(np.zeros((WARP, 4)), afr, bf)), a @ kn)


@pytest.mark.parametrize("hd", [32, 64])
@pytest.mark.parametrize("warp", [0, 3])
def test_row_dots_is_q_times_k_transposed(hd, warp):
  rng = np.random.default_rng(hd + warp)
  q, qmem, ld = _tile(rng, TILE, hd)
  k, kmem, _ = _tile(rng, TILE, hd)
  c = row_dots(load_row_fragments(qmem, hd, warp, ld), kmem, hd, ld)
  got = np.concatenate([c_matrix(x) for x in c], axis=1)
  assert np.array_equal(got, q[warp * 16:warp * 16 + 16, :hd] @ k[:, :hd].T)


@pytest.mark.parametrize("hd", [32, 64])
def test_accumulate_p_times_rows_is_p_times_v(hd):
  rng = np.random.default_rng(hd)
  p = rng.integers(-4, 5, size=(16, TILE)).astype(np.float64)
  v, vmem, ld = _tile(rng, TILE, hd)
  # p in the C layout of row_dots' result: block nb holds columns 8 nb .. 8 nb + 7.
  blocks = []
  for nb in range(TILE // 8):
    blk = np.zeros((WARP, 4))
    for lane in range(WARP):
      blk[lane] = [p[r, 8 * nb + col] for r, col in c_positions(lane)]
    blocks.append(blk)
  acc0 = [np.zeros((WARP, 4)) for _ in range(hd // 8)]
  acc = accumulate_p_times_rows(acc0, blocks, vmem, hd, ld)
  got = np.concatenate([c_matrix(x) for x in acc], axis=1)
  assert np.array_equal(got, p @ v[:, :hd])


def test_backward_products_compose():
  # Query side: dq = dS K with dS = P * (dO V^T - delta); key side: dv = P^T dO, dk = dS^T Q,
  # each built from the same fragment routines the kernels use.
  hd, rng = 32, np.random.default_rng(7)
  q, qmem, ld = _tile(rng, TILE, hd)
  k, kmem, _ = _tile(rng, TILE, hd)
  v, vmem, _ = _tile(rng, TILE, hd)
  do, domem, _ = _tile(rng, TILE, hd)
  p = rng.integers(0, 3, size=(TILE, TILE)).astype(np.float64)  # stands for exp(S - lse)
  delta = rng.integers(-2, 3, size=TILE).astype(np.float64)
  ds = p * (do[:, :hd] @ v[:, :hd].T - delta[:, None])

  def c_blocks(m):  # a 16 x 64 matrix in the C layout
    return [np.array([[m[r, 8 * nb + col] for r, col in c_positions(l)] for l in range(WARP)])
            for nb in range(TILE // 8)]

  for warp in range(TILE // 16):
    rows = slice(warp * 16, warp * 16 + 16)
    dp = [c_matrix(x) for x in row_dots(load_row_fragments(domem, hd, warp, ld), vmem, hd, ld)]
    ds_w = p[rows] * (np.concatenate(dp, axis=1) - delta[rows, None])
    dq = accumulate_p_times_rows([np.zeros((WARP, 4))] * (hd // 8), c_blocks(ds_w), kmem, hd, ld)
    assert np.array_equal(np.concatenate([c_matrix(x) for x in dq], axis=1), ds[rows] @ k[:, :hd])
    # Key-major: this warp's 16 keys; P^T and dS^T are the same computations transposed.
    dv = accumulate_p_times_rows([np.zeros((WARP, 4))] * (hd // 8), c_blocks(p.T[rows]),
                                 domem, hd, ld)
    dk = accumulate_p_times_rows([np.zeros((WARP, 4))] * (hd // 8), c_blocks(ds.T[rows]),
                                 qmem, hd, ld)
    assert np.array_equal(np.concatenate([c_matrix(x) for x in dv], axis=1), p.T[rows] @ do[:, :hd])
    assert np.array_equal(np.concatenate([c_matrix(x) for x in dk], axis=1), ds.T[rows] @ q[:, :hd])


# --- Part 2: tile geometry -------------------------------------------------------------------

def group_length(length, dilation, group):
  return (length - group + dilation - 1) // dilation


def window_start(ig, lg, kernel, stride, causal):  # na_index.h WindowStart
  block = (ig // stride) * stride
  if causal:
    return max(min(block + stride - 1, lg - 1) - kernel + 1, 0)
  start = min(min(block + stride // 2, lg - 1) - kernel // 2, lg - kernel)
  return max(start, 0)


def window_count(ig, start, kernel, causal):
  return min(ig - start + 1, kernel) if causal else kernel


def group_slot(ig, kg, lg, kernel, stride, causal):  # GroupSlot: (slot or -1, rpb0)
  start = window_start(ig, lg, kernel, stride, causal)
  n = kg - start
  return (n if 0 <= n < window_count(ig, start, kernel, causal) else -1), start - ig + kernel - 1


def inverse_range(kp, length, kernel, stride, dilation, causal):  # InverseRange
  g, kg = kp % dilation, kp // dilation
  lg = group_length(length, dilation, g)
  reach = kernel + stride
  lo, hi = lg, -1
  for ig in range(max(kg - reach, 0), min(kg + reach, lg - 1) + 1):
    if group_slot(ig, kg, lg, kernel, stride, causal)[0] >= 0:
      lo, hi = min(lo, ig), ig
  return lo, hi


def axis_boxes(length, kernel, stride, dilation, causal, t):
  """MakeTileBox along one axis: (group, c0, n, halo lo, halo ext) for each box index."""
  per_group = -(-group_length(length, dilation, 0) // t)
  for tc in range(per_group * dilation):
    g, c0 = tc // per_group, (tc % per_group) * t
    lg = group_length(length, dilation, g)
    n = min(lg - c0, t)
    if n <= 0:
      yield g, c0, n, None, None
      continue
    starts = [window_start(c0 + j, lg, kernel, stride, causal) for j in range(n)]
    yield g, c0, n, min(starts), max(starts) + kernel - min(starts)


def key_box_queries(g, c0, n, length, kernel, stride, dilation, causal):
  """BwdMmaKeyKernel's query range: the union of the box's keys' inverse ranges."""
  first, last = None, None
  for j in range(n):
    lo, hi = inverse_range(g + (c0 + j) * dilation, length, kernel, stride, dilation, causal)
    if lo <= hi:
      first = lo if first is None else min(first, lo)
      last = hi if last is None else max(last, hi)
  return (first, last - first + 1) if first is not None else (0, 0)


def _random_axis(rng):
  dilation = int(rng.integers(1, 4))
  kernel = int(rng.integers(1, 8))
  length = int(rng.integers(kernel * dilation, kernel * dilation + 20))
  stride = int(rng.integers(1, kernel + 1))
  causal = bool(rng.integers(0, 2))
  t = int(2 ** rng.integers(0, 7))
  return length, kernel, stride, dilation, causal, t


AXIS_CONFIGS = 400


def test_tile_boxes_and_masks_match_the_reference_windows():
  rng = np.random.default_rng(0)
  for _ in range(AXIS_CONFIGS):
    length, kernel, stride, dilation, causal, t = _random_axis(rng)
    keys, valid, rpb_index = axis_windows(length, kernel, stride, dilation, causal)
    cfg = (length, kernel, stride, dilation, causal, t)
    seen = np.zeros(length, int)
    readers = {kp: set() for kp in range(length)}  # queries whose window holds kp
    for i in range(length):
      for n in range(kernel):
        if valid[i, n]:
          readers[int(keys[i, n])].add(i)
    for g, c0, n, lo, ext in axis_boxes(length, kernel, stride, dilation, causal, t):
      if n <= 0:
        continue
      lg = group_length(length, dilation, g)
      box = [g + (c0 + j) * dilation for j in range(n)]
      seen[box] += 1
      for i in box:
        ig = i // dilation
        start = window_start(ig, lg, kernel, stride, causal)
        count = window_count(ig, start, kernel, causal)
        # Query-major mask: key group coordinate kg passes iff 0 <= kg - start < count.
        in_mask = {g + kg * dilation for kg in range(lo, lo + ext) if 0 <= kg - start < count}
        assert in_mask == set(keys[i][valid[i]].tolist()), cfg
        for kp in in_mask:  # GroupSlot and the rpb index agree with the reference
          slot, rpb0 = group_slot(ig, kp // dilation, lg, kernel, stride, causal)
          assert keys[i, slot] == kp and rpb_index[i, slot] == rpb0 + slot, cfg
      # Key-major: the query range holds every reader of every key of the box.
      qlo, qext = key_box_queries(g, c0, n, length, kernel, stride, dilation, causal)
      box_readers = set().union(*(readers[kp] for kp in box))
      assert box_readers <= {g + ig * dilation for ig in range(qlo, qlo + qext)}, cfg
      for kp in box:
        lo_k, hi_k = inverse_range(kp, length, kernel, stride, dilation, causal)
        assert {g + ig * dilation for ig in range(lo_k, hi_k + 1)} == readers[kp] or (
            not readers[kp] and lo_k > hi_k), cfg
    assert (seen == 1).all(), cfg  # the boxes cover every position once


def choose_query_tile(lengths, kernels, strides, dilations):
  """ChooseQueryTile (tile_config.h): the least-work box shape, ties to more queries."""
  best, best_cost = None, None
  for t0 in (1, 2, 4, 8, 16, 32, 64):
    for t1 in (x for x in (1, 2, 4, 8, 16, 32, 64) if t0 * x <= TILE):
      for t2 in (x for x in (1, 2, 4, 8, 16, 32, 64) if t0 * t1 * x <= TILE):
        t, halo, tiles, useful = (t0, t1, t2), 1, 1, True
        for a in range(3):
          gl = -(-lengths[a] // dilations[a])
          useful &= not (t[a] > 1 and t[a] // 2 >= gl)
          halo *= min(t[a] + kernels[a] + strides[a] - 2, gl)
          tiles *= -(-gl // t[a]) * dilations[a]
        if not useful:
          continue
        cost = tiles * -(-halo // TILE)
        if best is None or cost < best_cost or (cost == best_cost and t0 * t1 * t2 > np.prod(best)):
          best, best_cost = t, cost
  return best


def test_chosen_tiles_fit_and_halos_fit_their_bound():
  rng = np.random.default_rng(1)
  for _ in range(100):
    axes = [_random_axis(rng) for _ in range(3)]
    lengths, kernels, strides, dilations = ([ax[i] for ax in axes] for i in range(4))
    t = choose_query_tile(lengths, kernels, strides, dilations)
    assert np.prod(t) <= TILE
    for a, (length, kernel, stride, dilation, causal, _) in enumerate(axes):
      for g, c0, n, lo, ext in axis_boxes(length, kernel, stride, dilation, causal, t[a]):
        if n > 0:  # the cost model's halo bound holds
          assert ext <= min(t[a] + kernel + stride - 2, group_length(length, dilation, g)) or (
              ext <= kernel), (axes, t)
          qlo, qext = key_box_queries(g, c0, n, length, kernel, stride, dilation, causal)
          assert qext <= n + 2 * (kernel + stride), (axes, t)


def test_row_major_offsets_built_axis_by_axis_match_direct_formulas():
  # ForEachSlot / KeyMajorKernel build slot, token row and rpb offset incrementally.
  rng = np.random.default_rng(2)
  for _ in range(200):
    K = rng.integers(1, 6, size=3)
    L = rng.integers(1, 9, size=3) + K
    E = 2 * K - 1
    rpb0 = rng.integers(0, K, size=3)
    n = [int(rng.integers(0, K[a])) for a in range(3)]
    p = [int(rng.integers(0, L[a])) for a in range(3)]
    r0 = (rpb0[0] + n[0]) * E[1] + rpb0[1]
    r01 = (r0 + n[1]) * E[2] + rpb0[2]
    direct = ((rpb0[0] + n[0]) * E[1] + rpb0[1] + n[1]) * E[2] + rpb0[2] + n[2]
    assert r01 + n[2] == direct
    assert ((n[0] * K[1] + n[1]) * K[2]) + n[2] == np.ravel_multi_index(n, K)
    b, N = int(rng.integers(0, 3)), int(np.prod(L))
    row01 = b * N + (p[0] * L[1] + p[1]) * L[2]
    assert row01 + p[2] == b * N + np.ravel_multi_index(p, L)
