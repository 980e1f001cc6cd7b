"""The ``"tiled"`` backend: neighborhood attention as dense matrix products over query tiles.

Pure JAX (no custom calls), so it runs on every XLA platform, TPU included. Each spatial
axis is seen in its dilation groups (a dilated neighbourhood is a plain one inside each
group) and cut into tiles of queries aligned with the stride groups. Every tile's keys and
values are taken once, as the haloed block that holds the union of its queries' windows;
logits are one batched matmul per tile, the exact NATTEN window (border shift, stride,
causal) is a mask over the block, and the output is a second matmul. Work grows with the
halo (about ``(tile + kernel - 1) / kernel`` per axis over the windows alone) but runs at
the matmul rate, where a per-query gather runs at the memory rate.

Tiles run in chunks: on CPU, cache-sized chunks in a loop, each gathering its query tiles
and key blocks from the tokens (``GatherLayout``), in 1D and 2D a tile in two halves along its
first axis, each over only the keys its windows reach (``KeySplit``); on accelerators, all at
once, cut by reshapes and slices (``CutLayout``). On CPU every product runs on all of XLA's
threads: the forward without gradients as one library fusion of each chunk's products and
softmax (``_fused_softmax_attention``), training's products each with an identity reduction
(``_on_all_threads``). All index math comes from
``reference.axis_windows``, so the tiles cannot drift from the reference's semantics.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jnat import reference
from jnat.reference import (acc_dtype, einsum, fused_out_specs, per_head_layout,
                             softmax_delta, spread_heads)
from jnat._checks import Neighborhood
from jnat.cpu_info import usable_cores

# Queries per tile along each axis (in dilation-group coordinates), by rank.
TILE = {1: 64, 2: (8, 8), 3: (4, 4, 4)}


def default_tile(nbhd: Neighborhood, threaded: bool) -> tuple[int, ...] | int:
  """``TILE[rank]``, except in 2D on CPU with several threads and a kernel of 11 or more
  along the first axis: tiles of 16 x 8. Their products have twice the rows, which XLA's
  threads split better, for a quarter more work per query (each half of a tile runs over
  20 x 20 keys instead of 16 x 20 with K13). On two cores, forward+backward: 0.87-0.96x the
  time of 8 x 8 with K13 (128²), 0.93x with K11, but 1.09x with K9 and 1.07-1.18x with K7
  (64² and 56²); on one core 1.09-1.14x with K11 and K13."""
  if nbhd.rank == 2 and threaded and nbhd.kernel_size[0] >= 11:
    return (16, 8)
  return TILE[nbhd.rank]


@dataclasses.dataclass(frozen=True, eq=False)
class AxisTiling:
  """How one spatial axis is cut into tiles: static tables, built once per shape.

  Along an axis, a *unit* is one tile of one dilation group; units are ordered
  group-major (``unit = group * tiles + tile``).
  """

  length: int        # spatial size L
  dilation: int      # number of dilation groups d
  group_length: int  # ceil(L / d): the longest group, every group is padded to it
  tile: int          # queries per tile T
  tiles: int         # tiles per group
  halo: int          # keys per tile's block W
  halo_offset: int   # tile t's block starts at group position t * T + halo_offset
  mask: np.ndarray        # bool [units, T, W]: key in the query's window (and causally visible)
  rpb_index: np.ndarray   # int32 [units, T, W]: the rpb entry of each visible key, else -1

  @property
  def units(self) -> int:
    return self.dilation * self.tiles


def _tile_size(wanted: int, stride: int, group_length: int) -> int:
  """A multiple of the stride (whole stride groups share a window), at most one group."""
  tile = stride * max(1, wanted // stride)
  return min(tile, group_length)


def _axis_tiling(length, kernel, stride, dilation, causal, wanted_tile) -> AxisTiling:
  keys, valid, rpb_index = reference.axis_windows(length, kernel, stride, dilation, causal)
  group_length = -(-length // dilation)
  tile = _tile_size(wanted_tile, stride, group_length)
  tiles = -(-group_length // tile)
  groups = np.arange(dilation)[:, None]
  # Query position of each (group, tile slot). Padded slots (past their group's end) repeat
  # the group's last query but see no key: their outputs are dropped.
  in_group = np.arange(tiles * tile)[None, :]
  group_sizes = (length - groups + dilation - 1) // dilation
  query = np.minimum(in_group, group_sizes - 1) * dilation + groups  # [d, tiles*T]
  key_in_group = (keys[query] - groups[..., None]) // dilation      # [d, tiles*T, K]
  visible = valid[query] & (in_group < group_sizes)[..., None]
  per_tile = lambda x: x.reshape(dilation, tiles, tile * kernel)
  lo = np.where(per_tile(visible), per_tile(key_in_group), group_length).min(axis=(0, 2))
  hi = np.where(per_tile(visible), per_tile(key_in_group), -1).max(axis=(0, 2)) + 1
  # Blocks at a uniform offset from their tiles (so they are slices of the keys, cheap to
  # transpose), as wide as the widest union: usually tile + kernel - 1.
  first = np.arange(tiles) * tile
  offset = int((lo - first).min())
  halo = int((hi - first).max()) - offset
  start = first + offset

  units = dilation * tiles
  slot = key_in_group.reshape(units, tile, kernel) - np.tile(start, dilation)[:, None, None]
  visible = visible.reshape(units, tile, kernel)
  u, t, k = np.nonzero(visible)
  mask = np.zeros((units, tile, halo), bool)
  mask[u, t, slot[u, t, k]] = True
  block_rpb_index = np.full((units, tile, halo), -1, np.int32)
  block_rpb_index[u, t, slot[u, t, k]] = rpb_index[query.reshape(units, tile)[u, t], k]
  return AxisTiling(length, dilation, group_length, tile, tiles, halo, offset, mask,
                    block_rpb_index)


@functools.lru_cache(maxsize=256)
def tiling(spatial: tuple[int, ...], nbhd: Neighborhood,
           tile: tuple[int, ...] | int | None = None) -> tuple[AxisTiling, ...]:
  """Per-axis tilings of a query grid (cached: the tables are built in NumPy); ``tile``
  defaults to ``TILE[rank]``."""
  tile = tile or TILE[nbhd.rank]
  tile = (tile,) * nbhd.rank if isinstance(tile, int) else tile
  return tuple(_axis_tiling(*args) for args in zip(
      spatial, nbhd.kernel_size, nbhd.stride, nbhd.dilation, nbhd.is_causal, tile))


# --- Layout changes: [B, *spatial, H, D] <-> [units, B, H, T or W (over all axes), D]. ---

def _group_axes(x, tilings, pads):
  """Spatial axis ``a`` -> one axis ``[d * (left + group_length + right)]``, group-major,
  each dilation group padded by ``pads[a] = (left, right)`` zeros."""
  for a, t in enumerate(tilings):
    axis = 1 + a
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, t.dilation * t.group_length - t.length)
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], t.group_length, t.dilation, *x.shape[axis + 1:])
    x = jnp.swapaxes(x, axis, axis + 1)
    pad[axis] = pads[a]
    pad.insert(axis, (0, 0))
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
  return x


def _merge_units(x, rank):
  """``[B, u0, s0, u1, s1, ..., H, D]`` -> ``[u0*u1*.., B, H, s0*s1*.., D]``."""
  b, *mid, h, d = x.shape
  units = [1 + 2 * a for a in range(rank)]
  slots = [2 + 2 * a for a in range(rank)]
  x = x.transpose(units + [0, 1 + 2 * rank] + slots + [2 + 2 * rank])
  return x.reshape(math.prod(mid[0::2]), b, h, math.prod(mid[1::2]), d)


def query_tiles(x, tilings):
  """``[B, *spatial, H, D]`` -> ``[units, B, H, T, D]``."""
  x = _group_axes(x, tilings, [(0, t.tiles * t.tile - t.group_length) for t in tilings])
  for a, t in enumerate(tilings):
    axis = 1 + 2 * a
    x = x.reshape(*x.shape[:axis], t.units, t.tile, *x.shape[axis + 1:])
  return _merge_units(x, len(tilings))


def key_blocks(x, tilings):
  """``[B, *spatial, Hkv, D]`` -> every tile's haloed block ``[units, B, Hkv, W, D]``.

  Per axis, the keys are cut into tile-sized pieces and block ``t`` joins pieces
  ``t .. t + parts - 1``: slices and a concatenation, whose transposes are pads and adds.
  """
  parts = [-(-t.halo // t.tile) for t in tilings]
  x = _group_axes(x, tilings, [
      (-t.halo_offset, (t.tiles + n - 1) * t.tile + t.halo_offset - t.group_length)
      for t, n in zip(tilings, parts)])
  for a, (t, n) in enumerate(zip(tilings, parts)):
    axis = 1 + 2 * a
    x = x.reshape(*x.shape[:axis], t.dilation, t.tiles + n - 1, t.tile, *x.shape[axis + 1:])
    x = jnp.concatenate([jax.lax.slice_in_dim(x, j, j + t.tiles, axis=axis + 1)
                         for j in range(n)], axis=axis + 2)
    x = jax.lax.slice_in_dim(x, 0, t.halo, axis=axis + 2)
    x = x.reshape(*x.shape[:axis], t.units, t.halo, *x.shape[axis + 3:])
  return _merge_units(x, len(tilings))


def _token_table(tilings, slots):
  """Tokens (row-major over the spatial axes) at group positions ``slots[a] [units_a, S_a]``
  relative to each tile's first query, per axis -> int32 ``[units, S]``, with the tokens
  past an axis' end or its dilation group's end set to the number of tokens."""
  coords, real = [], []
  for t, s in zip(tilings, slots):
    unit = np.arange(t.units)[:, None]
    group, in_group = unit // t.tiles, unit % t.tiles * t.tile + s
    coord = in_group * t.dilation + group
    real.append((in_group >= 0) & (coord < t.length))
    coords.append(np.clip(coord, 0, t.length - 1))
  strides = np.cumprod([1] + [t.length for t in tilings[:0:-1]])[::-1]
  token = functools.reduce(np.add, _per_unit([(c * s)[:, None] for c, s in zip(coords, strides)]))
  real = functools.reduce(np.logical_and, _per_unit([r[:, None] for r in real]))
  units, _, _ = _tile_dims(tilings)
  token = np.where(real, token, math.prod(t.length for t in tilings))
  return token.reshape(units, -1).astype(np.int32)


def query_token_index(tilings):
  """int32 ``[units, T]``: the query token of each tile slot (the token count for padding)."""
  return _token_table(tilings, [np.arange(t.tile) for t in tilings])


def key_token_index(tilings):
  """int32 ``[units, W]``: the key token in each slot of each tile's block (the token count
  for padding, which no query sees: ``tile_mask``)."""
  return _token_table(tilings, [t.halo_offset + np.arange(t.halo) for t in tilings])


def untile_queries(x, tilings):
  """Inverse of ``query_tiles``: ``[units, B, H, T, *rest]`` -> ``[B, *spatial, H, *rest]``."""
  rank = len(tilings)
  _, b, h, _, *rest = x.shape
  x = x.reshape(*[t.units for t in tilings], b, h, *[t.tile for t in tilings], *rest)
  interleaved = [i for a in range(rank) for i in (a, rank + 2 + a)]
  x = x.transpose([rank] + interleaved + [rank + 1] + list(range(2 * rank + 2, x.ndim)))
  for a, t in enumerate(tilings):
    axis = 1 + a
    x = x.reshape(*x.shape[:axis], t.dilation, t.tiles * t.tile, *x.shape[axis + 2:])
    x = jax.lax.slice_in_dim(x, 0, t.group_length, axis=axis + 1)
    x = jnp.swapaxes(x, axis, axis + 1).reshape(
        *x.shape[:axis], t.group_length * t.dilation, *x.shape[axis + 2:])
    x = jax.lax.slice_in_dim(x, 0, t.length, axis=axis)
  return x


# --- The additive bias of each tile: rpb at visible keys, -inf elsewhere. ---

def _per_unit(tables):
  """Per-axis ``[units_a, T_a, W_a, *extra_a]`` -> the outer product's index layout:
  axis ``a``'s table reshaped to broadcast in ``[u0, u1, .., T0, T1, .., W0, W1, ..]``."""
  rank = len(tables)
  out = []
  for a, table in enumerate(tables):
    shape = [1] * (3 * rank)
    for j, n in enumerate(table.shape[:3]):
      shape[j * rank + a] = n
    out.append(table.reshape(shape + list(table.shape[3:])))
  return out


