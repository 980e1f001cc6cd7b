"""The ``"xla"`` backend: neighborhood attention in pure JAX.

It runs on every platform, is differentiable by JAX's own autodiff, and is the semantic
oracle the C++ and CUDA kernels are tested against (itself tested against NATTEN's
outputs). Keys are gathered per query window, so memory is O(B·N·H·prod(K)·D) per query
chunk; large inputs are processed in chunks of rows of the first spatial axis, each
rematerialised in the backward pass, so no dense N×N mask ever exists. Half-precision
inputs are computed in float32, and every product runs at full float32 precision (never
TF32), so the results are a valid oracle on any platform.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jnat._checks import Neighborhood

# Gathered key/value elements per chunk (float32: 256 MiB); bounds the reference's memory.
_CHUNK_ELEMENTS = 1 << 26


def axis_windows(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                 positions=None, xp=np):
  """Per-axis neighbourhood tables, the array twin of ``QueryWindow`` in na_index.h.

  Args:
    length, kernel, stride, dilation, causal: one spatial axis of the neighbourhood.
    positions: the query positions to describe (default: all ``length`` of them).
    xp: ``numpy`` for host tables, ``jax.numpy`` to build them inside a computation.

  Returns:
    keys: int32 ``[queries, kernel]``, the key position of each window slot.
    valid: bool ``[queries, kernel]``, False for causally masked slots.
    rpb_index: int32 ``[queries, kernel]``, the relative-position-bias index of each slot.
  """
  i = xp.arange(length) if positions is None else positions
  group, ig = i % dilation, i // dilation
  group_length = (length - group + dilation - 1) // dilation
  block = (ig // stride) * stride
  if causal:
    leader = xp.minimum(block + stride - 1, group_length - 1)
    start = xp.maximum(leader - kernel + 1, 0)
  else:
    leader = xp.minimum(block + stride // 2, group_length - 1)
    start = xp.maximum(xp.minimum(leader - kernel // 2, group_length - kernel), 0)
  slot_g = start[:, None] + xp.arange(kernel)[None, :]
  valid = slot_g <= ig[:, None] if causal else xp.ones(slot_g.shape, bool)
  keys = group[:, None] + slot_g * dilation
  rpb_index = slot_g - ig[:, None] + kernel - 1
  return keys.astype(np.int32), valid, rpb_index.astype(np.int32)


def acc_dtype(x):
  """Accumulation dtype: float32 for half and single precision, float64 stays float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


# Full-precision products: GPUs default float32 matmuls to TF32 (~1e-3 relative).
einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _window_tables(spatial, nbhd: Neighborhood, rows=None):
  """Neighbourhood tables of a query grid, built inside the computation: O(sum of axes).

  Returns ``(keys, valid, rpb_index)``: one int array per axis for keys and rpb_index and a
  bool array for valid, each broadcasting to ``[*spatial, *kernel]`` (axis 0 restricted to
  the query positions `rows` when given).
  """
  rank = nbhd.rank
  keys, rpb_index, valid, grid = [], [], jnp.ones((1,) * (2 * rank), bool), []
  for a, (length, k, s, d, c) in enumerate(
      zip(spatial, nbhd.kernel_size, nbhd.stride, nbhd.dilation, nbhd.is_causal)):
    positions = rows if a == 0 and rows is not None else None
    kk, vv, rr = axis_windows(length, k, s, d, c, positions, xp=jnp)
    shape = [1] * (2 * rank)
    shape[a], shape[rank + a] = kk.shape
    keys.append(kk.reshape(shape))
    rpb_index.append(rr.reshape(shape))
    valid = valid & vv.reshape(shape)
    grid.append(kk.shape[0])
  return keys, jnp.broadcast_to(valid, (*grid, *nbhd.kernel_size)), rpb_index


def _gather_windows(x, keys):
  """``x [B, *spatial, H, D]`` → ``[B, *spatial, *kernel, H, D]`` for the given tables."""
  return x[(slice(None),) + tuple(keys)]


