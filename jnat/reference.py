"""The ``"xla"`` backend: neighborhood attention in pure JAX.

It runs on every platform, is differentiable by JAX's own autodiff, and is the semantic
oracle the C++ and CUDA kernels are tested against (itself tested against NATTEN's
outputs). Keys are gathered per query window, so memory is O(B·N·H·prod(K)·D) per query
chunk; large inputs are processed in chunks of rows of the first spatial axis, each
rematerialised in the backward pass, so no dense N×N mask ever exists.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jnat._checks import Neighborhood

# Gathered key/value elements per chunk (float32: 256 MiB); bounds the reference's memory.
_CHUNK_ELEMENTS = 1 << 26


def axis_windows(length: int, kernel: int, stride: int, dilation: int, causal: bool):
  """Per-axis neighbourhood tables, the NumPy twin of ``QueryWindow`` in na_index.h.

  Returns:
    keys: int32 ``[length, kernel]``, the key position of each window slot.
    valid: bool ``[length, kernel]``, False for causally masked slots.
    rpb_index: int32 ``[length, kernel]``, the relative-position-bias index of each slot.
  """
  i = np.arange(length)
  group, ig = i % dilation, i // dilation
  group_length = (length - group + dilation - 1) // dilation
  block = (ig // stride) * stride
  if causal:
    leader = np.minimum(block + stride - 1, group_length - 1)
    start = np.maximum(leader - kernel + 1, 0)
  else:
    leader = np.minimum(block + stride // 2, group_length - 1)
    start = np.maximum(np.minimum(leader - kernel // 2, group_length - kernel), 0)
  slot_g = start[:, None] + np.arange(kernel)[None, :]
  valid = slot_g <= ig[:, None] if causal else np.ones((length, kernel), bool)
  keys = group[:, None] + slot_g * dilation
  rpb_index = slot_g - ig[:, None] + kernel - 1
  return keys.astype(np.int32), valid, rpb_index.astype(np.int32)


def _acc(x):
  """Accumulation dtype: float32 for half and single precision, float64 stays float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _window_tables(spatial, nbhd: Neighborhood):
  """Neighbourhood tables of a query grid: ``(keys, valid, rpb_index)``.

  ``keys`` and ``rpb_index`` hold one int array per axis, broadcasting to
  ``[*spatial, *kernel]``; ``valid`` is a bool array of that full shape.
  """
  rank = nbhd.rank
  keys, rpb_index, valid = [], [], np.ones((1,) * (2 * rank), bool)
  for a, (length, k, s, d, c) in enumerate(
      zip(spatial, nbhd.kernel_size, nbhd.stride, nbhd.dilation, nbhd.is_causal)):
    shape = [1] * (2 * rank)
    shape[a], shape[rank + a] = length, k
    kk, vv, rr = axis_windows(length, k, s, d, c)
    keys.append(kk.reshape(shape))
    rpb_index.append(rr.reshape(shape))
    valid = valid & vv.reshape(shape)
  return keys, np.broadcast_to(valid, tuple(spatial) + nbhd.kernel_size), rpb_index


def _gather_windows(x, keys):
  """``x [B, *spatial, H, D]`` → ``[B, *spatial, *kernel, H, D]`` for the given tables."""
  return x[(slice(None),) + tuple(jnp.asarray(k) for k in keys)]