def _tile_dims(tilings):
  return tuple(math.prod(getattr(t, f) for t in tilings) for f in ("units", "tile", "halo"))


# The per-unit tables below are host constants: built in the graph, they reached the chunk
# loop as computed arrays, and the CPU forward ran 1.3x (mask) to 1.8x (with rpb) slower.

def tile_mask(tilings):
  """bool ``[units, 1, T, W]``: which block keys each tile query sees."""
  visible = functools.reduce(np.logical_and, _per_unit([t.mask for t in tilings]))
  units, tile, halo = _tile_dims(tilings)
  return visible.reshape(units, 1, tile, halo)


def tile_rpb_index(tilings, rpb_shape):
  """int32 ``[units, T, W]``: each (tile query, block key) pair's entry in one head's
  flattened rpb (0 where the key is not in the query's window; the mask drops those)."""
  strides = np.cumprod((tuple(rpb_shape[2:]) + (1,))[::-1])[::-1]  # row-major, per axis
  parts = _per_unit([np.maximum(t.rpb_index, 0).astype(np.int32) * s
                     for t, s in zip(tilings, strides)])
  units, tile, halo = _tile_dims(tilings)
  return functools.reduce(np.add, parts).reshape(units, tile, halo).astype(np.int32)


def _unit_bias(rpb_table, index):
  """rpb ``[R, H]`` (positions by heads) at ``index [U, T, W]`` -> ``[U, H, T, W]``. Gathered
  per chunk of units, inside the loop: a bias materialised for all units before it ran 2-3×
  slower on CPU. Heads last: each gathered or scattered row is H contiguous values."""
  return jnp.moveaxis(jnp.take(rpb_table, index, axis=0), -1, 1)


