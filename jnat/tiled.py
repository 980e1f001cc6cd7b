"""The ``"tiled"`` backend: neighborhood attention as dense matrix products over query tiles.

Pure JAX (no custom calls), so it runs on every XLA platform, TPU included. Each spatial
axis is first regrouped into its dilation groups (a dilated neighbourhood is a plain one
inside each group), then cut into tiles of queries aligned with the stride groups. Every
tile's keys and values are gathered once, as the haloed block that holds the union of its
queries' windows; logits are one batched matmul per tile, the exact NATTEN window (border
shift, stride, causal) is a mask over the block, and the output is a second matmul. Work
grows with the halo (about ``(tile + kernel - 1) / kernel`` per axis over the windows
alone) but runs at the matmul rate, where a per-query gather runs at the memory rate.

All index math comes from ``reference.axis_windows``, so the tiles cannot drift from the
reference's semantics.
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

# Queries per tile along each axis (in dilation-group coordinates), by rank.
TILE = {1: 64, 2: (8, 8), 3: (4, 4, 4)}


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
           tile: tuple[int, ...] | None = None) -> tuple[AxisTiling, ...]:
  """Per-axis tilings of a query grid (cached: the tables are built in NumPy)."""
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


def key_token_index(tilings):
  """int32 ``[units, W]``: the key token (row-major over the spatial axes) in each slot of
  each tile's block, so that a block is also a gather of key rows. Slots past the keys (the
  padding of ``key_blocks``) hold the nearest token: no query sees them (``tile_mask``)."""
  coords = []
  for t in tilings:
    unit = np.arange(t.units)[:, None]
    in_group = unit % t.tiles * t.tile + t.halo_offset + np.arange(t.halo)
    coords.append(np.clip(in_group * t.dilation + unit // t.tiles, 0, t.length - 1))
  strides = np.cumprod([1] + [t.length for t in tilings[:0:-1]])[::-1]
  parts = _per_unit([(c * s)[:, None, :] for c, s in zip(coords, strides)])
  units, _, halo = _tile_dims(tilings)
  return functools.reduce(np.add, parts).reshape(units, halo).astype(np.int32)


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


def _add_unit_bias_grad(drpb, dbias, index):
  """Transpose of ``_unit_bias``: ``dbias [U, H, T, W]`` added into ``drpb [R, H]``."""
  rows = jnp.moveaxis(dbias, 1, -1).reshape(-1, drpb.shape[1])
  return drpb.at[index.reshape(-1)].add(rows)


# --- Attention inside the tiles: custom VJP that recomputes the weights from the lse. ---

def _logits(q, k, mask, bias, scale):
  """q ``[U, B, H, T, D]``, k ``[U, B, H, W, D]``, mask ``[U, 1, T, W]``, bias ``[U, H, T, W]``
  or None -> masked logits ``[U, B, H, T, W]`` in the accumulation dtype."""
  s = einsum("ubhtd,ubhwd->ubhtw", q, k, preferred_element_type=acc_dtype(q)) * scale
  if bias is not None:
    s = s + bias[:, None]
  return jnp.where(mask[:, None], s, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class GatheredBlocks:
  """Blocks gathered from the keys' rows one chunk of units at a time, inside the loop, and
  their gradients scattered back: the haloed blocks (about ``prod(W / T)`` times the keys)
  never exist for all units at once. On CPU the gather runs at the speed of a copy, where
  the slices and concatenations of ``key_blocks`` ran 4x slower, and their transposes
  needed block-sized arrays outside the loop. Only the token axis is indexed: batch and
  heads are whole slices, which partitioners keep sharded (rows indexed across them made
  the partitioner gather whole arrays)."""

  # [B, U, W, H, D] (what indexing the token axis gives) <-> [U, B, H, W, D] (the tiles').
  _TO_BLOCKS = (1, 0, 3, 2, 4)

  @staticmethod
  def _tokens(x):
    """``[B, *spatial, H, D]`` -> ``[B, N, H, D]``."""
    return x.reshape(x.shape[0], -1, *x.shape[-2:])

  def of(self, x, token_index):
    """The blocks ``[U, B, H, W, D]`` of keys ``x [B, *spatial, H, D]``."""
    rows = self._tokens(x).at[:, token_index].get(mode="promise_in_bounds")
    return jnp.transpose(rows, self._TO_BLOCKS)

  def add_grad(self, acc, token_index, grad):
    """``acc [B, *spatial, H, D]`` plus the blocks' gradient added into their key rows."""
    grad = jnp.transpose(grad, self._TO_BLOCKS).astype(acc.dtype)  # a self-inverse swap
    return self._tokens(acc).at[:, token_index].add(grad, mode="promise_in_bounds").reshape(
        acc.shape)


