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
import string

import jax
import jax.numpy as jnp
import numpy as np

from jnat import reference
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
  halo_index: np.ndarray  # int32 [units, W]: position in the [d, group_length] key layout
  mask: np.ndarray        # bool [units, T, W]: key in the query's window (and causally visible)
  rpb_onehot: np.ndarray  # float32 [units, T, W, 2K-1]: the rpb entry of each visible key

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
  halo = int((hi - lo).max())
  start = np.minimum(lo, group_length - halo)  # every block inside the group
  halo_index = (groups[..., None] * group_length + start[None, :, None] +
                np.arange(halo)).reshape(dilation * tiles, halo)

  units = dilation * tiles
  slot = key_in_group.reshape(units, tile, kernel) - np.tile(start, dilation)[:, None, None]
  visible = visible.reshape(units, tile, kernel)
  u, t, k = np.nonzero(visible)
  mask = np.zeros((units, tile, halo), bool)
  mask[u, t, slot[u, t, k]] = True
  rpb_onehot = np.zeros((units, tile, halo, 2 * kernel - 1), np.float32)
  rpb_onehot[u, t, slot[u, t, k], rpb_index[query.reshape(units, tile)[u, t], k]] = 1.0
  return AxisTiling(length, dilation, group_length, tile, tiles, halo,
                    halo_index.astype(np.int32), mask, rpb_onehot)


@functools.lru_cache(maxsize=256)
def tiling(spatial: tuple[int, ...], nbhd: Neighborhood,
           tile: tuple[int, ...] | None = None) -> tuple[AxisTiling, ...]:
  """Per-axis tilings of a query grid (cached: the tables are built in NumPy)."""
  tile = tile or TILE[nbhd.rank]
  tile = (tile,) * nbhd.rank if isinstance(tile, int) else tile
  return tuple(_axis_tiling(*args) for args in zip(
      spatial, nbhd.kernel_size, nbhd.stride, nbhd.dilation, nbhd.is_causal, tile))


# --- Layout changes: [B, *spatial, H, D] <-> [units, B, H, T or W (over all axes), D]. ---

def _group_axes(x, tilings, lengths):
  """Spatial axis ``a`` of length L -> one axis ``[d * lengths[a]]`` in group-major order."""
  for a, t in enumerate(tilings):
    axis = 1 + a
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, t.dilation * t.group_length - t.length)
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], t.group_length, t.dilation, *x.shape[axis + 1:])
    x = jnp.swapaxes(x, axis, axis + 1)
    pad[axis] = (0, lengths[a] - t.group_length)
    pad.insert(axis, (0, 0))
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], t.dilation * lengths[a], *x.shape[axis + 2:])
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
  x = _group_axes(x, tilings, [t.tiles * t.tile for t in tilings])
  for a, t in enumerate(tilings):
    axis = 1 + 2 * a
    x = x.reshape(*x.shape[:axis], t.units, t.tile, *x.shape[axis + 1:])
  return _merge_units(x, len(tilings))


def key_blocks(x, tilings):
  """``[B, *spatial, Hkv, D]`` -> every tile's haloed block ``[units, B, Hkv, W, D]``."""
  x = _group_axes(x, tilings, [t.group_length for t in tilings])
  for a, t in enumerate(tilings):
    x = jnp.take(x, jnp.asarray(t.halo_index), axis=1 + 2 * a)
  return _merge_units(x, len(tilings))


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


def tile_bias(rpb, tilings, dtype):
  """``[units, H or 1, T, W]`` in ``dtype``: ``rpb`` (or 0 without) where a tile query sees a
  block key, -inf where it does not."""
  rank = len(tilings)
  visible = functools.reduce(jnp.logical_and, _per_unit([jnp.asarray(t.mask) for t in tilings]))
  units, tile, halo = (math.prod(getattr(t, f) for t in tilings)
                       for f in ("units", "tile", "halo"))
  visible = visible.reshape(units, 1, tile, halo)
  if rpb is None:
    return jnp.where(visible, jnp.zeros((), dtype), -jnp.inf)
  letters = iter(string.ascii_letters.replace("h", ""))
  r = [next(letters) for _ in range(rank)]
  u, t, w = ("".join(next(letters) for _ in range(rank)) for _ in range(3))
  operands = [f"h{''.join(r)}"] + [f"{u[a]}{t[a]}{w[a]}{r[a]}" for a in range(rank)]
  spread = functools.partial(jnp.einsum, ",".join(operands) + f"->{u}h{t}{w}")
  onehots = [jnp.asarray(x.rpb_onehot, dtype) for x in tilings]
  # One-hot products turn -inf into NaN (0 * -inf): spread the finite values and the
  # -inf positions separately.
  finite = jnp.isfinite(rpb)
  bias = spread(jnp.where(finite, rpb, 0).astype(dtype), *onehots)
  masked = spread(jnp.where(finite, 0, 1).astype(dtype), *onehots) > 0
  visible = visible & ~masked.reshape(units, -1, tile, halo)
  return jnp.where(visible, bias.reshape(units, -1, tile, halo), -jnp.inf)


# --- Attention inside the tiles: custom VJP that recomputes the weights from the lse. ---