def _drop_unit_batch(x):
  """Tiles ``[U, B, H, ...]`` -> ``[U, H, ...]`` when B is 1 (else unchanged): with a batch
  axis of 1 XLA's CPU backend copied the logits between a product and the fused softmax or
  reduction after it (``_on_all_threads``). Merging B and H instead would hide a sharded
  head axis from the partitioner."""
  return x[:, 0] if x.shape[1] == 1 else x


def _restore_unit_batch(x, batch):
  """Inverse of ``_drop_unit_batch`` for a batch of ``batch``."""
  return x[:, None] if batch == 1 else x


def _aligned(x, ndim):
  """A per-unit table ``[U, ...]`` (mask ``[U, 1, T, W]``, bias ``[U, H, T, W]``) with axes of
  1 after U, to broadcast against tiles of rank ``ndim``."""
  return x.reshape(x.shape[0], *(1,) * (ndim - x.ndim), *x.shape[1:])


def _sum_over_batch(x):
  """``x [U, B, ...]`` summed over B by halving it: XLA's CPU backend ran the reduction of
  that middle axis 10-40x slower (B = 2 with few units; B = 128)."""
  while x.shape[1] > 1:
    half = -(-x.shape[1] // 2)
    low, high = x[:, :half], x[:, half:]
    if high.shape[1] < half:  # odd: pair the middle slice with zeros
      high = jnp.pad(high, [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2))
    x = low + high
  return x[:, 0]


def _add_unit_bias_grad(drpb, ds, index):
  """Transpose of ``_unit_bias`` (summed over the batch): ``ds [U, B, H, T, W]`` added into
  ``drpb [R, H]``."""
  rows = jnp.moveaxis(_sum_over_batch(ds), 1, -1).reshape(-1, drpb.shape[1])
  return drpb.at[index.reshape(-1)].add(rows)


# --- Attention inside the tiles: custom VJP that recomputes the weights from the lse. ---

def _on_all_threads(product):
  """``product`` (a batched matmul's result) unchanged, in the form XLA's CPU backend runs on
  all its threads.

  That backend gives a lone matmul to YNNPACK, which runs a batch of small products on one
  thread; joined in one fusion by a reduction of its result, the product is spread over the
  thread pool, batch included. ``min(x, max(x))`` along axis -2 is that reduction and gives
  ``x`` back, except that a NaN spreads along that axis (a NaN query or output-gradient row
  reaches every query row of its tile, for that batch entry and head). Alone, chunks of the
  tiles' products ran 1.6-2.2x faster with it on two cores (2D 56² K7, 1D L4096 K63, 3D 16³
  K5), except the query-side products (``[T, W] x [W, D]``) of chunks of 16 tiles. Only ever
  on CPU: elsewhere it would be a wasted pass.
  """
  return jnp.minimum(product, jnp.max(product, axis=-2, keepdims=True))


def _product(spec, a, b, threaded):
  """``einsum(spec, a, b)`` accumulated in float32 or wider; ``threaded``: in the form XLA's
  CPU backend runs on all its threads (``_on_all_threads``)."""
  product = einsum(spec, a, b, preferred_element_type=acc_dtype(a))
  return _on_all_threads(product) if threaded else product


def _logits(q, k, mask, bias, scale, threaded):
  """q ``[U, B, H, T, D]``, k ``[U, B, H, W, D]`` (or without B, ``_drop_unit_batch``), mask
  ``[U, 1, T, W]``, bias ``[U, H, T, W]`` or None -> masked logits ``[U, B, H, T, W]`` in the
  accumulation dtype.

  On CPU this product with k's rows, ``[T, D] x [W, D]``, ran about 1.7x slower than a plain
  ``[T, D] x [D, W]`` one when timed alone; gathering the keys' columns (``[B, H, D, N]``
  tokens) to make it plain measured no faster over the whole attention (2D 56² K7) or up to
  1.2x slower (1D L4096 K63): XLA's gather of single columns costs what the product saves.
  """
  s = _product("...td,...wd->...tw", q, k, threaded) * scale
  if bias is not None:
    s = s + _aligned(bias, s.ndim)
  return jnp.where(_aligned(mask, s.ndim), s, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class KeySplit:
  """A tile's queries in ``parts`` runs along its first axis (contiguous, as that axis is the
  slowest in a tile), each over only the contiguous run of its block's keys that the run's
  windows reach (``width`` keys from the unit's and part's ``starts``): along the first axis
  a half of the tile needs about (T0/2 + K0 - 1) of the block's (T0 + K0 - 1) rows. The
  starts only shape the per-unit tables (``cut_tables``), so they are left out of equality."""

  parts: int
  width: int
  starts: np.ndarray = dataclasses.field(compare=False, repr=False)  # int [U, parts]

  def queries(self, x):
    """``[U, B, H, T, *rest]`` -> ``[U, B, H, parts, T / parts, *rest]``."""
    return x.reshape(*x.shape[:3], self.parts, -1, *x.shape[4:])

  def keys(self, x):
    """Keys gathered with the split table, ``[U, B, H, parts * width, D]`` -> ``[U, B, H,
    parts, width, D]``."""
    return x.reshape(*x.shape[:3], self.parts, self.width, *x.shape[4:])

  def cut_tables(self, tables):
    """The per-unit tables (mask ``[U, 1, T, W]``, rpb_index ``[U, T, W]`` or None, q_index,
    k_index ``[U, W]``) per part: ``[U, 1, parts, T / parts, width]``, ``[U, parts, T / parts,
    width]``, q_index as it is, and each part's keys in turn, ``[U, parts * width]``."""
    mask, rpb_index, q_index, k_index = tables
    slots = self.starts[:, :, None] + np.arange(self.width)  # [U, parts, width]
    per_part = lambda x: x.reshape(x.shape[0], self.parts, -1, x.shape[-1])
    cut = lambda x: np.take_along_axis(per_part(x), slots[:, :, None], axis=-1)
    mask = cut(mask[:, 0])[:, None]
    rpb_index = None if rpb_index is None else cut(rpb_index)
    k_index = np.take_along_axis(k_index, slots.reshape(len(slots), -1), axis=-1)
    return mask, rpb_index, q_index, k_index


def key_split(mask, tilings, parts=2, most=0.85):
  """The ``KeySplit`` of tiles with per-unit ``mask [U, T, W]``: the widest run of key rows,
  along the first axis, that each part's queries see; None where that is over ``most`` of
  the block's rows (or the parts do not divide the tile)."""
  t0, halo0 = tilings[0].tile, tilings[0].halo
  if t0 % parts:
    return None
  per_row = mask.shape[2] // halo0
  rows = mask.reshape(mask.shape[0], parts, -1, halo0, per_row).any(axis=(2, 4))  # [U, parts, K]
  seen = rows.any(axis=-1)
  lo = np.where(seen, rows.argmax(axis=-1), 0)
  hi = np.where(seen, halo0 - rows[..., ::-1].argmax(axis=-1), 0)
  width = int((hi - lo).max())
  if width > most * halo0:
    return None
  return KeySplit(parts, width * per_row, np.minimum(lo, halo0 - width) * per_row)


@dataclasses.dataclass(frozen=True)
class GatherLayout:
  """Tiles gathered from the tokens' rows one chunk of units at a time, inside the loop, and
  results written back by scatters: neither the query tiles nor the haloed key blocks (about
  ``prod(W / T)`` times the keys) exist for all units at once. On CPU a gather of rows runs
  at the speed of a copy, where cutting the blocks with slices and concatenations ran 4x
  slower and every layout change outside the loop was another pass over memory. Only the
  token axis is indexed (batch and heads are whole slices, which partitioners keep
  sharded); padding tokens (the token count N) are clamped when read and dropped when
  written."""

  rank: int
  split: KeySplit | None = None  # each part of a tile over its own run of the block's keys
  on_cpu: bool = True  # products and softmax in the forms XLA's CPU backend runs fast
  threaded: bool = False  # products in the form it runs on all threads (``_product``)

  def _tokens(self, x):
    """``[B, *spatial, H, *rest]`` -> ``[B, N, H, *rest]``."""
    return x.reshape(x.shape[0], -1, *x.shape[self.rank + 1:])

  @staticmethod
  def _swap(x):
    """``[B, U, S, H, *rest]`` <-> ``[U, B, H, S, *rest]``."""
    return jnp.transpose(x, (1, 0, 3, 2, *range(4, x.ndim)))

  def take(self, x, token_index):
    """``x [B, *spatial, H, *rest]`` at ``token_index [U, S]`` -> ``[U, B, H, S, *rest]``."""
    return self._swap(self._tokens(x).at[:, token_index].get(mode="clip"))

  def queries(self, x, token_index):
    x = self.take(x, token_index)
    return x if self.split is None else self.split.queries(x)

  def keys(self, x, token_index):
    x = self.take(x, token_index)
    return x if self.split is None else self.split.keys(x)

  def put_queries(self, acc, token_index, values):
    """``acc`` with the tiles' query rows set to ``values [U, B, H, T, *rest]``."""
    if self.split is not None:
      values = values.reshape(*values.shape[:3], -1, *values.shape[5:])
    rows = self._tokens(acc).at[:, token_index]
    return rows.set(self._swap(values).astype(acc.dtype), mode="drop").reshape(acc.shape)

  def add_keys(self, acc, token_index, values):
    """``acc`` plus ``values [U, B, H, W, D]`` added into the blocks' key rows."""
    if self.split is not None:
      values = values.reshape(*values.shape[:3], -1, *values.shape[5:])
    rows = self._tokens(acc).at[:, token_index]
    return rows.add(self._swap(values).astype(acc.dtype), mode="drop").reshape(acc.shape)


@dataclasses.dataclass(frozen=True)
class CutLayout:
  """Every unit's tiles at once, cut from the tokens by reshapes, slices and concatenations:
  the accelerators' way (one batch of units; a chunk loop there would be many small kernels
  per iteration). The token tables are not needed."""

  tilings: tuple[AxisTiling, ...]
  on_cpu: bool = False  # as GatherLayout's
  threaded: bool = False  # as GatherLayout's

  def queries(self, x, token_index):
    del token_index
    if x.ndim == len(self.tilings) + 2:  # no trailing D (lse)
      return query_tiles(x[..., None], self.tilings)[..., 0]
    return query_tiles(x, self.tilings)

  def keys(self, x, token_index):
    del token_index
    return key_blocks(x, self.tilings)

  def put_queries(self, acc, token_index, values):
    del token_index
    return untile_queries(values, self.tilings).astype(acc.dtype)

  def add_keys(self, acc, token_index, values):
    del token_index
    (grad,) = jax.linear_transpose(lambda x: key_blocks(x, self.tilings), acc)(
        values.astype(acc.dtype))
    return acc + grad


def _softmax_attention(q, k, v, mask, bias, scale, threaded):
  """Attention of q ``[U, B, H, T, D]`` over k, v ``[U, B, H, W, D]`` with ``_logits``' mask
  and bias: ``(out, lse)``. A window whose every logit is -inf (an rpb of -inf) gives output 0
  and lse -inf."""
  s = _logits(q, k, mask, bias, scale, threaded)
  peak = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(peak), peak, 0.0))
  total = jnp.sum(p, axis=-1, keepdims=True)
  out = _product("...tw,...wd->...td", p.astype(v.dtype), v, threaded)
  some = total > 0
  out = out / jnp.where(some, total, 1.0)
  lse = jnp.where(some, peak + jnp.log(jnp.where(some, total, 1.0)), -jnp.inf)
  return out, lse[..., 0]