def _logits(query, key, tables, rpb, scale):
  """Window logits ``[B, *spatial, H, prod(K)]`` in the inputs' dtype, -inf at masked slots."""
  keys, valid, rpb_index = tables
  b, *spatial, heads, dim = query.shape
  kv_heads = key.shape[-2]
  _check_heads_layout(query, kv_heads)
  q = query.reshape(b, *spatial, kv_heads, heads // kv_heads, dim)
  k_win = _gather_windows(key, keys).reshape(b, *spatial, -1, kv_heads, dim)
  logits = einsum("b...hgd,b...nhd->b...hgn", q, k_win)
  logits = logits.reshape(b, *spatial, heads, -1) * scale
  if rpb is not None:
    bias = rpb.astype(logits.dtype)[(slice(None),) + tuple(rpb_index)]
    logits = logits + jnp.moveaxis(bias.reshape(heads, *spatial, -1), 0, -2)
  return jnp.where(valid.reshape(*spatial, 1, -1), logits, -jnp.inf)


def _apply_weights(weights, value, tables):
  """Σ_slots weights · value over each window; weights ``[B, *spatial, H, prod(K)]``."""
  keys, valid, _ = tables
  b, *spatial, heads, n = weights.shape
  kv_heads, dim = value.shape[-2:]
  weights = jnp.where(valid.reshape(*spatial, 1, n), weights, 0.0)
  v_win = _gather_windows(value, keys).reshape(b, *spatial, n, kv_heads, dim)
  w = weights.reshape(b, *spatial, kv_heads, heads // kv_heads, n)
  out = einsum("b...hgn,b...nhd->b...hgd", w, v_win)
  return out.reshape(b, *spatial, heads, dim)


def _chunked(fn, nbhd: Neighborhood, per_query, shared, elements_per_row):
  """Runs ``fn(tables, *per_query, *shared)`` over chunks of rows of spatial axis 0.

  ``per_query`` arrays have the query grid at axes 1..rank; results are stitched back along
  axis 1. A single call when a whole input fits in ``_CHUNK_ELEMENTS``; otherwise a
  ``lax.map`` over rematerialised chunks, so the backward pass stays within the bound too.
  """
  spatial = per_query[0].shape[1:1 + nbhd.rank]
  rows = spatial[0]
  chunk = max(1, min(rows, _CHUNK_ELEMENTS // max(1, elements_per_row)))
  if chunk >= rows:
    return fn(_window_tables(spatial, nbhd), *per_query, *shared)
  n_chunks = -(-rows // chunk)
  pad = n_chunks * chunk - rows
  xs = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in per_query]
  xs = [x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:]).swapaxes(0, 1) for x in xs]

  @jax.checkpoint
  def body(args):
    index, chunk_xs = args
    # Padding rows repeat the last query; their results are dropped below.
    positions = jnp.minimum(index * chunk + jnp.arange(chunk), rows - 1)
    return fn(_window_tables(spatial, nbhd, positions), *chunk_xs, *shared)

  outs = jax.lax.map(body, (jnp.arange(n_chunks), xs))

  def unchunk(y):
    y = y.swapaxes(0, 1)
    return y.reshape(y.shape[0], n_chunks * chunk, *y.shape[3:])[:, :rows]

  return jax.tree.map(unchunk, outs)


def _masked_lse(logits):
  """Log-sum-exp over the window; ``-inf`` with zero gradients where every slot is masked."""
  peak = jnp.max(logits, axis=-1, keepdims=True)
  peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  total = jnp.sum(jnp.exp(logits - peak), axis=-1)
  some = total > 0
  return jnp.where(some, jnp.log(jnp.where(some, total, 1.0)) + peak[..., 0], -jnp.inf)


def _softmax_weights(logits, lse):
  """exp(logits - lse), 0 for a fully masked window."""
  return jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])


def na_forward(query, key, value, nbhd: Neighborhood, scale: float, rpb=None):
  """Fused neighborhood attention: ``(out, lse)``; natural-log lse in the accumulation dtype.

  A fully masked window gives output 0 and lse ``-inf``. Inputs are cast to the
  accumulation dtype first, so gradients also accumulate there.
  """
  b, *spatial, heads, dim = query.shape
  acc = acc_dtype(query)

  def attend(tables, q, key, value, rpb):
    logits = _logits(q, key, tables, rpb, scale)
    lse = _masked_lse(logits)
    out = _apply_weights(_softmax_weights(logits, lse), value, tables)
    return out.astype(query.dtype), lse

  row = b * math.prod(spatial[1:]) * heads * nbhd.window_size * dim * 2
  return _chunked(attend, nbhd, [query.astype(acc)], [key.astype(acc), value.astype(acc), rpb],
                  row)


