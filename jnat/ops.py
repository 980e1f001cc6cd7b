"""Public neighborhood attention ops: validate, pick a backend, dispatch.

``na1d/na2d/na3d`` are fused (softmax inside); ``na*d_qk`` and ``na*d_av`` are the unfused
halves for users who need to read or edit the attention weights.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from jnat import _checks, reference

log = logging.getLogger("jnat")


def _ffi():
  from jnat import _ffi  # deferred: keeps `import jnat` cheap and free of extension errors
  return _ffi


def _platform_of(x) -> str:
  devices = getattr(x, "devices", None)
  if callable(devices) and not isinstance(x, jax.core.Tracer):
    return next(iter(devices())).platform
  return jax.default_backend()


def available_backends(platform: str | None = None) -> tuple[str, ...]:
  """Backends usable on `platform` (default: JAX's default), fastest first.

  Example:
    >>> "xla" in jnat.available_backends()
    True
  """
  platform = platform or jax.default_backend()
  kernels = _ffi().compiled_platforms()
  fast = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}.get(platform)
  return ((fast,) if fast in kernels else ()) + ("xla",)


def _select_backend(backend, query) -> str:
  _checks.check_backend(backend)
  platform = _platform_of(query)
  available = available_backends(platform)
  if backend is None:
    backend = available[0]
    if np.dtype(query.dtype).name not in _checks.SUPPORTED_DTYPES:
      backend = "xla"  # only the reference handles e.g. float64
    log.debug("jnat: backend %r picked for %s inputs on %s", backend, query.dtype, platform)
  elif backend not in available:
    built = _ffi().compiled_platforms() or ("none",)
    raise ValueError(f"backend={backend!r} is not available on platform {platform!r} "
                     f"(kernels compiled for: {', '.join(built)}); available: {available}.")
  if backend == "xla":
    _checks.check_dtype(query, "query", _checks.SUPPORTED_DTYPES + ("float64",))
  else:
    _checks.check_dtype(query, "query")
  return backend


def _impl(backend):
  return reference if backend == "xla" else _ffi()


def _neighborhood_attention(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                            scale, rpb, additional_keys, additional_values, return_lse, backend):
  heads = _checks.check_qkv(rank, query, key, value)
  nbhd = _checks.make_neighborhood(rank, query.shape[1:1 + rank], kernel_size, stride, dilation,
                                   is_causal)
  _checks.check_rpb(rpb, heads, nbhd)
  _checks.check_additional_kv(additional_keys, additional_values, query, key)
  backend = _select_backend(backend, query)
  scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
  out, lse = _impl(backend).na_forward(query, key, value, nbhd, scale, rpb)
  if additional_keys is not None:
    extra = reference.dense_attention(query, additional_keys, additional_values, scale)
    out, lse = reference.merge_by_lse(out, lse, *extra)
  return (out, lse) if return_lse else out


def _qk(rank, query, key, kernel_size, stride, dilation, is_causal, rpb, backend):
  if getattr(query, "shape", None) is None or getattr(key, "shape", None) is None:
    raise ValueError("query and key must be arrays.")
  heads = _checks.check_qkv(rank, query, key, key)
  nbhd = _checks.make_neighborhood(rank, query.shape[1:1 + rank], kernel_size, stride, dilation,
                                   is_causal)
  _checks.check_rpb(rpb, heads, nbhd)
  return _impl(_select_backend(backend, query)).na_qk(query, key, nbhd, rpb)


def _av(rank, attn, value, kernel_size, stride, dilation, is_causal, backend):
  a_shape, v_shape = getattr(attn, "shape", None), getattr(value, "shape", None)
  if a_shape is None or v_shape is None:
    raise ValueError("attn and value must be arrays.")
  if len(v_shape) != rank + 3:
    raise ValueError(f"value.shape={tuple(v_shape)} must be [batch, *spatial ({rank} axes), "
                     f"kv_heads, head_dim].")
  nbhd = _checks.make_neighborhood(rank, v_shape[1:1 + rank], kernel_size, stride, dilation,
                                   is_causal)
  kv_heads = v_shape[-2]
  if (len(a_shape) != rank + 3 or tuple(a_shape[:rank + 1]) != tuple(v_shape[:rank + 1])
      or a_shape[-1] != nbhd.window_size or a_shape[-2] % kv_heads):
    raise ValueError(
        f"attn.shape={tuple(a_shape)} must be [batch, *spatial, heads, prod(kernel_size)="
        f"{nbhd.window_size}] with value's batch/spatial axes ({tuple(v_shape)}) and heads a "
        f"multiple of value's {kv_heads} heads.")
  if attn.dtype != value.dtype:
    raise ValueError(f"attn.dtype={attn.dtype} must equal value.dtype={value.dtype}.")
  return _impl(_select_backend(backend, value)).na_av(attn, value, nbhd)


_FUSED_DOC = """{rank}D neighborhood attention (NATTEN semantics), fused.

Each query attends to the keys of its window: `kernel_size` neighbours per axis, shifted
inward at the borders (never zero-padded), within its dilation group; `stride` groups
queries in blocks that share one window (stride == kernel_size is blocked attention);
`is_causal` ends the window at the query along that axis.

Args:
  query: ``[batch, {spatial}, heads, head_dim]``.
  key, value: ``[batch, {spatial}, kv_heads, head_dim]``; kv_heads must divide heads
    (GQA/MQA: query head h uses kv head ``h // (heads // kv_heads)``).
  kernel_size, stride, dilation: int or one int per spatial axis.
  is_causal: bool or one bool per spatial axis.
  scale: logit scale, default ``head_dim ** -0.5``.
  rpb: optional relative positional bias ``[heads, {rpb}]``, added to the scaled logits.
  additional_keys, additional_values: optional ``[batch, tokens, kv_heads, head_dim]`` that
    every query also attends to (merged through the log-sum-exp; no rpb, never masked).
  return_lse: also return the natural-log logsumexp of the logits ``[batch, {spatial}, heads]``
    (float32).
  backend: ``None`` (fastest for the inputs' platform), ``"xla"``, ``"cpu"`` or ``"cuda"``.

Returns:
  The attention output, shaped like query (and the lse if `return_lse`).

Raises:
  ValueError: on inconsistent shapes or dtypes, a kernel that does not fit, a stride outside
    ``[1, kernel_size]``, or a backend that is unknown, missing or lacks the dtype.

Example:
  >>> q = k = v = jnp.ones((1, {example_shape}, 2, 16))
  >>> jnat.na{rank}d(q, k, v, kernel_size=3).shape
  (1, {example_shape}, 2, 16)
"""

_QK_DOC = """{rank}D unfused neighborhood attention logits: ``query · key`` over each window.

No scaling (scale `query` yourself, as with NATTEN's ``na{rank}d_qk``); `rpb` is added;
causally masked slots hold ``-inf``. Window slots are flattened row-major over the
kernel axes. Arguments as for ``jnat.na{rank}d``.

Returns:
  ``[batch, {spatial}, heads, prod(kernel_size)]`` in query's dtype.

Example:
  >>> q = k = jnp.ones((1, {example_shape}, 2, 16))
  >>> jnat.na{rank}d_qk(q, k, kernel_size=3).shape[-1] == 3 ** {rank}
  True
"""

_AV_DOC = """{rank}D unfused neighborhood attention: weighted sum of each window's values.

Args:
  attn: ``[batch, {spatial}, heads, prod(kernel_size)]`` weights (e.g. a softmax of
    ``na{rank}d_qk``); masked slots are ignored.
  value: ``[batch, {spatial}, kv_heads, head_dim]``.
  Other arguments as for ``jnat.na{rank}d``.

Returns:
  ``[batch, {spatial}, heads, head_dim]`` in value's dtype.
"""


def _doc(template, rank):
  spatial = ", ".join("XYZ"[3 - rank:][i] for i in range(rank)) if rank > 1 else "L"
  rpb = ", ".join(f"2*K{i}-1" for i in range(rank))
  example = ", ".join(["8"] * rank)
  return template.format(rank=rank, spatial=spatial, rpb=rpb, example_shape=example)


def _fused_op(rank):
  def op(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         rpb=None, additional_keys=None, additional_values=None, return_lse=False,
         backend=None):
    return _neighborhood_attention(rank, query, key, value, kernel_size, stride, dilation,
                                   is_causal, scale, rpb, additional_keys, additional_values,
                                   return_lse, backend)
  op.__name__ = op.__qualname__ = f"na{rank}d"
  op.__doc__ = _doc(_FUSED_DOC, rank)
  return op


def _qk_op(rank):
  def op(query, key, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None,
         backend=None):
    return _qk(rank, query, key, kernel_size, stride, dilation, is_causal, rpb, backend)
  op.__name__ = op.__qualname__ = f"na{rank}d_qk"
  op.__doc__ = _doc(_QK_DOC, rank)
  return op


def _av_op(rank):
  def op(attn, value, kernel_size, stride=1, dilation=1, is_causal=False, backend=None):
    return _av(rank, attn, value, kernel_size, stride, dilation, is_causal, backend)
  op.__name__ = op.__qualname__ = f"na{rank}d_av"
  op.__doc__ = _doc(_AV_DOC, rank)
  return op


na1d, na2d, na3d = (_fused_op(r) for r in (1, 2, 3))
na1d_qk, na2d_qk, na3d_qk = (_qk_op(r) for r in (1, 2, 3))
na1d_av, na2d_av, na3d_av = (_av_op(r) for r in (1, 2, 3))