def _fused_softmax_attention(q, k, v, mask, bias, scale):
  """``_softmax_attention`` in the form XLA's CPU backend runs on all its threads (CPU only).

  That backend gives a matmul to YNNPACK alone, on one thread, unless a reduction of its
  result joins it in one fusion; the whole fusion then runs on the thread pool, batch
  included. A fusion has one result and takes only ops YNNPACK prefers (none on fewer than
  4096 elements: the per-row statistics of at least 4096 rows). So the mask is an additive
  bias (a select between the product and the maximum kept them apart), the peak is clamped
  to the lowest float instead of tested for -inf (a fully masked row: p = 0, out 0, lse
  -inf), and out and lse are separate fusions, each with its own logits
  product (the barrier keeps XLA from merging the two products into one that neither
  fusion can take). Without gradients lse is usually unused and never computed.
  """
  acc = acc_dtype(q)
  additive = jnp.where(_aligned(mask, q.ndim), 0.0, -jnp.inf).astype(acc)
  if bias is not None:
    additive = additive + _aligned(bias, q.ndim)

  def logits(q, k, additive):
    s = einsum("...td,...wd->...tw", q, k, preferred_element_type=acc) * scale + additive
    return s, jnp.maximum(jnp.max(s, axis=-1, keepdims=True), jnp.finfo(acc).min)

  s, peak = logits(q, k, additive)
  p = jnp.exp(s - peak)
  # A row's largest p is 1 where any logit is finite, and every p is 0 where none is.
  out = (einsum("...tw,...wd->...td", p.astype(v.dtype), v, preferred_element_type=acc)
         / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1.0))
  s, peak = logits(*jax.lax.optimization_barrier((q, k, additive)))
  lse = peak[..., 0] + jnp.log(jnp.sum(jnp.exp(s - peak), axis=-1))
  return out, lse


