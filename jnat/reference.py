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
from jax.sharding import PartitionSpec as P

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


def softmax_delta(dout, out, dlse):
  """The softmax backward's row term ``rowsum(dout · out) - dlse`` (d lse / d logits is the
  softmax itself, so the lse cotangent folds in), in the accumulation dtype. A dot rather
  than ``sum(dout * out)``: XLA's CPU fusion of the latter took 20 ms where the dot takes
  0.5 ms (1D L4096 B2 H4 D64), and slowed the kernel running after it."""
  acc = acc_dtype(out)
  return einsum("...d,...d->...", dout.astype(acc), out.astype(acc)) - dlse


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
  """Window logits ``[B, *spatial, H, prod(K)]`` in the inputs' dtype, -inf at masked slots.

  ``key`` has the query's heads (GQA/MQA inputs are spread first: ``spread_heads``)."""
  keys, valid, rpb_index = tables
  b, *spatial, heads, dim = query.shape
  k_win = _gather_windows(key, keys).reshape(b, *spatial, -1, heads, dim)
  logits = einsum("b...hd,b...nhd->b...hn", query, k_win) * scale
  if rpb is not None:
    bias = rpb.astype(logits.dtype)[(slice(None),) + tuple(rpb_index)]
    logits = logits + jnp.moveaxis(bias.reshape(heads, *spatial, -1), 0, -2)
  return jnp.where(valid.reshape(*spatial, 1, -1), logits, -jnp.inf)


def _apply_weights(weights, value, tables):
  """Σ_slots weights · value over each window; weights ``[B, *spatial, H, prod(K)]``, value
  with the same heads."""
  keys, valid, _ = tables
  b, *spatial, heads, n = weights.shape
  weights = jnp.where(valid.reshape(*spatial, 1, n), weights, 0.0)
  v_win = _gather_windows(value, keys).reshape(b, *spatial, n, heads, value.shape[-1])
  return einsum("b...hn,b...nhd->b...hd", weights, v_win)


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

  def run(query, key, value, rpb, kv_sharded):
    key, value = (spread_heads(x.astype(acc), heads, kv_sharded) for x in (key, value))
    row = b * math.prod(spatial[1:]) * heads * nbhd.window_size * dim * 2
    return _chunked(attend, nbhd, [query.astype(acc)], [key, value, rpb], row)

  return per_head_layout(run, query, key, fused_out_specs)(query, key, value, rpb)


def na_qk(query, key, nbhd: Neighborhood, rpb=None):
  """Unfused ``query · key`` over each window (+ rpb), -inf at masked slots, in query dtype."""
  b, *spatial, heads, dim = query.shape
  acc = acc_dtype(query)

  def qk(tables, q, key, rpb):
    return _logits(q, key, tables, rpb, 1.0).astype(query.dtype)

  def run(query, key, rpb, kv_sharded):
    row = b * math.prod(spatial[1:]) * heads * nbhd.window_size * dim
    key = spread_heads(key.astype(acc), heads, kv_sharded)
    return _chunked(qk, nbhd, [query.astype(acc)], [key, rpb], row)

  return per_head_layout(run, query, key, window_out_specs)(query, key, rpb)


def na_av(attn, value, nbhd: Neighborhood):
  """Unfused ``attn · value`` over each window (masked slots ignored), in value dtype."""
  b, *spatial, heads, n = attn.shape

  def av(tables, attn, value_acc):
    return _apply_weights(attn, value_acc, tables).astype(value.dtype)

  def run(attn, value, kv_sharded):
    row = b * math.prod(spatial[1:]) * heads * n * value.shape[-1]
    acc = acc_dtype(value)
    value = spread_heads(value.astype(acc), heads, kv_sharded)
    return _chunked(av, nbhd, [attn.astype(acc)], [value], row)

  return per_head_layout(run, attn, value, window_out_specs)(attn, value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def spread_heads(x, heads, kv_sharded):
  """GQA/MQA: ``[..., kv_heads, D]`` -> ``[..., heads, D]``, each kv head repeated for its group.

  Every product then runs per query head, a layout any head sharding of the query can follow
  (grouping the query heads per kv head cannot split 6 heads over 2 shards without a gather).
  The heads axis may be sharded as the query's is, with kv sharded alike (``kv_sharded``,
  known with Explicit mesh axes) or replicated. A repeat is a broadcast that a partitioner
  follows either way. Its transpose, a sum over each group, splits the heads axis: fine when
  kv is sharded alike, but over replicated kv only an all-gather could follow that, so there
  it is a one-hot contraction over the heads instead (partial sums and an all-reduce).
  """
  if x.shape[-2] == heads:
    return x
  return jnp.repeat(x, heads // x.shape[-2], axis=-2)


def _spread_fwd(x, heads, kv_sharded):
  return spread_heads(x, heads, kv_sharded), x.shape[-2]


def _spread_bwd(heads, kv_sharded, kv_heads, grad):
  if kv_heads == heads:
    return (grad,)
  if kv_sharded:
    return (grad.reshape(*grad.shape[:-2], kv_heads, heads // kv_heads, -1).sum(axis=-2),)
  onehot = np.arange(heads)[:, None] // (heads // kv_heads) == np.arange(kv_heads)
  return (einsum("...hd,hk->...kd", grad, jnp.asarray(onehot, grad.dtype)),)


spread_heads.defvjp(_spread_fwd, _spread_bwd)


def explicit_mesh(x):
  """The mesh of ``x``'s sharding if it has Explicit axes, else None."""
  mesh = jax.typeof(x).sharding.mesh
  if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  return mesh


def explicit_spec(x):
  """``x``'s partition spec, one entry per axis, if it is sharded over Explicit mesh axes."""
  if explicit_mesh(x) is None:
    return None
  spec = jax.typeof(x).sharding.spec
  return tuple(spec) + (None,) * (x.ndim - len(spec))


def fused_out_specs(spec):
  """The fused op's results, ``(out, lse)``, sharded like a query of partition spec ``spec``."""
  return P(*spec), P(*spec[:-1])  # lse: no head_dim


def window_out_specs(spec):
  """Per-window results ``[B, *spatial, H, prod(K)]`` (qk weights, av output rows alike),
  sharded like the input of partition spec ``spec`` with its last axis whole."""
  return P(*spec[:-1], None)


def per_head_layout(fn, x, kv, out_specs):
  """``fn(*args, kv_sharded)`` for a query-side input ``x`` and key/value-side input ``kv``.

  On Explicit meshes it runs inside ``auto_axes`` (the window and tile layouts' reshapes are
  left to the partitioner) and its results take the PartitionSpecs ``out_specs(spec of x)``;
  ``kv_sharded`` says whether kv's heads axis is sharded, which only Explicit axes tell at
  trace time (elsewhere it is False, and spread_heads' transpose reduces over all heads).
  """
  spec = explicit_spec(x)
  if spec is None:
    return lambda *args: fn(*args, kv_sharded=False)
  kv_spec = explicit_spec(kv)
  kv_sharded = kv_spec is not None and kv_spec[-2] is not None
  return jax.sharding.auto_axes(functools.partial(fn, kv_sharded=kv_sharded),
                                out_sharding=out_specs(spec))


def _explicit_axes(x, dims):
  """The Explicit mesh axes that shard `x` along each of `dims` (None where unsharded)."""
  spec = explicit_spec(x) or (None,) * x.ndim
  return tuple(spec[d] for d in dims)


def _reshard(x, spec):
  """`x` with the given Explicit sharding (a local slice of a replicated array)."""
  if all(a is None for a in spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec))


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