@dataclasses.dataclass(frozen=True)
class CutBlocks:
  """Every unit's block at once, cut from the keys (``key_blocks``): the accelerators' way,
  one batch of units, where a chunk loop would be many small kernels per iteration."""

  tilings: tuple[AxisTiling, ...]

  def of(self, x, token_index):
    del token_index
    return key_blocks(x, self.tilings)

  def add_grad(self, acc, token_index, grad):
    del token_index
    (grad,) = jax.linear_transpose(lambda x: key_blocks(x, self.tilings), acc)(
        grad.astype(acc.dtype))
    return acc + grad


def _forward_units(carry, q, mask, rpb_index, token_index, k, v, rpb_table, *, scale, blocks):
  k, v = blocks.of(k, token_index), blocks.of(v, token_index)
  bias = None if rpb_table is None else _unit_bias(rpb_table, rpb_index)
  s = _logits(q, k, mask, bias, scale)
  # A window whose every logit is -inf (an rpb of -inf) gives output 0 and lse -inf.
  peak = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(peak), peak, 0.0))
  total = jnp.sum(p, axis=-1, keepdims=True)
  out = einsum("ubhtw,ubhwd->ubhtd", p.astype(v.dtype), v, preferred_element_type=acc_dtype(q))
  some = total > 0
  out = out / jnp.where(some, total, 1.0)
  lse = jnp.where(some, peak + jnp.log(jnp.where(some, total, 1.0)), -jnp.inf)
  return carry, (out.astype(q.dtype), lse[..., 0])


def _backward_units(carry, q, q_t, mask, rpb_index, token_index, out, lse, dout, dout_t, dlse,
                    k, v, rpb_table, *, scale, blocks):
  """q_t, dout_t: q and dout with T and D swapped, made outside the loop. The key-side
  gradients are ``x^T ds`` products; with x^T at hand they are plain ``[D, T] x [T, W]``
  matmuls, which XLA's CPU backend runs about 1.5x faster than the same product with a
  transposed operand (a transpose made in the loop folds back into the product)."""
  drpb, dk, dv = carry
  acc = acc_dtype(q)
  k_blocks, v_blocks = blocks.of(k, token_index), blocks.of(v, token_index)
  bias = None if rpb_table is None else _unit_bias(rpb_table, rpb_index)
  s = _logits(q, k_blocks, mask, bias, scale)
  finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # fully masked rows: p = 0
  p = jnp.exp(s - finite_lse[..., None])
  dp = einsum("ubhtd,ubhwd->ubhtw", dout, v_blocks, preferred_element_type=acc)
  ds = p * (dp - softmax_delta(dout, out, dlse)[..., None])
  ds_low = ds.astype(q.dtype)
  dq = einsum("ubhtw,ubhwd->ubhtd", ds_low, k_blocks, preferred_element_type=acc) * scale
  dv_t = einsum("ubhdt,ubhtw->ubhdw", dout_t, p.astype(dout.dtype), preferred_element_type=acc)
  dk_t = einsum("ubhdt,ubhtw->ubhdw", q_t, ds_low, preferred_element_type=acc) * scale
  # Else XLA folds the transposes below into the products, back to the slow form.
  dk_t, dv_t = jax.lax.optimization_barrier((dk_t, dv_t))
  dk = blocks.add_grad(dk, token_index, jnp.swapaxes(dk_t, -1, -2))
  dv = blocks.add_grad(dv, token_index, jnp.swapaxes(dv_t, -1, -2))
  if rpb_table is not None:
    drpb = _add_unit_bias_grad(drpb, jnp.sum(ds, axis=1), rpb_index)
  return (drpb, dk, dv), dq.astype(q.dtype)