def _forward_units(carry, mask, rpb_index, q_index, k_index, query, key, value, rpb_table, *,
                   scale, layout, fused):
  out_acc, lse_acc = carry
  q = _drop_unit_batch(layout.queries(query, q_index))
  k, v = (_drop_unit_batch(layout.keys(x, k_index)) for x in (key, value))
  bias = None if rpb_table is None else _unit_bias(rpb_table, rpb_index)
  if fused:
    out, lse = _fused_softmax_attention(q, k, v, mask, bias, scale)
  else:
    out, lse = _softmax_attention(q, k, v, mask, bias, scale, layout.threaded)
  batch = query.shape[0]
  return (layout.put_queries(out_acc, q_index, _restore_unit_batch(out, batch)),
          layout.put_queries(lse_acc, q_index, _restore_unit_batch(lse, batch))), None


def _transposed_product(a, b):
  """``a^T b`` over axis -2: ``[..., T, W] x [..., T, D] -> [..., W, D]``, accumulated in
  float32 or wider."""
  return einsum("...tw,...td->...wd", a, b, preferred_element_type=acc_dtype(a))


def _transposed_product_cpu(a, b, threaded):
  """``_transposed_product`` as XLA's CPU backend runs it fast: ``(b^T a)^T`` with ``b^T``
  materialised is a plain ``[D, T] x [T, W]`` matmul, about 1.5x faster there than a
  product with a transposed operand. Without the barriers XLA folds the transposes back
  into the product."""
  b_t = jax.lax.optimization_barrier(jnp.swapaxes(b, -1, -2))
  product = _product("...dt,...tw->...dw", b_t, a, threaded)
  return jnp.swapaxes(jax.lax.optimization_barrier(product), -1, -2)


