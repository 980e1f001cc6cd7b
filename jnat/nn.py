"""Flax linen neighborhood attention, and the computation it shares with the NNX module.

``NeighborhoodAttention`` is NATTEN's ``NeighborhoodAttention{1,2,3}D`` for channels-last
inputs: a ``qkv`` projection, neighborhood attention with optional relative positional
bias ``rpb``, and an output projection ``proj``. Its parameters map one-to-one onto
NATTEN's (a Dense ``kernel`` is the transpose of a Linear ``weight``), so PyTorch
checkpoints convert by name (see ``jnat.convert``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jnat import _checks
from jnat import ops

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# timm's trunc_normal_(std=.02), which NATTEN uses for the bias and the NAT reference for
# its Linear weights: N(0, 0.02) truncated at ±2 absolute, i.e. ±100 std, in effect an
# untruncated normal. The bounds of Flax's initializer are in units of std.
trunc_normal_init = nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


def resolve_rank(kernel_size: int | Sequence[int], inputs_ndim: int) -> int:
  """Spatial rank: the length of ``kernel_size``, or that of the input when it is an int.

  Raises:
    ValueError: if the input is not ``[batch, *spatial, channels]`` with 1 to 3 spatial
      axes matching ``kernel_size``.
  """
  rank = inputs_ndim - 2 if isinstance(kernel_size, int) else len(kernel_size)
  if not 1 <= rank <= 3 or inputs_ndim != rank + 2:
    raise ValueError(f"{kernel_size=} needs inputs of shape [batch, *spatial, channels] with "
                     f"1 to 3 spatial axes matching it; got an input of rank {inputs_ndim}.")
  return rank


def rpb_shape(num_heads: int, kernel_size: Sequence[int]) -> tuple[int, ...]:
  """Shape of NATTEN's relative positional bias: ``[heads, 2*K0-1, 2*K1-1, ...]``."""
  return (num_heads, *(2 * k - 1 for k in kernel_size))


def window_args(rank: int, kernel_size, stride, dilation, is_causal) -> dict[str, tuple]:
  """The op's window arguments with one entry per spatial axis (ints broadcast)."""
  return dict(kernel_size=_checks.per_axis(kernel_size, rank, "kernel_size"),
              stride=_checks.per_axis(stride, rank, "stride"),
              dilation=_checks.per_axis(dilation, rank, "dilation"),
              is_causal=_checks.per_axis(is_causal, rank, "is_causal", kind=bool))


def attention(query: Array, key: Array, value: Array, rpb: Array | None, *,
              window: dict[str, tuple], scale: float, backend: str | None,
              weight_dropout: Callable[[Array], Array] | None = None) -> Array:
  """Neighborhood attention on ``[B, *spatial, H, D]``, fused unless weights need dropout.

  NATTEN's modules applied dropout to the softmax weights, which only the unfused
  ``na*d_qk`` → softmax → ``na*d_av`` path exposes; without dropout the fused op is used.
  """
  rank = len(window["kernel_size"])
  fused, qk, av = (getattr(ops, f"na{rank}d{suffix}") for suffix in ("", "_qk", "_av"))
  if rpb is not None:
    # Every backend adds the bias to float32 logits; keep it in float32 whatever the dtype.
    rpb = rpb.astype(jnp.float32)
  if weight_dropout is None:
    return fused(query, key, value, **window, scale=scale, rpb=rpb, backend=backend)
  logits = qk(query * jnp.asarray(scale, query.dtype), key, **window, rpb=rpb, backend=backend)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return av(weight_dropout(weights).astype(value.dtype), value, **window, backend=backend)