def _logits(query, key, tables, rpb, scale):
  """Float32 window logits ``[B, *spatial, H, prod(K)]``, -inf at masked slots."""
  keys, valid, rpb_index = tables
  b, *spatial, heads, dim = query.shape
  kv_heads = key.shape[-2]
  q = query.reshape(b, *spatial, kv_heads, heads // kv_heads, dim)
  k_win = _gather_windows(key, keys).reshape(b, *spatial, -1, kv_heads, dim)
  logits = jnp.einsum("b...hgd,b...nhd->b...hgn", q, k_win, preferred_element_type=_acc(q))
  logits = logits.reshape(b, *spatial, heads, -1) * scale
  if rpb is not None:
    bias = rpb.astype(logits.dtype)[(slice(None),) + tuple(jnp.asarray(r) for r in rpb_index)]
    logits = logits + jnp.moveaxis(bias.reshape(heads, *spatial, -1), 0, -2)
  mask = jnp.asarray(valid).reshape(*spatial, 1, -1)
  return jnp.where(mask, logits, -jnp.inf)


def _apply_weights(weights, value, tables):
  """Σ_slots weights · value over each window; weights ``[B, *spatial, H, prod(K)]`` f32."""
  keys, valid, _ = tables
  b, *spatial, heads, n = weights.shape
  kv_heads, dim = value.shape[-2:]
  weights = jnp.where(jnp.asarray(valid).reshape(*spatial, 1, n), weights, 0.0)
  v_win = _gather_windows(value, keys).reshape(b, *spatial, n, kv_heads, dim)
  w = weights.reshape(b, *spatial, kv_heads, heads // kv_heads, n)
  out = jnp.einsum("b...hgn,b...nhd->b...hgd", w, v_win, preferred_element_type=_acc(w))
  return out.reshape(b, *spatial, heads, dim)


def _chunked(fn, nbhd: Neighborhood, per_query, shared, elements_per_row):
  """Runs ``fn(tables, *per_query, *shared)`` over chunks of rows of spatial axis 0.

  ``per_query`` arrays have the query grid at axes 1..rank; results are stitched back along
  axis 1. A single call when a whole input fits in ``_CHUNK_ELEMENTS``; otherwise a
  ``lax.map`` over rematerialised chunks, so the backward pass stays within the bound too.
  """
  spatial = per_query[0].shape[1:1 + nbhd.rank]
  tables = _window_tables(spatial, nbhd)
  rows = spatial[0]
  chunk = max(1, min(rows, _CHUNK_ELEMENTS // max(1, elements_per_row)))
  if chunk >= rows:
    return fn(tables, *per_query, *shared)
  n_chunks = -(-rows // chunk)
  pad = n_chunks * chunk - rows

  leaves, treedef = jax.tree.flatten(tables)
  varies = [t.shape[0] == rows for t in leaves]  # only tables along axis 0 get chunked
  leaves = [
      jnp.asarray(np.concatenate([t, np.repeat(t[-1:], pad, axis=0)]).reshape(
          n_chunks, chunk, *t.shape[1:])) if v else t for t, v in zip(leaves, varies)]
  xs = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in per_query]
  xs = [x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:]).swapaxes(0, 1) for x in xs]

  @jax.checkpoint
  def body(args):
    index, chunk_xs = args
    chunk_tables = [t[index] if v else t for t, v in zip(leaves, varies)]
    return fn(jax.tree.unflatten(treedef, chunk_tables), *chunk_xs, *shared)

  outs = jax.lax.map(body, (jnp.arange(n_chunks), xs))

  def unchunk(y):
    y = y.swapaxes(0, 1)
    return y.reshape(y.shape[0], n_chunks * chunk, *y.shape[3:])[:, :rows]

  return jax.tree.map(unchunk, outs)


def na_forward(query, key, value, nbhd: Neighborhood, scale: float, rpb=None):
  """Fused neighborhood attention: ``(out, lse)``; natural-log lse in the accumulation dtype."""
  b, *spatial, heads, dim = query.shape

  def attend(tables, q, key, value, rpb):
    logits = _logits(q, key, tables, rpb, scale)
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = _apply_weights(jnp.exp(logits - lse[..., None]), value, tables)
    return out.astype(query.dtype), lse

  row = b * math.prod(spatial[1:]) * heads * nbhd.window_size * dim * 2
  return _chunked(attend, nbhd, [query], [key, value, rpb], row)


def na_qk(query, key, nbhd: Neighborhood, rpb=None):
  """Unfused ``query · key`` over each window (+ rpb), -inf at masked slots, in query dtype."""
  b, *spatial, heads, dim = query.shape

  def qk(tables, q, key, rpb):
    return _logits(q, key, tables, rpb, 1.0).astype(query.dtype)

  row = b * math.prod(spatial[1:]) * heads * nbhd.window_size * dim
  return _chunked(qk, nbhd, [query], [key, rpb], row)


def na_av(attn, value, nbhd: Neighborhood):
  """Unfused ``attn · value`` over each window (masked slots ignored), in value dtype."""
  b, *spatial, heads, n = attn.shape

  def av(tables, attn, value):
    return _apply_weights(attn.astype(_acc(attn)), value, tables).astype(value.dtype)

  row = b * math.prod(spatial[1:]) * heads * n * value.shape[-1]
  return _chunked(av, nbhd, [attn], [value], row)


def dense_attention(query, key, value, scale: float):
  """Every query against a flat set of tokens ``[B, M, Hkv, D]``: returns ``(out, lse)``.

  Used for NATTEN's additional key/value tokens, merged with the windowed part by lse.
  """
  b, *spatial, heads, dim = query.shape
  kv_heads = key.shape[-2]
  q = query.reshape(b, *spatial, kv_heads, heads // kv_heads, dim)
  logits = jnp.einsum("b...hgd,bmhd->b...hgm", q, key, preferred_element_type=_acc(q))
  logits = logits * scale
  lse = jax.nn.logsumexp(logits, axis=-1)
  out = jnp.einsum("b...hgm,bmhd->b...hgd", jnp.exp(logits - lse[..., None]), value,
                   preferred_element_type=_acc(q))
  return (out.reshape(b, *spatial, heads, dim).astype(query.dtype),
          lse.reshape(b, *spatial, heads))


def merge_by_lse(out_a, lse_a, out_b, lse_b):
  """Combines two softmax-normalised attention results over disjoint key sets."""
  lse = jnp.logaddexp(lse_a, lse_b)
  wa, wb = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
  out = wa * out_a.astype(lse.dtype) + wb * out_b.astype(lse.dtype)
  return out.astype(out_a.dtype), lse