def _backward_units(carry, mask, rpb_index, q_index, k_index, query, key, value, out, lse,
                    dout, dlse, rpb_table, *, scale, layout):
  drpb, dq_acc, dk_acc, dv_acc = carry
  batch = query.shape[0]
  q, do, out, lse, dlse = (_drop_unit_batch(layout.queries(x, q_index))
                           for x in (query, dout, out, lse, dlse))
  k, v = (_drop_unit_batch(layout.keys(x, k_index)) for x in (key, value))
  bias = None if rpb_table is None else _unit_bias(rpb_table, rpb_index)
  s = _logits(q, k, mask, bias, scale, layout.threaded)
  finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # fully masked rows: p = 0
  p = jnp.exp(s - finite_lse[..., None])
  dp = _product("...td,...wd->...tw", do, v, layout.threaded)
  ds = p * (dp - softmax_delta(do, out, dlse)[..., None])
  ds_low = ds.astype(q.dtype)
  dq = _product("...tw,...wd->...td", ds_low, k, layout.threaded) * scale
  product = (functools.partial(_transposed_product_cpu, threaded=layout.threaded)
             if layout.on_cpu else _transposed_product)
  with_batch = lambda x: _restore_unit_batch(x, batch)
  # dk scaled once, at the end.
  dk_acc = layout.add_keys(dk_acc, k_index, with_batch(product(ds_low, q)))
  dv_acc = layout.add_keys(dv_acc, k_index, with_batch(product(p.astype(do.dtype), do)))
  if rpb_table is not None:
    drpb = _add_unit_bias_grad(drpb, with_batch(ds), rpb_index)
  return (drpb, layout.put_queries(dq_acc, q_index, with_batch(dq)), dk_acc, dv_acc), None