def _scan_units(fn, chunk, per_unit, shared, carry=None):
  """``fn(carry, *per_unit_chunk, *shared) -> (carry, outputs)`` over chunks of ``chunk``
  units (axis 0 of every ``per_unit`` array; ``chunk`` divides them), one chunk at a time so
  that the per-tile intermediates stay small: per-unit outputs re-joined, the carry threaded
  through the chunks."""
  units = per_unit[0].shape[0]
  if chunk >= units:
    return fn(carry, *per_unit, *shared)
  split = lambda x: None if x is None else x.reshape(units // chunk, chunk, *x.shape[1:])
  carry, outs = jax.lax.scan(lambda c, xs: fn(c, *xs, *shared), carry,
                             [split(x) for x in per_unit])
  return carry, jax.tree.map(lambda y: y.reshape(units, *y.shape[2:]), outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def attend_units(q, k, v, mask, rpb_table, rpb_index, token_index, scale, chunk, blocks):
  """Softmax attention of every tile's queries over its block: ``(out, lse)``.

  q ``[U, B, H, T, D]``; k, v ``[B, *spatial, H, D]``; mask ``[U, 1, T, W]``; rpb_table
  ``[R, H]`` (rpb with its positions flattened, heads last) and rpb_index ``[U, T, W]``
  (``tile_rpb_index``), or both None; token_index ``[U, W]`` (``key_token_index``); out like
  q; lse ``[U, B, H, T]`` in the accumulation dtype. Runs ``chunk`` units at a time, their
  key blocks made by ``blocks`` (``GatheredBlocks`` or ``CutBlocks``).
  """
  forward = functools.partial(_forward_units, scale=scale, blocks=blocks)
  return _scan_units(forward, chunk, (q, mask, rpb_index, token_index), (k, v, rpb_table))[1]


def _attend_fwd(q, k, v, mask, rpb_table, rpb_index, token_index, scale, chunk, blocks):
  out, lse = attend_units(q, k, v, mask, rpb_table, rpb_index, token_index, scale, chunk,
                          blocks)
  return (out, lse), (q, k, v, mask, rpb_table, rpb_index, token_index, out, lse)


def _attend_bwd(scale, chunk, blocks, residuals, cotangents):
  q, k, v, mask, rpb_table, rpb_index, token_index, out, lse = residuals
  dout, dlse = cotangents
  backward = functools.partial(_backward_units, scale=scale, blocks=blocks)
  acc = acc_dtype(q)
  carry = (None if rpb_table is None else jnp.zeros_like(rpb_table),
           jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
  t = lambda x: jnp.swapaxes(x, -1, -2)
  (drpb, dk, dv), dq = _scan_units(
      backward, chunk, (q, t(q), mask, rpb_index, token_index, out, lse, dout, t(dout), dlse),
      (k, v, rpb_table), carry)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, drpb, None, None


attend_units.defvjp(_attend_fwd, _attend_bwd)

# Logit elements per chunk of units (each a float32 or wider), per lowering platform. On CPU
# a chunk that stays in cache is fastest; on an accelerator each chunk is a loop iteration
# of many small kernels, so chunks there only bound memory (1 GiB of logits per array).
CHUNK_ELEMENTS = {"cpu": 1 << 20, "accelerator": 1 << 28}


def _chunk_size(units, unit_elements, elements):
  """The largest divisor of ``units`` that keeps a chunk within ``elements``."""
  most = max(1, elements // unit_elements)
  return max(c for c in range(1, min(units, most) + 1) if units % c == 0)


def _attend(query, key, value, rpb, *, nbhd, scale, tile, kv_sharded):
  tilings = tiling(tuple(query.shape[1:1 + nbhd.rank]), nbhd, tile)
  key, value = (spread_heads(x, query.shape[-2], kv_sharded) for x in (key, value))
  q = query_tiles(query, tilings)
  units, b, heads, t, dim = q.shape
  rpb_table = rpb_index = None
  if rpb is not None:
    rpb_table = rpb.astype(acc_dtype(query)).reshape(heads, -1).T
    rpb_index = tile_rpb_index(tilings, rpb.shape)
  unit_elements = b * heads * t * math.prod(a.halo for a in tilings)
  args = (q, key, value, tile_mask(tilings), rpb_table, rpb_index, key_token_index(tilings))
  cpu_chunk = _chunk_size(units, unit_elements, CHUNK_ELEMENTS["cpu"])
  accelerator_chunk = _chunk_size(units, unit_elements, CHUNK_ELEMENTS["accelerator"])

  run = lambda chunk, blocks: lambda *a: attend_units(*a, scale, chunk, blocks)
  cpu = run(cpu_chunk, GatheredBlocks())
  # Cut blocks need every unit in one batch; beyond that, chunks gather their blocks.
  accelerator = run(accelerator_chunk, CutBlocks(tilings) if accelerator_chunk == units
                    else GatheredBlocks())
  out, lse = jax.lax.platform_dependent(*args, cpu=cpu, default=accelerator)
  return untile_queries(out, tilings), untile_queries(lse, tilings)


def na_forward(query, key, value, nbhd: Neighborhood, scale: float, rpb=None, tile=None):
  """Fused neighborhood attention: ``(out, lse)``; natural-log lse in the accumulation dtype.

  ``tile``: queries per tile along each axis (default ``TILE[rank]``). Matmuls run at full
  precision (never TF32 or single-pass bfloat16 for float32 inputs), as the reference's do.
  """
  attend = functools.partial(_attend, nbhd=nbhd, scale=scale, tile=tile)
  return per_head_layout(attend, query, key, fused_out_specs)(query, key, value, rpb)


# The unfused halves return per-window tensors, which is the reference's layout already.
na_qk = reference.na_qk
na_av = reference.na_av
