"""Flax NNX neighborhood attention: the NNX twin of ``jnat.nn.NeighborhoodAttention``.

Same computation (shared with the linen module through ``jnat.nn.self_attention``) and the
same parameter names: ``qkv``, ``proj`` and ``rpb``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jnat import nn as jnat_nn


class NeighborhoodAttention(nnx.Module):
  """Multi-head neighborhood self-attention for ``[batch, *spatial, channels]`` inputs.

  The keyword-only configuration (``stride``, ``dilation``, ``is_causal``, ``qkv_bias``,
  ``rel_pos_bias``, ``qk_scale``, ``attn_drop``, ``proj_drop``, ``deterministic``,
  ``dtype``, ``param_dtype``, ``kernel_init``, ``bias_init``, ``rpb_init``) is that of
  ``jnat.nn.NeighborhoodAttention``, whose attributes of the same names document it.

  Args:
    in_features: number of channels.
    num_heads: number of attention heads; must divide ``in_features``.
    kernel_size: window size, one per spatial axis (this sets the rank); an int works
      for every rank only without ``rel_pos_bias``, whose shape depends on the rank.
    backend: op backend; None: the platform's default (see `jnat.na2d`).
    rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` for training).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jnat.nnx
    >>> layer = jnat.nnx.NeighborhoodAttention(64, 4, (7, 7), rel_pos_bias=True,
    ...                                        rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 14, 14, 64))).shape
    (2, 14, 14, 64)
  """

  def __init__(self, in_features: int, num_heads: int, kernel_size: int | Sequence[int], *,
               stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
               is_causal: bool | Sequence[bool] = False, qkv_bias: bool = True,
               rel_pos_bias: bool = False, qk_scale: float | None = None,
               attn_drop: float = 0.0, proj_drop: float = 0.0,
               deterministic: bool | None = None, dtype=None, param_dtype=jnp.float32,
               kernel_init=nnx.initializers.lecun_normal(),
               bias_init=nnx.initializers.zeros_init(),
               rpb_init=jnat_nn.trunc_normal_init, backend: str | None = None,
               rngs: nnx.Rngs):
    if in_features % num_heads:
      raise ValueError(f"{in_features=} must be divisible by {num_heads=}.")
    if rel_pos_bias and isinstance(kernel_size, int):
      raise ValueError(f"{kernel_size=}: pass one kernel size per spatial axis, so that the "
                       "shape of the relative positional bias is known.")
    # Tuples, not lists: NNX treats list attributes as sub-structure, not configuration.
    static = lambda v: v if isinstance(v, (int, bool)) else tuple(v)
    self.num_heads = num_heads
    self.kernel_size, self.stride = static(kernel_size), static(stride)
    self.dilation, self.is_causal = static(dilation), static(is_causal)
    self.qk_scale, self.backend = qk_scale, backend
    self.deterministic = deterministic
    linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
    self.qkv = linear(in_features, 3 * in_features, use_bias=qkv_bias)
    self.proj = linear(in_features, in_features)
    self.rpb = (nnx.Param(rpb_init(rngs.params(), jnat_nn.rpb_shape(num_heads, kernel_size),
                                   param_dtype)) if rel_pos_bias else None)
    # A dropout layer only takes an rng stream when it has something to drop.
    self.attn_drop = nnx.Dropout(attn_drop, rngs=rngs if attn_drop else None)
    self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs if proj_drop else None)

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    """Applies neighborhood self-attention.

    Args:
      inputs: ``[batch, *spatial, channels]``.
      deterministic: if True, no dropout; falls back to the attribute, then to
        ``nnx.Dropout``'s own state (set by ``model.train()`` / ``model.eval()``).

    Returns:
      ``[batch, *spatial, channels]``.
    """
    window = jnat_nn.window_args(jnat_nn.resolve_rank(self.kernel_size, inputs.ndim),
                                 self.kernel_size, self.stride, self.dilation, self.is_causal)
    if deterministic is None:
      deterministic = self.deterministic
    if deterministic is None:
      deterministic = self.attn_drop.deterministic
    weight_dropout = None
    if self.attn_drop.rate > 0 and not deterministic:
      weight_dropout = functools.partial(self.attn_drop, deterministic=False)
    rpb = None if self.rpb is None else self.rpb[...]
    attend = lambda q, k, v: jnat_nn.attention(
        q, k, v, rpb, window=window, scale=jnat_nn.head_scale(self.qk_scale, q.shape[-1]),
        backend=self.backend, weight_dropout=weight_dropout)
    out = jnat_nn.self_attention(inputs, num_heads=self.num_heads, window=window,
                                 qkv=self.qkv, attend=attend, proj=self.proj)
    return self.proj_drop(out, deterministic=deterministic)