def _scan_units(fn, plan, per_unit, shared, carry):
  """``fn(carry, *per_unit_chunk, *shared) -> (carry, None)`` over the first ``units`` units
  (axis 0 of every ``per_unit`` table) in chunks of ``chunk``, ``plan = (chunk, units)``
  (``chunk`` divides ``units``), one chunk at a time so that the per-tile intermediates stay
  small; returns the final carry."""
  chunk, units = plan
  per_unit = [None if x is None else x[:units] for x in per_unit]
  if chunk == units:
    return fn(carry, *per_unit, *shared)[0]
  split = lambda x: None if x is None else x.reshape(units // chunk, chunk, *x.shape[1:])
  return jax.lax.scan(lambda c, xs: fn(c, *xs, *shared), carry, [split(x) for x in per_unit])[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def attend_tiles(query, key, value, rpb_table, mask, rpb_index, q_index, k_index, scale, chunks,
                 layout):
  """Softmax attention of every tile's queries over its block: ``(out, lse)``.

  query ``[B, *spatial, H, D]``, key and value alike (heads spread); rpb_table ``[R, H]`` (rpb
  with its positions flattened, heads last) or None. Per unit: mask ``[U, 1, T, W]``,
  rpb_index ``[U, T, W]`` (``tile_rpb_index``, None without rpb), q_index ``[U, T]`` and
  k_index ``[U, W]`` (``query_token_index``, ``key_token_index``). out like the query; lse
  ``[B, *spatial, H]`` in the accumulation dtype. Runs ``chunks = (inference, training)``,
  each ``(units at a time, units)`` (``_scan_units``), their tiles made by ``layout``
  (``GatherLayout`` or ``CutLayout``). On CPU the inference forward is
  ``_fused_softmax_attention``; training keeps the separate products, as the lse it needs
  costs the fused form a second logits product.
  """
  return _attend_forward(query, key, value, rpb_table, mask, rpb_index, q_index, k_index,
                         scale=scale, plan=chunks[0], layout=layout, fused=layout.on_cpu)


def _attend_forward(query, key, value, rpb_table, mask, rpb_index, q_index, k_index, *, scale,
                    plan, layout, fused):
  forward = functools.partial(_forward_units, scale=scale, layout=layout, fused=fused)
  carry = (jnp.zeros_like(query), jnp.zeros(query.shape[:-1], acc_dtype(query)))
  return _scan_units(forward, plan, (mask, rpb_index, q_index, k_index),
                     (query, key, value, rpb_table), carry)


def _attend_fwd(query, key, value, rpb_table, mask, rpb_index, q_index, k_index, scale, chunks,
                layout):
  out, lse = _attend_forward(query, key, value, rpb_table, mask, rpb_index, q_index, k_index,
                             scale=scale, plan=chunks[1], layout=layout, fused=False)
  return (out, lse), (query, key, value, rpb_table, mask, rpb_index, q_index, k_index, out, lse)


def _attend_bwd(scale, chunks, layout, residuals, cotangents):
  query, key, value, rpb_table, mask, rpb_index, q_index, k_index, out, lse = residuals
  dout, dlse = cotangents
  backward = functools.partial(_backward_units, scale=scale, layout=layout)
  acc = acc_dtype(query)
  carry = (None if rpb_table is None else jnp.zeros_like(rpb_table), jnp.zeros_like(query),
           jnp.zeros(key.shape, acc), jnp.zeros(value.shape, acc))
  drpb, dq, dk, dv = _scan_units(backward, chunks[1], (mask, rpb_index, q_index, k_index),
                                 (query, key, value, out, lse, dout, dlse, rpb_table), carry)
  # The scale applied to dk once: per chunk, fused into the block's transposing scatter, it
  # made XLA's CPU backend run that fusion 6x slower than dv's.
  dk = dk * scale
  return dq, dk.astype(key.dtype), dv.astype(value.dtype), drpb, None, None, None, None


attend_tiles.defvjp(_attend_fwd, _attend_bwd)

# The most elements per chunk of units, per plan, counting on CPU a chunk's query, key and value
# tiles as well as its logits. On CPU with several threads each chunk's products run on all of
# them (`_on_all_threads`), which pays only for a large enough batch of tiles: on two cores
# chunks of 17 * 2^17 elements (10 units of 2D 56² K7 at B2 H4 D32, 8 of 3D 16³ K5 at B1 H4)
# took 0.84-0.99x the forward+backward time of half-size chunks with the query-side products
# (out, dq) plain, on every benchmark case; doubling the chunks alone changed nothing, threading
# those products alone at the half size made 3D 1.05x slower, and chunks twice as large again
# measured no better. With one thread the products stay plain (their reductions cost 1D L4096
# K63 and 2D 56² K7 1.1-1.2x there) and chunks stay small enough for the cache (1D L4096 K63
# at head dim 64 ran 15% faster in chunks of 4 units than of 8). On an accelerator each chunk
# is a loop iteration of many small kernels, so chunks there only bound memory (1 GiB of logits
# per array, each a float32 or wider).
CHUNK_ELEMENTS = {"cpu": 17 << 17, "cpu, one thread": 17 << 16, "accelerator": 1 << 28}

# Query rows per inference chunk on CPU: below this YNNPACK takes none of the per-row ops, and
# the fused forward (`_fused_softmax_attention`) falls apart. Inference joins the fewest
# training chunks that reach it: more ran up to 1.1x faster on two cores but 1.15x slower on
# one (1D L4096 K63, 4 chunks instead of 2). Its loop has units of its own to pad where that
# number does not divide the training chunks: when it had to (2D 64² K11, 11 chunks of 6
# units), all units ran in one step, 2.8x slower than in chunks.
FUSED_ROWS = 4096


def unit_elements(tilings, batch, heads, dim):
  """The elements of one unit that ``CHUNK_ELEMENTS`` counts, per platform."""
  _, t, w = _tile_dims(tilings)
  logits = batch * heads * t * w
  return {"cpu": logits + batch * heads * (t + 2 * w) * dim, "accelerator": logits}


def _pad_units(tables, units, tokens):
  """The per-unit tables (mask, rpb_index, q_index, k_index) padded to ``units`` units with
  units that see no key and whose results are dropped (the token count ``tokens``)."""
  pad = lambda x, fill: np.concatenate([x, np.full((units - len(x), *x.shape[1:]), fill, x.dtype)])
  fills = (False, 0, tokens, tokens)
  return tuple(None if x is None else pad(x, fill) for x, fill in zip(tables, fills))


def _attend(query, key, value, rpb, *, nbhd, scale, tile, kv_sharded):
  key, value = (spread_heads(x, query.shape[-2], kv_sharded) for x in (key, value))
  b, *spatial, heads, dim = query.shape
  rpb_table = None if rpb is None else rpb.astype(acc_dtype(query)).reshape(heads, -1).T

  def run(platform):
    """The attention on ``platform``, for chunks of at most ``CHUNK_ELEMENTS`` of its plan (or
    one unit), as even as that number of chunks allows; on CPU inference takes as few of them
    at a time as hold ``FUSED_ROWS`` query rows (``_scan_units``' plans)."""
    on_cpu = platform == "cpu"
    threaded = on_cpu and usable_cores() > 1  # the size of XLA's CPU thread pool
    tilings = tiling(tuple(spatial), nbhd, tile or default_tile(nbhd, threaded))
    units, tile_queries, _ = _tile_dims(tilings)
    rpb_index = None if rpb is None else tile_rpb_index(tilings, rpb.shape)
    tables = (tile_mask(tilings), rpb_index, query_token_index(tilings), key_token_index(tilings))
    per_unit = unit_elements(tilings, b, heads, dim)
    plan = ("cpu" if threaded else "cpu, one thread") if on_cpu else platform
    chunks = -(-units // max(1, CHUNK_ELEMENTS[plan] // per_unit[platform]))
    chunk = -(-units // chunks)
    rows = chunk * b * heads * tile_queries
    group = min(chunks, -(-FUSED_ROWS // rows)) if on_cpu else 1  # training chunks per step
    plans = ((group * chunk, -(-chunks // group) * group * chunk), (chunk, chunks * chunk))
    if chunk == units:  # one batch: cut tiles
      layout, padded = CutLayout(tilings, on_cpu, threaded), tables
    else:  # chunks gather theirs; the last chunks filled up with empty units
      # Not in 3D: on 16³ K5 the halves' forward ran 15% faster but their backward slower.
      split = key_split(tables[0][:, 0], tilings) if on_cpu and nbhd.rank < 3 else None
      layout = GatherLayout(nbhd.rank, split, on_cpu, threaded)
      padded = _pad_units(tables if split is None else split.cut_tables(tables),
                          plans[0][1], math.prod(spatial))
    return lambda *a: attend_tiles(*a, *padded, scale, plans, layout)

  # Every platform its own plan: the layouts differ at least in on_cpu.
  return jax.lax.platform_dependent(query, key, value, rpb_table, cpu=run("cpu"),
                                    default=run("accelerator"))


def na_forward(query, key, value, nbhd: Neighborhood, scale: float, rpb=None, tile=None):
  """Fused neighborhood attention: ``(out, lse)``; natural-log lse in the accumulation dtype.

  ``tile``: queries per tile along each axis (default ``default_tile``). Matmuls run at full
  precision (never TF32 or single-pass bfloat16 for float32 inputs), as the reference's do.
  """
  attend = functools.partial(_attend, nbhd=nbhd, scale=scale, tile=tile)
  return per_head_layout(attend, query, key, fused_out_specs)(query, key, value, rpb)


# The unfused halves return per-window tensors, which is the reference's layout already.
na_qk = reference.na_qk
na_av = reference.na_av