def _acc(x):
  """Accumulation dtype: float32 for half and single precision, float64 stays float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _logits(q, k, bias, scale):
  """q ``[U, B, Hkv, G*T, D]``, k ``[U, B, Hkv, W, D]``, bias ``[U, H or 1, T, W]`` ->
  biased logits ``[U, B, Hkv, G, T, W]`` in the accumulation dtype."""
  units, b, kv_heads, _, _ = q.shape
  _, bias_heads, tile, halo = bias.shape
  s = jnp.einsum("ubkmd,ubkwd->ubkmw", q, k, preferred_element_type=_acc(q)) * scale
  s = s.reshape(units, b, kv_heads, -1, tile, halo)
  groups = bias_heads // kv_heads if bias_heads > 1 else 1
  return s + bias.reshape(units, 1, bias_heads // groups, groups, tile, halo)


def _forward_units(q, k, v, bias, *, scale):
  s = _logits(q, k, bias, scale)
  # A window whose every logit is -inf (an rpb of -inf) gives output 0 and lse -inf.
  peak = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(peak), peak, 0.0))
  total = jnp.sum(p, axis=-1, keepdims=True)
  p = p.reshape(*q.shape[:-1], -1).astype(v.dtype)
  out = jnp.einsum("ubkmw,ubkwd->ubkmd", p, v, preferred_element_type=_acc(q))
  some = total > 0
  out = out / jnp.where(some, total, 1.0).reshape(*q.shape[:-1], 1)
  lse = jnp.where(some, peak + jnp.log(jnp.where(some, total, 1.0)), -jnp.inf)
  return out.astype(q.dtype), lse.reshape(q.shape[:-1])


def _backward_units(q, k, v, bias, out, lse, dout, dlse, *, scale):
  acc = _acc(q)
  s = _logits(q, k, bias, scale)
  finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # fully masked rows: p = 0
  p = jnp.exp(s - finite_lse.reshape(s.shape[:-1] + (1,))).reshape(*q.shape[:-1], -1)
  dp = jnp.einsum("ubkmd,ubkwd->ubkmw", dout, v, preferred_element_type=acc)
  # d lse / d s = p, so the lse cotangent joins the softmax's row term.
  delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1) - dlse
  ds = p * (dp - delta[..., None])
  dv = jnp.einsum("ubkmw,ubkmd->ubkwd", p.astype(dout.dtype), dout, preferred_element_type=acc)
  ds_low = ds.astype(q.dtype)
  dq = jnp.einsum("ubkmw,ubkwd->ubkmd", ds_low, k, preferred_element_type=acc) * scale
  dk = jnp.einsum("ubkmw,ubkmd->ubkwd", ds_low, q, preferred_element_type=acc) * scale
  units, bias_heads, tile, halo = bias.shape
  dbias = ds.reshape(units, -1, bias_heads, tile, halo).sum(axis=1).astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


def _map_units(fn, chunk, arrays, pad_values):
  """``fn`` over chunks of ``chunk`` units (axis 0 of every array), one chunk at a time, so
  that the per-tile intermediates stay small (in cache on a CPU); outputs are re-joined."""
  units = arrays[0].shape[0]
  if chunk >= units:
    return fn(*arrays)
  n = -(-units // chunk)
  padded = [jnp.pad(x, [(0, n * chunk - units)] + [(0, 0)] * (x.ndim - 1), constant_values=c)
            for x, c in zip(arrays, pad_values)]
  outs = jax.lax.map(lambda xs: fn(*xs), [x.reshape(n, chunk, *x.shape[1:]) for x in padded])
  return jax.tree.map(lambda y: y.reshape(n * chunk, *y.shape[2:])[:units], outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attend_units(q, k, v, bias, scale, chunk):
  """Softmax attention of every tile's queries over its block: ``(out, lse)``.

  q ``[U, B, Hkv, G*T, D]``; k, v ``[U, B, Hkv, W, D]``; bias ``[U, H or 1, T, W]``;
  out like q; lse ``[U, B, Hkv, G*T]`` in the accumulation dtype. Runs ``chunk`` units at a
  time.
  """
  return _map_units(functools.partial(_forward_units, scale=scale), chunk, (q, k, v, bias),
                    (0,) * 4)


def _attend_fwd(q, k, v, bias, scale, chunk):
  out, lse = attend_units(q, k, v, bias, scale, chunk)
  return (out, lse), (q, k, v, bias, out, lse)


def _attend_bwd(scale, chunk, residuals, cotangents):
  return _map_units(functools.partial(_backward_units, scale=scale), chunk,
                    residuals + tuple(cotangents), (0,) * 8)


attend_units.defvjp(_attend_fwd, _attend_bwd)

# Logit elements per chunk of units (each a float32 or wider).
CHUNK_ELEMENTS = 1 << 20


def na_forward(query, key, value, nbhd: Neighborhood, scale: float, rpb=None, tile=None):
  """Fused neighborhood attention: ``(out, lse)``; natural-log lse in the accumulation dtype."""
  tilings = tiling(tuple(query.shape[1:1 + nbhd.rank]), nbhd, tile)
  q = query_tiles(query, tilings)
  units, b, heads, t, dim = q.shape
  k, v = key_blocks(key, tilings), key_blocks(value, tilings)
  kv_heads = k.shape[2]
  chunk = max(1, CHUNK_ELEMENTS // (b * heads * t * k.shape[3]))
  out, lse = attend_units(q.reshape(units, b, kv_heads, -1, dim), k, v,
                          tile_bias(rpb, tilings, _acc(query)), scale, chunk)
  return (untile_queries(out.reshape(q.shape), tilings),
          untile_queries(lse.reshape(q.shape[:-1]), tilings))


# The unfused halves return per-window tensors, which is the reference's layout already.
na_qk = reference.na_qk
na_av = reference.na_av