def self_attention(inputs: Array, *, num_heads: int, window: dict[str, tuple],
                   qkv: Callable[[Array], Array],
                   attend: Callable[[Array, Array, Array], Array],
                   proj: Callable[[Array], Array]) -> Array:
  """``proj(attend(qkv(inputs)))`` on ``[B, *spatial, C]``, padding small inputs.

  An input smaller than ``kernel_size * dilation`` along an axis is zero-padded at the end
  of that axis before the projection and cropped after attention, as the original NAT
  code does (so the padded tokens, projected zeros, take part as keys).
  """
  batch, *spatial, channels = inputs.shape
  if channels % num_heads:
    raise ValueError(f"The channel count {channels} must be divisible by {num_heads=}.")
  pads = [max(0, k * d - s)
          for k, d, s in zip(window["kernel_size"], window["dilation"], spatial)]
  x = jnp.pad(inputs, [(0, 0)] + [(0, p) for p in pads] + [(0, 0)]) if any(pads) else inputs
  padded = x.shape[1:-1]
  q, k, v = jnp.unstack(qkv(x).reshape(batch, *padded, 3, num_heads, channels // num_heads),
                        axis=-3)
  out = attend(q, k, v).reshape(batch, *padded, channels)
  return proj(out[(slice(None),) + tuple(slice(0, s) for s in spatial)])


def head_scale(qk_scale: float | None, head_dim: int) -> float:
  """The logit scale: ``qk_scale`` if given, else ``head_dim ** -0.5``."""
  return head_dim ** -0.5 if qk_scale is None else qk_scale


def dropout(x: Array, rate: float, rng: Array,
            mask_shape: Sequence[int] | None = None) -> Array:
  """Inverted dropout: zeroes entries with probability ``rate``, rescales the rest.

  Args:
    x: the array.
    rate: drop probability.
    rng: PRNG key of the mask.
    mask_shape: shape of the mask, broadcast against ``x``; default ``x.shape`` (each
      element on its own). ``(batch, 1, ..., 1)`` drops whole samples (stochastic depth).
  """
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape if mask_shape is None else mask_shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class NeighborhoodAttention(nn.Module):
  """Multi-head neighborhood self-attention (NATTEN's module) for 1D, 2D and 3D inputs.

  Inputs are channels-last ``[batch, *spatial, channels]``; the spatial rank is the length
  of ``kernel_size`` (or the input's, when it is an int). Each query attends to the
  ``kernel_size`` window of keys around it (see ``jnat.na2d``). Parameters, named as in
  NATTEN: ``qkv`` (Dense, channels → 3·channels, split as ``[3, heads, head_dim]``),
  ``proj`` (Dense) and, with ``rel_pos_bias``, ``rpb`` of shape ``[heads, 2K0-1, ...]``.

  Attributes:
    num_heads: number of attention heads; must divide the channel count.
    kernel_size: window size, an int or one per spatial axis.
    stride: query stride (NATTEN 0.20+ semantics), int or per axis.
    dilation: window dilation, int or per axis.
    is_causal: causal masking, bool or per axis.
    qkv_bias: whether the ``qkv`` projection has a bias.
    rel_pos_bias: whether to learn a relative positional bias ``rpb`` (NATTEN's default
      is off; NAT and DiNAT turn it on).
    qk_scale: logit scale; ``head_dim ** -0.5`` when None.
    attn_drop: dropout rate on the attention weights.
    proj_drop: dropout rate on the output.
    deterministic: disables dropout; may also be passed to ``__call__``.
    dtype: computation dtype (inferred from inputs and parameters when None).
    param_dtype: parameter dtype.
    kernel_init: initializer of the projection kernels.
    bias_init: initializer of the projection biases.
    rpb_init: initializer of ``rpb``.
    backend: op backend (``"tiled"``, ``"xla"``, ``"cpu"``, ``"cuda"``); None: the platform's
      default.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import jnat
    >>> layer = jnat.NeighborhoodAttention(num_heads=4, kernel_size=(7, 7),
    ...                                    rel_pos_bias=True)
    >>> x = jnp.ones((2, 14, 14, 64))
    >>> params = layer.init(jax.random.key(0), x)
    >>> layer.apply(params, x).shape
    (2, 14, 14, 64)
  """

  num_heads: int
  kernel_size: int | Sequence[int]
  stride: int | Sequence[int] = 1
  dilation: int | Sequence[int] = 1
  is_causal: bool | Sequence[bool] = False
  qkv_bias: bool = True
  rel_pos_bias: bool = False
  qk_scale: float | None = None
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  deterministic: bool | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  rpb_init: Initializer = trunc_normal_init
  backend: str | None = None

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool | None = None) -> Array:
    """Applies neighborhood self-attention.

    Args:
      inputs: ``[batch, *spatial, channels]``.
      deterministic: if True, no dropout; if False, dropout draws from the ``'dropout'``
        rng. Falls back to the attribute of the same name; needed (in one of the two
        places) only when a dropout rate is non-zero.

    Returns:
      ``[batch, *spatial, channels]``, in ``dtype``.
    """
    window = self._window(resolve_rank(self.kernel_size, inputs.ndim))
    # As in nn.MultiHeadDotProductAttention, the flag is only required when it matters.
    deterministic = (nn.merge_param("deterministic", self.deterministic, deterministic)
                     if self.attn_drop > 0 or self.proj_drop > 0 else True)
    channels = inputs.shape[-1]
    dense = lambda features, use_bias, name: nn.Dense(
        features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init, name=name)
    rpb = (self.param("rpb", self.rpb_init, rpb_shape(self.num_heads, window["kernel_size"]),
                      self.param_dtype) if self.rel_pos_bias else None)
    out = self_attention(
        inputs, num_heads=self.num_heads, window=window,
        qkv=dense(3 * channels, self.qkv_bias, "qkv"),
        attend=lambda q, k, v: self.attend(q, k, v, rpb, deterministic),
        proj=dense(channels, True, "proj"))
    return nn.Dropout(self.proj_drop)(out, deterministic=deterministic)

  def attend(self, query: Array, key: Array, value: Array, rpb: Array | None,
             deterministic: bool) -> Array:
    """The attention core on heads-last ``[batch, *spatial, heads, head_dim]`` tensors.

    A method of its own so that tools such as ``jnat.flops`` can intercept it.
    """
    weight_dropout = None
    if self.attn_drop > 0 and not deterministic:
      rng = self.make_rng("dropout")
      weight_dropout = lambda w: dropout(w, self.attn_drop, rng)
    return attention(query, key, value, rpb, window=self._window(query.ndim - 3),
                     scale=head_scale(self.qk_scale, query.shape[-1]), backend=self.backend,
                     weight_dropout=weight_dropout)

  def _window(self, rank: int) -> dict[str, tuple]:
    return window_args(rank, self.kernel_size, self.stride, self.dilation, self.is_causal)