def na_qk(query, key, nbhd: Neighborhood, rpb=None):
  """Unfused ``query · key`` over each window (+ rpb), -inf at masked slots, in query dtype."""
  b, *spatial, heads, dim = query.shape

  def qk(tables, q, key, rpb):
    return _logits(q, key, tables, rpb, 1.0).astype(query.dtype)

  row = b * math.prod(spatial[1:]) * heads * nbhd.window_size * dim
  acc = acc_dtype(query)
  return _chunked(qk, nbhd, [query.astype(acc)], [key.astype(acc), rpb], row)


def na_av(attn, value, nbhd: Neighborhood):
  """Unfused ``attn · value`` over each window (masked slots ignored), in value dtype."""
  b, *spatial, heads, n = attn.shape

  def av(tables, attn, value_acc):
    return _apply_weights(attn, value_acc, tables).astype(value.dtype)

  row = b * math.prod(spatial[1:]) * heads * n * value.shape[-1]
  acc = acc_dtype(value)
  return _chunked(av, nbhd, [attn.astype(acc)], [value.astype(acc)], row)


def _explicit_axes(x, dims):
  """The Explicit mesh axes that shard `x` along each of `dims` (None where unsharded)."""
  sharding = jax.typeof(x).sharding
  if sharding.mesh.empty or jax.sharding.AxisType.Explicit not in sharding.mesh.axis_types:
    return (None,) * len(dims)
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  return tuple(spec[d] for d in dims)


def _reshard(x, spec):
  """`x` with the given Explicit sharding (a local slice of a replicated array)."""
  if all(a is None for a in spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec))


def _check_heads_layout(query, kv_heads):
  """The query heads must split over kv heads as their Explicit sharding allows."""
  (axes,) = _explicit_axes(query, (query.ndim - 2,))
  if axes is None:
    return
  mesh = jax.typeof(query).sharding.mesh
  shards = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
  if kv_heads % shards and kv_heads != 1:  # MQA splits only the group axis: fine
    raise NotImplementedError(
        f"jnat backend='xla': query heads sharded {shards} ways (mesh axes {axes}) need kv "
        f"heads divisible by {shards} (or 1), got {kv_heads}; shard kv heads alike or use the "
        f"'cpu', 'cuda' or 'tiled' backend, which take kv replicated.")


def dense_attention(query, key, value, scale: float):
  """Every query against a flat set of tokens ``[B, M, Hkv, D]``: returns ``(out, lse)``.

  Used for NATTEN's additional key/value tokens, merged with the windowed part by lse.
  """
  heads, acc = query.shape[-2], acc_dtype(query)
  # The few tokens are repeated per query head rather than query heads grouped per kv head:
  # no reshape of the heads axis, which may be sharded in a way a split cannot follow.
  batch_axes, heads_axes = _explicit_axes(query, (0, query.ndim - 2))
  per_head = lambda x: _reshard(
      jnp.take(x.astype(acc), jnp.arange(heads) // (heads // x.shape[-2]), axis=2),
      (batch_axes, None, heads_axes, None))
  logits = einsum("b...hd,bmhd->b...hm", query.astype(acc), per_head(key)) * scale
  lse = jax.nn.logsumexp(logits, axis=-1)
  out = einsum("b...hm,bmhd->b...hd", jnp.exp(logits - lse[..., None]), per_head(value))
  return out.astype(query.dtype), lse


def merge_by_lse(out_a, lse_a, out_b, lse_b):
  """Combines two softmax-normalised attention results over disjoint key sets."""
  lse = jnp.logaddexp(lse_a, lse_b)
  wa, wb = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
  out = wa * out_a.astype(lse.dtype) + wb * out_b.astype(lse.dtype)
  return out.astype(out_a.dtype), lse
